"""
Tests for the PostgreSQL backend (SPEC 11.3) against a real, private
PostgreSQL cluster (the C{postgres} fixture): the versioned schema and
C{pullmail initdb}, the [store] keys, leases and fencing between two
nodes' stores on injected clocks, and the database out of reach.
"""

from __future__ import annotations

import io

import psycopg
import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pullmail import config as configuration
from pullmail.interfaces import IOutbox, IPendingStore
from pullmail.node import cli
from pullmail.storage.outbox import NOTIFIED, QUEUED
from pullmail.storage.pending import PENDING, PendingStore
from pullmail.storage.postgresql import schema
from pullmail.storage.postgresql.database import Database, StoreUnavailable
from pullmail.storage.postgresql.outbox import PostgresOutbox
from pullmail.storage.postgresql.pending import PostgresPending
from pullmail.testing import make_entry
from tests.test_pending import _notification

ID1 = "First_entry_id_00001"
ID2 = "Second_entry_id_0002"
MESSAGE = [b"Subject: hi\r\n", b"\r\nbody\r\n"]
LEASE = 300.0


@pytest.fixture
def database(pg_database):
    return pg_database


def _clock(at: float = 1000.0) -> Clock:
    clock = Clock()
    clock.advance(at)
    return clock


def _node(database, name: str, clock: Clock | None = None) -> PostgresOutbox:
    outbox = PostgresOutbox(database, name, LEASE, clock or _clock(),
                            lambda entry: entry.next_attempt if entry.state == QUEUED
                            else entry.expires)
    outbox.load()
    return outbox


def _row(database, entry_id: str) -> tuple:
    with database.transaction() as cursor:
        cursor.execute("SELECT record->>'state', record->'recipients', taken, taken_by,"
                       " generation FROM outbox WHERE id = %s", (entry_id,))
        return cursor.fetchone()


# -- schema and initdb ----------------------------------------------------------------


@pytest.fixture
def empty_database(postgres):
    """A database of its own with no schema."""
    admin = postgres.dsn
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS pullmail_empty")
        connection.execute("CREATE DATABASE pullmail_empty")
    return admin.rsplit("/", 1)[0] + "/pullmail_empty"


def test_check_refuses_a_database_without_the_schema(empty_database) -> None:
    with psycopg.connect(empty_database) as connection, connection.cursor() as cursor:
        with pytest.raises(schema.SchemaError, match="run `pullmail initdb"):
            schema.check(cursor)


def test_initdb_creates_then_changes_nothing(empty_database) -> None:
    """SPEC 11.3: initdb is idempotent, and records the version it made."""
    with psycopg.connect(empty_database) as connection:
        assert schema.initdb(connection) == (0, schema.SCHEMA_VERSION)
        assert schema.initdb(connection) == (schema.SCHEMA_VERSION, schema.SCHEMA_VERSION)
        with connection.cursor() as cursor:
            schema.check(cursor)
            cursor.execute("SELECT count(*) FROM pullmail_schema")
            assert cursor.fetchone()[0] == 1


def test_a_newer_schema_is_refused(empty_database) -> None:
    """A node refuses to start on a schema version it does not know."""
    with psycopg.connect(empty_database) as connection:
        schema.initdb(connection)
        connection.execute("UPDATE pullmail_schema SET version = 99")
        connection.commit()
        with connection.cursor() as cursor, pytest.raises(schema.SchemaError,
                                                          match="version 99, newer"):
            schema.check(cursor)
        with pytest.raises(schema.SchemaError):
            schema.initdb(connection)


def _config_file(tmp_path, dsn: str, backend: str = "postgresql"):
    path = tmp_path / "pullmail.toml"
    path.write_text(f'[node]\nstate_dir = "var"\n[store]\nbackend = "{backend}"\n'
                    f'dsn = "{dsn}"\nlease = "30s"\n')
    return str(path)


def _main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(argv, out=out), out.getvalue()


def test_initdb_command(empty_database, tmp_path) -> None:
    config = _config_file(tmp_path, empty_database)
    assert _main(["initdb", "--config", config]) == (
        0, f"schema created: version {schema.SCHEMA_VERSION}\n")
    assert _main(["initdb", "--config", config]) == (
        0, f"schema is up to date (version {schema.SCHEMA_VERSION})\n")


