# -*- test-case-name: tests.test_dispatch -*-
"""
What runs next: one dispatcher for the outbound sessions and the
retrieval connections alike.

Items (outbox entries, pending notifications) wait under their due time;
when it comes, their owner lines them up under a key (a recipient domain,
a notifying address).  The dispatcher hands the lines out as I{work} --
one session or connection over a batch of one key's items -- at most
C{per_key} at once per key and C{total} in all, and the owner only starts
the work it is handed and says when it ends.  Running work may take more
of its key's line, so a stream of items for one key shares a few
connections (and their TLS handshakes) instead of opening one each; and
work whose line is empty may idle a while (L{Dispatcher.wait_for_more}):
items lined up for its key meanwhile go to it before any new work starts,
so a trickle of single items shares one connection too.

An item is I{busy} from the moment it is lined up until its owner is done
with it (L{Dispatcher.done_with}) or its work ends: a due time that comes
meanwhile is skipped, so no item is tried twice at once.

No I/O here but the one timer of L{DueQueue}, on the clock passed in.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Iterator, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from pullmail.scheduling.timers import DueQueue

__all__ = ["Dispatcher", "Work"]

T = TypeVar("T")


class Work(Generic[T]):
    """
    One session or connection, handed out by a L{Dispatcher}.

    @ivar key: the line it serves, or C{None} for work outside any line.
    @ivar items: the batch it was handed, in line order.
    """

    def __init__(self, key: str | None, items: list[T], held: set[str]) -> None:
        self.key = key
        self.items = items
        self._held = held   # ids of items this work still answers for
        self.up = False     # its connection is open (L{Dispatcher.ready})

    def __repr__(self) -> str:
        return f"<Work {self.key!r} {len(self.items)} items>"


class Dispatcher(Generic[T]):
    def __init__(
        self,
        clock: IReactorTime,
        *,
        wake: Callable[[], None],
        start: Callable[[Work[T]], None],
        ident: Callable[[T], str],
        total: int,
        per_key: int,
        batch: int | None = None,
        current: Callable[[T], bool] = lambda item: True,
        spare: int = 0,
    ) -> None:
        """
        @param wake: called when a due time has come; the owner then reads
            L{due} and lines items up.
        @param start: starts one piece of work (and later calls L{finished}).
        @param ident: an item's unique id.
        @param total: work running at once, in all (counting L{run_now}'s).
        @param per_key: work running at once for one key.
        @param batch: items per piece of work handed out; C{None}: the
            key's line shared evenly between its C{per_key} slots.
        @param current: whether a lined-up item is still to be worked on
            when its turn comes (it may have been deleted or taken
            meanwhile); items that are not are dropped.
        @param spare: items a key's line may hold per piece of its work
            running before more work starts for it: running work takes
            them as soon as it is free, on the connection it has, so a
            message that comes while the last one is still on the wire
            waits for it instead of opening a connection of its own.  With
            spare, no more work starts for a key while a piece of its work
            is still opening its connection (until L{ready}): a burst that
            comes during a TLS handshake waits for that connection first.
        """
        self._due_queue = DueQueue(clock, wake)
        self._clock = clock
        self._stopped = False
        self._start = start
        self._ident = ident
        self._current = current
        self.total = total
        self.per_key = per_key
        self.batch = batch
        self.spare = spare
        self._lines: dict[str, deque[T]] = {}     # due, waiting for work
        self._busy: set[str] = set()
        self._running = 0
        self._running_for: dict[str, int] = {}
        self._opening: dict[str, int] = {}        # work started, connection not yet up
        self._dispatching = self._dispatch_again = False
        # Running work with an empty line, idling for more (wait_for_more):
        # key -> [(work, count, waiter, timer)], first come first served.
        self._idle: dict[str, list[tuple[Work[T], int, Deferred, object]]] = {}

    # -- due times ----------------------------------------------------------------

    def schedule(self, due: float, item_id: str) -> None:
        """Wake at C{due} for the item (after L{arm}).  Stale times are the owner's to skip."""
        self._due_queue.add(due, item_id)

    def arm(self) -> None:
        if not self._stopped:
            self._due_queue.arm()

    def stop(self) -> None:
        """No more wake-ups: work that ends after this (idle work let go) arms nothing."""
        self._stopped = True
        self._due_queue.stop()
        for key in list(self._idle):
            self._release_idle(key)

    def due(self, now: float) -> Iterator[tuple[float, str]]:
        """Pop every (due time, id) due by C{now} whose item is not busy."""
        while self._due_queue.due_now(now):
            due, item_id = self._due_queue.pop()
            if item_id not in self._busy:
                yield due, item_id

    # -- lines and work ------------------------------------------------------------

    def busy(self, item_id: str) -> bool:
        return item_id in self._busy

    def line_up(self, key: str, item: T) -> None:
        """Queue a due item for work on C{key} (call L{dispatch} after)."""
        self._busy.add(self._ident(item))
        self._lines.setdefault(key, deque()).append(item)

    def waiting(self, key: str) -> int:
        """How many items wait in C{key}'s line."""
        return len(self._lines.get(key, ()))

    def running(self, key: str | None = None) -> int:
        """Work running in all, or for C{key}."""
        return self._running if key is None else self._running_for.get(key, 0)

    def run_now(self, items: list[T]) -> Work[T]:
        """
        Work outside any line (a re-notification): never held back, but
        counted against C{total} while it runs.  The caller starts it.
        """
        held = {self._ident(item) for item in items}
        self._busy.update(held)
        self._running += 1
        return Work(None, list(items), held)

    def dispatch(self) -> None:
        """
        Hand out work for the lines while the caps allow; costs O(keys), not
        O(items).  Work that ends at once, while this runs, asks again: that
        is done here, after this pass, not inside it.
        """
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._dispatch_once()
        finally:
            self._dispatching = False

    def _dispatch_once(self) -> None:
        for key in list(self._lines):
            self._feed_idle(key)
            if self._lines.get(key) and self._running >= self.total:
                # Idle work of other keys holds the slots: let it end.
                for other in [k for k in self._idle if k != key]:
                    self._release_idle(other)
            while self._lines.get(key) and self._running < self.total and (
                self._running_for.get(key, 0) < self.per_key
            ) and len(self._lines[key]) > self._running_for.get(key, 0) * self.spare and not (
                self.spare and self._opening.get(key)
            ):
                count = self.batch or -(-len(self._lines[key]) // self.per_key)
                work: Work[T] = Work(key, [], set())
                self.take(work, count)
                if work.items:
                    self._running += 1
                    self._running_for[key] = self._running_for.get(key, 0) + 1
                    self._opening[key] = self._opening.get(key, 0) + 1
                    self._start(work)
            if not self._lines.get(key):
                self._lines.pop(key, None)

    def take(self, work: Work[T], count: int) -> list[T]:
        """Up to C{count} current items from the front of C{work}'s line, now C{work}'s."""
        line = self._lines.get(work.key)
        batch: list[T] = []
        while line and len(batch) < count:
            item = line.popleft()
            item_id = self._ident(item)
            if self._current(item):
                batch.append(item)
                work._held.add(item_id)
            else:
                self._busy.discard(item_id)
        work.items.extend(batch)
        return batch

    def wait_for_more(self, work: Work[T], count: int, timeout: float) -> Deferred:
        """
        For running C{work} whose line is empty: fires with up to C{count}
        items lined up for its key within C{timeout} seconds (now
        C{work}'s, as L{take} gives them), or with C{[]} when none came,
        when another key needs the slot, or at L{stop}.
        """
        taken = self.take(work, count)
        if taken or timeout <= 0 or work.key is None:
            return succeed(taken)
        waiter: Deferred = Deferred()
        timer = self._clock.callLater(timeout, self._idle_over, work.key, waiter)
        self._idle.setdefault(work.key, []).append((work, count, waiter, timer))
        return waiter

    def idle(self, key: str) -> int:
        """How much running work of C{key} idles in L{wait_for_more}."""
        return len(self._idle.get(key, ()))

    def _feed_idle(self, key: str) -> None:
        waiting = self._idle.get(key)
        while waiting and self._lines.get(key):
            work, count, waiter, timer = waiting.pop(0)
            timer.cancel()
            items = self.take(work, count)
            if not waiting:
                del self._idle[key]
            waiter.callback(items)

    def _idle_over(self, key: str, waiter: Deferred) -> None:
        waiting = self._idle.get(key, [])
        self._idle[key] = [entry for entry in waiting if entry[2] is not waiter]
        if not self._idle[key]:
            del self._idle[key]
        waiter.callback([])

    def _release_idle(self, key: str) -> None:
        for _, _, waiter, timer in self._idle.pop(key, []):
            timer.cancel()
            waiter.callback([])

    def give_back(self, work: Work[T], items: list[T]) -> None:
        """Return untried items to the front of C{work}'s line, in order."""
        line = self._lines.setdefault(work.key, deque())
        for item in reversed(items):
            work._held.discard(self._ident(item))
            line.appendleft(item)

    def done_with(self, item_id: str) -> None:
        """The item's outcome is recorded: its due times count again."""
        self._busy.discard(item_id)

    def ready(self, work: Work[T]) -> None:
        """C{work}'s connection is up: more work may start for its key (see C{spare})."""
        if work.up or work.key is None:
            return
        work.up = True
        self._count_down(self._opening, work.key)
        self.dispatch()

    @staticmethod
    def _count_down(counts: dict[str, int], key: str) -> None:
        left = counts.pop(key, 0) - 1
        if left > 0:
            counts[key] = left

    def finished(self, work: Work[T]) -> None:
        """C{work} ended: its slot is free, and so is every item it still held."""
        if not work.up and work.key is not None:
            work.up = True
            self._count_down(self._opening, work.key)
        self._running -= 1
        if work.key is not None:
            self._count_down(self._running_for, work.key)
        self._busy.difference_update(work._held)
        work._held.clear()
        self.dispatch()
        self.arm()
