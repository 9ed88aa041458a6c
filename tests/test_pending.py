"""A user connection's pending work (cpnd/pending.py): what an answer left to do runs off the user's
path, yet no other task ever sees state it has not reached, and it runs once, never lost."""

from __future__ import annotations

import collections
import logging
from typing import Any

import trio
import trio.testing

from cpnd.admission import Slot
from cpnd.pending import NOW, Pending
from cpnd.users import Users


def test_work_left_pending_runs_before_any_other_task_steps() -> None:
    seen: list[list[str]] = []

    async def main() -> None:
        pending = Pending()
        state: list[str] = []
        woken = trio.Event()

        async def other() -> None:  # a show stats, another request's plan, a load advertisement
            await woken.wait()
            seen.append(list(state))

        async def connection() -> None:
            later = pending.later()
            later.defer(state.append, "accounted")
            woken.set()  # (no checkpoint: the other task runs only once this one waits)
            await trio.sleep_forever()  # waits for its next request with the work pending

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(connection)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert not pending.held

    trio.run(main)
    assert seen == [["accounted"]]


def test_its_own_steps_keep_it_pending_until_it_runs_it_once_in_order() -> None:
    ran: list[Any] = []

    async def main() -> None:
        pending = Pending()
        later = pending.later()
        await trio.testing.wait_all_tasks_blocked()  # (trio's own tasks: done starting)
        later.defer(ran.append, 1)
        later.defer(ran.append, 2)
        await trio.lowlevel.cancel_shielded_checkpoint()  # only this task runs: its own step keeps the work
        assert ran == [] and pending.held == {trio.lowlevel.current_task(): later}
        later.run()  # (its request went upstream)
        later.run()
        assert ran == [1, 2] and not pending.held
        later.defer(ran.append, 3)  # the next answer's
        later.run()
        assert ran == [1, 2, 3]

    trio.run(main)


def test_run_by_another_task_it_is_not_run_again_by_its_owner() -> None:
    ran: collections.Counter[str] = collections.Counter()

    async def main() -> None:
        pending = Pending()
        owner_later: list[Any] = []
        go_on = trio.Event()

        async def connection() -> None:
            later = pending.later()
            owner_later.append(later)
            later.defer(ran.update, ["accounted"])
            await go_on.wait()
            later.run()  # its next request went upstream: nothing left

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection)
            await trio.testing.wait_all_tasks_blocked()  # this task's step ran it
            assert ran == {"accounted": 1} and not pending.held
            go_on.set()
        assert ran == {"accounted": 1}

    trio.run(main)


def test_an_item_that_fails_is_logged_and_the_others_run(caplog) -> None:
    ran: list[int] = []

    def broken() -> None:
        raise ValueError("a bug in accounting")

    async def main() -> None:
        later = Pending().later()
        later.defer(ran.append, 1)
        later.defer(broken)
        later.defer(ran.append, 3)
        with caplog.at_level(logging.ERROR, logger="cpnd.http"):
            later.run()

    trio.run(main)
    assert ran == [1, 3]
    assert "accounting after a response failed" in caplog.text and "a bug in accounting" in caplog.text


def test_where_nothing_is_kept_the_work_runs_at_once() -> None:
    ran: list[int] = []
    NOW.defer(ran.append, 1)
    NOW.run()
    assert ran == [1]


class _NoOtherTask(Pending):
    """As if no other task ever stepped (trio's own may, now and then): the connection alone runs its work."""

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        pass


class _Plane:
    def __init__(self) -> None:
        self.pending = _NoOtherTask()
        self.stats: collections.Counter[str] = collections.Counter()
        self.gw = type("Gw", (), {"id": "a"})()


class _Slots:
    def release(self, slot: Slot) -> None:
        pass


def _users(ends: Any) -> tuple[Users, list[tuple[str, trio.lowlevel.Task]]]:
    """The real ``Users._client`` around a connection whose one request was answered and accounted
    (its work left pending), which then ends by ``ends``: where and how often the work ran."""
    users = Users.__new__(Users)
    users.p = _Plane()  # type: ignore[assignment]
    users.slots = _Slots()  # type: ignore[assignment]
    ran: list[tuple[str, trio.lowlevel.Task]] = []

    async def http1_only(client: Any, slot: Slot) -> bool:
        return True

    async def requests(client: Any, slot: Slot, pinned: Any) -> None:
        client.later = users.p.pending.later()
        client.later.defer(lambda: ran.append(("accounted", trio.lowlevel.current_task())))
        await ends()

    users._http1_only = http1_only  # type: ignore[method-assign]
    users._requests = requests  # type: ignore[method-assign]
    return users, ran


def test_a_user_gone_right_after_its_answer_loses_none_of_its_accounting() -> None:
    async def gone() -> None:
        raise trio.BrokenResourceError("the client went away")

    async def main() -> None:
        users, ran = _users(gone)
        stream, _ = trio.testing.memory_stream_pair()
        await users._client(stream, Slot("192.0.2.1"))  # type: ignore[arg-type]
        # Run by the connection's own task as it ended (its finally), once.
        assert ran == [("accounted", trio.lowlevel.current_task())]
        assert not users.p.pending.held

    trio.run(main)


def test_a_connection_cancelled_with_work_pending_runs_it_once() -> None:
    async def waits() -> None:
        await trio.sleep_forever()  # for a next request that never comes

    async def main() -> None:
        users, ran = _users(waits)
        stream, _ = trio.testing.memory_stream_pair()
        with trio.move_on_after(0.01):
            await users._client(stream, Slot("192.0.2.1"))  # type: ignore[arg-type]
        assert ran == [("accounted", trio.lowlevel.current_task())]
        assert not users.p.pending.held

    trio.run(main)