def test_initdb_command_needs_the_postgresql_backend(tmp_path, capsys) -> None:
    assert cli.main(["initdb", "--config", _config_file(tmp_path, "", "files")]) == 1
    assert "not \"postgresql\"" in capsys.readouterr().err


def test_node_refuses_to_start_without_the_schema(empty_database, tmp_path) -> None:
    from twisted.python import usage

    from pullmail.node.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match="store.dsn: .*pullmail initdb"):
        options.parseOptions(["--config", _config_file(tmp_path, empty_database)])


# -- [store] -------------------------------------------------------------------------------


@pytest.mark.parametrize("store, key", [
    ({"backend": "sqlite"}, "store.backend"),
    ({"backend": "postgresql"}, "store.dsn"),
    ({"backend": "postgresql", "dsn": "  "}, "store.dsn"),
    ({"lease": "soon"}, "store.lease"),
    ({"lease": "0s"}, "store.lease"),
])
def test_store_config_errors_name_the_key(store, key, tmp_path) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.parse({"store": store}, tmp_path)
    assert raised.value.option == key


def test_store_defaults(tmp_path) -> None:
    """The files backend stays the embedded default."""
    store = configuration.embedded_default(tmp_path).store
    assert (store.backend, store.dsn, store.lease) == ("files", "", 300.0)


# -- interfaces ------------------------------------------------------------------------------


def test_stores_provide_their_interfaces(database, tmp_path) -> None:
    assert verifyObject(IOutbox, _node(database, "mx1.example"))
    assert verifyObject(IPendingStore, PostgresPending(database, "mx1.example", LEASE, Clock()))
    assert verifyObject(IPendingStore, PendingStore(tmp_path))


# -- claims, leases and fencing (two nodes, two clocks) --------------------------------------


def test_a_claim_holds_for_its_lease(database) -> None:
    """SPEC 11.3: another node cannot take a transfer while its lease runs."""
    one_clock, two_clock = _clock(), _clock()
    one = _node(database, "mx1.example", one_clock)
    one.add([make_entry(id=ID1, state=NOTIFIED, expires=99999.0)], MESSAGE)
    two = _node(database, "mx2.example", two_clock)
    assert one.claim(ID1) is not None
    two_clock.advance(LEASE - 1)
    assert two.claim(ID1) is None
    two_clock.advance(2)
    assert two.claim(ID1) is not None


def test_a_node_back_after_its_lease_cannot_complete(database) -> None:
    """
    Fencing: a node whose lease ran out, and whose transfer another node
    has claimed since, can neither complete (remove), update nor release
    it; it forgets the entry instead.
    """
    one_clock, two_clock = _clock(), _clock()
    one = _node(database, "mx1.example", one_clock)
    one.add([make_entry(id=ID1, state=NOTIFIED, expires=99999.0,
                        recipients=["a@r.example", "b@r.example"])], MESSAGE)
    two = _node(database, "mx2.example", two_clock)
    stale = one.claim(ID1)
    two_clock.advance(LEASE + 1)
    fresh = two.claim(ID1)
    assert fresh is not None
    generation = _row(database, ID1)[4]
    stale.recipients = ["b@r.example"]
    one.update(stale)
    assert one.get(ID1) is None   # forgotten: another node has it
    assert _row(database, ID1) == ("notified", ["a@r.example", "b@r.example"], "retr",
                                   "mx2.example", generation)
    one._merge(stale, generation - 1)   # as if it still believed it held it
    one.release(ID1)
    one._merge(stale, generation - 1)
    one.remove(ID1)
    assert _row(database, ID1)[2:] == ("retr", "mx2.example", generation)
    two.remove(ID1)
    assert _row(database, ID1) is None


def test_due_work_is_taken_by_one_node(database) -> None:
    """Exactly one node takes an entry that came due; the other gets None and forgets it."""
    one, two = _node(database, "mx1.example"), _node(database, "mx2.example")
    one.add([make_entry(id=ID1, next_attempt=500.0)], MESSAGE)
    two.load()
    taken = [one.take(ID1), two.take(ID1)]
    results = [d.result for d in taken]
    assert sum(r is not None for r in results) == 1
    assert two.get(ID1) is None or one.get(ID1) is None


