"""The data plane's stream tasks (cpnd/dataplane.py StreamTasks): a stream goes to a parked task when
there is one, parked tasks are bounded, and a closing nursery ends them."""

from __future__ import annotations

import trio
import trio.testing

from cpnd import dataplane
from cpnd.dataplane import StreamTasks


async def test_streams_served_one_after_another_share_a_task() -> None:
    served: list[tuple[str, int]] = []
    done = trio.Event()

    async def serve(name: str) -> None:
        served.append((name, id(trio.lowlevel.current_task())))
        await trio.lowlevel.checkpoint()
        if len(served) == 3:
            done.set()

    tasks = StreamTasks(serve)
    async with trio.open_nursery() as nursery:
        tasks.start(nursery, "a")
        await trio.testing.wait_all_tasks_blocked()
        tasks.start(nursery, "b")
        await trio.testing.wait_all_tasks_blocked()
        tasks.start(nursery, "c")
        await done.wait()
        assert [n for n, _ in served] == ["a", "b", "c"]
        assert len({t for _, t in served}) == 1  # parked after "a", woken for "b" and "c"
        nursery.cancel_scope.cancel()  # the parked task ends with its nursery


async def test_concurrent_streams_get_tasks_of_their_own_and_at_most_the_bound_stay_parked(monkeypatch) -> None:
    monkeypatch.setattr(dataplane, "IDLE_STREAM_TASKS", 2)
    release = trio.Event()
    running: set[int] = set()

    async def serve(i: int) -> None:
        running.add(i)
        await release.wait()

    tasks = StreamTasks(serve)
    async with trio.open_nursery() as nursery:
        for i in range(4):
            tasks.start(nursery, i)
        await trio.testing.wait_all_tasks_blocked()
        assert running == {0, 1, 2, 3}  # none waits for another
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(tasks._idle) == 2  # two parked, two ended
        assert sum(1 for t in nursery.child_tasks) == 2
        nursery.cancel_scope.cancel()
    assert tasks._idle == []  # aborted out of the parked list as they ended
