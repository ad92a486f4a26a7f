"""
The operator's tools against real nodes (issue 16, SPEC 11.4): metrics
scraped and parsed with prometheus_client's own parser, ``pullmail
sendmail`` with the node down and up, ``pullmail queue`` hold / release /
delete / --json / shape on a running and a stopped node, ``pullmail doctor``
against the test DNS server, the state dir's lock, and the log formats.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import NodeError, submit, wait_until

ALICE = "alice@example.org"
PASSWORD = "s3cret"
METRICS_PORT = 9464


def message(subject: str, to: str = ALICE, extra: str = "") -> bytes:
    return (f"From: <{ALICE}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n{extra}\r\n"
            f"body of {subject}\r\n").encode()


def scrape(address: str, accept: str | None = None) -> tuple[str, str, float]:
    request = urllib.request.Request(f"http://{address}:{METRICS_PORT}/metrics")
    if accept:
        request.add_header("Accept", accept)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
        kind = response.headers["Content-Type"]
    return body, kind, time.perf_counter() - started


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def queue_document(node) -> dict:
    return json.loads(node.cli("queue", "--json").stdout)


def messages_of(node, queue: str | None = None) -> list[dict]:
    return [m for m in queue_document(node)["messages"] if queue is None or m["queue"] == queue]


# A remote domain whose only way out is a smarthost that refuses connections:
# mail for it stays in the push queue, retried in an hour.
STUCK = {"delivery": {"smarthost": "127.0.9.99:2525", "push_retry": ["1h"],
                      "connect_timeout": "2s"}}


@pytest.fixture
def metered(make_node):
    return make_node("metered", "127.0.9.1", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD},
                     settings={"metrics": {"listen": f"tcp:{METRICS_PORT}:interface=127.0.9.1"},
                               **STUCK})


# -- metrics -------------------------------------------------------------------------


def test_metrics_count_what_the_node_did(metered):
    assert submit(metered, ALICE, PASSWORD, [ALICE], message("local")) == {}
    assert submit(metered, ALICE, PASSWORD, ["bob@remote.test"],
                  message("out", "bob@remote.test")) == {}
    metered.wait_log(r"deferred \S+ \(\S+\) until", 10)
    metered.cli("sendmail", ALICE, input=b"Subject: cron\n\nhello\n")
    metered.wait_delivered(ALICE, 2)

    text, kind, _ = scrape(metered.address)
    assert kind.startswith("text/plain"), kind
    found = samples(text)
    accepted = "pullmail_messages_accepted_total"
    assert found[(accepted, (("service", "submission"),))] == 2
    assert found[(accepted, (("service", "sendmail"),))] == 1
    assert found[("pullmail_replies_total", (("code", "250"),))] >= 6   # EHLO, MAIL, RCPT...
    assert found[("pullmail_replies_total", (("code", "235"),))] == 2   # AUTH
    assert found[("pullmail_deliveries_total", (("result", "deferred"),))] == 1
    assert found[("pullmail_queue_messages", (("queue", "push"),))] == 1
    assert found[("pullmail_queue_messages", (("queue", "outbox"),))] == 0
    assert found[("pullmail_queue_messages", (("queue", "pending"),))] == 0
    assert ("pullmail_delivery_seconds_count", ()) in found
    # No label carries an address or a domain.
    for name, labels in found:
        for _, value in labels:
            assert "@" not in value and not re.search(r"\d+\.\d+\.\d+\.\d+", value), (name, value)


def test_openmetrics_when_asked(metered):
    text, kind, _ = scrape(metered.address, "application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text"), kind
    assert text.rstrip().endswith("# EOF")
    names = {family.name for family in text_string_to_metric_families(text.replace("# EOF", ""))}
    assert {"pullmail_queue_messages", "pullmail_delivery_seconds"} <= names


def test_queue_gauges_with_a_full_queue(metered):
    """
    300 queued entries show in the queue gauge, read from the in-memory
    indexes at each scrape.  (The scrape time under load is a benchmark
    figure, not an assertion: bench/README.md.)
    """
    for batch in range(3):
        recipients = [f"user{batch}x{i}@d{i}.remote.test" for i in range(100)]
        assert submit(metered, ALICE, PASSWORD, recipients, message(f"bulk{batch}")) == {}
    wait_until(lambda: samples(scrape(metered.address)[0]).get(
        ("pullmail_queue_messages", (("queue", "push"),))) == 300, 30,
        message=lambda: metered.diagnostics())
    times = [scrape(metered.address)[2] for _ in range(9)]
    print(f"scrape with 300 queued entries: median {statistics.median(times) * 1000:.1f} ms")
    assert samples(scrape(metered.address)[0])[
        ("pullmail_queue_messages", (("queue", "push"),))] == 300


# -- sendmail ------------------------------------------------------------------------


def test_sendmail_while_the_node_is_down(make_node):
    node = make_node("drop", "127.0.9.2", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD}, start=False)
    result = node.cli("sendmail", "-F", "Cron Daemon", ALICE,
                      input=b"Subject: nightly\n\nall is well\n.\nnot part of it\n")
    assert result.returncode == 0 and result.stderr == b""
    dropped = list((node.state_dir / "maildrop" / "new").iterdir())
    assert len(dropped) == 1
    node.start()
    [raw] = node.wait_delivered(ALICE, 1, timeout=15)
    assert b"Subject: nightly" in raw and b"all is well" in raw
    assert b"not part of it" not in raw          # a lone "." ended it (no -i)
    assert re.search(rb"From: \"Cron Daemon\" <root@mx\.example\.org>", raw), raw
    assert b"Message-ID: <" in raw and b"\r\nDate: " in raw
    wait_until(lambda: not list((node.state_dir / "maildrop" / "new").iterdir()), 5)


def test_sendmail_to_a_running_node(make_node):
    node = make_node("poke", "127.0.9.3", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD, "carol@example.org": PASSWORD})
    body = (b"From: Ops <ops@example.org>\nTo: alice@example.org\n"
            b"Bcc: carol@example.org\nSubject: -t\n\n.\nline after a dot\n")
    node.cli("sendmail", "-t", "-oi", "-f", "ops@example.org", "-odi", "-oem", input=body)
    # Taken in at once (the command pokes the node), not at the next scan.
    [raw] = node.wait_delivered(ALICE, 1, timeout=5)
    node.wait_delivered("carol@example.org", 1, timeout=5)
    assert b"line after a dot" in raw           # -oi
    assert b"Bcc:" not in raw
    node.wait_log(r"sendmail by \S+: <ops@example\.org>", 5)   # root may use -f


@pytest.mark.parametrize("args, stdin, status, error", [
    ((), b"Subject: x\n\nbody\n", 64, "no recipients"),
    (("-t",), b"Subject: x\n\nbody\n", 64, "no recipients"),
    (("not an address@",), b"Subject: x\n\nbody\n", 65, "malformed address"),
    (("-f", "bad@@sender", ALICE), b"Subject: x\n\nbody\n", 65, "malformed address"),
    ((ALICE,), b"Subject: big\n\n" + b"x" * 2000 + b"\n", 65, "too big"),
    ((ALICE,), b"", 66, "no message"),
    (("-q",), b"", 64, "unknown option"),
])
def test_sendmail_bad_input(make_node, args, stdin, status, error):
    node = make_node("badmail", "127.0.9.4", ["example.org"], "mx.example.org", start=False,
                     settings={"limits": {"message_size": "1KB"}})
    result = node.cli("sendmail", *args, input=stdin, check=False)
    assert result.returncode == status, result
    assert error in result.stderr.decode(), result.stderr
    new = node.state_dir / "maildrop" / "new"
    assert not new.exists() or not list(new.iterdir())
    tmp = node.state_dir / "maildrop" / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())


def test_sendmail_unknown_local_user_bounces(make_node):
    node = make_node("unknown", "127.0.9.5", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD})
    node.cli("sendmail", "-f", ALICE, "nobody@example.org", ALICE,
             input=b"Subject: to two\n\nhi\n")
    delivered = node.wait_delivered(ALICE, 2, timeout=10)
    report = [m for m in delivered if b"multipart/report" in m]
    assert report and b"nobody@example.org" in report[0] and b"5.1.1" in report[0]
    # Made by the node's one Reports, which logs it as every DSN (the metrics count it).
    node.wait_log(r"failed DSN for \S+ to <alice@example\.org>: "
                  r"\['nobody@example\.org'\] 5\.1\.1", 5)

    # -R hdrs -V: the report returns the header only and echoes the id (RFC 3461);
    # -N never: none at all.
    node.cli("sendmail", "-f", ALICE, "-R", "hdrs", "-V", "job-7", "nobody@example.org",
             input=b"Subject: headers only\n\nSECRET BODY\n")
    report = [m for m in node.wait_delivered(ALICE, 3, timeout=10) if b"job-7" in m]
    assert report and b"Subject: headers only" in report[0] and b"SECRET BODY" not in report[0]
    node.cli("sendmail", "-f", ALICE, "-N", "never", "nobody@example.org", ALICE,
             input=b"Subject: never\n\nhi\n")
    wait_until(lambda: len(re.findall(r"sendmail by ", node.log_text())) == 3, 10)
    assert len(node.wait_delivered(ALICE, 4, timeout=10)) == 4     # the message, no report
    assert len(re.findall(r"failed DSN for", node.log_text())) == 2


# -- queue tools ---------------------------------------------------------------------


def _queued(node, token: str) -> dict:
    assert submit(node, ALICE, PASSWORD, [f"bob@{token}.test"],
                  message(token, f"bob@{token}.test")) == {}
    node.wait_log(r"deferred \S+ \(\S+\) until", 10)
    return wait_until(lambda: [m for m in messages_of(node, "push")
                               if m["domain"] == f"{token}.test"], 10)[0]


def test_queue_hold_release_running_and_stopped(make_node):
    node = make_node("queue", "127.0.9.6", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD}, settings=STUCK)
    entry = _queued(node, "held")
    assert set(entry) >= {"id", "queue", "sender", "recipients", "domain", "age_s", "state"}
    assert (entry["queue"], entry["sender"], entry["recipients"], entry["state"]) == (
        "push", ALICE, ["bob@held.test"], "queued")
    assert queue_document(node)["source"] == "node"

    assert node.cli("queue", "hold", entry["id"]).stdout == f"held {entry['id']}\n".encode()
    [held] = messages_of(node, "push")
    assert held["state"] == "held"
    node.cli("queue", "--flush")
    time.sleep(1)
    assert messages_of(node, "push")[0]["attempts"] == entry["attempts"]   # not tried

    node.stop()
    document = queue_document(node)
    assert document["source"] == "files" and document["messages"][0]["state"] == "held"
    node.cli("queue", "release", entry["id"])                     # on the files
    assert messages_of(node, "push")[0]["state"] == "queued"
    node.cli("queue", "hold", entry["id"])
    node.start()
    node.cli("queue", "--flush")
    time.sleep(1)
    assert messages_of(node, "push")[0]["state"] == "held"       # held across a restart
    node.cli("queue", "release", entry["id"])
    node.cli("queue", "--flush")
    wait_until(lambda: messages_of(node, "push")[0]["attempts"] > entry["attempts"], 10,
               message=lambda: node.diagnostics())

    for running in (True, False):
        if not running:
            node.stop()
        for action in ("hold", "release", "delete"):
            result = node.cli("queue", action, "NoSuchId12345", check=False)
            assert result.returncode == 1 and b"no entry NoSuchId12345" in result.stderr
    node.cli("queue", "delete", entry["id"])
    assert messages_of(node) == []


def test_a_clean_stop_leaves_a_fresh_outbox_snapshot(make_node):
    """
    Stop 12: the outbox snapshot is written again at a clean stop, so the
    next start takes every entry from it and reads no record file.
    """
    node = make_node("snapstop", "127.0.9.7", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD}, settings=STUCK)
    _queued(node, "one")
    _queued(node, "two")
    snapshot = node.state_dir / "outbox" / "entries.snapshot"
    assert not snapshot.exists()        # the start found an empty outbox: nothing to write
    node.stop()
    assert re.search(r"outbox snapshot \S+entries\.snapshot written: 2 entries", node.log_text())
    assert snapshot.exists()
    node.start()
    node.wait_log(r"outbox \S+ indexed: 2 entries from its snapshot, 0 read from their files", 10)


def test_queue_shape(make_node):
    node = make_node("shape", "127.0.9.7", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD}, settings=STUCK)
    assert submit(node, ALICE, PASSWORD, ["a@one.test", "b@one.test", "c@two.test"],
                  message("shape")) == {}
    wait_until(lambda: len(messages_of(node, "push")) == 2, 10)
    lines = node.cli("queue", "shape").stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["T", "5m", "10m"] and lines[0].split()[-1] == "1280m+"
    table = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
    assert table["TOTAL"][:2] == [2, 2]
    assert table["one.test"][:2] == [1, 1] and table["two.test"][:2] == [1, 1]
    node.stop()
    assert node.cli("queue", "shape").stdout.decode().splitlines() == lines


# -- doctor --------------------------------------------------------------------------


def good_zone(address: str) -> dict:
    reverse = ".".join(reversed(address.split("."))) + ".in-addr.arpa"
    return {
        "example.org": {"MX": [[10, "mx.example.org"]], "TXT": [f"v=spf1 ip4:{address} -all"]},
        "mx.example.org": {"A": [address]},
        reverse: {"PTR": ["mx.example.org"]},
        "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.org"]},
    }


def test_doctor(make_node, dns_server):
    address = "127.0.9.8"
    dns_server.update(good_zone(address))
    node = make_node("doctor", address, ["example.org"], "mx.example.org", start=False,
                     settings={"dns": {"nameservers": [dns_server.nameserver], "timeout": "2s"}})
    result = node.cli("doctor", check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, out
    for check in ("MX", "PTR", "SPF", "DMARC"):
        assert re.search(rf"^ok\s+example\.org  {check}", out, re.MULTILINE), out
    assert re.search(r"^warn\s+example\.org  MTA-STS: no _mta-sts", out, re.MULTILINE), out
    assert re.search(r"^(warn|fail)\s+example\.org  DKIM", out, re.MULTILINE), out

    zone = good_zone(address)
    zone["example.org"]["TXT"] = ["v=spf1 ip4:192.0.2.1 -all"]
    del zone["_dmarc.example.org"]
    zone["mx.example.org"]["A"] = ["192.0.2.1"]
    dns_server.update(zone)
    result = node.cli("doctor", check=False)
    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert re.search(r"^fail\s+example\.org  SPF: fail for 127\.0\.9\.8.*hint", out, re.M), out
    assert re.search(r"^fail\s+example\.org  DMARC: no DMARC record", out, re.M), out
    assert re.search(r"^fail\s+example\.org  MX: no MX host points at", out, re.M), out
    assert re.search(r"^fail\s+example\.org  PTR", out, re.M), out


# -- one node per state dir, and the log ----------------------------------------------


def test_second_node_on_the_same_state_dir_refuses(make_node):
    first = make_node("first", "127.0.9.9", ["example.org"], "mx.example.org")
    second = make_node("second", "127.0.9.10", ["example.org"], "mx.example.org",
                       start=False, settings={"node": {"state_dir": str(first.state_dir)}})
    with pytest.raises(NodeError, match=rf"refusing to start: state dir .* in use by pid "
                                        rf"{first.pid}"):
        second.start(timeout=15)
    assert first.running()


def test_log_lines_have_milliseconds(make_node):
    node = make_node("textlog", "127.0.9.11", ["example.org"], "mx.example.org")
    node.wait_log(r"pullmail node mx\.example\.org", 5)
    first = node.log_text().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[", first), first


def test_json_log(make_node):
    node = make_node("jsonlog", "127.0.9.12", ["example.org"], "mx.example.org",
                     users={ALICE: PASSWORD}, settings={"node": {"log_format": "json"}})
    assert submit(node, ALICE, PASSWORD, [ALICE], message("json")) == {}
    node.wait_delivered(ALICE)
    records = wait_until(lambda: [r for r in map(json.loads, node.log_text().splitlines())
                                  if r.get("event") == "accepted"], 5)
    record = records[0]
    assert record["service"] == "submission" and record["recipients"] == [ALICE]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["level"] == "info" and record["namespace"].startswith("pullmail")
    assert "accepted" in record["message"]


def test_metrics_of_general_delivery(make_node, dns_server):
    """A GDEL and its RETR, counted on both sides."""
    a_ip, b_ip = "127.0.9.21", "127.0.9.22"
    records = {}
    for domain, address in (("a.test", a_ip), ("b.test", b_ip)):
        records[domain] = {"MX": [[10, f"mx.{domain}"]], "TXT": [f"v=spf1 ip4:{address} -all"]}
        records[f"mx.{domain}"] = {"A": [address]}
    dns_server.update(records)
    nodes = {}
    for name, domain, address, user in (("a", "a.test", a_ip, "alice@a.test"),
                                        ("b", "b.test", b_ip, "bob@b.test")):
        nodes[name] = make_node.for_domain(
            name, address, domain, users=[user], password=PASSWORD, dns=dns_server,
            settings={"metrics": {"listen": f"tcp:{METRICS_PORT}:interface={address}"}})
    assert submit(nodes["a"], "alice@a.test", PASSWORD, ["bob@b.test"],
                  message("pulled", "bob@b.test")) == {}
    nodes["b"].wait_delivered("bob@b.test", 1, timeout=20)

    def scraped():
        return samples(scrape(a_ip)[0]), samples(scrape(b_ip)[0])

    retrieved = ("pullmail_deliveries_total", (("result", "retrieved"),))
    wait_until(lambda: scraped()[0].get(retrieved), 10, message=lambda: nodes["a"].diagnostics())
    a, b = scraped()
    assert a[("pullmail_delivery_seconds_count", ())] == 1
    assert b[("pullmail_gdel_total", (("verdict", "accepted"),))] == 1
    assert b[("pullmail_retrievals_total", (("result", "retrieved"),))] == 1
    assert b[("pullmail_messages_accepted_total", (("service", "retrieval"),))] == 1
    assert b[("pullmail_spf_total", (("result", "pass"),))] >= 1