def test_take_returns_the_row_as_another_node_left_it(database) -> None:
    one, two = _node(database, "mx1.example"), _node(database, "mx2.example")
    one.add([make_entry(id=ID1, next_attempt=500.0)], MESSAGE)
    two.load()
    entry = one.take(ID1).result
    entry.state, entry.expires = NOTIFIED, 5000.0
    one.update(entry)   # the work is done: the row is free again
    fresh = two.take(ID1).result
    assert fresh is two.get(ID1)
    assert (fresh.state, fresh.expires) == (NOTIFIED, 5000.0)


def test_a_node_may_claim_an_entry_waiting_in_its_own_line(database) -> None:
    """A RETR for an entry this node took for due work but has not sent yet."""
    one, two = _node(database, "mx1.example"), _node(database, "mx2.example")
    one.add([make_entry(id=ID1)], MESSAGE)
    assert one.take(ID1).result is not None
    assert two.claim(ID1) is None
    assert one.claim(ID1) is not None


def test_poll_renews_leases_and_releases_dead_claims(database) -> None:
    """A dead node's claim is released by a live node's poll once its lease ran out."""
    one_clock, two_clock = _clock(), _clock()
    one = _node(database, "mx1.example", one_clock)
    one.add([make_entry(id=ID1, state=NOTIFIED, expires=99999.0),
             make_entry(id=ID2, next_attempt=100.0)], MESSAGE)
    two = _node(database, "mx2.example", two_clock)
    one.claim(ID1)
    one_clock.advance(LEASE - 10)
    one.poll()   # renewed: holds until 1000 + 2 * LEASE - 10
    two_clock.advance(LEASE + 5)
    due, released = two.polled(two.poll())
    assert released == [] and [e.id for e in due] == [ID2]
    two_clock.advance(LEASE)
    due, released = two.polled(two.poll())
    assert [e.id for e in released] == [ID1] and not two.get(ID1).claimed
    assert two.claim(ID1) is not None


def test_a_restarted_node_releases_its_own_claims(database) -> None:
    one = _node(database, "mx1.example")
    one.add([make_entry(id=ID1)], MESSAGE)
    one.claim(ID1)
    assert _node(database, "mx2.example").claim(ID1) is None
    again = PostgresOutbox(database, "mx1.example", LEASE, _clock(), lambda e: None)
    assert again.load() == [ID1]


def test_message_bodies_are_stored_whole(database) -> None:
    one = _node(database, "mx1.example")
    body = [bytes(range(256)) * 400, b"\r\n.\r\n"]
    one.add([make_entry(id=ID1), make_entry(id=ID2)], body)
    assert _node(database, "mx2.example").read_message(ID2) == b"".join(body)


# -- the shared pending notifications -------------------------------------------------------


def _pending(database, name: str, clock: Clock) -> PostgresPending:
    store = PostgresPending(database, name, LEASE, clock)
    store.load()
    return store


def test_one_receiving_node_retrieves_each_id(database) -> None:
    """SPEC 11.3: of two RMTA nodes, one takes a due notification; the other cannot."""
    one_clock, two_clock = _clock(), _clock()
    one, two = _pending(database, "mx1.example", one_clock), _pending(database, "mx2.example",
                                                                      two_clock)
    notification = _notification()
    one.save(notification)
    assert two.find("sender.example", notification.gdel_id).result is not None
    first, second = one.take(notification.key).result, two.take(notification.key).result
    assert first is not None and second is None
    assert two.by_key(notification.key) is None


def test_a_stale_receiving_node_cannot_record_an_outcome(database) -> None:
    one_clock, two_clock = _clock(), _clock()
    one, two = _pending(database, "mx1.example", one_clock), _pending(database, "mx2.example",
                                                                      two_clock)
    one.save(_notification())
    key = _notification().key
    stale = one.take(key).result
    two_clock.advance(LEASE + 1)
    fresh = two.take(key).result
    assert fresh is not None
    stale.attempts = 7
    one.save(stale)   # refused: forgotten here
    assert one.by_key(key) is None
    with database.transaction() as cursor:
        cursor.execute("SELECT record->>'attempts', taken_by FROM pending")
        assert cursor.fetchall() == [("0", "mx2.example")]
    fresh.state = PENDING
    two.save(fresh)
    assert _pending(database, "mx3.example", _clock()).take(key).result is not None


