"""
Tests for L{pullmail.smtp.address}: RFC 5321 paths and the relay rule.
"""

from __future__ import annotations

import pytest

from pullmail.smtp.address import (
    AddressError,
    Forbidden,
    Local,
    Mailbox,
    Remote,
    classify,
    is_dot_atom,
    parse_mail_argument,
    parse_mailbox,
    parse_rcpt_argument,
)
from pullmail.testing import not_refused

pytestmark = pytest.mark.usefixtures("no_logged_failures")

DOMAINS = frozenset({"example.org", "example.net"})


def rcpt(path: str):
    """Classify the recipient of ``RCPT TO:<path>``."""
    mailbox, _ = parse_rcpt_argument(f"TO:{path}")
    return classify(mailbox, DOMAINS, "example.org")


class MailArgumentTests:
    """``MAIL FROM:<reverse-path> [params]`` (RFC 5321 4.1.1.2)."""

    def test_plain(self):
        """A plain path gives its mailbox, domain lowercased."""
        sender, params = parse_mail_argument("FROM:<Alice@Example.ORG>")
        assert sender == Mailbox("Alice", "example.org")
        assert str(sender) == "Alice@example.org"
        assert params == {}

    def test_null_sender(self):
        """``<>`` is the null reverse-path, with or without parameters."""
        assert parse_mail_argument("FROM:<>") == (None, {})
        assert parse_mail_argument("FROM:<> SIZE=10") == (None, {"SIZE": "10"})

    def test_keyword_case_and_space(self):
        """``from:`` in any case and a space before ``<`` are accepted."""
        assert parse_mail_argument("from: <a@b.test>")[0] == Mailbox("a", "b.test")

    def test_params(self):
        """Parameters are keyword(=value), keywords uppercased."""
        _, params = parse_mail_argument("FROM:<a@b.test> size=100 BODY=8BITMIME FLAG")
        assert params == {"SIZE": "100", "BODY": "8BITMIME", "FLAG": None}

    def test_bad_params(self):
        """An empty value, an '=' in a value or junk after the path is an error."""
        arguments = ("FROM:<a@b.test> SIZE=", "FROM:<a@b.test> X=a=b",
                     "FROM:<a@b.test>SIZE=1", "FROM:<a@b.test> -X")
        assert not_refused(parse_mail_argument, arguments, error=AddressError) == []

    def test_no_brackets(self):
        """A path must be in angle brackets."""
        arguments = ("FROM:a@b.test", "FROM:", "FROM:<a@b.test", "TO:<a@b.test>", "FROMx:<a@b.test>")
        assert not_refused(parse_mail_argument, arguments, error=AddressError) == []

    def test_source_route_dropped(self):
        """A source route is parsed and ignored (RFC 5321 4.1.1.3, C.)."""
        assert parse_mail_argument("FROM:<@relay.test,@other.test:a@b.test>")[0] == Mailbox("a", "b.test")

    def test_bad_source_route(self):
        """A malformed route is an error, never a mailbox."""
        paths = ("<@:a@b.test>", "<@relay.test a@b.test>", "<@relay.test,x:a@b.test>",
                 "<@-bad.test:a@b.test>")
        assert not_refused(lambda path: parse_mail_argument(f"FROM:{path}"), paths,
                           error=AddressError) == []

    def test_postmaster_not_a_sender(self):
        """A bare <postmaster> is only a recipient."""
        with pytest.raises(AddressError):
            parse_mail_argument("FROM:<postmaster>")


