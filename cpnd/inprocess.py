"""In-process streams: a request to one of our own instances, ingress to egress without a tunnel."""

from __future__ import annotations

from typing import Any

import h11
import trio

from .streams import Abandon, StreamReset, _Inbox
from .tunnel import ResetCode

PIPE_HIGH_WATER = 256 * 1024


class PipeEnd:
    """One end of an in-process byte stream, for requests to our own instances."""

    def __init__(self) -> None:
        self.inbox = _Inbox()
        self.buffered = 0
        self.drained = trio.Event()
        self.other: PipeEnd = self
        self.load_report: tuple[float, float, int, int | None] | None = None
        self.sent_end = False
        self.abandon = Abandon()
        self.peer_reset_code: int | None = None  # the other end's reset, if it reset (fairshare: a user gone is CANCEL)

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the other end resets (the ingress gave up)."""
        self.abandon.add(scope)

    @property
    def closed(self) -> bool:
        """Reset, or both directions ended."""
        return self.inbox.reset is not None or (self.sent_end and self.inbox.ended and not self.inbox.chunks)

    def report_load(self, load: float, bload: float, compute_us: float, instance_us: float | None = None,
                    *, soon: bool = False) -> None:
        self.other.load_report = (load, bload, int(compute_us), None if instance_us is None else int(instance_us))

    async def receive(self) -> Any:
        """The next chunk (or event, for LocalEvents); ``b""`` at the end."""
        item = await self.inbox.pop()
        if isinstance(item, bytes):
            return item  # b"": the other end is done
        data, size = item
        self.buffered -= size
        self.drained.set()
        return data

    def receive_nowait(self) -> Any:
        """The next queued chunk or event, else None (nothing there yet: it would block)."""
        if not self.inbox.chunks:
            return None
        data, size = self.inbox.chunks.popleft()
        self.buffered -= size
        self.drained.set()
        return data

    async def send(self, data: bytes, end: bool = False) -> None:
        await self.send_event(data or None, len(data), end)

    async def send_event(self, item: Any, size: int, end: bool) -> None:
        """Queue ``item`` (``size`` bytes of payload, for the high-water mark); ``None`` queues nothing."""
        o = self.other
        if self.inbox.reset is not None:
            raise self.inbox.reset
        while o.buffered > PIPE_HIGH_WATER and o.inbox.reset is None:
            o.drained = trio.Event()
            await o.drained.wait()
        if item is not None:
            o.buffered += size
            o.inbox.push((item, size))
        if end:
            self.sent_end = True
            o.inbox.end()

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        self.other.peer_reset_code = code
        self.other.inbox.fail(StreamReset(code, delivered, text))
        self.inbox.fail(StreamReset(code, delivered, "reset locally: " + text))
        self.drained.set()
        self.other.drained.set()
        self.other.abandon.fire()


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a, b = PipeEnd(), PipeEnd()
    a.other, b.other = b, a
    return a, b


class LocalEvents:
    """H11Stream's interface over a PipeEnd that carries h11 events, not bytes.

    A request to one of our own instances needs no wire format between our ingress and
    our egress: passing the events saves a serialise and a parse each way. Both sides
    already hold validated events (the user's request, the instance's response).
    """

    def __init__(self, end: PipeEnd) -> None:
        self.end = end

    async def send(self, event: Any, *, end: bool = False) -> None:
        await self.end.send_event(event, len(event.data) if isinstance(event, h11.Data) else 0, end)

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        for i, event in enumerate(events):
            await self.send(event, end=end and i == len(events) - 1)

    async def next_event(self) -> Any:
        event = await self.end.receive()
        return h11.ConnectionClosed() if isinstance(event, bytes) else event

    def next_event_nowait(self) -> Any:
        """The next event if one is queued, else None."""
        return self.end.receive_nowait()
