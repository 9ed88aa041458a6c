"""The trio helpers: precise sleeps never wake early, cancel cleanly, and serve many sleepers."""

from __future__ import annotations

from collections.abc import Callable

import trio

from cpnd import aio


def test_precise_sleeps_never_wake_early() -> None:
    async def main() -> list[float]:
        early = []
        for i in range(60):
            deadline = trio.current_time() + 0.0005 * (1 + i % 4)
            await aio.sleep_until_precisely(deadline)
            if trio.current_time() < deadline:
                early.append(deadline - trio.current_time())
        return early

    assert trio.run(main) == []


def test_many_sleepers_and_cancellation() -> None:
    async def main() -> tuple[int, int]:
        woke, early = 0, 0

        async def one(k: int) -> None:
            nonlocal woke, early
            deadline = trio.current_time() + 0.001 * (k % 5)
            await aio.sleep_until_precisely(deadline)
            woke += 1
            early += trio.current_time() < deadline

        async with trio.open_nursery() as nursery:
            for k in range(50):
                nursery.start_soon(one, k)
        with trio.move_on_after(0.002) as cs:
            await aio.sleep_until_precisely(trio.current_time() + 10)
        assert cs.cancelled_caught
        await aio.sleep_until_precisely(trio.current_time() + 0.001)  # the timer still works after a cancel
        return woke, early

    assert trio.run(main) == (50, 0)


def test_timerfd_in_use_on_linux() -> None:
    import sys

    async def main() -> object:
        await aio.sleep_until_precisely(trio.current_time() + 0.0005)
        return aio._timers()

    timers = trio.run(main)
    assert (timers is not None) == sys.platform.startswith("linux")


def test_failed_accepts_pause_and_are_counted_not_spun_on() -> None:
    """Out of descriptors, accept fails at once each time: the loop reports each failure and
    pauses ACCEPT_PAUSE_S between tries instead of spinning (or logging a traceback per try)."""
    import errno

    from trio.testing import MockClock

    class Exhausted:
        def __init__(self) -> None:
            self.calls = 0

        async def accept(self) -> trio.SocketStream:
            self.calls += 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")

    errors: list[tuple[str, str]] = []

    async def main() -> int:
        listener = Exhausted()
        with trio.move_on_after(9.95):  # tries at 0, 0.1, ..., 9.9 s
            await aio.serve_accepting(listener, lambda s: None, lambda k, line: errors.append((k, line)), "http")
        return listener.calls

    calls = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert calls == len(errors) == 100
    assert errors[0] == ("http accept errors (EMFILE)", "http: accept failed: Too many open files; pausing 0.1 s")


def test_a_precise_cancel_cuts_its_scope_never_early_and_is_withdrawn_on_leaving() -> None:
    async def main() -> tuple[list[float], bool]:
        early = []
        for i in range(20):
            deadline = trio.current_time() + 0.0005 * (1 + i % 4)
            with trio.CancelScope() as scope:  # no deadline of its own: only the precise cancel cuts
                with aio.cancel_precisely_at(scope, deadline):
                    await trio.sleep(1)
            assert scope.cancelled_caught
            if trio.current_time() < deadline:
                early.append(deadline - trio.current_time())
        with trio.CancelScope() as scope:
            withdrawn = trio.current_time() + 0.05  # far enough that a loaded machine still leaves in time
            with aio.cancel_precisely_at(scope, withdrawn):
                await trio.lowlevel.checkpoint()
            assert trio.current_time() < withdrawn
            await trio.sleep_until(withdrawn + 0.005)  # past the withdrawn deadline
        await aio.sleep_until_precisely(trio.current_time() + 0.001)  # the timer still serves others
        return early, scope.cancelled_caught

    assert trio.run(main) == ([], False)


def test_withdrawn_timers_leave_the_heap_and_the_timer_disarmed() -> None:
    async def main() -> tuple[int, float]:
        with trio.CancelScope() as scope:
            for _ in range(100):
                with aio.cancel_precisely_at(scope, trio.current_time() + 10):
                    await trio.lowlevel.checkpoint()
        timers = aio._timers()
        return len(timers.heap), timers.armed

    assert trio.run(main) == (0, float("inf"))


def test_withdrawn_far_timers_do_not_pile_up() -> None:
    """A cut withdrawn in time leaves no entry for as long as its deadline was far (a 60 s bound)."""
    async def main() -> tuple[int, int]:
        top = 0
        with trio.CancelScope() as scope:
            with aio.cancel_precisely_at(scope, trio.current_time() + 0.01):  # the earliest stays armed
                for _ in range(5000):
                    with aio.cancel_precisely_at(scope, trio.current_time() + 60):
                        top = max(top, len(aio._timers().heap))
                await trio.sleep(1)
        await aio.sleep_until_precisely(trio.current_time() + 0.001)  # the timer still works
        return top, aio._timers().discarded

    top, discarded = trio.run(main)
    assert top <= 2 * aio.COMPACT_AT + 2 and discarded <= aio.COMPACT_AT


def _spin_started(timers: aio._PreciseTimers) -> bool:
    return timers.lead <= aio.MAX_LEAD_S  # _fire_due learns it anew (at most MAX_LEAD_S) before it spins


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(400):  # bounded
        if cond():
            return
        await trio.sleep(0.001)
    assert cond()


def test_a_timer_added_while_the_timer_spins_for_a_later_one_fires_at_its_own_deadline() -> None:
    """The timer fires ``lead`` early and the rest is spent yielding: a timer added meanwhile for an
    earlier deadline (a held response's cut, a retry's) fires at its own, not at the one armed for."""
    async def main() -> float:
        timers = aio._timers()
        assert timers is not None
        far = trio.current_time() + 0.2
        with trio.CancelScope() as scope, aio.cancel_precisely_at(scope, far):
            timers.lead = 0.15  # as if wake-ups had been that late: the timer fires 150 ms early
            timers._arm(far)
            await _until(lambda: _spin_started(timers))
            assert trio.current_time() < far - 0.05
            near = trio.current_time() + 0.002
            await aio.sleep_until_precisely(near)
            return trio.current_time() - near

    late = trio.run(main)
    assert late < 0.05, f"woke {late * 1000:.1f} ms late: at the deadline armed for, not its own"


def test_the_timer_stops_spinning_once_the_timer_it_spins_for_is_withdrawn() -> None:
    """Withdrawn during the timer task's last stretch (a response in time): the next timer is due later,
    so the task waits for the timerfd again instead of yielding in a loop until the withdrawn deadline."""
    async def main() -> int:
        timers = aio._timers()
        assert timers is not None
        far = trio.current_time() + 0.2
        with trio.CancelScope() as scope, aio.cancel_precisely_at(scope, far + 10):  # a later one stays
            timers.lead = 0.15
            with aio.cancel_precisely_at(scope, far):
                await _until(lambda: _spin_started(timers))
                assert trio.current_time() < far - 0.05
            steps = _TaskSteps("cpn-precise-timers")
            trio.lowlevel.add_instrument(steps)
            await trio.sleep(0.005)
            trio.lowlevel.remove_instrument(steps)
        assert not scope.cancelled_caught
        return steps.n

    assert trio.run(main) <= 1  # one step to see it: not one per loop pass until the withdrawn deadline


class _TaskSteps(trio.abc.Instrument):
    """Counts the steps the task named ``name`` takes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.n += task.name == self.name