# -- the database out of reach ---------------------------------------------------------------


def test_an_unreachable_database_is_an_oserror(postgres) -> None:
    """Whatever answers a client then says 451 4.3.0, never 250 (SPEC 11.3)."""
    from tests.integration.harness import free_port

    database = Database(f"postgresql://pullmail@127.0.0.1:{free_port()}/pullmail",
                        timeout=0.5)
    database.open()
    try:
        with pytest.raises(StoreUnavailable) as raised:
            with database.transaction() as cursor:
                cursor.execute("SELECT 1")
        assert isinstance(raised.value, OSError)
        from pullmail.smtp import replies

        assert replies.storage_failure(raised.value) == replies.S451_LOCAL_ERROR
    finally:
        database.close()


def test_cluster_queue_from_any_node(database, tmp_path, pg_dsn) -> None:
    """`pullmail queue` lists, flushes and deletes the cluster's entries from the database."""
    one = _node(database, "mx1.example")
    one.add([make_entry(id=ID1, next_attempt=5e9), make_entry(id=ID2)], MESSAGE)
    config = _config_file(tmp_path, pg_dsn)
    code, out = _main(["queue", "--config", config, "--json"])
    assert code == 0
    assert ID1 in out and ID2 in out and '"domain"' in out
    assert _main(["queue", "--config", config, "--flush"])[0] == 0
    assert _node(database, "mx2.example").get(ID1).next_attempt < 5e9
    assert _main(["queue", "--config", config, "--delete", ID2])[0] == 0
    assert _row(database, ID2) is None
    assert cli.main(["queue", "--config", config, "--delete", ID2]) == 1


# -- two nodes' delivery over one outbox (exactly one does each piece of work) -------------


class TwoNodes:
    """Two L{Outbound}s of one cluster on one clock, against one peer (test_delivery's)."""

    def __init__(self, database, tmp_path, gdel: bool = True) -> None:
        from pullmail.config import DeliveryConfig
        from pullmail.outbound.delivery import Outbound
        from pullmail.outbound.lifecycle import due_at
        from pullmail.testing import FakeNetwork, FakeResolver, run_blocking
        from tests.test_delivery import MX1, START, Peer

        self.clock = _clock(START)
        self.network = FakeNetwork(self.clock, source="192.0.2.10")
        resolver = FakeResolver(mx={"receiver.example": [(10, "mx1.receiver.example")]},
                                addresses={"mx1.receiver.example": [MX1]})
        self.peer = Peer(self.clock, gdel=gdel)
        self.network.listen(MX1, 25, self.peer.factory)
        config = DeliveryConfig(outbox_lifetime=48 * 3600.0)
        self.bounces: list[str] = []
        self.nodes = []
        for name in ("mx1.sender.example", "mx2.sender.example"):
            outbox = PostgresOutbox(database, name, LEASE, self.clock,
                                    lambda entry: due_at(entry, config))
            outbound = Outbound(
                outbox=outbox, resolver=resolver, connect=self.network, clock=self.clock,
                run_blocking=run_blocking, hostname=name, config=config,
                send_bounce=lambda sender, message, name=name: self.bounces.append(name))
            outbound.start()
            self.nodes.append(outbound)

    def poll(self) -> None:
        """Each node's poll (in the node: on a timer and at each NOTIFY)."""
        for outbound in self.nodes:
            outbound.cluster.polled(outbound.outbox.polled(outbound.outbox.poll()))

    def advance(self, seconds: float) -> None:
        self.network.advance(seconds)
        self.poll()
        self.network.settle()


