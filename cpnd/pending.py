"""What a request leaves to do once its answer has left: its accounting (Planner.observed and the
correction, the stage meters, the instance's sample, the fair shares, the metrics), kept as its
user connection's pending work so that it runs off the user's path.

A user sending requests one after the other has its next one on the way as soon as it has read
our answer: work done after the answer's last write was, 9 times in 10, work its next request
waited for. Kept pending, it runs

- in the connection's own task once its next request has gone upstream (its write done: the
  upstream has it, and the work runs while the answer is being made), or when the connection
  ends however it ends (its handler's ``finally``);
- else before any other task's step (``Pending`` is a trio Instrument), whichever comes first.

So no other task (a ``show stats``, another request's plan, a load advertisement) can ever see
state the work has not reached, and it runs once: taken from the table before it runs. Its
times are the ones read when things happened (the callables are given them), never the time it
runs. The same connection's next request is planned and admitted before it runs, as if it had
come a moment sooner, while the last one was still being answered: what is learnt from an answer
(samples, the correction, metrics) waits; what a request holds (its instance's in-flight count,
the estimate's in-flight count, the plane's) is given back at once, never deferred.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("cpnd.http")


class Later:
    """One user connection's pending work, run in its task (``run``) or by ``Pending`` before another's step."""

    __slots__ = ("pending", "task", "work")

    def __init__(self, pending: Pending, task: trio.lowlevel.Task) -> None:
        self.pending = pending
        self.task = task
        self.work: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` when this connection's pending work runs (``args``: its times already read)."""
        if not self.work:
            self.pending.held[self.task] = self
        self.work.append((fn, args))

    def run(self) -> None:
        """Run what is pending now (the connection's request went upstream, or it ends): each item
        once, in the order it was deferred; one that fails is logged, the others run all the same."""
        work = self.work
        if not work:
            return
        self.work = []
        self.pending.held.pop(self.task, None)
        for fn, args in work:
            try:
                fn(*args)
            except Exception:  # a bug in accounting: the request was answered, the daemon goes on
                log.exception("accounting after a response failed")


class AtOnce:
    """A connection with no pending work kept (an HTTP/2 stream, a tunnel stream): ``defer`` runs at once."""

    __slots__ = ()
    work = ()

    @staticmethod
    def defer(fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    @staticmethod
    def run() -> None:
        pass


NOW = AtOnce()


class Pending(trio.abc.Instrument):
    """A gateway's user connections' pending work, by task: another task's step runs it first."""

    def __init__(self) -> None:
        self.held: dict[trio.lowlevel.Task, Later] = {}
        self._run: object = None  # the trio run this is an instrument of

    def later(self) -> Later:
        """The current task's pending work (a user connection's handler calls this once)."""
        token = trio.lowlevel.current_trio_token()
        if self._run is not token:
            trio.lowlevel.add_instrument(self)
            self._run = token
        return Later(self, trio.lowlevel.current_task())

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        held = self.held
        if held and (len(held) > 1 or task not in held):
            for later in [w for t, w in held.items() if t is not task]:
                later.run()
