"""
MTA-STS for the node (RFC 8461 5.1, SPEC 11.2): find a domain's policy
(TXT record, cache, HTTPS fetch) and apply it to outbound sessions and to
the RETR destined-host check; refresh cached policies once a day, before
they run out, and forget those that ran out.  Domains are A-labels
throughout (``_mta-sts.xn--bcher-kva.example``, ``https://mta-sts.xn--...``).
The rules are in L{policy}; this is the glue.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.net.tls import ObservedTLS, verifying_options
from pullmail.outbound.sts.cache import CachedPolicy, PolicyCache
from pullmail.outbound.sts.policy import (
    Mode,
    Policy,
    PolicyError,
    Verdict,
    allowed,
    parse_policy,
    parse_txt,
)
from pullmail.smtp.address import AddressError, a_label_domain
from pullmail.smtp.client import EHLOResult, open_session

__all__ = ["MTASTS", "PolicyRefused"]

log = Logger(namespace="pullmail.outbound.sts")

# After a failed fetch, the same policy id is not asked for again this
# long: a broken policy host must not cost every delivery attempt and every
# RETR a fetch (and its timeout).  A new id is fetched at once.
FETCH_HOLDOFF = 300.0
# RFC 8461 5.1: senders should refresh cached policies periodically, e.g.
# daily, so that a policy is renewed (and a changed id seen) before its
# max_age runs out even for a domain nobody sends to that day.
REFRESH_INTERVAL = 86400.0


class PolicyRefused(Exception):
    """An ``enforce`` policy forbids this session (the deferral's reason)."""


class MTASTS:
    """
    C{policy_for(domain)} fires with the L{Policy} to apply, or None; it
    never fails.  C{fetch(domain)} is the HTTPS fetch
    (L{pullmail.outbound.sts.fetch.PolicyFetcher.fetch}); C{trust} the
    trust root for MX certificates.
    """

    def __init__(self, *, resolver, fetch: Callable[[str], defer.Deferred], cache: PolicyCache,
                 clock: IReactorTime, trust) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.cache = cache
        self.clock = clock
        self.trust = trust
        self._asking: dict[str, list[defer.Deferred]] = {}
        self._failed: dict[str, tuple[str, float]] = {}   # domain -> (id, retry after)
        self._refresher = task.LoopingCall(self.refresh)
        self._refresher.clock = clock

    def start(self) -> None:
        """Read the cache (blocking), forget what ran out; refresh daily from now on."""
        self.cache.load()
        self.cache.prune(self.clock.seconds())
        self._refresher.start(REFRESH_INTERVAL, now=False).addErrback(
            lambda f: log.failure("MTA-STS refresh", f))

    def stop(self) -> None:
        if self._refresher.running:
            self._refresher.stop()

    # -- refresh (RFC 8461 5.1) ----------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """
        Forget the policies past their max_age, then look up again each
        cached one fetched at least L{REFRESH_INTERVAL} ago, one after
        another: a changed id is fetched, as always, and an unchanged one
        too, so that the policy's max_age starts again (a failure keeps
        the cached policy while it lasts).
        """
        return defer.Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        now = self.clock.seconds()
        await self.cache.prune(now)
        due = [c.domain for c in self.cache.policies() if now - c.fetched >= REFRESH_INTERVAL]
        maillog.MTA_STS_REFRESH(log, count=len(due))
        for domain in due:
            await self._lookup(domain, refresh=True)

    # -- discovery (RFC 8461 3 and 5.1) ------------------------------------------

    def policy_for(self, domain: str) -> defer.Deferred:
        """
        One lookup per domain at a time; callers meanwhile share its answer.
        A U-label domain is looked up as its A-label (IDNA 2008); a name
        that has none has no policy.
        """
        try:
            domain = a_label_domain(domain.rstrip("."))
        except AddressError:
            return defer.succeed(None)
        return self._lookup(domain)

    def _lookup(self, domain: str, refresh: bool = False) -> defer.Deferred:
        if domain in self._asking:
            waiter = defer.Deferred()
            self._asking[domain].append(waiter)
            return waiter
        self._asking[domain] = []

        def answer(policy: Policy | None | Failure) -> Policy | None:
            if isinstance(policy, Failure):   # a bug: keep what is known, never hang
                log.failure("MTA-STS lookup for {domain}", policy, domain=domain)
                policy = self._known(domain)
            for waiter in self._asking.pop(domain):
                waiter.callback(policy)
            return policy

        return defer.Deferred.fromCoroutine(self._discover(domain, refresh)).addBoth(answer)

    def _known(self, domain: str) -> Policy | None:
        """The cached policy of C{domain} while its max_age lasts."""
        cached = self.cache.get(domain)
        if cached is None or not cached.fresh(self.clock.seconds()):
            return None
        return cached.policy()

    async def _discover(self, domain: str, refresh: bool = False) -> Policy | None:
        """C{refresh}: fetch even for the cached policy's id (L{refresh})."""
        known = self._known(domain)
        try:
            record_id = parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except Exception as e:  # DNS failure, no record, a bad one
            # RFC 8461 5.1: without a live record, an unexpired cached policy applies.
            if known is not None:
                maillog.MTA_STS_CACHED(log, domain=domain, error=str(e), id=known.id)
            return known
        if known is not None and known.id == record_id and not refresh:
            return known
        failed_id, retry_after = self._failed.get(domain, ("", 0.0))
        if failed_id == record_id and self.clock.seconds() < retry_after:
            return known
        try:
            policy = parse_policy(await self.fetch(domain), record_id)
        except Exception as e:  # FetchError, PolicyError, DNS: the policy is not there
            now = self.clock.seconds()
            self._failed = {d: f for d, f in self._failed.items() if f[1] > now}
            self._failed[domain] = (record_id, now + FETCH_HOLDOFF)
            maillog.MTA_STS_FETCH_FAILED(
                log, domain=domain, id=record_id, error=_describe(e),
                fallback="keeping the cached one" if known else "no policy applies",
            )
            return known
        maillog.MTA_STS_POLICY(
            log, domain=domain, id=policy.id, mode=policy.mode.value, mx=list(policy.mx),
            max_age=policy.max_age,
        )
        self._failed.pop(domain, None)
        self.cache.put(CachedPolicy.of(domain, policy, self.clock.seconds())).addErrback(
            lambda f: log.failure("storing the MTA-STS policy of {domain}", f, domain=domain))
        return policy

    # -- application (RFC 8461 4 and 5) ------------------------------------------

    def refusal(self, policy: Policy | None, domain: str, host: str) -> str | None:
        """
        Before connecting to MX C{host}: the reason an enforce policy skips
        it, or None (a testing policy only logs).
        """
        return self._judge(policy, domain, host, None)

    async def open_session(self, policy: Policy, domain: str, connection, hostname: str,
                           host: str, fallback_tls) -> EHLOResult:
        """
        L{pullmail.smtp.client.open_session} under C{policy}: enforce
        requires STARTTLS and a certificate valid for C{host} (a failure is
        L{PolicyRefused}); testing checks the same and logs; none uses
        C{fallback_tls}, the node's usual outbound TLS.
        """
        if policy.mode is Mode.NONE:
            tls = fallback_tls.options_for(host) if fallback_tls else None
            return await open_session(connection, hostname, tls,
                                      require_tls=bool(fallback_tls and fallback_tls.required))
        if policy.mode is Mode.ENFORCE:
            try:
                session = await open_session(connection, hostname,
                                             verifying_options(host, self.trust),
                                             require_tls=True)
            except Exception as e:
                raise PolicyRefused(f"MTA-STS enforce ({domain}): MX {host}: {_describe(e)}") \
                    from e
            verified = session.tls
            maillog.MTA_STS_VERIFIED(log, domain=domain, host=host)
        else:
            observed = ObservedTLS(host, self.trust)
            session = await open_session(connection, hostname, observed)
            verified = session.tls and bool(observed.verified)
            if session.tls and not verified:
                maillog.MTA_STS_TLS_REPORT(log, domain=domain, host=host, problem=observed.problem)
        refused = self._judge(policy, domain, host, verified)
        if refused:
            raise PolicyRefused(refused)
        return session

    def destined(self, domain: str, hosts: dict[str, str]) -> defer.Deferred:
        """
        SPEC 11.2: of the destined addresses C{hosts} (address -> MX host) of
        C{domain}, those an enforce policy allows to RETR its mail.
        """
        def keep(policy: Policy | None) -> dict[str, str]:
            return {address: host for address, host in hosts.items()
                    if allowed(policy, host).verdict is not Verdict.REFUSE}

        return self.policy_for(domain).addCallback(keep)

    def _judge(self, policy: Policy | None, domain: str, host: str,
               verified: bool | None) -> str | None:
        decision = allowed(policy, host, verified)
        if decision.verdict is Verdict.DELIVER:
            return None
        mode = policy.mode.value
        refused = decision.verdict is Verdict.REFUSE
        (maillog.MTA_STS_REFUSED if refused else maillog.MTA_STS_REPORT)(
            log, mode=mode, domain=domain, id=policy.id, reason=decision.reason)
        if refused:
            return f"MTA-STS {mode} ({domain}): {decision.reason}"
        return None


def _describe(error: Exception) -> str:
    if isinstance(error, PolicyError):
        return f"invalid policy: {error}"
    return f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__