class MailboxTests:
    """``Mailbox = Local-part "@" ( Domain / address-literal )``."""

    def test_quoted_local_part(self):
        """A quoted local part is unquoted and marked."""
        mailbox = parse_mailbox('"john doe"@example.org')
        assert mailbox == Mailbox("john doe", "example.org", quoted=True)
        assert str(mailbox) == '"john doe"@example.org'

    def test_quoted_pair(self):
        """Backslash pairs in quotes are undone; str() quotes again."""
        mailbox = parse_mailbox(r'"a\"b\\c"@example.org')
        assert mailbox.local == 'a"b\\c'
        assert str(mailbox) == r'"a\"b\\c"@example.org'
        assert parse_mailbox(str(mailbox)) == mailbox

    def test_needless_quotes(self):
        """``"user"@d`` is the same local part as ``user@d``; str() drops the quotes."""
        mailbox = parse_mailbox('"user"@example.org')
        assert mailbox.local == "user"
        assert str(mailbox) == "user@example.org"

    def test_address_literal(self):
        """Address literals are kept as such."""
        assert parse_mailbox("a@[192.0.2.1]").literal
        assert parse_mailbox("a@[IPv6:2001:db8::1]").literal

    def test_bad(self):
        """Malformed mailboxes are errors."""
        texts = ("", "@example.org", "a@", "a", "a@b@c.test", ".a@b.test", "a.@b.test",
                 "a..b@c.test", "a b@c.test", '"unterminated@b.test', 'a"b"@c.test',
                 "a@-b.test", "a@b-.test", "a@b..test", "a@b.test.", "a@b_c.test",
                 "a@[1.2.3.4", '"a"b@c.test', "a@b.test\x00", "a\r@b.test")
        assert not_refused(parse_mailbox, texts, error=AddressError) == []

    def test_dot_atom(self):
        """is_dot_atom follows RFC 5322 3.2.3."""
        assert is_dot_atom("a.b+c_d-e{x}")
        assert not is_dot_atom("a..b")
        assert not is_dot_atom("a b")
        assert not is_dot_atom("")


class LengthTests:
    """The limits of RFC 5321 4.5.3.1."""

    def test_local_part(self):
        """64 octets of local part are fine, 65 are not."""
        parse_mailbox("a" * 64 + "@b.test")
        with pytest.raises(AddressError):
            parse_mailbox("a" * 65 + "@b.test")

    def test_domain(self):
        """A domain over 255 octets is refused."""
        label = "a" * 50
        long_domain = ".".join([label] * 6)  # 305 octets
        with pytest.raises(AddressError):
            parse_mailbox("x@" + long_domain)

    def test_label(self):
        """A label is at most 63 octets (RFC 1035 2.3.4)."""
        parse_mailbox("x@" + "a" * 63 + ".test")
        with pytest.raises(AddressError):
            parse_mailbox("x@" + "a" * 64 + ".test")

    def test_path(self):
        """A path over 256 octets with its brackets is refused (4.5.3.1.3)."""
        domain = ".".join(["a" * 60] * 3) + ".test"   # 187 octets
        ok = "b" * 60 + "@" + domain                   # 248 octets, 250 with <>
        assert parse_mail_argument(f"FROM:<{ok}>")[0].local == "b" * 60
        long_path = "@" + "r" * 10 + ".test:" + ok     # a route makes it 266
        with pytest.raises(AddressError):
            parse_mail_argument(f"FROM:<{long_path}>")


class RcptArgumentTests:
    """``RCPT TO:<forward-path>``, and <postmaster>."""

    def test_postmaster(self):
        """A bare <Postmaster>, any case, is allowed and has no domain."""
        for path in ("<postmaster>", "<Postmaster>", "<POSTMASTER>"):
            mailbox, _ = parse_rcpt_argument(f"TO:{path}")
            assert mailbox == Mailbox("postmaster", "")

    def test_other_bare_name(self):
        """Any other bare name is an error."""
        with pytest.raises(AddressError):
            parse_rcpt_argument("TO:<alice>")

    def test_params(self):
        """RCPT parameters are returned for the server to judge."""
        assert parse_rcpt_argument("TO:<a@b.test> NOTIFY=NEVER")[1] == {"NOTIFY": "NEVER"}


