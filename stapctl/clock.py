"""One thread that fires the controller's timeouts at their deadlines.

Every channel request and short command on every host is bounded by a timeout that
almost never fires; a thread each for them (threading.Timer) was several threads started
and torn down per host, thousands for a fleet. Here they are alarms in one heap, watched
by one daemon thread, started with the first alarm.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


def _nothing() -> None:
    pass


class Alarm:
    """A callback due at ``when`` (a time.monotonic() value), until cancelled."""

    def __init__(self, when: float, fire: Callable[[], None]) -> None:
        self.when = when
        self.fire = fire
        self.cancelled = False

    def cancel(self) -> None:
        """Keep it from firing. It stays in the heap until its time, then is dropped, but
        lets go of its callback now: what that holds (a channel, and through it a host's
        connection) is freed as the host is done, not at the deadline, a minute on."""
        self.cancelled = True
        self.fire = _nothing


class Clock:
    """Alarms in a heap, fired by one thread. A due alarm's callback runs in a thread of
    its own: an alarm fires only when something timed out, and its callback (closing a
    channel to a host that stopped answering) may block, which must not hold back the
    other hosts' alarms."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()  # ties fire in the order they were set
        self._thread: threading.Thread | None = None

    def after(self, seconds: float, fire: Callable[[], None]) -> Alarm:
        """Call ``fire`` in ``seconds`` unless the alarm returned is cancelled first."""
        alarm = Alarm(time.monotonic() + seconds, fire)
        with self._changed:
            heapq.heappush(self._due, (alarm.when, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stapctl-clock",
                                                daemon=True)
                self._thread.start()
            elif self._due[0][2] is alarm:  # earlier than what the thread waits for
                self._changed.notify()
        return alarm

    def pending(self) -> int:
        """How many alarms are set and not cancelled (for tests and diagnostics)."""
        with self._changed:
            return sum(not alarm.cancelled for _, _, alarm in self._due)

    def _run(self) -> None:
        while True:
            alarm = self._next_due()
            threading.Thread(target=alarm.fire, name="stapctl-alarm", daemon=True).start()

    def _next_due(self) -> Alarm:
        """Wait for the earliest alarm not cancelled to be due, and take it."""
        with self._changed:
            while True:
                while self._due and self._due[0][2].cancelled:
                    heapq.heappop(self._due)
                if not self._due:
                    self._changed.wait()
                    continue
                left = self._due[0][0] - time.monotonic()
                if left <= 0:
                    return heapq.heappop(self._due)[2]
                self._changed.wait(left)


CLOCK = Clock()  # the controller's one clock