def test_one_node_notifies_and_one_node_expires(database, tmp_path) -> None:
    """
    SPEC 11.3: a message queued at one node is notified once, although both
    nodes know it; at its expiry exactly one node bounces it, and it is gone.
    """
    from pullmail.testing import result_of
    from tests.test_delivery import BOB, MESSAGE, SENDER

    world = TwoNodes(database, tmp_path)
    one, two = world.nodes
    result_of(one.enqueue("QID1", SENDER, [BOB], MESSAGE))
    world.poll()   # the other node learns of it too
    world.network.settle()
    assert len(world.peer.notifications) == 1
    world.advance(3600.0)
    assert len(world.peer.notifications) == 1
    world.advance(48 * 3600.0)
    world.advance(60.0)
    assert len(world.bounces) == 1, world.bounces
    with database.transaction() as cursor:
        cursor.execute("SELECT count(*) FROM outbox")
        assert cursor.fetchone()[0] == 0


def test_one_node_pushes(database, tmp_path) -> None:
    """A message due at both nodes (one of them restarted) is pushed once."""
    from pullmail.testing import result_of
    from tests.test_delivery import BOB, MESSAGE, SENDER

    world = TwoNodes(database, tmp_path, gdel=False)
    one, two = world.nodes
    result_of(one.enqueue("QID1", SENDER, [BOB], MESSAGE))
    two.start()   # loads the row: due now on both nodes
    world.network.settle()
    world.advance(1.0)
    assert len(world.peer.deliveries) == 1
    assert world.bounces == []


def _cluster_world(database, tmp_path, **kw):
    """test_retrieval's World with two receiving nodes over one database."""
    from tests import test_retrieval as retrieval

    class ClusterWorld(retrieval.World):
        names = iter(["mx1.receiver.example", "mx2.receiver.example"])

        def new_retriever(self):
            self.store = PostgresPending(database, next(self.names), LEASE, self.clock)
            retriever = retrieval.Retriever(
                store=self.store, trust=self.trust, connect=self.connect, clock=self.clock,
                run_blocking=retrieval.run_blocking, hostname="mx.receiver.example",
                schedule=retrieval.SCHEDULE, remote_port=25, keep_for=48 * 3600.0,
                pending_per_origin=self.pending_per_origin, policy=self.policy,
                deliver=self.deliver)
            retriever.start()
            return retriever

    return ClusterWorld(tmp_path, **kw)


def test_two_receiving_nodes_retrieve_an_id_once(database, tmp_path) -> None:
    """
    SPEC 11.3: a notification taken at one RMTA node and known to the
    other (re-notified there, and found by its poll) is retrieved by one.
    """
    from tests import test_retrieval as retrieval

    world = _cluster_world(database, tmp_path)
    world.smta.hold()
    one = world.retriever
    two = world.retriever = world.new_retriever()
    assert world.notify().code == 250   # at node two
    one.polled(one.store.polled(one.store.poll()))   # node one learns of it
    assert one.store.by_key(two.store.by_key(next(iter(two.store)).key).key) is not None
    world.settle()
    world.advance(1.0)
    assert world.smta.retrs == [retrieval.GDEL_ID]
    assert len(world.deliveries) == 1
    assert world.notify().code == 250   # re-notified: fetched again (dropped at delivery)


def test_writes_refused_by_an_unreachable_database_are_retried_in_order() -> None:
    """A fenced write the database could not take is tried again, ahead of later ones."""
    from twisted.internet import defer

    from pullmail.storage.ordered import InOrder
    from pullmail.storage.postgresql.outbox import RETRY_WRITE, _retry_unavailable

    clock, done, failures = Clock(), [], [StoreUnavailable("down")]

    def run(function, *args):
        if failures:
            return defer.fail(failures.pop())
        return defer.maybeDeferred(function, *args)

    writes = InOrder(run, clock, _retry_unavailable)
    writes.submit(ID1, done.append, "first")
    writes.submit(ID1, done.append, "second")
    flushed = writes.flushed(ID1)
    assert done == [] and not flushed.called
    clock.advance(RETRY_WRITE)
    assert done == ["first", "second"] and flushed.called


