"""The shared clock: alarms fire in their order, a cancelled one never does, and a
callback that blocks holds back no other alarm. Real threads; no timing asserts beyond
"fired" and "did not fire"."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from stapctl.clock import Clock

pytestmark = pytest.mark.unit

WAIT = 10.0  # seconds a test waits for an alarm that must fire (it fires long before)


def test_an_alarm_fires() -> None:
    clock = Clock()
    fired = threading.Event()
    clock.after(0.01, fired.set)
    assert fired.wait(WAIT)
    assert clock.pending() == 0


def test_alarms_fire_in_the_order_of_their_deadlines() -> None:
    clock = Clock()
    order: list[str] = []
    done = threading.Event()
    lock = threading.Lock()

    def note(name: str) -> None:
        with lock:
            order.append(name)
            if len(order) == 3:
                done.set()

    clock.after(0.3, lambda: note("last"))
    clock.after(0.2, lambda: note("second"))  # earlier than what the thread waits for
    clock.after(0.1, lambda: note("first"))
    assert done.wait(WAIT)
    assert order == ["first", "second", "last"]


def test_a_cancelled_alarm_does_not_fire() -> None:
    clock = Clock()
    cancelled = threading.Event()
    alarm = clock.after(0.05, cancelled.set)
    alarm.cancel()
    after = threading.Event()
    clock.after(0.1, after.set)  # fires after the cancelled one was due
    assert after.wait(WAIT)
    assert not cancelled.is_set()
    assert clock.pending() == 0


def test_a_cancelled_alarm_lets_go_of_its_callback_at_once() -> None:
    """What the callback holds (a host's channel and connection) is freed when the host
    is done, not when the alarm would have been due."""

    class Held:
        def fire(self) -> None:
            pass

    held = Held()
    freed = weakref.ref(held)
    alarm = Clock().after(3600, held.fire)
    alarm.cancel()
    del held
    gc.collect()
    assert freed() is None


def test_a_blocked_callback_holds_back_no_other_alarm() -> None:
    clock = Clock()
    release = threading.Event()
    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(WAIT)

    clock.after(0.01, block)
    assert blocked.wait(WAIT)
    fired = threading.Event()
    clock.after(0.01, fired.set)
    try:
        assert fired.wait(WAIT)
    finally:
        release.set()


def clock_threads() -> int:
    return sum(thread.name == "stapctl-clock" for thread in threading.enumerate())


def test_one_thread_watches_every_alarm() -> None:
    clock = Clock()
    before = clock_threads()
    alarms = [clock.after(3600, lambda: None) for _ in range(100)]
    assert clock_threads() == before + 1
    assert clock.pending() == 100
    for alarm in alarms:
        alarm.cancel()
    assert clock.pending() == 0
