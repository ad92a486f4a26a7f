"""
The harness itself: its TOML writer, and a node's life cycle (start, a
clear error on a bad config, graceful stop, restart keeping its mail).
"""

from __future__ import annotations

import tomllib

import pytest

from .harness import NodeError, RawSMTP, merge_settings, smtp, toml_dumps

ALICE = "alice@example.org"


def test_toml_round_trip():
    document = {
        "node": {"hostname": "mx.example.org", "domains": ["a.test", "b.test"]},
        "limits": {"recipients": 3, "ratio": 0.5, "flag": True, "off": False},
        "odd": {"quote\"key": 'a "quoted" \\ back\tslash\nnewline\x01', "nested": [[1, 2], []]},
    }
    assert tomllib.loads(toml_dumps(document)) == document


def test_merge_settings():
    base = {"limits": {"a": 1, "b": 2}, "node": {"x": 1}}
    assert merge_settings(base, {"limits": {"b": 3}, "dns": {"t": "1s"}}) == {
        "limits": {"a": 1, "b": 3}, "node": {"x": 1}, "dns": {"t": "1s"},
    }
    assert base["limits"] == {"a": 1, "b": 2}


def test_config_file(make_node):
    node = make_node("cfg", "127.0.0.7", ["example.org"], "mx.example.org",
                     start=False, settings={"limits": {"recipients": 7}})
    config = tomllib.loads(node.config_path.read_text())
    assert config["listen"]["smtp"] == ["tcp:2525:interface=127.0.0.7"]
    assert config["delivery"] == {"bind_address": "127.0.0.7", "remote_port": 2525}
    assert config["limits"] == {"idle_timeout": "30s", "ipv4_prefix": 32, "recipients": 7}
    assert config["node"]["state_dir"] == "var"


def test_bad_config_fails_start_with_its_message(make_node):
    node = make_node("bad", "127.0.0.7", ["example.org"], "mx.example.org",
                     start=False, settings={"limits": {"recipients": 0}})
    with pytest.raises(NodeError, match="limits.recipients"):
        node.start(timeout=10)
    assert not node.running()


def test_adduser_rejects_foreign_domain(make_node):
    node = make_node("users", "127.0.0.7", ["example.org"], "mx.example.org", start=False)
    with pytest.raises(NodeError, match="adduser"):
        node.add_user("someone@elsewhere.test", "pw")


def test_life_cycle(make_node):
    """Mail survives stop and restart; a second start on a busy address fails."""
    node = make_node("life", "127.0.0.7", ["example.org"], "mx.example.org",
                     users={ALICE: "pw"})
    with pytest.raises(NodeError, match="already running"):
        node.start()
    twin = make_node("twin", "127.0.0.7", ["example.org"], "mx.example.org", start=False)
    with pytest.raises(NodeError, match="already listens"):
        twin.start()
    with smtp(node) as client:
        client.sendmail("a@outside.test", [ALICE], b"Subject: 1\r\n\r\nkeep me\r\n")
    node.stop()
    assert not node.running()
    assert "Server Shut Down" in node.log_text()
    node.restart()
    with RawSMTP(node.address) as client:
        assert client.greeting[0] == 220
        code, lines = client.command("EHLO client.outside.test")
        assert code == 250 and len(lines) > 1  # a multi-line reply, parsed whole
        client.assert_silent(0.1)
    (data,) = node.delivered(ALICE)
    assert data.endswith(b"keep me\r\n")
    node.kill()
    assert not node.running()
