"""
Tests for L{pullmail.config}: defaults (SPEC 10), conversions, errors that
name their key, paths, overrides, and the example file etc/pullmail.toml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

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



def _tempdir(case) -> Path:
    """A fresh folder outside the source tree, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="pullmail-test-")).resolve()
    case.addCleanup(shutil.rmtree, path, True)
    return path

class DefaultTests(SynchronousTestCase):
    """An empty file gives the defaults of SPEC 10."""

    def test_spec_defaults(self):
        """Every key SPEC 10 lists has its SPEC value by default."""
        defaults = parse({}, BASE)
        spelled = parse(SPEC_DEFAULTS, BASE)
        for section, keys in SPEC_DEFAULTS.items():
            for key in keys:
                self.assertEqual(
                    getattr(getattr(defaults, section), key),
                    getattr(getattr(spelled, section), key),
                    f"{section}.{key}",
                )

    def test_converted_values(self):
        """Defaults come out converted: seconds, bytes, absolute paths, None."""
        c = parse({}, BASE)
        self.assertEqual(c.node.domains, ("example.org",))
        self.assertEqual(c.node.state_dir, BASE / "var")
        self.assertEqual(c.state_dir, BASE / "var")
        self.assertEqual(c.tls.certificate, BASE / "var/tls/cert.pem")
        self.assertEqual(c.tls.key, BASE / "var/tls/key.pem")
        self.assertIs(c.tls.generate, True)
        self.assertEqual(c.accounts.users, BASE / "users")
        self.assertEqual(c.accounts.aliases, BASE / "aliases")
        self.assertEqual(c.listen.smtp, ("tcp:2525:interface=127.0.0.1",))
        self.assertEqual(c.listen.submission, ("tcp:2587:interface=127.0.0.1",))
        self.assertEqual(c.listen.submissions, ())
        self.assertEqual(c.dns.nameservers, ())
        self.assertEqual(c.dns.timeout, 5)
        self.assertEqual(c.trust.spf_accept, ("pass",))
        self.assertEqual((c.trust.allow, c.trust.deny, c.trust.dnsbl, c.trust.policies), ((),) * 4)
        self.assertEqual(c.trust.push, "accept")
        self.assertIs(c.trust.bare_gdel, True)
        self.assertEqual(c.delivery.remote_port, 25)
        self.assertEqual(c.delivery.bind_address, "")
        self.assertIs(c.delivery.push_fallback, True)
        self.assertIsNone(c.delivery.smarthost)
        self.assertEqual(c.delivery.outbox_lifetime, 48 * 3600)
        self.assertEqual(c.delivery.delay_warning, 0)
        self.assertEqual(c.delivery.push_retry, (300, 900, 3600, 14400))
        self.assertEqual(c.delivery.push_lifetime, 5 * 86400)
        self.assertEqual(c.retrieval.schedule, (0, 600, 3600, 21600, 86400))
        self.assertEqual(c.limits.message_size, 25_000_000)
        self.assertEqual(c.limits.recipients, 100)
        self.assertEqual(c.limits.idle_timeout, 300)
        self.assertEqual(c.limits.retr_fail_limit, 10)
        self.assertEqual(c.limits.retr_fail_window, 3600)
        self.assertEqual(c.limits.retr_block, 3600)
        self.assertEqual(c.limits.retr_tarpit_max, 30)
        self.assertEqual(c.limits.pending_per_origin, 10000)

    def test_embedded_default(self):
        """The embedded default is loopback, under the given folder."""
        c = configuration.embedded_default(BASE)
        self.assertEqual(c.node.hostname, "localhost")
        self.assertEqual(c.state_dir, BASE / "var")
        self.assertEqual(c.accounts.users, BASE / "var/users")
        for endpoint in c.listen.smtp + c.listen.submission:
            self.assertIn("interface=127.0.0.1", endpoint)

    def test_frozen(self):
        """A Config cannot be changed in place."""
        c = parse({}, BASE)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            c.limits.recipients = 5


