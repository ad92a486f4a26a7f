"""
AUTH backend: the twisted.cred checker over the users file, and the
throttling of addresses that keep failing.  Deterministic: task.Clock.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pullmail.accounts.login import AccountsChecker, Authenticator, make_portal
from pullmail.accounts.users import Accounts, hash_password
from pullmail.smtp import replies
from pullmail.smtp.server import Authenticate
from pullmail.testing import assert_no_result, failure_of, result_of
from pullmail.trust.throttle import FailureTracker

pytestmark = pytest.mark.usefixtures("no_logged_failures")


def run_blocking(function, *args):
    return defer.maybeDeferred(function, *args)


ACCOUNTS = Accounts(frozenset({"example.org"}),
                    users={"alice@example.org": hash_password("secret", salt=b"s" * 16)})


def connection(peer: str):
    return SimpleNamespace(machine=SimpleNamespace(session=SimpleNamespace(peer=peer)))


class CheckerTests:
    def test_interface(self):
        """The checker is a twisted.cred ICredentialsChecker."""
        assert verifyObject(ICredentialsChecker, AccountsChecker(ACCOUNTS, run_blocking))

    def test_right_password(self):
        """The avatar id is the user's address, normalised to lower case."""
        checker = AccountsChecker(ACCOUNTS, run_blocking)
        d = checker.requestAvatarId(UsernamePassword(b"Alice@Example.org", b"secret"))
        assert result_of(d) == "alice@example.org"

    def test_wrong_password_and_unknown_user(self):
        """Both fail the same way: UnauthorizedLogin."""
        checker = AccountsChecker(ACCOUNTS, run_blocking)
        for user, password in [(b"alice@example.org", b"nope"), (b"bob@example.org", b"secret")]:
            failure_of(
                checker.requestAvatarId(UsernamePassword(user, password)), UnauthorizedLogin
            )


class AuthenticatorTests:
    def setup_method(self):
        self.clock = Clock()
        self.failures = FailureTracker(self.clock, limit=3, window=3600, block=900,
                                       tarpit_max=10, what="AUTH")
        self.authenticate = Authenticator(make_portal(ACCOUNTS, run_blocking), self.failures,
                                          self.clock)

    def test_success_is_immediate(self):
        d = self.authenticate(connection("192.0.2.1"), Authenticate("alice@example.org", "secret"))
        assert result_of(d) is True

    def test_failures_answered_later_each_time_then_blocked(self):
        """
        RFC 4954 15: failures are answered after 1 s, then 2 s ...; at the
        limit the address is refused at connect (421 4.7.0); others are not.
        """
        peer = "192.0.2.7"
        for delay, verdict in ((1.0, False), (2.0, False), (4.0, replies.S421_BLOCKED)):
            d = self.authenticate(connection(peer), Authenticate("alice@example.org", "bad"))
            assert_no_result(d)
            self.clock.advance(delay - 0.01)
            assert_no_result(d)
            self.clock.advance(0.01)
            assert result_of(d) == verdict
        assert self.failures.refuse_connection(peer) == replies.S421_BLOCKED
        # Not even the right password, on a connection opened before the block.
        d = self.authenticate(connection(peer), Authenticate("alice@example.org", "secret"))
        assert result_of(d) == replies.S421_BLOCKED
        assert self.failures.refuse_connection("192.0.2.8") is None
        self.clock.advance(900)
        assert self.failures.refuse_connection(peer) is None
