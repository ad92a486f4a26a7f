"""
Tests for L{pullmail.accounts.users}: password hashes, the users and aliases
files, alias expansion and sender ownership.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pullmail.accounts.users import (
    Accounts,
    AccountsError,
    add_user,
    hash_password,
    normalise_local_address,
    read_aliases,
    read_users,
    verify_password,
)

DOMAINS = frozenset({"example.org", "example.net"})


class PasswordTests:
    """scrypt hashes (RFC 7914) with a per-user salt."""

    def test_verify(self):
        """A hash verifies its password and nothing else."""
        stored = hash_password("correct horse")
        assert stored.startswith("$scrypt$")
        assert "correct horse" not in stored
        assert verify_password("correct horse", stored)
        assert not verify_password("correct hors", stored)
        assert not verify_password("", stored)

    def test_salt_differs(self):
        """The same password hashed twice gives two different hashes."""
        assert hash_password("pw") != hash_password("pw")

    def test_fixed_salt(self):
        """With a given salt the hash is deterministic."""
        assert hash_password("pw", salt=b"s" * 16) == hash_password("pw", salt=b"s" * 16)

    def test_unicode(self):
        """Non-ASCII passwords work."""
        assert verify_password("pässwörd", hash_password("pässwörd"))

    def test_garbage(self):
        """Malformed stored hashes never verify and never raise."""
        for stored in ("", "plain", "$md5$x$y$z", "$scrypt$n=16384$a$b", "$scrypt$x=1$a$b"):
            assert not verify_password("pw", stored), stored


class NormaliseTests:
    def test_lowercase(self):
        """Addresses are lowercased."""
        assert normalise_local_address(" Alice@Example.ORG ") == "alice@example.org"

    def test_unsafe(self):
        """Names unsafe as a path component are refused."""
        for text in ("../x@example.org", "a/b@example.org", '"a b"@example.org',
                     "x@[127.0.0.1]", ".hidden@example.org", "a..b@example.org", "noat"):
            with pytest.raises(AccountsError):
                normalise_local_address(text)


class FileTests:
    """The users and aliases files, with line numbers in errors."""

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        self.dir = tmp_path

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def test_users(self):
        """Comments and blank lines are skipped; addresses are normalised."""
        path = self.write("users", "# users\n\nAlice@Example.org:$scrypt$abc\n")
        assert read_users(path) == {"alice@example.org": "$scrypt$abc"}

    def test_missing_files(self):
        """Missing files mean no users and no aliases."""
        assert read_users(self.dir / "none") == {}
        assert read_aliases(self.dir / "none") == {}

    def test_users_bad_line(self):
        """A bad users line is reported with its file and line number."""
        path = self.write("users", "# c\nalice@example.org:$scrypt$x\n\nbob@example.org secret\n")
        with pytest.raises(AccountsError) as caught:
            read_users(path)
        assert f"{path}:4:" in str(caught.value)

    def test_users_bad_address(self):
        """A bad address in the users file names its line."""
        path = self.write("users", "../evil@example.org:$scrypt$x\n")
        with pytest.raises(AccountsError) as caught:
            read_users(path)
        assert f"{path}:1:" in str(caught.value)

    def test_aliases(self):
        """Aliases map to their targets; '@dom' is a catch-all."""
        path = self.write(
            "aliases",
            "# aliases\nSales@example.org: alice@example.org, Bob@Example.ORG\n"
            "@example.net: alice@example.org\nfwd@example.org: friend@remote.test\n",
        )
        assert read_aliases(path) == {
            "sales@example.org": ("alice@example.org", "Bob@example.org"),
            "@example.net": ("alice@example.org",),
            "fwd@example.org": ("friend@remote.test",),
        }

    def test_aliases_errors(self):
        """Every kind of bad alias line names its line number."""
        for text, line in [
            ("ok@example.org: a@example.org\nno colon here\n", 2),
            ("\n\nx@example.org:\n", 3),
            ("x@example.org: not an address\n", 1),
            ("# c\nx@example.org: a@[127.0.0.1]\n", 2),
            ("@bad..domain: a@example.org\n", 1),
            ("../x@example.org: a@example.org\n", 1),
        ]:
            path = self.write("aliases", text)
            with pytest.raises(AccountsError) as caught:
                read_aliases(path)
            assert f"{path}:{line}:" in str(caught.value), text

    def test_load(self):
        """Accounts.load reads both files."""
        users = self.write("users", "alice@example.org:$scrypt$x\n")
        aliases = self.write("aliases", "a@example.org: alice@example.org\n")
        accounts = Accounts.load(["example.org"], users, aliases)
        assert accounts.exists("a@example.org")
        assert accounts.exists("alice@example.org")
        assert not accounts.exists("bob@example.org")

    def test_add_user(self):
        """add_user writes a verifiable hash, keeps other users, file mode 0600."""
        path = self.dir / "sub" / "users"
        assert add_user(path, "Alice@Example.org", "one") == "alice@example.org"
        add_user(path, "bob@example.org", "two")
        add_user(path, "alice@example.org", "three")
        users = read_users(path)
        assert sorted(users) == ["alice@example.org", "bob@example.org"]
        assert verify_password("three", users["alice@example.org"])
        assert verify_password("two", users["bob@example.org"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["users"]

    def test_add_user_bad(self):
        """add_user refuses an unsafe address."""
        with pytest.raises(AccountsError):
            add_user(self.dir / "users", "a/b@example.org", "pw")


class ExpandTests:
    """Alias expansion, catch-alls, loops and ownership."""

    def setup_method(self):
        self.accounts = Accounts(
            DOMAINS,
            users={"alice@example.org": "h", "bob@example.org": "h", "carol@example.net": "h"},
            aliases={
                "sales@example.org": ("alice@example.org", "Bob@example.org"),
                "all@example.org": ("sales@example.org", "carol@example.net", "alice@example.org"),
                "fwd@example.org": ("friend@remote.test",),
                "loop1@example.org": ("loop2@example.org",),
                "loop2@example.org": ("loop1@example.org",),
                "self@example.org": ("self@example.org", "bob@example.org"),
                "@example.net": ("carol@example.net",),
            },
        )

    def test_user(self):
        """A user expands to itself."""
        assert self.accounts.expand("alice@example.org") == ("alice@example.org",)

    def test_unknown(self):
        """An unknown local address expands to nothing."""
        assert self.accounts.expand("nobody@example.org") == ()
        assert not self.accounts.exists("nobody@example.org")

    def test_postmaster(self):
        """postmaster@ every local domain always exists."""
        assert self.accounts.exists("postmaster@example.org")
        assert self.accounts.exists("postmaster@example.net")

    def test_nested_no_duplicates(self):
        """Nested aliases expand in order, each mailbox once."""
        assert self.accounts.expand("all@example.org") == (
            "alice@example.org", "bob@example.org", "carol@example.net",
        )

    def test_remote_target(self):
        """A remote target is kept as is."""
        assert self.accounts.expand("fwd@example.org") == ("friend@remote.test",)

    def test_catch_all(self):
        """Unknown names in a domain with a catch-all go to its target."""
        assert self.accounts.expand("anything@example.net") == ("carol@example.net",)
        assert self.accounts.exists("whatever@example.net")
        assert not self.accounts.exists("whatever@example.org")

    def test_loop_bounded(self):
        """An alias loop ends and delivers nowhere."""
        assert self.accounts.expand("loop1@example.org") == ()
        assert not self.accounts.exists("loop1@example.org")

    def test_deep_chain_bounded(self):
        """A very long chain stops at the depth limit instead of recursing."""
        aliases = {f"a{i}@example.org": (f"a{i + 1}@example.org",) for i in range(500)}
        accounts = Accounts(DOMAINS, users={"a500@example.org": "h"}, aliases=aliases)
        assert accounts.expand("a0@example.org") == ()
        assert accounts.expand("a495@example.org") == ("a500@example.org",)

    def test_self_reference(self):
        """An alias that names itself keeps a copy for itself."""
        assert self.accounts.expand("self@example.org") == ("self@example.org", "bob@example.org")

    def test_owns(self):
        """A user owns her address and the aliases that reach her, nothing else."""
        owns = self.accounts.owns
        assert owns("alice@example.org", "alice@example.org")
        assert owns("alice@example.org", "ALICE@example.org")
        assert owns("alice@example.org", "sales@example.org")
        assert owns("bob@example.org", "sales@example.org")
        assert owns("carol@example.net", "all@example.org")
        assert not owns("alice@example.org", "bob@example.org")
        assert not owns("alice@example.org", "fwd@example.org")
        assert not owns("alice@example.org", "alice@remote.test")
        assert not owns("alice@example.org", "")
        # A catch-all gives no right to send as every name of the domain.
        assert not owns("carol@example.net", "anything@example.net")
        assert not owns("alice@example.org", "loop1@example.org")

    def test_check_password(self):
        """check_password verifies the stored hash; unknown users are refused."""
        accounts = Accounts(DOMAINS, users={"alice@example.org": hash_password("pw")})
        assert accounts.check_password("alice@example.org", "pw")
        assert not accounts.check_password("alice@example.org", "wrong")
        assert not accounts.check_password("nobody@example.org", "pw")
