"""
The MTA-STS policy cache: one versioned JSON record per domain (its
A-label form) under ``<state_dir>/mta-sts/``, so that a restart keeps what
RFC 8461 5.1 needs, the last valid policy of each domain until its
``max_age`` runs out (an attacker who blocks the TXT lookup or the HTTPS
fetch must not make us forget an ``enforce`` policy).  Then it is no
policy: L{PolicyCache.prune} forgets it and removes its file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.logger import Logger

from pullmail import maillog
from pullmail.outbound.sts.policy import Mode, Policy
from pullmail.storage import record
from pullmail.storage.durable import write_atomically

__all__ = ["CachedPolicy", "PolicyCache"]

log = Logger(namespace="pullmail.outbound.sts")

VERSION = 1
# A domain is a file name only when it is plainly one (A-labels, no dot-names).
_FILE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass
class CachedPolicy:
    """What is kept per domain: the policy, its TXT id and when it was fetched."""

    domain: str
    id: str
    mode: str
    max_age: int
    mx: list[str]
    fetched: float

    def policy(self) -> Policy:
        return Policy(Mode(self.mode), self.max_age, tuple(self.mx), self.id)

    def fresh(self, now: float) -> bool:
        """RFC 8461 5.1: usable until max_age seconds after the fetch."""
        return now < self.fetched + self.max_age

    @classmethod
    def of(cls, domain: str, policy: Policy, fetched: float) -> "CachedPolicy":
        return cls(domain, policy.id, policy.mode.value, policy.max_age, list(policy.mx), fetched)


class PolicyCache:
    """
    Policies in memory, written through to C{folder} off the reactor thread
    (C{run_blocking}); L{load} reads them back at start.
    """

    def __init__(self, folder: Path, run_blocking: Callable) -> None:
        self.folder = folder
        self._run_blocking = run_blocking
        self._policies: dict[str, CachedPolicy] = {}

    def load(self) -> None:
        """Read every record; a damaged one is logged and skipped."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stem, data in record.read_folder(self.folder):
            try:
                cached = record.load(CachedPolicy, data, VERSION)
                cached.policy()
            except (ValueError, TypeError) as e:
                maillog.MTA_STS_CACHE_DAMAGED(log, name=stem, error=str(e))
                continue
            if cached.domain == stem:
                self._policies[stem] = cached

    def get(self, domain: str) -> CachedPolicy | None:
        return self._policies.get(domain)

    def policies(self) -> list[CachedPolicy]:
        return list(self._policies.values())

    def _path(self, domain: str) -> Path | None:
        if not _FILE_NAME.fullmatch(domain) or ".." in domain:
            return None
        return self.folder / f"{domain}.json"

    def put(self, cached: CachedPolicy):
        """Remember C{cached}; fires once it is on disk (or at once, for an odd name)."""
        self._policies[cached.domain] = cached
        path = self._path(cached.domain)
        if path is None:
            return self._run_blocking(lambda: None)
        return self._run_blocking(write_atomically, path, record.dump(cached, VERSION))

    def prune(self, now: float):
        """
        Forget the policies whose max_age has run out (RFC 8461 5.1: they
        no longer apply) and remove their files; fires with their domains.
        """
        expired = sorted(d for d, cached in self._policies.items() if not cached.fresh(now))
        for domain in expired:
            del self._policies[domain]
        paths = [path for path in map(self._path, expired) if path is not None]
        if expired:
            maillog.MTA_STS_EXPIRED(log, domains=expired)
        return self._run_blocking(_remove, paths).addCallback(lambda _: expired)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