def test_hold_and_release_in_the_cluster(database) -> None:
    """The listing's hold/release (``pullmail queue``) on the database, from any node."""
    from pullmail.storage.postgresql.outbox import hold_in_cluster

    one = _node(database, "mx1.example")
    one.add([make_entry(id=ID1, next_attempt=500.0)], MESSAGE)
    assert hold_in_cluster(database, ID1, True, 1000.0)
    with database.transaction() as cursor:
        cursor.execute("SELECT record->'held', due FROM outbox")
        assert cursor.fetchall() == [(True, None)]
    assert one.claim(ID1) is not None
    assert not hold_in_cluster(database, ID1, False, 1000.0)   # a node holds the row
    one.release(ID1)
    assert hold_in_cluster(database, ID1, False, 1000.0)
    assert _node(database, "mx2.example").poll()[0][0][0] == ID1   # due now: a poll finds it


# -- [limits] pending_per_origin, counted in the cluster ---------------------------------------


def test_pending_per_origin_counts_the_whole_cluster(database, tmp_path) -> None:
    """
    A peer's notifications at both receiving nodes count against one limit:
    the second node refuses the third (452 4.3.1), which is not stored.
    """
    from pullmail.smtp import replies

    world = _cluster_world(database, tmp_path, pending_per_origin=2)
    world.smta.hold()
    one = world.retriever
    two = world.retriever = world.new_retriever()
    world.retriever = one
    assert world.notify("Cluster_limit_id_0001").code == 250
    world.retriever = two
    assert world.notify("Cluster_limit_id_0002").code == 250
    assert world.notify("Cluster_limit_id_0003") == replies.S452_TOO_MANY_PENDING
    world.retriever = one
    assert world.notify("Cluster_limit_id_0003") == replies.S452_TOO_MANY_PENDING
    assert world.notify("Cluster_limit_id_0001").code == 250   # known: not counted again
    with database.transaction() as cursor:
        cursor.execute("SELECT gdel_id FROM pending ORDER BY gdel_id")
        assert [row[0] for row in cursor.fetchall()] == ["Cluster_limit_id_0001",
                                                         "Cluster_limit_id_0002"]


def test_pending_per_origin_holds_under_concurrent_inserts(database) -> None:
    """
    Many new notifications of one peer saved at once by two nodes' stores:
    exactly the limit are stored (the count and the insert are one step).
    """
    import threading

    from pullmail.storage.pending import TooManyPending
    from tests.test_pending import _notification

    stores = [_pending(database, name, _clock()) for name in ("mx1.example", "mx2.example")]
    stored, refused, go = [], [], threading.Barrier(16)

    def save(number: int) -> None:
        go.wait()
        try:
            stores[number % 2].save(_notification(f"Concurrent_id_{number:06d}"), limit=5)
            stored.append(number)
        except TooManyPending:
            refused.append(number)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (len(stored), len(refused)) == (5, 11)
    with database.transaction() as cursor:
        cursor.execute("SELECT count(*) FROM pending")
        assert cursor.fetchone()[0] == 5


# -- pullmail queue hold/release of a pending notification ---------------------------------------


def test_a_held_notification_is_not_retrieved_until_released(database, tmp_path) -> None:
    """
    ``pullmail queue hold`` of a pending notification in a cluster: no node
    retrieves it (the node whose timer comes lets the row go, due never);
    released, a node's poll finds it and it is retrieved once.
    """
    from pullmail.storage.postgresql.pending import hold_in_cluster
    from tests import test_retrieval as retrieval

    world = _cluster_world(database, tmp_path)
    world.smta.hold()
    one = world.retriever
    two = world.new_retriever()
    assert world.notify().code == 250   # at node one
    assert hold_in_cluster(database, retrieval.GDEL_ID, True, world.clock.seconds())
    world.settle()
    world.advance(3600.0)
    for node in (one, two):
        node.polled(node.store.polled(node.store.poll()))
    world.advance(3600.0)
    assert world.smta.retrs == []
    with database.transaction() as cursor:
        cursor.execute("SELECT record->'held', due, taken_by FROM pending")
        assert cursor.fetchall() == [(True, None, None)]
    assert hold_in_cluster(database, retrieval.GDEL_ID, False, world.clock.seconds())
    for node in (two, one):
        node.polled(node.store.polled(node.store.poll()))
    world.settle()
    world.advance(1.0)
    assert world.smta.retrs == [retrieval.GDEL_ID]
    assert len(world.deliveries) == 1


