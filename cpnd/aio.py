"""Small trio helpers shared by the shells (never by the sans-IO cores)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises its first real error as itself, not inside an ExceptionGroup.

    Request handlers raise ``HttpError``/``StreamReset`` for their callers to turn into
    responses; trio would otherwise wrap them and the ``except`` clauses would miss them.
    Groups holding only ``Cancelled`` propagate unchanged so cancellation still works.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if not real:
            raise
        raise real[0] from None


SPIN_S = 0.001


async def sleep_until_precisely(deadline: float) -> None:
    """Sleep until ``deadline`` give or take ~0.1 ms (emulated links, simulated compute).

    The event loop's timers wake up to a millisecond late (epoll rounds up), which would
    add ~1 ms to every emulated delay; the last millisecond is spent yielding instead.
    """
    if deadline - trio.current_time() > SPIN_S:
        await trio.sleep_until(deadline - SPIN_S)
    while trio.current_time() < deadline:
        await trio.sleep(0)