class ValueTests(SynchronousTestCase):
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
        self.assertEqual(c.node.hostname, "mx.example.net")
        self.assertEqual(c.node.domains, ("example.net", "b.test"))
        self.assertTrue(c.is_local_domain("B.TEST"))
        self.assertFalse(c.is_local_domain("example.org"))
        self.assertEqual(c.dns.nameservers, (("127.0.0.1", 5353), ("192.0.2.1", 53), ("::1", 53)))
        self.assertEqual(c.dns.timeout, 5400)
        self.assertEqual(c.trust.allow, (ipaddress.ip_network("192.0.2.0/24"), "good.test"))
        self.assertEqual(c.delivery.smarthost, ("relay.test", 2525))
        self.assertEqual(c.limits.message_size, 1024)
        self.assertEqual(c.limits.idle_timeout, 90)


class DurationTests(SynchronousTestCase):
    def test_good(self):
        """Durations in every unit, and combined."""
        for text, seconds in [("0s", 0), ("90s", 90), ("10m", 600), ("48h", 172800), ("5d", 432000),
                              ("1w", 604800), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25)]:
            self.assertEqual(parse_duration(text), seconds, text)

    def test_bad(self):
        """Numbers without a unit, negative, unknown units, spaces and non-strings fail."""
        for text in ("", "10", "-1s", "5x", "h", " 1s", "1s ", "1 s", "s1", 10, None, "1h-5m"):
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_duration(text)

    def test_bad_in_file_names_key(self):
        """A bad duration in the file names its key."""
        for section, key, value in [("limits", "idle_timeout", "5 minutes"), ("dns", "timeout", 5),
                                    ("delivery", "push_retry", ["5m", "soon"]),
                                    ("retrieval", "schedule", ["0s", 10])]:
            e = _error({section: {key: value}})
            self.assertEqual(e.option, f"{section}.{key}")
            self.assertTrue(str(e).startswith(f"{section}.{key}: "))


class SizeTests(SynchronousTestCase):
    def test_good(self):
        """Decimal and binary units, and bare integers."""
        for text, size in [("25MB", 25_000_000), ("1KB", 1000), ("1kb", 1000), ("1MiB", 1048576),
                           ("2GiB", 2 * 1024**3), ("100", 100), ("100B", 100), (512, 512)]:
            self.assertEqual(parse_size(text), size, text)

    def test_bad(self):
        """Fractions, negatives, unknown units and booleans fail."""
        for text in ("1.5MB", "-1", -1, "MB", "", "25TB", "lots", True, None):
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_size(text)

    def test_bad_in_file_names_key(self):
        """A bad size in the file names limits.message_size."""
        for value in ("25 megabytes", True, 1.5):
            self.assertEqual(_error({"limits": {"message_size": value}}).option, "limits.message_size")


