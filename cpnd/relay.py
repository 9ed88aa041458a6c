"""The response relay: an upstream's response passed on to a sink (the user, or a stream back).

One loop for the ingress (tunnelled or local instance -> user) and the egress (instance ->
stream back to the ingress): small responses of known length are held whole, others flow as
they come, and neither side moving for the idle time ends the exchange.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h11
import trio

from .aio import cancel_precisely_at
from .h1 import RESPONSE_HOLD_BYTES, H11Stream
from .load import InstanceMeter
from .pending import NOW, Later, AtOnce
from .inprocess import LocalEvents
from .planner import Attempt
from .streams import ByteStream, StreamReset
from .tunnel import ResetCode
from .whole import whole_response, whole_writable


class Sink(Protocol):
    """Where a response goes; ``hold_until``: a held response not whole by then is not sent (None: no limit)."""

    hold_until: float | None
    later: Later | AtOnce  # where the call's accounting goes (cpnd/pending.py): the user connection's pending work, or now

    async def send_all(self, events: list[Any], *, end: bool = False) -> None: ...

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None: ...

    def report_load(self, meter: InstanceMeter, instance_s: float | None = None, now: float | None = None) -> None: ...

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None: ...

    def before_blocking(self, arm: Callable[[], None] | None) -> None:
        """Call ``arm`` before a write of ours waits for room (None: no longer)."""

    @property
    def abandoned(self) -> bool: ...


class Cut(Exception):
    """The upstream ended mid-response; ``held``: nothing of it reached the sink yet."""

    def __init__(self, held: bool) -> None:
        super().__init__("upstream ended mid-response")
        self.held = held


class StreamSink:
    """Back down the (tunnel or pipe) stream the request came on: the egress's sink."""

    hold_until = None  # the ingress holds the user's bound
    later = NOW  # a stream's task ends with its call: nothing to run its accounting later

    def __init__(self, rx: H11Stream | LocalEvents, stream: ByteStream) -> None:
        self.rx = rx
        self.stream = stream
        self.later = getattr(stream, "later", NOW)  # a sealed stream's makes its response cipher meanwhile
        self.head_at: float | None = None  # when the response head went back down the stream

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        head = isinstance(events[0], h11.Response)
        await self.rx.send_all(events, end=end)
        if head and self.head_at is None:
            self.head_at = trio.current_time()

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        self.stream.reset(code, delivered, text)

    def report_load(self, meter: InstanceMeter, instance_s: float | None = None, now: float | None = None) -> None:
        now = trio.current_time() if now is None else now
        self.stream.report_load(*meter.loads(now), meter.base_us,
                                None if instance_s is None else instance_s * 1_000_000, soon=True)

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None:
        """The instance call's scope: cancelled when the ingress abandons the stream (its RESET, the session lost)."""
        self.stream.cancel_on_abandon(scope)

    def before_blocking(self, arm: Callable[[], None] | None) -> None:
        pass  # the request's deadline bounds our write: the ingress gives up on the stream then

    @property
    def abandoned(self) -> bool:
        """The stream ended before our response did: the far end abandoned it (we reset it only after the call)."""
        return self.stream.closed