class ClassifyTests:
    """The relay rule: no address trick makes a remote recipient local."""

    def test_local(self):
        """A plain local address, in any case, is Local and normalised."""
        assert rcpt("<Alice@EXAMPLE.org>") == Local("alice@example.org")
        assert rcpt("<bob@example.net>") == Local("bob@example.net")
        assert rcpt('<"bob"@example.net>') == Local("bob@example.net")

    def test_postmaster(self):
        """<postmaster> is the postmaster of the postmaster domain."""
        assert rcpt("<postmaster>") == Local("postmaster@example.org")

    def test_remote(self):
        """An address elsewhere is Remote (relay, AUTH only)."""
        assert rcpt("<a@remote.test>") == Remote(Mailbox("a", "remote.test"))

    def test_source_route_to_local(self):
        """A route through somewhere else to a local mailbox is local."""
        assert rcpt("<@remote.test:alice@example.org>") == Local("alice@example.org")

    def test_tricks_never_local(self):
        """Every trick address is Forbidden, Remote or a syntax error, never Local."""
        tricks = [
            '<"user@evil.test"@example.org>',        # quoted @
            '<"user@evil.test">',                    # quoted, no domain
            "<user%evil.test@example.org>",          # percent hack
            '<"user%evil.test"@example.org>',        # quoted percent hack
            "<evil.test!user@example.org>",          # bang path
            '<"evil.test!user"@example.org>',        # quoted bang path
            "<@example.org:user@evil.test>",         # source route out
            "<@example.org,@example.net:user@evil.test>",
            "<user@[127.0.0.1]>",                    # address literal
            "<user@[IPv6:::1]>",
            "<user@[example.org]>",
            "<user@example.org@evil.test>",          # two @
            "<user@evil.test@example.org>",
            "<user\\@evil.test@example.org>",
            "<user@example.org.>",                   # trailing dot
            "<user@sub.example.org>",                # subdomain
            "<user@example.org.evil.test>",          # suffix
            "<user@evil.test%example.org>",          # percent in domain
            "<user@example.org:25>",
            '<"@evil.test:user"@example.org>',       # quoted route
            '<"\\"user@evil.test"@example.org>',     # quoted pair
            "<user@127.0.0.1>",                      # dotted quad as a domain
            "<user@evil.test >",
            "<postmaster@evil.test>",
            '<"a b"@example.org>',                   # quoted space
            "<user@example.org\x00.evil.test>",
            "<user@example.org,@evil.test>",
        ]
        local = []
        for path in tricks:
            try:
                verdict = rcpt(path)
            except AddressError:
                continue
            if isinstance(verdict, Local):
                local.append((path, verdict))
            elif isinstance(verdict, Remote):
                assert verdict.mailbox.domain not in DOMAINS, path
            else:
                assert isinstance(verdict, Forbidden), path
        assert local == []

    def test_routing_characters_forbidden(self):
        """Routing characters in a local domain's local part are Forbidden."""
        for path in ('<"user@evil.test"@example.org>', "<user%evil.test@example.org>",
                     "<evil.test!user@example.org>"):
            assert isinstance(rcpt(path), Forbidden), path

    def test_literal_forbidden(self):
        """An address literal is never delivered, even for our own address."""
        assert isinstance(rcpt("<alice@[192.0.2.1]>"), Forbidden)

    def test_quoted_non_atom_forbidden(self):
        """A quoted local part that is not a dot-atom is Forbidden locally."""
        assert isinstance(rcpt('<"a b"@example.org>'), Forbidden)


def test_octets_that_are_not_utf8_make_no_address():
    """
    A command line is decoded with surrogateescape; an address holding
    octets that were not UTF-8 is refused as an address (RFC 6532 3.2),
    never an exception past the parser (the live fuzz found this).
    """
    assert not_refused(parse_mail_argument, [
        "FROM:<x@fuzz.t\udc81st> SIZETMIME",
        "FROM:<a@out2\udcea$side.test>",
        "FROM:<\udc81x@b.test> SMTPUTF8",
    ], error=AddressError) == []