class ErrorTests(SynchronousTestCase):
    """Every error names the key at fault."""

    def test_unknown_section(self):
        """An unknown section is named."""
        self.assertEqual(_error({"bogus": {}}).option, "bogus")

    def test_section_not_table(self):
        """A section that is not a table is named."""
        self.assertEqual(_error({"limits": 5}).option, "limits")

    def test_unknown_key(self):
        """An unknown key is named with its section."""
        e = _error({"limits": {"recipient": 5}})
        self.assertEqual(e.option, "limits.recipient")
        self.assertIn("unknown", e.message)

    def test_wrong_types(self):
        """Wrong TOML types are named."""
        for section, key, value in [
            ("node", "hostname", 5), ("node", "domains", "example.org"), ("tls", "generate", "yes"),
            ("limits", "recipients", "100"), ("limits", "recipients", True), ("delivery", "remote_port", 25.0),
            ("listen", "smtp", "tcp:25"), ("trust", "bare_gdel", 1), ("node", "domains", [1]),
        ]:
            self.assertEqual(_error({section: {key: value}}).option, f"{section}.{key}", (key, value))

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
            self.assertEqual(e.option, f"{section}.{key}", (key, value))
            self.assertNotIn("\n", str(e))

    def test_bad_endpoints(self):
        """Endpoint strings that do not parse are named, without listening."""
        for value in ("tcp:abc", "tcp:", "foo:1", "", "tcp:25:bogus=1", "ssl:4650", "tcp:99999", "tcp:-1"):
            e = _error({"listen": {"smtp": ["tcp:2525", value]}})
            self.assertEqual(e.option, "listen.smtp", value)
        self.assertEqual(_error({"listen": {"submissions": ["nonsense"]}}).option, "listen.submissions")

    def test_bad_local_delivery(self):
        """[delivery] local is "maildir" or "lmtp:" and a client endpoint; errors name it."""
        for value in ("mbox", "lmtp", "lmtp:", "lmtp:bogus:1", "lmtp:tcp:127.0.0.1",
                      "lmtp:tcp:127.0.0.1:x", "lmtp:unix:run/lmtp", "LMTP:unix:/run/lmtp"):
            e = _error({"delivery": {"local": value}})
            self.assertEqual(e.option, "delivery.local", value)
            self.assertNotIn("\n", str(e))

    def test_good_local_delivery(self):
        """The SPEC 11.3 forms are kept as written; maildir is the default."""
        self.assertEqual(parse({}, BASE).delivery.local, "maildir")
        for value in ("maildir", "lmtp:unix:/run/dovecot/lmtp", "lmtp:tcp:127.0.0.1:24",
                      "lmtp:unix:path=/run/lmtp:timeout=5"):
            self.assertEqual(parse({"delivery": {"local": value}}, BASE).delivery.local, value)

    def test_good_endpoints(self):
        """Ordinary endpoint strings are kept as written."""
        c = parse({"listen": {"smtp": ["tcp:25", "tcp6:25:interface=\\:\\:1", "unix:/run/p.sock"]}}, BASE)
        self.assertEqual(c.listen.smtp, ("tcp:25", "tcp6:25:interface=\\:\\:1", "unix:/run/p.sock"))

    def test_tls_files_required_without_generate(self):
        """With tls.generate off, missing files are an error naming the key."""
        folder = _tempdir(self)
        e = _error({"tls": {"generate": False}}, folder)
        self.assertEqual(e.option, "tls.certificate")
        (folder / "cert.pem").write_text("x")
        e = _error({"tls": {"generate": False, "certificate": "cert.pem"}}, folder)
        self.assertEqual(e.option, "tls.key")
        (folder / "key.pem").write_text("x")
        c = parse({"tls": {"generate": False, "certificate": "cert.pem", "key": "key.pem"}}, folder)
        self.assertEqual(c.tls.key, (folder / "key.pem").resolve())


class PathTests(SynchronousTestCase):
    """Relative paths are relative to the config file's folder."""

    def test_relative(self):
        """Every path key is resolved against the base folder."""
        c = parse(
            {"node": {"state_dir": "state"}, "tls": {"certificate": "../tls/c.pem", "key": "k.pem"},
             "accounts": {"users": "u", "aliases": "sub/a"}},
            BASE,
        )
        self.assertEqual(c.state_dir, BASE / "state")
        self.assertEqual(c.tls.certificate, Path("/srv/pullmail/tls/c.pem"))
        self.assertEqual(c.tls.key, BASE / "k.pem")
        self.assertEqual(c.accounts.users, BASE / "u")
        self.assertEqual(c.accounts.aliases, BASE / "sub/a")

    def test_absolute(self):
        """Absolute paths are kept."""
        c = parse({"node": {"state_dir": "/var/lib/pullmail"}}, BASE)
        self.assertEqual(c.state_dir, Path("/var/lib/pullmail"))

    def test_load_relative_to_file(self):
        """load() resolves against the file's folder, not the working directory."""
        folder = _tempdir(self)
        (folder / "conf").mkdir(parents=True)
        path = folder / "conf" / "p.toml"
        path.write_text('[node]\nstate_dir = "../state"\n[accounts]\nusers = "users.txt"\n')
        c = load(path)
        self.assertEqual(c.state_dir, folder / "state")
        self.assertEqual(c.accounts.users, folder / "conf" / "users.txt")


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.folder = _tempdir(self)

    def test_bad_toml(self):
        """A file that is not TOML is one ConfigError naming the file."""
        path = self.folder / "bad.toml"
        path.write_text("[limits\nrecipients = \n")
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(caught.exception.option, "config")
        self.assertIn("bad.toml", str(caught.exception))
        self.assertIn("TOML", str(caught.exception))

    def test_not_utf8(self):
        """A file that is not UTF-8 is a ConfigError too."""
        path = self.folder / "latin1.toml"
        path.write_bytes(b'[node]\nhostname = "caf\xe9"\n')
        with self.assertRaises(ConfigError):
            load(path)

    def test_missing(self):
        """A missing file is a ConfigError, not an OSError."""
        with self.assertRaises(ConfigError) as caught:
            load(self.folder / "none.toml")
        self.assertEqual(caught.exception.option, "config")

    def test_bad_value_in_file(self):
        """A bad value in a file names its key."""
        path = self.folder / "p.toml"
        path.write_text("[limits]\nrecipients = 0\n")
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(caught.exception.option, "limits.recipients")


