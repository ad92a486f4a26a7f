"""
A cluster (SPEC 11.3, issue 15): two real nodes, MX hosts of sender.test,
sharing one PostgreSQL database (the C{postgres} fixture's private
cluster).  The receiver is played by hand from 127.0.0.3, the address of
receiver.test's MX, so every RETR and every transfer is counted.

    mx1.sender.test  127.0.0.2      mx2.sender.test  127.0.0.5
"""

from __future__ import annotations

import os
import secrets
import select
import smtplib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from twisted.internet.task import Clock

from pullmail.ids import new_gdel_id
from pullmail.storage.outbox import NOTIFIED, OutboxEntry
from pullmail.storage.postgresql.database import Database
from pullmail.storage.postgresql.outbox import PostgresOutbox

from .harness import NodeFactory, RawSMTP, submit, wait_until
from .test_general_delivery import FakeMX, message, serve_turn
from .world import ALICE, BOB, PASSWORD, RECEIVER_IP, RECORDS

MX1, MX2 = "127.0.0.2", "127.0.0.5"
CLUSTER_RECORDS = {
    **RECORDS,
    "sender.test": {"A": [MX1], "MX": [[10, "mx1.sender.test"], [10, "mx2.sender.test"]],
                    "TXT": [f"v=spf1 ip4:{MX1} ip4:{MX2} -all"]},
    "mx1.sender.test": {"A": [MX1]},
    "mx2.sender.test": {"A": [MX2]},
}
LEASE = "3s"
# RETRs sent in parallel to both nodes; RACE_RETRS=1000 for the full run.
RACE = int(os.environ.get("RACE_RETRS", "200"))


@pytest.fixture
def cluster_dns(tmp_path, dns_port):
    from .harness import DNSServer

    with DNSServer(tmp_path / "dns", CLUSTER_RECORDS, dns_port) as server:
        yield server


class Cluster:
    """Two nodes of sender.test over one database; the database's own handle."""

    def __init__(self, tmp_path, dns, dsn: str) -> None:
        self.factory = NodeFactory(tmp_path)
        self.dsn = dsn
        self.dns = dns
        self.database = Database(dsn)
        self.database.open()

    def node(self, name: str, address: str, dsn: str | None = None):
        settings = {
            "dns": {"nameservers": [self.dns.nameserver], "timeout": "2s"},
            "store": {"backend": "postgresql", "dsn": dsn or self.dsn, "lease": LEASE},
            "retrieval": {"schedule": ["0s", "2s", "4s", "8s"]},
            "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"},
            # The race answers many 550s to one address: no tarpit, no block.
            "limits": {"retr_tarpit_max": "0s", "retr_fail_limit": 1000000,
                       "idle_timeout": "30s"},
        }
        return self.factory(name, address, ["sender.test"], f"{name}.sender.test",
                            users={ALICE: PASSWORD}, settings=settings)

    def add_notified(self, count: int) -> list[str]:
        """Entries for bob@receiver.test, notified, as a node would store them."""
        outbox = PostgresOutbox(self.database, "test", 300.0, Clock(), lambda e: e.expires)
        ids = []
        for _ in range(count):
            gdel_id = new_gdel_id()
            outbox.add([OutboxEntry(
                id=gdel_id, queue_id="Q" + gdel_id[:10], sender=ALICE, domain="receiver.test",
                recipients=[BOB], created=1e9, size=100, state=NOTIFIED, expires=9e9,
            )], [message(gdel_id)])
            ids.append(gdel_id)
        return ids

    def rows(self) -> int:
        with self.database.transaction() as cursor:
            cursor.execute("SELECT count(*) FROM outbox")
            return cursor.fetchone()[0]

    def close(self) -> None:
        self.factory.close()
        self.database.close()


@pytest.fixture
def cluster(tmp_path, cluster_dns, pg_dsn):
    made = Cluster(tmp_path, cluster_dns, pg_dsn)
    try:
        yield made
    finally:
        made.close()


def retrieve(node_address: str, gdel_id: str, answer_end: bool = True):
    """One RETR from the receiver's MX; on 250 the turn is served.  (code, data)."""
    with RawSMTP(node_address, source=RECEIVER_IP, timeout=20) as client:
        client.ehlo("mx.receiver.test")
        code, texts = client.command(f"RETR {gdel_id}")
        if code != 250:
            return code, texts
        _, data = serve_turn(client, answer_end=answer_end)
        if answer_end:
            client.expect("QUIT", 221)
        return code, data


