"""
Tests for the operator tools' pure parts: L{pullmail.node.queuetools}
(the --json record, qshape's table), L{pullmail.node.doctor} (each check
over a fake zone), L{pullmail.node.logs}, L{pullmail.node.lock}, the config
file's lookup order and the systemd unit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, LogLevel, formatEvent

from pullmail import config as configuration
from pullmail import maillog
from pullmail.node import doctor, logs
from pullmail.node.lock import StateLocked, lock_state_dir
from pullmail.node.queuetools import message_record, shape_table

REPO = Path(__file__).resolve().parents[1]


# -- queue --------------------------------------------------------------------------


def test_message_record():
    row = {"kind": "push", "id": "I", "queue_id": "Q", "sender": "a@x.test",
           "recipients": ["b@y.test"], "domain": "y.test", "age": 61.23456, "held": True,
           "state": "queued", "attempts": 2, "next": 5.0, "last_error": "451"}
    record = message_record(row)
    assert (record["queue"], record["state"], record["age_s"], record["domain"]) == (
        "push", "held", 61.235, "y.test")


def test_shape_table():
    messages = [{"queue": "push", "domain": "a.test", "age_s": s} for s in (0, 400, 90000)] + [
        {"queue": "outbox", "domain": "b.test", "age_s": 700},
        {"queue": "pending", "domain": "c.test", "age_s": 0}]
    lines = shape_table(messages).splitlines()
    assert lines[0].split() == ["T", "5m", "10m", "20m", "40m", "80m", "160m", "320m",
                                "640m", "1280m", "1280m+"]
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
    assert rows == {"TOTAL": [4, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1],
                    "a.test": [3, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1],
                    "b.test": [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]}
    assert "c.test" in shape_table(messages, ("pending",))


# -- doctor -------------------------------------------------------------------------


class _Zone(doctor.Lookup):
    def __init__(self, records):
        self.records = records

    def __call__(self, name, rdtype):
        return list(self.records.get((name, rdtype), []))


def _key(tmp_path, algorithm):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (ed25519.Ed25519PrivateKey.generate() if algorithm == "ed25519"
           else rsa.generate_private_key(public_exponent=65537, key_size=1024))
    path = tmp_path / f"example.org.pm1-{algorithm}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = key.public_key()
    if algorithm == "ed25519":
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode()


def test_dkim_check(tmp_path):
    rsa_key, ed_key = _key(tmp_path, "rsa"), _key(tmp_path, "ed25519")
    zone = _Zone({("pm1-rsa._domainkey.example.org", "TXT"): [f"v=DKIM1; k=rsa; p={rsa_key}"],
                  ("pm1-ed25519._domainkey.example.org", "TXT"):
                      [f"v=DKIM1; k=ed25519; p={ed_key[:-4]}AAA="]})
    checks = doctor.check_dkim("example.org", "pm1", tmp_path, zone)
    assert [c.status for c in checks] == ["ok", "fail"]
    assert "another key" in checks[1].message and checks[1].hint
    missing = doctor.check_dkim("example.org", "pm2", tmp_path, zone)
    assert [c.status for c in missing] == ["warn", "warn"]


def test_dmarc_check():
    def status(*records):
        zone = _Zone({("_dmarc.example.org", "TXT"): list(records)})
        return [c.status for c in doctor.check_dmarc("example.org", zone)]

    assert status("v=DMARC1; p=reject") == ["ok"]
    assert status("v=DMARC1; p=none") == ["warn"]
    assert status() == ["fail"]
    assert status("v=DMARC1; p=maybe") == ["fail"]
    assert status("v=DMARC1; p") == ["fail"]
    assert status("v=DMARC1; p=reject", "v=DMARC1; p=none") == ["fail"]


def test_mx_and_ptr_checks():
    zone = _Zone({("example.org", "MX"): ["mx.example.org"],
                  ("mx.example.org", "A"): ["192.0.2.1"],
                  ("1.2.0.192.in-addr.arpa.", "PTR"): ["mx.example.org"]})
    assert [c.status for c in doctor.check_mx("example.org", ["192.0.2.1"], zone)] == ["ok"]
    assert [c.status for c in doctor.check_mx("example.org", ["192.0.2.9"], zone)] == ["fail"]
    assert doctor.check_mx("other.test", ["192.0.2.1"], zone)[0].message == "no MX record"
    assert [c.status for c in doctor.check_ptr("example.org", ["192.0.2.1"], "mx.example.org",
                                               zone)] == ["ok"]
    assert [c.status for c in doctor.check_ptr("example.org", ["192.0.2.1"], "mail.other",
                                               zone)] == ["fail"]


def test_mta_sts_check():
    txt = {("_mta-sts.example.org", "TXT"): ["v=STSv1; id=2026"],
           ("example.org", "MX"): ["mx1.example.org", "mx2.example.org"]}
    policy = "version: STSv1\nmode: enforce\nmx: *.example.org\nmax_age: 86400\n"
    assert doctor.check_mta_sts("example.org", _Zone({}), lambda d: "")[0].status == "warn"
    assert doctor.check_mta_sts("example.org", _Zone(txt), lambda d: policy)[0].status == "ok"
    narrow = policy.replace("*.example.org", "mx1.example.org")
    assert doctor.check_mta_sts("example.org", _Zone(txt), lambda d: narrow)[0].status == "fail"

    def unreachable(domain):
        raise OSError("connection refused")

    assert doctor.check_mta_sts("example.org", _Zone(txt), unreachable)[0].status == "fail"


def test_check_lines():
    line = doctor.Check("fail", "example.org", "SPF", "fail for 192.0.2.1", "publish it").line()
    assert line == "fail  example.org  SPF: fail for 192.0.2.1  (hint: publish it)"
    assert "hint" not in doctor.Check("ok", "example.org", "MX", "fine", "x").line()


# -- logs and the lock ----------------------------------------------------------------


def _event(**fields):
    event = {"log_time": 1764906464.1234, "log_level": LogLevel.info,
             "log_namespace": "pullmail.smtp", "log_format": "accepted {queue_id}",
             "queue_id": "Q1", "event": "accepted", "recipients": ("a@x.test",),
             "session": object()}
    event.update(fields)
    return event


def test_text_format():
    assert logs.format_text(_event()) == \
        "2025-12-05T03:47:44.123Z [pullmail.smtp#info] accepted Q1\n"


def test_json_format():
    record = json.loads(logs.format_json(_event()))
    assert record == {"time": "2025-12-05T03:47:44.123Z", "level": "info",
                      "namespace": "pullmail.smtp", "message": "accepted Q1",
                      "queue_id": "Q1", "event": "accepted", "recipients": ["a@x.test"]}


def test_mail_events_read_as_twisted_would_format_them():
    """
    A mail event's line is made with str.format_map (the cheap path),
    and reads exactly as twisted.logger's formatEvent makes it; an event
    whose format is not its vocabulary's goes the general way.
    """
    event = _event(log_format=maillog.ACCEPTED.format, sender="s@x.test",
                   recipients=["a@x.test", "b@x.test"], size=2048, peer="192.0.2.1",
                   delivered=[], local_bounced=[], local_deferred=[], queued=[],
                   service="smtp")
    line = "accepted Q1 from <s@x.test> for ['a@x.test', 'b@x.test'] (2048 bytes) via 192.0.2.1"
    assert logs.format_text(event).endswith(f"#info] {line}\n")
    assert formatEvent(event) == line
    other = _event(log_format="{queue_id!r} {recipients[0]}")
    assert logs.format_text(other).endswith("] 'Q1' a@x.test\n")


def test_observer_drops_debug():
    stream = io.StringIO()
    observer = logs.log_observer("text", stream)
    observer(_event(log_level=LogLevel.debug))
    assert stream.getvalue() == ""
    observer(_event())
    assert stream.getvalue().endswith("accepted Q1\n")


@pytest.mark.parametrize("fields, shown", [
    ({"log_level": LogLevel.debug}, False),
    ({"log_level": LogLevel.info}, True),
    ({"log_level": LogLevel.warn}, True),
    ({"log_level": LogLevel.error}, True),
    ({"log_level": LogLevel.critical}, True),
    ({"log_level": None}, False),
    ({"log_namespace": ""}, False),
])
def test_observer_shows_what_an_info_level_filter_would(fields, shown):
    """The same events as twisted.logger's LogLevelFilterPredicate at info."""
    from twisted.logger import LogLevelFilterPredicate, PredicateResult

    stream = io.StringIO()
    event = _event(**fields)
    logs.log_observer("text", stream)(event)
    assert bool(stream.getvalue()) is shown
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    assert (predicate(event) is PredicateResult.maybe) is shown