class OverrideTests(SynchronousTestCase):
    """--set section.key=value on top of a loaded config."""

    def setUp(self):
        self.config = parse({}, BASE)

    def test_values(self):
        """TOML values and bare words are both understood."""
        c = override(self.config, "limits.recipients", "50")
        self.assertEqual(c.limits.recipients, 50)
        c = override(c, "trust.push", "refuse")
        self.assertEqual(c.trust.push, "refuse")
        c = override(c, "node.domains", '["a.test", "b.test"]')
        self.assertEqual(c.node.domains, ("a.test", "b.test"))
        c = override(c, "limits.idle_timeout", "10m")
        self.assertEqual(c.limits.idle_timeout, 600)
        self.assertEqual(c.limits.recipients, 50)
        self.assertEqual(self.config.limits.recipients, 100)

    def test_paths_relative_to_base(self):
        """An overridden relative path is relative to the config's folder."""
        c = override(self.config, "node.state_dir", "other")
        self.assertEqual(c.state_dir, BASE / "other")

    def test_errors(self):
        """Unknown keys and bad values name the key."""
        for option, value in [("limits.nothing", "1"), ("nosection.key", "1"), ("limits", "1"),
                              ("limits.recipients", "0"), ("limits.recipients", "many"),
                              ("tls.generate", "maybe")]:
            with self.assertRaises(ConfigError, msg=option) as caught:
                override(self.config, option, value)
            self.assertEqual(caught.exception.option, option)


class ExampleFileTests(SynchronousTestCase):
    """etc/pullmail.toml loads and documents every key (SPEC 9)."""

    def test_loads(self):
        """The example file is a valid config."""
        c = load(EXAMPLE)
        self.assertEqual(c.base, EXAMPLE.parent)

    def test_every_key(self):
        """Every field of every Config section is a key of the example file."""
        mapping = tomllib.loads(EXAMPLE.read_text("utf-8"))
        missing = []
        for section in SECTIONS:
            cls = type(getattr(Config(), section))
            for f in dataclasses.fields(cls):
                if f.name not in mapping.get(section, {}):
                    missing.append(f"{section}.{f.name}")
        self.assertEqual(missing, [])

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
                    self.assertEqual(
                        getattr(getattr(documented, section), m.group(1)),
                        getattr(getattr(defaults, section), m.group(1)),
                        f"{section}.{m.group(1)}",
                    )
                    checked += 1
                pending = None
        self.assertGreater(checked, 40)


def test_mta_sts_keys():
    """SPEC 11.2: [delivery] mta_sts (off by default) and mta_sts_port (443)."""
    defaults = parse({}, BASE)
    assert (defaults.delivery.mta_sts, defaults.delivery.mta_sts_port) == (False, 443)
    on = parse({"delivery": {"mta_sts": True, "mta_sts_port": 8443}}, BASE)
    assert (on.delivery.mta_sts, on.delivery.mta_sts_port) == (True, 8443)
    for key, value in [("mta_sts", "yes"), ("mta_sts_port", 0), ("mta_sts_port", 65536),
                       ("mta_sts_port", "443")]:
        assert _error({"delivery": {key: value}}).option == f"delivery.{key}"