def test_retr_at_either_mx_is_served_once(cluster):
    """
    The message submitted at mx1 and notified from there is retrieved at
    mx2: any node finds any node's message; then neither node has it.
    """
    mx1, mx2 = cluster.node("mx1", MX1), cluster.node("mx2", MX2)
    fake = FakeMX()
    fake.start()
    try:
        token = "cluster-" + secrets.token_hex(6)
        assert submit(mx1, ALICE, PASSWORD, [BOB], message(token)) == {}
        match = mx1.wait_log(r"pull attempt ([A-Za-z0-9_-]+) .*accepted", 10)
        gdel_id = match.group(1)
    finally:
        fake.close()
    code, data = retrieve(MX2, gdel_id)
    assert code == 250 and f"END {token}".encode() in data, (code, data)
    mx2.wait_log(rf"retrieved {gdel_id} .* accepted \['{BOB}'\]", 5)
    wait_until(lambda: cluster.rows() == 0, 5, message="the row removed")
    assert retrieve(MX1, gdel_id)[0] == 550
    assert retrieve(MX2, gdel_id)[0] == 550


def test_two_nodes_race_on_retrs(cluster):
    """Every id RETRed at both nodes at once: exactly one transfer per id."""
    cluster.node("mx1", MX1)
    cluster.node("mx2", MX2)
    ids = cluster.add_notified(RACE)
    transfers: dict[str, int] = {gdel_id: 0 for gdel_id in ids}
    lock = threading.Lock()
    codes: list[int] = []

    def one(job):
        gdel_id, address = job
        code, data = retrieve(address, gdel_id)
        with lock:
            codes.append(code)
            if code == 250:
                assert f"END {gdel_id}".encode() in data
                transfers[gdel_id] += 1

    jobs = [(gdel_id, address) for gdel_id in ids for address in (MX1, MX2)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, jobs))
    assert set(codes) <= {250, 451, 550}, sorted(set(codes))
    assert [i for i, n in transfers.items() if n != 1] == [], (
        f"ids not transferred exactly once: {[n for n in transfers.values() if n != 1][:20]}")
    wait_until(lambda: cluster.rows() == 0, 10, message="every row removed")


def test_node_killed_mid_retr_loses_its_claim(cluster):
    """SIGKILL mid-turn: the other node serves the RETR once the lease ran out."""
    mx1, _ = cluster.node("mx1", MX1), cluster.node("mx2", MX2)
    [gdel_id] = cluster.add_notified(1)
    client = RawSMTP(MX1, source=RECEIVER_IP, timeout=20)
    try:
        client.ehlo("mx.receiver.test")
        assert client.command(f"RETR {gdel_id}")[0] == 250
        assert client.read_line().startswith(b"MAIL FROM")
        mx1.kill()
    finally:
        client.close()
    code, texts = retrieve(MX2, gdel_id)
    assert code == 451, (code, texts)   # the dead node's lease still runs
    code, data = wait_until(lambda: (lambda r: r if r[0] == 250 else None)(
        retrieve(MX2, gdel_id)), 15, interval=0.5, message="the lease ran out")
    assert f"END {gdel_id}".encode() in data
    wait_until(lambda: cluster.rows() == 0, 5, message="the row removed")


def gdel(address: str, gdel_id: str) -> tuple[int, list[str]]:
    """A bare GDEL notification from receiver.test's address (its SPF passes)."""
    with RawSMTP(address, source=RECEIVER_IP, timeout=20) as client:
        client.ehlo("receiver.test")
        return client.command(f"GDEL {gdel_id}")


def assert_store_refused(node, stored: str) -> None:
    """A submission, a GDEL and a RETR at C{node} get 451 4.3.0: its store is out of reach."""
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(node, ALICE, PASSWORD, [BOB], message("while-down"))
    assert refused.value.smtp_code == 451, refused.value
    assert refused.value.smtp_error.startswith(b"4.3.0"), refused.value
    code, texts = gdel(node.address, new_gdel_id())
    assert code == 451 and texts[0].startswith("4.3.0"), (code, texts)
    code, texts = retrieve(node.address, stored)
    assert code == 451 and texts[0].startswith("4.3.0"), (code, texts)


def test_database_stopped_mid_run(cluster, postgres):
    """
    PostgreSQL stops: submissions, GDEL and RETR get 451 4.3.0, never 250
    for what was not committed; once it is back, everything resumes.
    """
    mx1 = cluster.node("mx1", MX1)
    [stored] = cluster.add_notified(1)
    postgres.stop()
    try:
        assert_store_refused(mx1, stored)
    finally:
        postgres.start()
    fake = FakeMX()
    fake.start()
    try:
        def submitted():
            try:
                return submit(mx1, ALICE, PASSWORD, [BOB], message("after")) == {}
            except smtplib.SMTPDataError:
                return False

        wait_until(submitted, 20, interval=0.5, message="submissions accepted again")
        mx1.wait_log(r"pull attempt \S+ .*accepted", 10)
    finally:
        fake.close()
    assert gdel(MX1, new_gdel_id())[0] == 250
    code, data = retrieve(MX1, stored)
    assert code == 250 and f"END {stored}".encode() in data