def test_log_goes_where_twistd_would(tmp_path):
    assert logs.twistd_stream(None) is None
    assert logs.twistd_stream({"syslog": True, "logfile": ""}) is None
    assert logs.twistd_stream({"logfile": "-", "nodaemon": True}) is sys.stdout
    assert logs.twistd_stream({"logfile": "", "nodaemon": True}) is sys.stdout
    logfile = logs.twistd_stream({"logfile": str(tmp_path / "n.log"), "nodaemon": True})
    assert logfile.path == str(tmp_path / "n.log")
    logfile.close()


def test_node_service_gives_the_application_its_observer():
    node = logs.NodeService()
    node.log_observer = logs.log_observer("json", io.StringIO())
    application = Application("pullmail")
    node.setServiceParent(application)
    assert application.getComponent(ILogObserver) is node.log_observer


def test_state_dir_lock(tmp_path):
    fd = lock_state_dir(tmp_path / "state")
    try:
        with pytest.raises(StateLocked, match=rf"in use by pid {os.getpid()}"):
            lock_state_dir(tmp_path / "state")
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path / "state"))      # free again


# -- config lookup order --------------------------------------------------------------


def test_config_lookup_order(tmp_path):
    system = tmp_path / "etc.toml"
    env = {"PULLMAIL_CONFIG": "/from/env.toml"}
    assert configuration.config_path("given.toml", env, system) == "given.toml"
    assert configuration.config_path(None, env, system) == "/from/env.toml"
    assert configuration.config_path(None, {}, system) is None
    system.write_text('[node]\nhostname = "mx.etc.test"\n')
    assert configuration.config_path(None, {}, system) == str(system)
    assert configuration.load_config(None, environ={}, system=system).node.hostname == \
        "mx.etc.test"


# -- the systemd unit -----------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in (REPO / "etc" / "pullmail.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_unit_is_hardened():
    unit = _unit()
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["true"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["User"] == ["pullmail"]
    assert "/var/lib/pullmail" in unit["ReadWritePaths"][0].split()
    assert "--nodaemon" in unit["ExecStart"][0] and " pullmail" in unit["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(tmp_path):
    twistd = Path(sys.executable).parent / "twistd"
    text = (REPO / "etc" / "pullmail.service").read_text()
    (tmp_path / "pullmail.service").write_text(text.replace("/usr/local/bin/twistd",
                                                            str(twistd)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "pullmail.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pullmail.service" not in result.stderr, result.stderr
