"""Users who hang up mid-request: an HTTP/1.1 user's FIN or reset, seen while its request is served.

Without it the ingress would notice a closed connection only when it writes the response: an
abandoned request would keep its attempt, its tunnel stream and its instance's slot until the
instance answers (protocol-spec/threats.md). As nginx does without ``proxy_ignore_client_abort``,
the user's close ends the request at once; a half-close (``shutdown(SHUT_WR)``) counts as one.

Every user connection that forwards a request is in one epoll set per trio run, for its hang-up
alone (EPOLLRDHUP, edge-triggered; EPOLLHUP and EPOLLERR come always), which one system task
watches. Nothing is read: bytes of a next request that a user pipelines stay in the socket for
the next head. A connection costs two epoll_ctl calls (at its first forwarded request, at its
end) and a wake-up of that task if its user closes it; a request, one call (``arm``). An attempt
arms its connection's watch with what must end if the user goes: its tunnel (or pipe) stream,
reset as CANCEL (the egress then ends the instance call), or the scope of its call to one of our
own instances.
"""

from __future__ import annotations

import contextlib
import logging
import select
from typing import TYPE_CHECKING, Any

import trio

from .aio import per_run
from .tunnel import ResetCode

if TYPE_CHECKING:
    from .streams import ByteStream

    Target = trio.CancelScope | ByteStream  # what an attempt arms: a call's scope, or its stream

log = logging.getLogger("cpnd.http")

_EVENTS = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLET", 0)


class UserGone(trio.BrokenResourceError):
    """The user closed its connection while its request was served: the request ends here
    (counted ``user_abandoned``), with no answer and no sample for the estimates."""


class Hangup:
    """One user connection's watch: ``gone`` once its user closed (or reset) it; ``target``, what
    the attempt under way armed (a stream to reset, or a scope to cancel), is ended then."""

    __slots__ = ("fd", "gone", "target")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone = False
        self.target: Target | None = None  # set while an attempt waits on it, None otherwise

    def arm(self, target: Target) -> None:
        """``target`` ends when the user goes (now, if it has)."""
        if self.gone:
            _end(target)
        else:
            self.target = target

    def hung_up(self) -> None:
        self.gone = True
        target, self.target = self.target, None
        if target is not None:
            _end(target)


def _end(target: Target) -> None:
    if isinstance(target, trio.CancelScope):
        target.cancel()
    elif not target.closed:
        target.reset(ResetCode.CANCEL, True, "the user closed its connection")


class Hangups:
    """The watched connections of one trio run, by descriptor."""

    def __init__(self, epoll: Any) -> None:
        self.epoll = epoll
        self.watching: dict[int, Hangup] = {}

    def watch(self, sock: Any) -> Hangup | None:
        """Watch ``sock`` (a socket) for its peer's close; None if it cannot be (closed already)."""
        try:
            fd = sock.fileno()
            try:
                self.epoll.register(fd, _EVENTS)
            except FileExistsError:  # registered already (never unwatched: a bug): this watch replaces that one
                self.epoll.modify(fd, _EVENTS)
        except (OSError, ValueError):
            return None
        hangup = self.watching[fd] = Hangup(fd)
        return hangup

    def unwatch(self, hangup: Hangup) -> None:
        """Before its socket closes (a descriptor's number is reused at once)."""
        if self.watching.get(hangup.fd) is hangup:
            del self.watching[hangup.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(hangup.fd)

    def poll(self) -> None:
        """Mark the connections whose users hung up since the last poll."""
        for fd, _ in self.epoll.poll(0):
            hangup = self.watching.get(fd)
            if hangup is not None:
                try:
                    hangup.hung_up()
                except Exception:  # a bug must cost this request, never the daemon (a system task's error ends the run)
                    log.exception("ending the attempt of a user who hung up failed")

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.epoll.fileno())
                self.poll()
        finally:
            self.epoll.close()


_HANGUPS: trio.lowlevel.RunVar[Hangups | None] = trio.lowlevel.RunVar("cpn_hangups")


def hangups() -> Hangups | None:
    """This trio run's watch (started on first use); None where there is no epoll (not Linux)."""
    return per_run(_HANGUPS, _new_watch, "cpn-hangups")


def _new_watch() -> Hangups | None:
    return Hangups(select.epoll()) if _EVENTS and hasattr(select, "epoll") else None
