"""DiskPool: blocking jobs in threads, results back in bursts."""

from __future__ import annotations

import threading

import pytest

from pullmail.storage.disk_threads import DiskPool
from pullmail.testing import assert_no_result, failure_of, result_of

pytestmark = pytest.mark.usefixtures("no_logged_failures")


class HeldReactor:
    """Keeps what the threads hand over until the test runs it."""

    def __init__(self) -> None:
        self.calls = []

    def callFromThread(self, function, *args, **kwargs):
        self.calls.append((function, args, kwargs))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for function, args, kwargs in calls:
            function(*args, **kwargs)


class DiskPoolTests:
    @pytest.fixture(autouse=True)
    def _pool(self):
        self.reactor = HeldReactor()
        self.pool = DiskPool(self.reactor, 2, name="test-disk")
        self.pool.start()
        yield
        self.pool.stop()

    def _drain(self) -> None:
        """Let the threads finish what is queued (stop waits), then restart them."""
        self.pool.stop()
        self.pool.start()

    def test_results_and_failures(self):
        """Results and exceptions come back as the Deferreds' outcomes, in the reactor."""
        ran_in = []
        ok = self.pool(lambda a, b=0: (ran_in.append(threading.current_thread().name), a + b)[1],
                       1, b=2)
        bad = self.pool(int, "not a number")
        self._drain()
        assert_no_result(ok)
        self.reactor.run_calls()
        assert result_of(ok) == 3
        failure_of(bad, ValueError)
        assert ran_in[0].startswith("test-disk-")

    def test_one_wake_up_per_burst(self):
        """Jobs finishing while a wake-up is pending ride on it: one call for many."""
        results = [self.pool(pow, 2, n) for n in range(20)]
        self._drain()
        assert len(self.reactor.calls) == 1
        self.reactor.run_calls()
        assert [result_of(d) for d in results] == [2 ** n for n in range(20)]
        later = self.pool(pow, 3, 2)
        self._drain()
        assert len(self.reactor.calls) == 1   # a new burst wakes the reactor again
        self.reactor.run_calls()
        assert result_of(later) == 9

    def test_stop_finishes_queued_jobs(self):
        """stop() runs every job queued before it, then the threads end."""
        gate = threading.Event()
        blocked = self.pool(gate.wait, 10)
        queued = [self.pool(len, "x" * n) for n in range(5)]
        gate.set()
        self.pool.stop()
        self.reactor.run_calls()
        assert result_of(blocked)
        assert [result_of(d) for d in queued] == list(range(5))
        assert [t for t in threading.enumerate() if t.name.startswith("test-disk-")] == []
        self.pool.start()
