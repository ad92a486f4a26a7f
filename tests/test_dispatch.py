"""
Tests for L{pullmail.scheduling.dispatch.Dispatcher}: due times, lines per
key, the per-key and total caps, work handed back, and the order work is
handed out in.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from pullmail.scheduling.dispatch import Dispatcher, Work


class Owner:
    """Lines up whatever is due under the key before the colon of its id."""

    def __init__(self, total: int = 3, per_key: int = 2, batch: int | None = 2) -> None:
        self.clock = Clock()
        self.started: list[Work[str]] = []
        self.gone: set[str] = set()
        self.dispatcher: Dispatcher[str] = Dispatcher(
            self.clock, wake=self.wake, start=self.started.append, ident=lambda item: item,
            total=total, per_key=per_key, batch=batch,
            current=lambda item: item not in self.gone,
        )
        self.woken: list[tuple[float, str]] = []

    def wake(self) -> None:
        for due, item in self.dispatcher.due(self.clock.seconds()):
            self.woken.append((due, item))
            self.dispatcher.line_up(item.partition(":")[0], item)
        self.dispatcher.dispatch()
        self.dispatcher.arm()

    def add(self, due: float, *items: str) -> None:
        for item in items:
            self.dispatcher.schedule(due, item)
        self.dispatcher.arm()

    def handed_out(self) -> list[tuple[str | None, list[str]]]:
        return [(work.key, list(work.items)) for work in self.started]


def test_nothing_before_its_due_time() -> None:
    owner = Owner()
    owner.add(10.0, "a:1")
    owner.clock.advance(9.9)
    assert owner.started == []
    owner.clock.advance(0.1)
    assert owner.handed_out() == [("a", ["a:1"])]


def test_due_times_in_order_one_timer() -> None:
    """Items come due in time order, whatever order they were added in."""
    owner = Owner(total=10)
    owner.add(30.0, "c:1")
    owner.add(10.0, "a:1")
    owner.add(20.0, "b:1")
    assert len(owner.clock.getDelayedCalls()) == 1
    owner.clock.advance(30.0)
    assert [item for _, item in owner.woken] == ["a:1", "b:1", "c:1"]


def test_an_earlier_due_time_rearms_the_timer() -> None:
    owner = Owner()
    owner.add(100.0, "a:1")
    owner.add(5.0, "b:1")
    owner.clock.advance(5.0)
    assert owner.handed_out() == [("b", ["b:1"])]


def test_an_item_due_now_is_handed_out_now_not_at_a_tick() -> None:
    """
    Issue 17 (latency at light load): an item due at the present moment,
    a fraction of a second past a whole one, is handed out by the next
    reactor turn (a zero delay), not at the next second nor any other tick.
    """
    owner = Owner()
    owner.clock.advance(1000.37)
    owner.add(owner.clock.seconds(), "a:1")
    [call] = owner.clock.getDelayedCalls()
    assert call.getTime() == 1000.37
    owner.clock.advance(0)
    assert owner.handed_out() == [("a", ["a:1"])]
    assert owner.woken == [(1000.37, "a:1")]


def test_an_item_due_in_the_past_is_handed_out_now() -> None:
    """A due time already gone by (a slow store write) arms no negative delay, nor a wait."""
    owner = Owner()
    owner.clock.advance(50.5)
    owner.add(50.25, "a:1")
    owner.clock.advance(0)
    assert owner.handed_out() == [("a", ["a:1"])]


def test_cap_per_key() -> None:
    """At most per_key pieces of work for one key; the rest of its line waits."""
    owner = Owner(total=10, per_key=2, batch=1)
    owner.add(1.0, "a:1", "a:2", "a:3", "b:1")
    owner.clock.advance(1.0)
    assert owner.handed_out() == [("a", ["a:1"]), ("a", ["a:2"]), ("b", ["b:1"])]
    assert owner.dispatcher.running("a") == 2
    assert owner.dispatcher.waiting("a") == 1
    owner.dispatcher.finished(owner.started[0])
    assert owner.handed_out()[-1] == ("a", ["a:3"])


def test_cap_in_all() -> None:
    """At most total pieces of work at once, whatever their keys."""
    owner = Owner(total=2, per_key=2, batch=1)
    owner.add(1.0, "a:1", "b:1", "c:1")
    owner.clock.advance(1.0)
    assert owner.handed_out() == [("a", ["a:1"]), ("b", ["b:1"])]
    assert owner.dispatcher.running() == 2
    owner.dispatcher.finished(owner.started[1])
    assert owner.handed_out()[-1] == ("c", ["c:1"])
    assert owner.dispatcher.running() == 2


def test_work_outside_lines_counts_against_the_total() -> None:
    owner = Owner(total=2, per_key=2, batch=1)
    outside = owner.dispatcher.run_now(["x:1"])
    assert outside.key is None and outside.items == ["x:1"]
    owner.add(1.0, "a:1", "a:2")
    owner.clock.advance(1.0)
    assert owner.handed_out() == [("a", ["a:1"])]
    owner.dispatcher.finished(outside)
    assert owner.handed_out() == [("a", ["a:1"]), ("a", ["a:2"])]


def test_work_outside_lines_is_never_held_back() -> None:
    owner = Owner(total=1, per_key=1, batch=1)
    owner.add(1.0, "a:1")
    owner.clock.advance(1.0)
    extra = owner.dispatcher.run_now(["x:1"])
    assert owner.dispatcher.running() == 2
    owner.dispatcher.finished(extra)
    assert owner.dispatcher.running() == 1


def test_fixed_batches_in_line_order() -> None:
    owner = Owner(total=10, per_key=10, batch=2)
    owner.add(1.0, "a:1", "a:2", "a:3", "a:4", "a:5")
    owner.clock.advance(1.0)
    assert owner.handed_out() == [("a", ["a:1", "a:2"]), ("a", ["a:3", "a:4"]), ("a", ["a:5"])]


def test_shared_batches_spread_a_line_over_its_slots() -> None:
    """
    batch=None: each piece of work takes its share of what waits (7 over 2
    slots: 4, then 2 of the 3 left); the rest is for work taking more.
    """
    owner = Owner(total=10, per_key=2, batch=None)
    owner.add(1.0, *[f"a:{n}" for n in range(7)])
    owner.clock.advance(1.0)
    assert [len(items) for _, items in owner.handed_out()] == [4, 2]
    assert owner.dispatcher.waiting("a") == 1


def test_keys_in_the_order_their_lines_formed() -> None:
    owner = Owner(total=10, per_key=1, batch=5)
    owner.add(1.0, "b:1")
    owner.add(2.0, "a:1")
    owner.add(3.0, "b:2")
    owner.clock.advance(3.0)
    assert owner.handed_out() == [("b", ["b:1", "b:2"]), ("a", ["a:1"])]


def test_running_work_takes_more_of_its_line() -> None:
    owner = Owner(total=10, per_key=1, batch=1)
    owner.add(1.0, "a:1", "a:2", "a:3")
    owner.clock.advance(1.0)
    work = owner.started[0]
    assert owner.dispatcher.take(work, 5) == ["a:2", "a:3"]
    assert work.items == ["a:1", "a:2", "a:3"]
    assert owner.dispatcher.waiting("a") == 0
    assert owner.dispatcher.take(work, 5) == []


def test_items_no_longer_current_are_dropped() -> None:
    owner = Owner(total=10, per_key=1, batch=1)
    owner.add(1.0, "a:1", "a:2", "a:3")
    owner.clock.advance(1.0)
    owner.gone.add("a:2")
    assert owner.dispatcher.take(owner.started[0], 5) == ["a:3"]
    assert not owner.dispatcher.busy("a:2")


def test_handed_back_items_go_first_to_the_next_work() -> None:
    owner = Owner(total=10, per_key=1, batch=3)
    owner.add(1.0, "a:1", "a:2", "a:3", "a:4")
    owner.clock.advance(1.0)
    work = owner.started[0]
    owner.dispatcher.give_back(work, ["a:2", "a:3"])
    owner.dispatcher.finished(work)
    assert owner.handed_out()[-1] == ("a", ["a:2", "a:3", "a:4"])
    assert owner.dispatcher.busy("a:2")      # on its way again
    assert not owner.dispatcher.busy("a:1")  # its work is over


def test_busy_items_skip_their_due_times() -> None:
    """A due time that comes while the item is lined up or worked on is skipped."""
    owner = Owner(total=1, per_key=1, batch=1)
    owner.add(1.0, "a:1")
    owner.clock.advance(1.0)
    owner.add(2.0, "a:1")
    owner.clock.advance(1.0)
    assert owner.woken == [(1.0, "a:1")]
    owner.dispatcher.done_with("a:1")
    owner.add(3.0, "a:1")
    owner.clock.advance(1.0)
    assert owner.woken == [(1.0, "a:1"), (3.0, "a:1")]


def test_finished_work_frees_what_it_held() -> None:
    owner = Owner(total=1, per_key=1, batch=2)
    owner.add(1.0, "a:1", "a:2")
    owner.clock.advance(1.0)
    work = owner.started[0]
    owner.dispatcher.done_with("a:1")
    assert owner.dispatcher.busy("a:2")
    owner.dispatcher.finished(work)
    assert not owner.dispatcher.busy("a:2")
    assert owner.dispatcher.running() == 0 and owner.dispatcher.running("a") == 0


def test_work_that_ends_at_once_does_not_recurse() -> None:
    """
    Work finishing inside start() gets the next work handed out after the
    current pass, not inside it: a long line costs no stack.
    """
    clock = Clock()
    depth, deepest = [0], [0]
    dispatcher: Dispatcher[str] = Dispatcher(
        clock, wake=lambda: None, start=lambda work: end(work), ident=lambda item: item,
        total=1, per_key=1, batch=1,
    )

    def end(work) -> None:
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        dispatcher.finished(work)
        depth[0] -= 1

    for n in range(5000):
        dispatcher.line_up("a", f"a:{n}")
    dispatcher.dispatch()
    assert deepest[0] == 1
    assert dispatcher.waiting("a") == 0 and dispatcher.running() == 0


def test_stop_cancels_the_timer() -> None:
    owner = Owner()
    owner.add(5.0, "a:1")
    owner.dispatcher.stop()
    assert owner.clock.getDelayedCalls() == []


# -- idle work (wait_for_more) ------------------------------------------------------------


def _idle_work(owner: Owner, item: str) -> Work[str]:
    owner.add(owner.clock.seconds(), item)
    owner.clock.advance(0)
    work = owner.started[-1]
    assert work.items == [item]
    return work


def test_idle_work_takes_what_is_lined_up_for_its_key() -> None:
    """An item due while work of its key idles goes to that work: no new work starts."""
    owner = Owner(total=10, per_key=2, batch=1)
    work = _idle_work(owner, "a:1")
    got: list = []
    owner.dispatcher.wait_for_more(work, 5, 2.0).addCallback(got.append)
    assert got == [] and owner.dispatcher.idle("a") == 1
    owner.add(owner.clock.seconds() + 1.0, "a:2")
    owner.clock.advance(1.0)
    assert got == [["a:2"]]
    assert len(owner.started) == 1
    assert owner.dispatcher.idle("a") == 0
    assert owner.clock.getDelayedCalls() == []   # the idle timer is gone


def test_idle_work_gets_nothing_after_its_time() -> None:
    owner = Owner(total=10, batch=1)
    work = _idle_work(owner, "a:1")
    got: list = []
    owner.dispatcher.wait_for_more(work, 5, 2.0).addCallback(got.append)
    owner.clock.advance(1.9)
    assert got == []
    owner.clock.advance(0.1)
    assert got == [[]]
    assert owner.dispatcher.idle("a") == 0
    # Later items start new work.
    owner.dispatcher.finished(work)
    owner.add(owner.clock.seconds(), "a:2")
    owner.clock.advance(0)
    assert owner.handed_out()[-1] == ("a", ["a:2"])


def test_no_wait_when_items_are_there_or_time_is_zero() -> None:
    owner = Owner(total=10, batch=1, per_key=1)
    work = _idle_work(owner, "a:1")
    owner.add(owner.clock.seconds(), "a:2")
    owner.clock.advance(0)                        # lined up; the cap keeps it waiting
    got: list = []
    owner.dispatcher.wait_for_more(work, 5, 2.0).addCallback(got.append)
    assert got == [["a:2"]]
    owner.dispatcher.wait_for_more(work, 5, 0).addCallback(got.append)
    assert got == [["a:2"], []]


def test_idle_work_of_another_key_gives_up_its_slot() -> None:
    """At the total cap, a key with a line ends idle work of other keys."""
    owner = Owner(total=1, per_key=1, batch=1)
    work = _idle_work(owner, "a:1")
    got: list = []

    def ended(items):
        got.append(items)
        owner.dispatcher.finished(work)     # the owner closes its connection

    owner.dispatcher.wait_for_more(work, 5, 60.0).addCallback(ended)
    owner.add(owner.clock.seconds(), "b:1")
    owner.clock.advance(0)
    assert got == [[]]
    assert owner.handed_out()[-1] == ("b", ["b:1"])


def test_stop_ends_idle_work_and_arms_nothing_after() -> None:
    owner = Owner(total=10, batch=1)
    work = _idle_work(owner, "a:1")
    got: list = []
    owner.dispatcher.wait_for_more(work, 5, 60.0).addCallback(got.append)
    owner.add(owner.clock.seconds() + 100, "a:9")
    owner.dispatcher.stop()
    assert got == [[]]
    owner.dispatcher.finished(work)
    assert owner.clock.getDelayedCalls() == []


def test_spare_items_wait_for_running_work_of_their_key() -> None:
    """
    With spare=1 an item lined up while its key's work runs waits for that
    work (which takes it when free) instead of starting more; a line longer
    than that starts more once the running work's connection is up (ready);
    work that ends leaves none stranded.
    """
    owner = Owner(total=10, per_key=4, batch=1)
    owner.dispatcher.spare = 1
    owner.add(1.0, "a:1")
    owner.clock.advance(1.0)
    owner.add(2.0, "a:2")
    owner.clock.advance(1.0)
    assert owner.handed_out() == [("a", ["a:1"])]
    assert owner.dispatcher.waiting("a") == 1
    owner.add(3.0, "a:3")
    owner.clock.advance(1.0)
    # Two wait now, but the first work's connection is not up yet.
    assert owner.handed_out() == [("a", ["a:1"])]
    owner.dispatcher.ready(owner.started[0])
    assert owner.handed_out() == [("a", ["a:1"]), ("a", ["a:2"])]
    owner.dispatcher.finished(owner.started[0])
    owner.dispatcher.finished(owner.started[1])       # never up: its count goes too
    assert owner.handed_out()[-1] == ("a", ["a:3"])
    owner.dispatcher.finished(owner.started[2])
    assert owner.dispatcher.running("a") == 0
