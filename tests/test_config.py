"""
Tests for L{pullmail.config}: defaults (SPEC 10), conversions, errors that
name their key, paths, overrides, and the example file etc/pullmail.toml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from pullmail import config as configuration
from pullmail.config import (
    Config,
    ConfigError,
    load,
    override,
    parse,
    parse_duration,
    parse_size,
)
from pullmail.testing import not_refused

pytestmark = pytest.mark.usefixtures("no_logged_failures")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "etc" / "pullmail.toml"
BASE = Path("/srv/pullmail/etc")

# SPEC section 10, as TOML: the defaults of every key it names.
SPEC_DEFAULTS = tomllib.loads(
    """
[node]
domains = ["example.org"]
state_dir = "var"
[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = []
[tls]
certificate = "var/tls/cert.pem"
key = "var/tls/key.pem"
generate = true
[accounts]
users = "users"
aliases = "aliases"
[dns]
nameservers = []
timeout = "5s"
[trust]
spf_accept = ["pass"]
allow = []
deny = []
dnsbl = []
policies = []
push = "accept"
bare_gdel = true
[delivery]
remote_port = 25
bind_address = ""
push_fallback = true
smarthost = ""
outbox_lifetime = "48h"
delay_warning = "0s"
push_retry = ["5m", "15m", "1h", "4h"]
push_lifetime = "5d"
[retrieval]
schedule = ["0s", "10m", "1h", "6h", "24h"]
[limits]
message_size = "25MB"
recipients = 100
idle_timeout = "5m"
retr_fail_limit = 10
retr_fail_window = "1h"
retr_block = "1h"
retr_tarpit_max = "30s"
pending_per_origin = 10000
"""
)

SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "base"]


def _error(mapping, base: Path = BASE) -> ConfigError:
    try:
        parse(mapping, base)
    except ConfigError as e:
        return e
    raise AssertionError(f"no ConfigError for {mapping!r}")


class DefaultTests:
    """An empty file gives the defaults of SPEC 10."""

    def test_spec_defaults(self):
        """Every key SPEC 10 lists has its SPEC value by default."""
        defaults = parse({}, BASE)
        spelled = parse(SPEC_DEFAULTS, BASE)
        for section, keys in SPEC_DEFAULTS.items():
            for key in keys:
                assert (
                    getattr(getattr(defaults, section), key) == getattr(getattr(spelled, section), key)
                ), f"{section}.{key}"

    def test_converted_values(self):
        """Defaults come out converted: seconds, bytes, absolute paths, None."""
        c = parse({}, BASE)
        assert c.node.domains == ("example.org",)
        assert c.node.state_dir == BASE / "var"
        assert c.state_dir == BASE / "var"
        assert c.tls.certificate == BASE / "var/tls/cert.pem"
        assert c.tls.key == BASE / "var/tls/key.pem"
        assert c.tls.generate is True
        assert c.accounts.users == BASE / "users"
        assert c.accounts.aliases == BASE / "aliases"
        assert c.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
        assert c.listen.submission == ("tcp:2587:interface=127.0.0.1",)
        assert c.listen.submissions == ()
        assert c.dns.nameservers == ()
        assert c.dns.timeout == 5
        assert c.trust.spf_accept == ("pass",)
        assert (c.trust.allow, c.trust.deny, c.trust.dnsbl, c.trust.policies) == ((),) * 4
        assert c.trust.push == "accept"
        assert c.trust.bare_gdel is True
        assert c.delivery.remote_port == 25
        assert c.delivery.bind_address == ""
        assert c.delivery.push_fallback is True
        assert c.delivery.smarthost is None
        assert c.delivery.outbox_lifetime == 48 * 3600
        assert c.delivery.delay_warning == 0
        assert c.delivery.push_retry == (300, 900, 3600, 14400)
        assert c.delivery.push_lifetime == 5 * 86400
        assert c.retrieval.schedule == (0, 600, 3600, 21600, 86400)
        assert c.limits.message_size == 25_000_000
        assert c.limits.recipients == 100
        assert c.limits.idle_timeout == 300
        assert c.limits.retr_fail_limit == 10
        assert c.limits.retr_fail_window == 3600
        assert c.limits.retr_block == 3600
        assert c.limits.retr_tarpit_max == 30
        assert c.limits.pending_per_origin == 10000

    def test_embedded_default(self):
        """The embedded default is loopback, under the given folder."""
        c = configuration.embedded_default(BASE)
        assert c.node.hostname == "localhost"
        assert c.state_dir == BASE / "var"
        assert c.accounts.users == BASE / "var/users"
        for endpoint in c.listen.smtp + c.listen.submission:
            assert "interface=127.0.0.1" in endpoint

    def test_frozen(self):
        """A Config cannot be changed in place."""
        c = parse({}, BASE)
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.limits.recipients = 5


class ValueTests:
    """Values from the file, converted."""

    def test_values(self):
        """Each kind of value is converted."""
        c = parse(
            {
                "node": {"hostname": "MX.Example.NET", "domains": ["Example.NET", "b.test"]},
                "dns": {"nameservers": ["127.0.0.1:5353", "192.0.2.1", "[::1]:53"], "timeout": "1h30m"},
                "trust": {"allow": ["192.0.2.0/24", "good.test"], "spf_accept": ["pass", "none"]},
                "delivery": {"smarthost": "relay.test:2525", "bind_address": "127.0.0.5"},
                "limits": {"message_size": 1024, "idle_timeout": "90s"},
            },
            BASE,
        )
        assert c.node.hostname == "mx.example.net"
        assert c.node.domains == ("example.net", "b.test")
        assert c.is_local_domain("B.TEST")
        assert not c.is_local_domain("example.org")
        assert c.dns.nameservers == (("127.0.0.1", 5353), ("192.0.2.1", 53), ("::1", 53))
        assert c.dns.timeout == 5400
        assert c.trust.allow == (ipaddress.ip_network("192.0.2.0/24"), "good.test")
        assert c.delivery.smarthost == ("relay.test", 2525)
        assert c.limits.message_size == 1024
        assert c.limits.idle_timeout == 90


class DurationTests:
    def test_good(self):
        """Durations in every unit, and combined."""
        for text, seconds in [("0s", 0), ("90s", 90), ("10m", 600), ("48h", 172800), ("5d", 432000),
                              ("1w", 604800), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25)]:
            assert parse_duration(text) == seconds, text

    def test_bad(self):
        """Numbers without a unit, negative, unknown units, spaces and non-strings fail."""
        texts = ("", "10", "-1s", "5x", "h", " 1s", "1s ", "1 s", "s1", 10, None, "1h-5m")
        assert not_refused(parse_duration, texts) == []

    def test_bad_in_file_names_key(self):
        """A bad duration in the file names its key."""
        for section, key, value in [("limits", "idle_timeout", "5 minutes"), ("dns", "timeout", 5),
                                    ("delivery", "push_retry", ["5m", "soon"]),
                                    ("retrieval", "schedule", ["0s", 10])]:
            e = _error({section: {key: value}})
            assert e.option == f"{section}.{key}"
            assert str(e).startswith(f"{section}.{key}: ")


class SizeTests:
    def test_good(self):
        """Decimal and binary units, and bare integers."""
        for text, size in [("25MB", 25_000_000), ("1KB", 1000), ("1kb", 1000), ("1MiB", 1048576),
                           ("2GiB", 2 * 1024**3), ("100", 100), ("100B", 100), (512, 512)]:
            assert parse_size(text) == size, text

    def test_bad(self):
        """Fractions, negatives, unknown units and booleans fail."""
        texts = ("1.5MB", "-1", -1, "MB", "", "25TB", "lots", True, None)
        assert not_refused(parse_size, texts) == []

    def test_bad_in_file_names_key(self):
        """A bad size in the file names limits.message_size."""
        for value in ("25 megabytes", True, 1.5):
            assert _error({"limits": {"message_size": value}}).option == "limits.message_size"


class ErrorTests:
    """Every error names the key at fault."""

    def test_unknown_section(self):
        """An unknown section is named."""
        assert _error({"bogus": {}}).option == "bogus"

    def test_section_not_table(self):
        """A section that is not a table is named."""
        assert _error({"limits": 5}).option == "limits"

    def test_unknown_key(self):
        """An unknown key is named with its section."""
        e = _error({"limits": {"recipient": 5}})
        assert e.option == "limits.recipient"
        assert "unknown" in e.message

    def test_wrong_types(self):
        """Wrong TOML types are named."""
        for section, key, value in [
            ("node", "hostname", 5), ("node", "domains", "example.org"), ("tls", "generate", "yes"),
            ("limits", "recipients", "100"), ("limits", "recipients", True), ("delivery", "remote_port", 25.0),
            ("listen", "smtp", "tcp:25"), ("trust", "bare_gdel", 1), ("node", "domains", [1]),
        ]:
            assert _error({section: {key: value}}).option == f"{section}.{key}", (key, value)

    def test_bad_values(self):
        """Out-of-range and malformed values are named."""
        for section, key, value in [
            ("node", "hostname", "bad_host"), ("node", "hostname", "-x.test"),
            ("node", "domains", []), ("node", "domains", ["a..b"]),
            ("limits", "recipients", 0), ("limits", "connections", -1),
            ("limits", "connections_per_ip", 0), ("limits", "message_size", "0"),
            ("limits", "idle_timeout", "0s"), ("limits", "pending_per_origin", 0),
            ("limits", "retr_fail_limit", 0),
            ("delivery", "remote_port", 0), ("delivery", "remote_port", 65536),
            ("delivery", "bind_address", "not-an-ip"), ("delivery", "smarthost", "relay:port"),
            ("delivery", "smarthost", "relay:0"), ("delivery", "push_retry", []),
            ("delivery", "tls", "sometimes"),
            ("retrieval", "schedule", []),
            ("dns", "nameservers", ["127.0.0.1:99999"]), ("dns", "nameservers", ["a:b"]),
            ("trust", "push", "maybe"), ("trust", "spf_accept", ["great"]),
            ("trust", "allow", ["not a net"]), ("trust", "deny", ["300.1.1.1/8"]),
            ("trust", "dnsbl", ["zen..example"]),
        ]:
            e = _error({section: {key: value}})
            assert e.option == f"{section}.{key}", (key, value)
            assert "\n" not in str(e)

    def test_bad_endpoints(self):
        """Endpoint strings that do not parse are named, without listening."""
        for value in ("tcp:abc", "tcp:", "foo:1", "", "tcp:25:bogus=1", "ssl:4650", "tcp:99999", "tcp:-1"):
            e = _error({"listen": {"smtp": ["tcp:2525", value]}})
            assert e.option == "listen.smtp", value
        assert _error({"listen": {"submissions": ["nonsense"]}}).option == "listen.submissions"

    def test_bad_local_delivery(self):
        """[delivery] local is "maildir" or "lmtp:" and a client endpoint; errors name it."""
        for value in ("mbox", "lmtp", "lmtp:", "lmtp:bogus:1", "lmtp:tcp:127.0.0.1",
                      "lmtp:tcp:127.0.0.1:x", "lmtp:unix:run/lmtp", "LMTP:unix:/run/lmtp"):
            e = _error({"delivery": {"local": value}})
            assert e.option == "delivery.local", value
            assert "\n" not in str(e)

    def test_good_local_delivery(self):
        """The SPEC 11.3 forms are kept as written; maildir is the default."""
        assert parse({}, BASE).delivery.local == "maildir"
        for value in ("maildir", "lmtp:unix:/run/dovecot/lmtp", "lmtp:tcp:127.0.0.1:24",
                      "lmtp:unix:path=/run/lmtp:timeout=5"):
            assert parse({"delivery": {"local": value}}, BASE).delivery.local == value

    def test_good_endpoints(self):
        """Ordinary endpoint strings are kept as written."""
        c = parse({"listen": {"smtp": ["tcp:25", "tcp6:25:interface=\\:\\:1", "unix:/run/p.sock"]}}, BASE)
        assert c.listen.smtp == ("tcp:25", "tcp6:25:interface=\\:\\:1", "unix:/run/p.sock")

    def test_tls_files_required_without_generate(self, tmp_path):
        """With tls.generate off, missing files are an error naming the key."""
        folder = tmp_path.resolve()
        e = _error({"tls": {"generate": False}}, folder)
        assert e.option == "tls.certificate"
        (folder / "cert.pem").write_text("x")
        e = _error({"tls": {"generate": False, "certificate": "cert.pem"}}, folder)
        assert e.option == "tls.key"
        (folder / "key.pem").write_text("x")
        c = parse({"tls": {"generate": False, "certificate": "cert.pem", "key": "key.pem"}}, folder)
        assert c.tls.key == (folder / "key.pem").resolve()


class PathTests:
    """Relative paths are relative to the config file's folder."""

    def test_relative(self):
        """Every path key is resolved against the base folder."""
        c = parse(
            {"node": {"state_dir": "state"}, "tls": {"certificate": "../tls/c.pem", "key": "k.pem"},
             "accounts": {"users": "u", "aliases": "sub/a"}},
            BASE,
        )
        assert c.state_dir == BASE / "state"
        assert c.tls.certificate == Path("/srv/pullmail/tls/c.pem")
        assert c.tls.key == BASE / "k.pem"
        assert c.accounts.users == BASE / "u"
        assert c.accounts.aliases == BASE / "sub/a"

    def test_absolute(self):
        """Absolute paths are kept."""
        c = parse({"node": {"state_dir": "/var/lib/pullmail"}}, BASE)
        assert c.state_dir == Path("/var/lib/pullmail")

    def test_load_relative_to_file(self, tmp_path):
        """load() resolves against the file's folder, not the working directory."""
        folder = tmp_path.resolve()
        (folder / "conf").mkdir(parents=True)
        path = folder / "conf" / "p.toml"
        path.write_text('[node]\nstate_dir = "../state"\n[accounts]\nusers = "users.txt"\n')
        c = load(path)
        assert c.state_dir == folder / "state"
        assert c.accounts.users == folder / "conf" / "users.txt"


class LoadTests:
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        """A fresh folder outside the source tree."""
        self.folder = tmp_path.resolve()

    def test_bad_toml(self):
        """A file that is not TOML is one ConfigError naming the file."""
        path = self.folder / "bad.toml"
        path.write_text("[limits\nrecipients = \n")
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert caught.value.option == "config"
        assert "bad.toml" in str(caught.value)
        assert "TOML" in str(caught.value)

    def test_not_utf8(self):
        """A file that is not UTF-8 is a ConfigError too."""
        path = self.folder / "latin1.toml"
        path.write_bytes(b'[node]\nhostname = "caf\xe9"\n')
        with pytest.raises(ConfigError):
            load(path)

    def test_missing(self):
        """A missing file is a ConfigError, not an OSError."""
        with pytest.raises(ConfigError) as caught:
            load(self.folder / "none.toml")
        assert caught.value.option == "config"

    def test_bad_value_in_file(self):
        """A bad value in a file names its key."""
        path = self.folder / "p.toml"
        path.write_text("[limits]\nrecipients = 0\n")
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert caught.value.option == "limits.recipients"


class OverrideTests:
    """--set section.key=value on top of a loaded config."""

    def setup_method(self):
        self.config = parse({}, BASE)

    def test_values(self):
        """TOML values and bare words are both understood."""
        c = override(self.config, "limits.recipients", "50")
        assert c.limits.recipients == 50
        c = override(c, "trust.push", "refuse")
        assert c.trust.push == "refuse"
        c = override(c, "node.domains", '["a.test", "b.test"]')
        assert c.node.domains == ("a.test", "b.test")
        c = override(c, "limits.idle_timeout", "10m")
        assert c.limits.idle_timeout == 600
        assert c.limits.recipients == 50
        assert self.config.limits.recipients == 100

    def test_paths_relative_to_base(self):
        """An overridden relative path is relative to the config's folder."""
        c = override(self.config, "node.state_dir", "other")
        assert c.state_dir == BASE / "other"

    def test_errors(self):
        """Unknown keys and bad values name the key."""
        cases = [("limits.nothing", "1"), ("nosection.key", "1"), ("limits", "1"),
                 ("limits.recipients", "0"), ("limits.recipients", "many"), ("tls.generate", "maybe")]
        named = []  # (option, value, the option its ConfigError names, or None if none)
        for option, value in cases:
            try:
                override(self.config, option, value)
            except ConfigError as e:
                named.append((option, value, e.option))
            else:
                named.append((option, value, None))
        assert named == [(option, value, option) for option, value in cases]


class ExampleFileTests:
    """etc/pullmail.toml loads and documents every key (SPEC 9)."""

    def test_loads(self):
        """The example file is a valid config."""
        c = load(EXAMPLE)
        assert c.base == EXAMPLE.parent

    def test_every_key(self):
        """Every field of every Config section is a key of the example file."""
        mapping = tomllib.loads(EXAMPLE.read_text("utf-8"))
        missing = []
        for section in SECTIONS:
            cls = type(getattr(Config(), section))
            for f in dataclasses.fields(cls):
                if f.name not in mapping.get(section, {}):
                    missing.append(f"{section}.{f.name}")
        assert missing == []

    def test_documented_defaults(self):
        """Each key's '# Default:' comment, where given, is the real default."""
        text = EXAMPLE.read_text("utf-8")
        defaults = parse({}, BASE)
        section, pending, checked = None, None, 0
        for line in text.splitlines():
            if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
                section = m.group(1)
            elif m := re.fullmatch(r"#\s*Default:\s*(.*)", line.strip()):
                pending = re.sub(r"\s+\(.*\)$", "", m.group(1))
            elif m := re.fullmatch(r"(\w+)\s*=.*", line.strip()):
                if pending is not None:
                    value = tomllib.loads(f"v = {pending}")["v"]
                    documented = parse({section: {m.group(1): value}}, BASE)
                    key = m.group(1)
                    assert (
                        getattr(getattr(documented, section), key) == getattr(getattr(defaults, section), key)
                    ), f"{section}.{key}"
                    checked += 1
                pending = None
        assert checked > 40


def test_mta_sts_keys():
    """SPEC 11.2: [delivery] mta_sts (off by default) and mta_sts_port (443)."""
    defaults = parse({}, BASE)
    assert (defaults.delivery.mta_sts, defaults.delivery.mta_sts_port) == (False, 443)
    on = parse({"delivery": {"mta_sts": True, "mta_sts_port": 8443}}, BASE)
    assert (on.delivery.mta_sts, on.delivery.mta_sts_port) == (True, 8443)
    for key, value in [("mta_sts", "yes"), ("mta_sts_port", 0), ("mta_sts_port", 65536),
                       ("mta_sts_port", "443")]:
        assert _error({"delivery": {key: value}}).option == f"delivery.{key}"


def test_connection_cache_time():
    """
    [delivery] connection_cache_time: 2 s by default, 0 s off; a short
    [limits] idle_timeout is no error (it closes a cached connection first).
    """
    assert parse({}, BASE).delivery.connection_cache_time == 2.0
    assert parse({"delivery": {"connection_cache_time": "0s"}}, BASE
                 ).delivery.connection_cache_time == 0.0
    assert parse({"limits": {"idle_timeout": "2s"}}, BASE).delivery.connection_cache_time == 2.0
    for value in [2, "-1s", "soon"]:
        assert _error({"delivery": {"connection_cache_time": value}}).option == \
            "delivery.connection_cache_time"