def test_queue_hold_and_release_a_pending_notification(database, tmp_path, pg_dsn) -> None:
    """The command, from any node: hold, listed as held, release; a taken row is not held."""
    import time

    from tests.test_pending import _notification

    store = _pending(database, "mx1.example", _clock(time.time()))
    notification = _notification(ID1)
    store.save(notification)
    config = _config_file(tmp_path, pg_dsn)
    assert _main(["queue", "--config", config, "hold", ID1]) == (0, f"held {ID1}\n")
    assert '"state": "held"' in _main(["queue", "--config", config, "--json"])[1]
    assert _main(["queue", "--config", config, "release", ID1])[0] == 0
    with database.transaction() as cursor:
        cursor.execute("SELECT record->'held', due FROM pending")
        assert cursor.fetchall() == [(False, notification.next_attempt)]
    assert store.take(notification.key).result is not None
    assert cli.main(["queue", "--config", config, "hold", ID1]) == 1   # being retrieved


def test_cluster_queue_shows_this_nodes_local_queue(database, tmp_path, pg_dsn) -> None:
    """The LMTP local queue is the node's own: listed and deleted from its files (no node)."""
    import json

    from pullmail.storage.outbox import MaildirOutbox

    config = _config_file(tmp_path, pg_dsn)
    local = MaildirOutbox(tmp_path / "var" / "local-queue")
    local.load()
    local.add([make_entry(id=ID2, recipients=["bob@example.org"])], MESSAGE)
    _node(database, "mx1.example").add([make_entry(id=ID1)], MESSAGE)
    document = json.loads(_main(["queue", "--config", config, "--json"])[1])
    assert sorted((m["id"], m["queue"]) for m in document["messages"]) == [
        (ID1, "push"), (ID2, "local")]
    assert _main(["queue", "--config", config, "--delete", ID2])[0] == 0
    assert not list((tmp_path / "var" / "local-queue" / "entries").iterdir())
    assert _row(database, ID1) is not None


def test_a_record_written_mid_retrieval_stays_taken(database) -> None:
    """
    The handover's mark (L{pullmail.pull.handover}) is written while the
    node retrieves: the row stays its own, so no other node takes it.
    """
    from tests.test_pending import _notification

    one_clock = _clock()
    one, two = _pending(database, "mx1.example", one_clock), _pending(database, "mx2.example",
                                                                      _clock())
    one.save(_notification())
    key = _notification().key
    taken = one.take(key).result
    taken.handed_over = 1000.0
    one.save(taken, keep_taken=True)
    with database.transaction() as cursor:
        cursor.execute("SELECT taken_by, record->'handed_over' FROM pending")
        assert cursor.fetchall() == [("mx1.example", 1000.0)]
    assert two.take(key).result is None
    taken.handed_over = 0.0
    one.save(taken)
    assert two.take(key).result is not None


def test_a_take_waits_for_the_nodes_own_writes(database) -> None:
    """
    A broken transfer's release and its "notify again" are still being
    written when the entry's due time comes and the node takes the row:
    the take reads the row after them, so the notification is not lost
    (the kill rounds once left an entry waiting for its expiry this way).
    """
    from tests.test_outbox import HeldRunner

    runner, clock = HeldRunner(), _clock()
    outbox = PostgresOutbox(database, "mx1.example", LEASE, clock,
                            lambda entry: None if entry.claimed else (
                                entry.renotify_at or entry.expires), run=runner)
    outbox.load()
    outbox.add([make_entry(id=ID1, state=NOTIFIED, expires=9e9)], MESSAGE)
    entry = outbox.claim(ID1)
    entry.renotify_at = 1000.0
    outbox.release(ID1)
    outbox.update(entry)
    taken = outbox.take(ID1)
    runner.run_all()
    assert taken.result is entry and entry.renotify_at == 1000.0
    with database.transaction() as cursor:
        cursor.execute("SELECT record->'renotify_at', due, taken FROM outbox")
        assert cursor.fetchall() == [(1000.0, 1000.0, "work")]