class CuttableProxy(threading.Thread):
    """A TCP relay to the database that can be cut: one node's connection lost."""

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                inside.close()
                continue
            outside = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [inside, outside]
            threading.Thread(target=self._pump, args=(inside, outside), daemon=True).start()

    def _pump(self, one: socket.socket, two: socket.socket) -> None:
        try:
            while not self.cut.is_set():
                ready, _, _ = select.select([one, two], [], [], 0.2)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (two if source is one else one).sendall(data)
        except OSError:
            return
        finally:
            one.close()
            two.close()

    def sever(self) -> None:
        self.cut.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sever()
        self.listener.close()


def test_one_node_losing_the_database(cluster, postgres):
    """mx2 loses its database connection: it answers 451, and mx1 serves everything."""
    proxy = CuttableProxy(postgres.port)
    proxy.start()
    try:
        cluster.node("mx1", MX1)
        cluster.node("mx2", MX2, dsn=f"postgresql://pullmail@127.0.0.1:{proxy.port}/pullmail")
        ids = cluster.add_notified(6)
        assert retrieve(MX2, ids[0])[0] == 250
        proxy.sever()
        for gdel_id in ids[1:3]:
            code, texts = retrieve(MX2, gdel_id)
            assert code == 451 and texts[0].startswith("4.3.0"), (code, texts)
        for gdel_id in ids[1:]:
            code, data = retrieve(MX1, gdel_id)
            assert code == 250 and f"END {gdel_id}".encode() in data
        wait_until(lambda: cluster.rows() == 0, 5, message="every row removed")
    finally:
        proxy.close()


def test_receiver_retrieves_from_the_other_node_when_the_notifier_died(cluster):
    """
    A real receiving node: mx1 notifies it and is killed before the RETR;
    the receiver falls back to mx2 (an MX of sender.test that passes SPF,
    SPEC 4), which serves the message from the shared database.  One copy.
    """
    mx1, mx2 = cluster.node("mx1", MX1), cluster.node("mx2", MX2)
    receiver = cluster.factory(
        "receiver", RECEIVER_IP, ["receiver.test"], "mx.receiver.test",
        users={BOB: PASSWORD}, settings={
            "dns": {"nameservers": [cluster.dns.nameserver], "timeout": "2s"},
            "retrieval": {"schedule": ["3s", "6s", "12s"]},
            "delivery": {"connect_timeout": "2s"}})
    token = "failover-" + secrets.token_hex(6)
    assert submit(mx1, ALICE, PASSWORD, [BOB], message(token)) == {}
    gdel_id = mx1.wait_log(r"pull attempt ([A-Za-z0-9_-]+) .*accepted", 10).group(1)
    mx1.kill()
    copies = receiver.wait_delivered(BOB, 1, timeout=30)
    assert len([c for c in copies if f"END {token}".encode() in c]) == 1
    mx2.wait_log(rf"retrieved {gdel_id} .* accepted \['{BOB}'\]", 10)
    wait_until(lambda: cluster.rows() == 0, 5, message="the row removed")


def test_a_node_starts_while_the_database_is_down(cluster, postgres):
    """
    PostgreSQL stopped before the node starts: the node starts and listens
    all the same; a submission for a remote domain and a GDEL get 451
    4.3.0, mail for a local mailbox is delivered; the log says why.  Once
    the database is back the node connects, checks the schema, loads the
    cluster's rows, and serves them.
    """
    [stored] = cluster.add_notified(1)
    postgres.stop()
    try:
        mx1 = cluster.node("mx1", MX1)
        mx1.wait_log(r"the database is out of reach .*answering 451 4\.3\.0", 10)
        assert_store_refused(mx1, stored)
        assert submit(mx1, ALICE, PASSWORD, [ALICE], message("local")) == {}
        mx1.wait_delivered(ALICE)
    finally:
        postgres.start()
    mx1.wait_log(r"the database answers \(schema checked, stores loaded\)", 20)
    code, data = retrieve(MX1, stored)
    assert code == 250 and f"END {stored}".encode() in data
    assert gdel(MX1, new_gdel_id())[0] == 250
    wait_until(lambda: cluster.rows() == 0, 5, message="the row removed")


def test_a_node_started_without_the_database_still_refuses_an_unknown_schema(cluster,
                                                                              postgres):
    """The database it reaches later has no pullmail schema: the node stops, saying why."""
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS pullmail_noschema")
        connection.execute("CREATE DATABASE pullmail_noschema")
    proxy = CuttableProxy(postgres.port)
    proxy.cut.set()   # connections refused: the database is out of reach
    proxy.start()
    try:
        mx1 = cluster.node(
            "mx1", MX1, dsn=f"postgresql://pullmail@127.0.0.1:{proxy.port}/pullmail_noschema")
        mx1.wait_log(r"the database is out of reach", 10)
        assert mx1.running()
        proxy.cut.clear()
        mx1.wait_log(r"refusing to run: the database has no pullmail schema: run "
                     r"`pullmail initdb", 20)
        wait_until(lambda: not mx1.running(), 10, message="the node stopped")
    finally:
        proxy.close()