class UserSink:
    """The user's connection: the ingress's sink, and the egress's when the instance is our own.

    A lost user is a CANCEL reset (the egress stops the instance call); what would reset a
    stream is kept for the ingress, which retries or answers the error as for a tunnelled attempt.
    """

    def __init__(self, client: H11Stream, attempt: Attempt) -> None:
        self.client = client
        self.attempt = attempt
        self.status = 0
        self.failure: StreamReset | None = None
        self.hold_until = attempt.bound_at  # a held response not whole by the bound: 504 at the bound
        self.later = client.later

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        if isinstance(events[0], h11.Response):
            self._head(events[0].status_code)
        if end and events[-1].headers and not self.client.trailers:
            events[-1] = h11.EndOfMessage()  # trailers only for a user that takes them (HTTP/2, TE: trailers)
        self.attempt.sent_head = True
        try:
            await self.client.send_all(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamReset(ResetCode.CANCEL, True, f"user connection lost: {exc}") from None

    async def send_whole(self, whole: Whole) -> None:
        """A response that came whole (``first_event``), as it came: what ``send_all`` does for its events."""
        self._head(whole.status_code)
        self.attempt.sent_head = True
        try:
            await self.client.send_whole(whole.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamReset(ResetCode.CANCEL, True, f"user connection lost: {exc}") from None

    def _head(self, status: int) -> None:
        """The response head leaves now (the write that follows is the socket's, no wait before it),
        unless it is past the request's bound."""
        now = trio.current_time()
        bound_at = self.attempt.bound_at
        if bound_at is not None and now > bound_at:
            # A 200 past the bound is a broken promise, not a success: the user gets 504 now
            # (DESIGN.md section 6), and the instance's answer goes unused.
            raise StreamReset(ResetCode.DEADLINE, True, f"the response head came {(now - bound_at) * 1000:.1f} ms "
                              "after the request's latency bound")
        self.status = status
        self.attempt.head_at = now

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        if self.failure is None:
            self.failure = StreamReset(code, delivered, text)

    def report_load(self, meter: InstanceMeter, instance_s: float | None = None, now: float | None = None) -> None:
        pass  # the ingress reads its own instances' meters directly

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None:
        """The call's scope: cancelled when an HTTP/1.1 user closes its connection (hangups.py); a
        user lost otherwise fails the write (CANCEL, above)."""
        if self.client.hangup is not None:
            self.client.hangup.arm(scope)

    def before_blocking(self, arm: Callable[[], None] | None) -> None:
        """A user reading slowly must not lose its answer to the bound its head met (HTTP/1.1: ``arm``
        when the socket does not take the write at once; HTTP/2, with its own flow control: now)."""
        if type(self.client) is H11Stream:
            self.client.on_block = arm
        elif arm is not None:
            arm()

    @property
    def abandoned(self) -> bool:
        """The user closed its connection (its watch saw it)."""
        return self.client.hangup is not None and self.client.hangup.gone


async def relay_response(source: H11Stream | LocalEvents, head: h11.Response, length: int | None, sink: Sink,
                         idle: trio.CancelScope, idle_s: float, *, trailers: bool = True, now: float | None = None) -> None:
    """Send ``head`` (already rewritten) and the body read from ``source`` to ``sink``.

    A response of known ``length`` up to RESPONSE_HOLD_BYTES is gathered whole before the sink
    sees its head: an upstream failing meanwhile still leaves a clean error or a retry (Cut with
    ``held``). ``trailers`` False: the upstream's trailer fields are dropped. ``idle`` is the
    caller's scope (entered already, so that one scope serves the wait for the head and the
    body): its deadline becomes ``idle_s`` from ``now`` (the caller's clock reading, if it has
    one) before the first wait, pushed back as data flows (at most once a second: a timer per
    chunk cost a tenth of a bulk transfer's CPU; the clock is read only after a wait, since nothing
    else moves it a second). A held response that came whole with its head (most) may need no wait
    at all: its one write keeps the caller's deadline (``_last_write``).
    """
    idle_at = (trio.current_time() if now is None else now) + idle_s

    def arm() -> None:
        idle.deadline = idle_at

    held: list[Any] | None = [head] if length is not None and length <= RESPONSE_HOLD_BYTES else None
    armed = held is None
    if armed:  # a response that flows: its head and every piece under the idle time
        arm()
        await sink.send_all([head])
    while True:
        waited = held is None  # the sink's writes may have waited
        event = source.next_event_nowait()
        if event is None:
            if not armed:
                arm()
                armed = True
            event = await _next_piece(source, sink, held is not None)
            waited = True
        if isinstance(event, h11.Data):
            if held is not None:
                held.append(event)
            else:
                await sink.send_all([event])
        elif isinstance(event, h11.EndOfMessage):
            end = event if trailers else h11.EndOfMessage()
            last = sink.send_all([*held, end] if held is not None else [end], end=True)
            await (last if armed else _last_write(sink, idle, arm, last))
            return
        else:
            raise Cut(held is not None)
        if waited:
            now = trio.current_time()
            if idle.deadline - now < idle_s - 1.0:
                idle.deadline = now + idle_s


async def _next_piece(source: H11Stream | LocalEvents, sink: Sink, holding: bool) -> Any:
    """The response's next event, waited for (under the idle time); a held one (``holding``) not whole
    by the sink's ``hold_until`` fails (its head may not leave after the bound: UserSink)."""
    if holding and sink.hold_until is not None:
        event = None
        with trio.move_on_at(sink.hold_until) as hold, cancel_precisely_at(hold, sink.hold_until):
            event = await source.next_event()
        if event is None:
            raise StreamReset(ResetCode.DEADLINE, True, "the response was not whole by the request's latency bound")
        return event
    return await source.next_event()


async def _last_write(sink: Sink, idle: trio.CancelScope, arm: Callable[[], None], write: Awaitable[None]) -> None:
    """A held response's one write, no wait before it: under the caller's deadline, the idle time set
    (``arm``) only if the sink is about to block on it (``before_blocking``: a deadline set costs ~200
    bytecodes for nothing otherwise); under the idle time if the caller has no deadline to keep."""
    if idle.deadline == math.inf:
        arm()
        await write
        return
    sink.before_blocking(arm)
    try:
        await write
    finally:
        sink.before_blocking(None)


class Whole:
    """A response that came down a stream whole, in one piece, passed on to the user as it came
    (``first_event``): not read by h11 at the ingress, nor written by it again."""

    __slots__ = ("status_code", "data")

    def __init__(self, status_code: int, data: bytes) -> None:
        self.status_code = status_code
        self.data = data


async def first_event(up: H11Stream | LocalEvents, client: Any) -> Any:
    """The upstream's first answer event (``up.next_event``'s); or, when the whole response comes in
    its first piece (whole.whole_response) for a user connection that may take it as it came
    (whole.whole_writable), that piece as a Whole. What is not is read by h11 as ever."""
    if type(up) is not H11Stream or type(client) is not H11Stream or not whole_writable(client.conn):
        return up.next_event_nowait() or await up.next_event()
    stream = up.transport  # (nothing has been read from it: h11 holds nothing of the answer yet)
    data = stream.receive_nowait()
    if data is None:
        data = await stream.receive()
    status = whole_response(data)
    if status is not None:
        return Whole(status, data)
    up.conn.receive_data(data)
    return up.next_event_nowait() or await up.next_event()


async def relay_whole(whole: Whole, sink: UserSink, idle: trio.CancelScope, idle_s: float, now: float) -> None:
    """``whole`` to the user in one write, as ``relay_response`` sends a held response."""
    idle_at = now + idle_s

    def arm() -> None:
        idle.deadline = idle_at

    await _last_write(sink, idle, arm, sink.send_whole(whole))
