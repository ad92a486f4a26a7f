"""
DKIM keys (pullmail.trust.dkim_keys), the [dkim] config section and
``pullmail dkim-keygen`` (SPEC 11.1): keys made once and never
overwritten, records in zone-file form split into 255-octet strings.
"""

from __future__ import annotations

import io
import re

import pytest

from pullmail import config as configuration
from pullmail.config import ConfigError, DKIMConfig
from pullmail.node import cli
from pullmail.trust.dkim_keys import dns_record, ensure_keys, load_keys, txt_strings

ZONE_LINE = re.compile(r'^(\S+)\. IN TXT ((?:"[^"]{1,255}" ?)+)$')


def test_keys_are_made_once_and_never_overwritten(tmp_path):
    config = DKIMConfig(key_dir=tmp_path / "dkim")
    made = ensure_keys(config, ["example.org", "example.net"])
    assert sorted((k.domain, k.selector) for k in made) == [
        ("example.net", "pm1-ed25519"), ("example.net", "pm1-rsa"),
        ("example.org", "pm1-ed25519"), ("example.org", "pm1-rsa")]
    path = tmp_path / "dkim" / "example.org.pm1-rsa.pem"
    before = path.read_bytes()
    assert ensure_keys(config, ["example.org"]) == []
    assert path.read_bytes() == before
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "dkim").iterdir()) == [
        "example.net.pm1-ed25519.pem", "example.net.pm1-rsa.pem",
        "example.org.pm1-ed25519.pem", "example.org.pm1-rsa.pem"]


def test_a_new_selector_is_a_rotation_beside_the_old_keys(tmp_path):
    ensure_keys(DKIMConfig(key_dir=tmp_path), ["example.org"])
    made = ensure_keys(DKIMConfig(key_dir=tmp_path, selector="pm2"), ["example.org"])
    assert sorted(k.selector for k in made) == ["pm2-ed25519", "pm2-rsa"]
    assert len(list(tmp_path.iterdir())) == 4


def test_records_are_zone_file_lines_of_short_strings(dkim_keys):
    keys = dkim_keys[0]["example.org"]
    lines = [dns_record(k) for k in keys]
    for line in lines:
        assert ZONE_LINE.match(line), line
    rsa = next(line for line in lines if "k=rsa" in line)
    assert rsa.startswith('pm1-rsa._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MII')
    assert rsa.count('"') == 4           # a 2048-bit key needs two strings
    ed = next(line for line in lines if "k=ed25519" in line)
    assert ed.startswith('pm1-ed25519._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=')
    assert txt_strings("a" * 510) == '"' + "a" * 255 + '" "' + "a" * 255 + '"'


def test_a_file_of_the_wrong_kind_is_refused(tmp_path, dkim_keys):
    config = DKIMConfig(key_dir=tmp_path)
    ensure_keys(config, ["example.org"])
    ed = config.key_path("example.org", "ed25519-sha256").read_bytes()
    config.key_path("example.org", "rsa-sha256").write_bytes(ed)
    with pytest.raises(ValueError, match="not an RSA key"):
        load_keys(config, ["example.org"])


def write_config(tmp_path, dkim: str = "") -> str:
    path = tmp_path / "pullmail.toml"
    path.write_text('[node]\nhostname = "mx.example.org"\ndomains = ["example.org"]\n' + dkim)
    return str(path)


def test_config_defaults_and_validation(tmp_path):
    config = configuration.load(write_config(tmp_path))
    assert config.dkim.sign and config.dkim.generate
    assert config.dkim.selector == "pm1"
    assert config.dkim.key_dir == tmp_path / "dkim"
    assert config.dkim.algorithms == ("rsa-sha256", "ed25519-sha256")
    assert config.trust.authserv_id == "" and config.trust.dmarc == "enforce"
    for section, key, value in [("dkim", "selector", '"bad selector"'),
                                ("dkim", "algorithms", '["rsa-sha1"]'),
                                ("dkim", "algorithms", '["rsa-sha256", "rsa-sha256"]'),
                                ("trust", "dmarc", '"maybe"'),
                                ("trust", "authserv_id", '"no spaces"')]:
        with pytest.raises(ConfigError) as caught:
            configuration.parse({"node": {"domains": ["example.org"]},
                                 section: {key: __import__("tomllib").loads(f"v={value}")["v"]}},
                                tmp_path)
        assert caught.value.option == f"{section}.{key}"


def test_checkconfig_fails_when_a_key_is_missing_and_not_generated(tmp_path, capsys):
    path = write_config(tmp_path, "[dkim]\ngenerate = false\n")
    assert cli.main(["checkconfig", "--config", path], io.StringIO()) == 1
    assert "dkim.generate: no rsa-sha256 key for example.org" in capsys.readouterr().err
    path = write_config(tmp_path, "[dkim]\ngenerate = false\nsign = false\n")
    assert cli.main(["checkconfig", "--config", path], io.StringIO()) == 0


def test_dkim_keygen_prints_records_and_keeps_keys(tmp_path, capsys):
    path = write_config(tmp_path, "[dkim]\ngenerate = false\n")
    out = io.StringIO()
    assert cli.main(["dkim-keygen", "--config", path], out) == 0
    first = out.getvalue().splitlines()
    assert [line.split()[0] for line in first] == [
        "pm1-rsa._domainkey.example.org.", "pm1-ed25519._domainkey.example.org."]
    assert all(ZONE_LINE.match(line) for line in first)
    assert capsys.readouterr().err.count("; new ") == 2
    out = io.StringIO()
    assert cli.main(["dkim-keygen", "--config", path], out) == 0
    assert out.getvalue().splitlines() == first                # kept, not remade
    assert capsys.readouterr().err.count("; existing ") == 2
    assert cli.main(["checkconfig", "--config", path], io.StringIO()) == 0


def test_dkim_keygen_for_named_domains(tmp_path, capsys):
    out = io.StringIO()
    assert cli.main(["dkim-keygen", "--config", write_config(tmp_path), "new.example"], out) == 0
    assert "pm1-rsa._domainkey.new.example." in out.getvalue()
    assert cli.main(["dkim-keygen", "--config", write_config(tmp_path), "bad_name!"],
                    io.StringIO()) == 1
