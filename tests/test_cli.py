"""
Tests for L{pullmail.node.cli}: the ``pullmail`` operator command.
"""

from __future__ import annotations

import io
import sys

import pytest

from pullmail.accounts.users import read_users, verify_password
from pullmail.node import cli

pytestmark = pytest.mark.usefixtures("no_logged_failures")


class _Stdin(io.StringIO):
    """A piped standard input (not a terminal)."""

    def isatty(self) -> bool:
        return False


class CLITestCase:
    @pytest.fixture(autouse=True)
    def _node(self, tmp_path, monkeypatch):
        """A config in a fresh folder outside the source tree."""
        self.dir = tmp_path.resolve()
        self.config = self.dir / "pullmail.toml"
        self.config.write_text('[node]\nhostname = "mx.example.org"\ndomains = ["example.org"]\n')
        self.stderr = io.StringIO()
        self.monkeypatch = monkeypatch

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out = io.StringIO()
        # Patched here, not in the fixture: pytest's capture puts its own
        # sys.stderr back between a test's setup and its call.
        self.monkeypatch.setattr(sys, "stderr", self.stderr)
        self.monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
        code = cli.main(list(argv), out=out)
        return code, out.getvalue(), self.stderr.getvalue()


class CheckConfigTests(CLITestCase):
    def test_ok(self):
        """A good config exits 0 and says so."""
        code, out, err = self.run_cli("checkconfig", "--config", str(self.config))
        assert code == 0
        assert "config ok" in out
        assert "mx.example.org" in out
        assert err == ""

    def test_bad_value(self):
        """A bad value exits non-zero with one line naming the key."""
        self.config.write_text("[limits]\nrecipients = 0\n")
        code, out, err = self.run_cli("checkconfig", "--config", str(self.config))
        assert code != 0
        assert len(err.splitlines()) == 1, err
        assert "limits.recipients" in err

    def test_unknown_key(self):
        """An unknown key is named."""
        self.config.write_text("[limits]\nrecipientz = 10\n")
        code, _, err = self.run_cli("checkconfig", "--config", str(self.config))
        assert code != 0
        assert len(err.splitlines()) == 1, err
        assert "limits.recipientz" in err

    def test_bad_toml(self):
        """A file that is not TOML is one line, not a traceback."""
        self.config.write_text("[limits\n")
        code, _, err = self.run_cli("checkconfig", "--config", str(self.config))
        assert code != 0
        assert len(err.splitlines()) == 1, err
        assert "TOML" in err

    def test_missing_file(self):
        """A missing config file is one line."""
        code, _, err = self.run_cli("checkconfig", "--config", str(self.dir / "none.toml"))
        assert code != 0
        assert len(err.splitlines()) == 1, err

    def test_bad_users_file(self):
        """A broken users file is reported with its line number."""
        (self.dir / "users").write_text("alice@example.org nohash\n")
        code, _, err = self.run_cli("checkconfig", "--config", str(self.config))
        assert code != 0
        assert "users:1:" in err

    def test_set_override(self):
        """--set applies on top of the file, and a bad one names the key."""
        code, _, _ = self.run_cli("checkconfig", "--config", str(self.config), "--set", "limits.recipients=5")
        assert code == 0
        code, _, err = self.run_cli("checkconfig", "--config", str(self.config), "--set", "limits.recipients=0")
        assert code != 0
        assert "limits.recipients" in err

    def test_set_without_equals(self):
        """A --set without '=' is a one-line usage error, not a traceback."""
        try:
            code, _, err = self.run_cli("checkconfig", "--config", str(self.config), "--set", "limits.recipients")
        except SystemExit as e:
            code, err = e.code, self.stderr.getvalue()
        assert code != 0
        assert "limits.recipients" in err


class AddUserTests(CLITestCase):
    def test_adduser_from_pipe(self):
        """adduser reads the password from piped stdin; the stored hash verifies."""
        code, out, err = self.run_cli("adduser", "--config", str(self.config), "Alice@Example.org",
                                      stdin="s3cret pass\n")
        assert code == 0, err
        assert "alice@example.org" in out
        users = read_users(self.dir / "users")
        assert list(users) == ["alice@example.org"]
        assert verify_password("s3cret pass", users["alice@example.org"])
        assert not verify_password("s3cret pass\n", users["alice@example.org"])

    def test_crlf_stripped(self):
        """A CRLF-ended password line loses its line end."""
        self.run_cli("adduser", "--config", str(self.config), "bob@example.org", stdin="pw\r\n")
        assert verify_password("pw", read_users(self.dir / "users")["bob@example.org"])

    def test_empty_password(self):
        """An empty password is refused and nothing is written."""
        code, _, err = self.run_cli("adduser", "--config", str(self.config), "bob@example.org", stdin="\n")
        assert code != 0
        assert len(err.splitlines()) == 1
        assert not (self.dir / "users").exists()

    def test_foreign_domain(self):
        """A user outside node.domains is refused."""
        code, _, err = self.run_cli("adduser", "--config", str(self.config), "bob@other.test", stdin="pw\n")
        assert code != 0
        assert "other.test" in err
        assert not (self.dir / "users").exists()

    def test_bad_address(self):
        """An unsafe address is refused with one line."""
        code, _, err = self.run_cli("adduser", "--config", str(self.config), "../x@example.org", stdin="pw\n")
        assert code != 0
        assert len(err.splitlines()) == 1
