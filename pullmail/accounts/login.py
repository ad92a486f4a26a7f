"""
The AUTH backend of the submission services (RFC 4954), through
``twisted.cred``: a checker over the users file (scrypt, in a thread), a
realm whose avatar is the user's address, and throttling of addresses
that keep failing.
"""

from __future__ import annotations

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from zope.interface import Interface, implementer

from pullmail.accounts.users import Accounts
from pullmail.smtp import replies

__all__ = ["Authenticator", "AccountsChecker", "ISubmitter", "make_portal"]


class ISubmitter(Interface):
    """The avatar of a logged-in user: the address it may send as."""


@implementer(ICredentialsChecker)
class AccountsChecker:
    """Username/password against the users file; the avatar id is the address."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, accounts: Accounts, run_blocking) -> None:
        self.accounts = accounts
        self.run_blocking = run_blocking

    def requestAvatarId(self, credentials) -> defer.Deferred:
        user = credentials.username
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        password = credentials.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        user = user.lower()
        d = self.run_blocking(self.accounts.check_password, user, password)

        def judged(ok: bool) -> str:
            if not ok:
                raise error.UnauthorizedLogin()
            return user

        return d.addCallback(judged)


@implementer(IRealm)
class SubmitterRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmitter not in interfaces:
            raise NotImplementedError(interfaces)
        return ISubmitter, avatarId, lambda: None


def make_portal(accounts: Accounts, run_blocking) -> Portal:
    return Portal(SubmitterRealm(), [AccountsChecker(accounts, run_blocking)])


class Authenticator:
    """
    Carries out the machine's Authenticate requests through the portal; a
    failure is answered late, later with each failure from the same address,
    and enough of them block it (RFC 4954 15 warns of password guessing).
    """

    def __init__(self, portal: Portal, failures, clock) -> None:
        self.portal = portal
        self.failures = failures
        self.clock = clock

    def __call__(self, connection, request) -> defer.Deferred:
        """
        Fires with True (logged in), False (535), or a reply to close with:
        an address that is blocked is not let to guess on, even on a
        connection it opened before the block.
        """
        peer = connection.machine.session.peer
        if self.failures.blocked(peer):
            return defer.succeed(replies.S421_BLOCKED)
        d = self.portal.login(UsernamePassword(request.user, request.password), None, ISubmitter)

        def refused(failure):
            failure.trap(error.UnauthorizedLogin)
            delay = self.failures.failed(peer)
            verdict = replies.S421_BLOCKED if self.failures.blocked(peer) else False
            return task.deferLater(self.clock, delay, lambda: verdict)

        return d.addCallbacks(lambda avatar: True, refused)
