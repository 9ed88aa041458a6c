"""One HTTP/2 connection (h2, sans-IO) over any trio stream: the writer task, flow-controlled sends
and per-stream inboxes of h11 events. The ingress's server side (h2edge.py) and the egress's
client side to ``http2 = true`` instances (h2up.py) share it."""

from __future__ import annotations

import collections
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import trio

STREAM_WINDOW = 65_535  # per-stream receive window: the tunnel takes a stream's bytes before more are asked for
CONNECTION_WINDOW = 1024 * 1024  # what one connection may have buffered here, all its streams together
RECEIVE_CHUNK = 64 * 1024
WRITE_HIGH_WATER = 64 * 1024  # queued DATA beyond this waits for the socket (a slow reader slows its senders)


class H2Inbox:
    """What one stream received, as h11 events (Data, EndOfMessage with trailers), acknowledged to
    the peer's flow control as it is taken: a stream whose reader stops holds its window shut."""

    def __init__(self, wire: H2Wire, sid: int) -> None:
        self.wire = wire
        self.sid = sid
        self.events: collections.deque[tuple[Any, int]] = collections.deque()
        self.arrived = trio.Event()
        self.window = trio.Event()  # set when the peer opens our send window, or the stream ends
        self.reset_code: int | None = None  # the peer's RST_STREAM, or the connection's end
        self.ended = False  # END_STREAM received
        self.sent_end = False

    def push(self, event: Any, flow: int = 0) -> None:
        self.events.append((event, flow))
        self.arrived.set()

    def fail(self, code: int) -> None:
        if self.reset_code is None:
            self.reset_code = code
        self.arrived.set()
        self.window.set()

    def next_event_nowait(self) -> Any:
        """The next event if one is here, else None; BrokenResourceError once the stream was reset."""
        if self.events:
            event, flow = self.events.popleft()
            if flow:
                self.wire.ack(self.sid, flow)
            return event
        if self.reset_code is not None:
            raise trio.BrokenResourceError(f"stream reset ({h2_error_name(self.reset_code)})")
        return None

    async def next_event(self) -> Any:
        while True:
            event = self.next_event_nowait()
            if event is not None:
                return event
            self.arrived = trio.Event()
            await self.arrived.wait()

    def discard(self) -> None:
        """Hand back the window of what was received and will not be read (the connection's is shared)."""
        while self.events:
            _, flow = self.events.popleft()
            if flow:
                self.wire.ack(self.sid, flow)


class H2Wire:
    """An h2 connection's shell: one writer task; anything may queue frames and ``kick`` it."""

    def __init__(self, transport: Any, *, client_side: bool) -> None:
        self.transport = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True))
        self.inboxes: dict[int, H2Inbox] = {}
        self._dirty = trio.Event()
        self._round = trio.Event()
        self._pulled = 0  # writer rounds that took data from h2
        self._written = 0  # of those, the ones written to the transport
        self._unwritten = 0  # bytes of DATA queued since the writer last finished a round
        self._extra = b""  # frames h2's state machine must not see (a graceful GOAWAY: h2 would stop reading)
        self.broken: BaseException | None = None

    def kick(self) -> None:
        self._dirty.set()

    async def writer(self) -> None:
        """Write what h2 has queued, whenever kicked, until cancelled or the transport breaks."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                data = self.h2.data_to_send() + self._extra
                self._extra = b""
                self._pulled += 1
                if data:
                    await self.transport.send_all(data)
                self._written = self._pulled
                self._unwritten = 0
                self._round.set()
                self._round = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = exc
            self.fail_all(h2.errors.ErrorCodes.CANCEL)

    async def queued(self, size: int) -> None:
        """``size`` more bytes queued: written by the writer's next round, waited for only past
        WRITE_HIGH_WATER (small frames of one response then leave in one write)."""
        self._unwritten += size
        if self._unwritten >= WRITE_HIGH_WATER:
            await self.written()
        else:
            self.kick()

    async def written(self) -> None:
        """Return once what is queued now has been written (a slow reader slows its senders)."""
        target = self._pulled + 1
        self.kick()
        while self._written < target and self.broken is None:
            await self._round.wait()
        if self.broken is not None:
            raise trio.BrokenResourceError(str(self.broken))

    def send_raw(self, frame: bytes) -> None:
        """Queue a frame built outside h2, after what h2 has queued."""
        self._extra += frame
        self.kick()

    def ack(self, sid: int, flow: int) -> None:
        try:
            self.h2.acknowledge_received_data(flow, sid)
        except h2.exceptions.ProtocolError:
            return  # the connection is closing
        self.kick()

    def fail_all(self, code: int) -> None:
        for inbox in self.inboxes.values():
            inbox.fail(code)

    def on_window(self, event: h2.events.WindowUpdated | h2.events.RemoteSettingsChanged) -> None:
        sid = getattr(event, "stream_id", 0)
        for key, inbox in self.inboxes.items():
            if not sid or key == sid:
                inbox.window.set()

    def on_stream_event(self, event: Any) -> None:
        """Data, trailers, END_STREAM and RST_STREAM into the stream's inbox."""
        inbox = self.inboxes.get(event.stream_id)
        if isinstance(event, h2.events.DataReceived):
            if inbox is None or inbox.ended:
                self.ack(event.stream_id, event.flow_controlled_length)  # nobody reads it: the window goes back
            else:
                inbox.push(h11.Data(data=event.data), event.flow_controlled_length)
        elif inbox is None:
            return
        elif isinstance(event, h2.events.TrailersReceived):
            try:
                trailers = h11.EndOfMessage(headers=[(n, v) for n, v in event.headers if not n.startswith(b":")])
            except h11.LocalProtocolError:
                trailers = h11.EndOfMessage()
            inbox.ended = True
            inbox.push(trailers)
        elif isinstance(event, h2.events.StreamEnded):
            if not inbox.ended:
                inbox.ended = True
                inbox.push(h11.EndOfMessage())
        elif isinstance(event, h2.events.StreamReset):
            inbox.fail(event.error_code)

    async def send_data(self, inbox: H2Inbox, data: bytes) -> None:
        """``data`` on ``inbox``'s stream within the peer's flow-control windows; written before returning."""
        view = memoryview(data)
        while view:
            if inbox.reset_code is not None or self.broken is not None:
                raise trio.BrokenResourceError("stream reset or connection lost")
            window = min(self.h2.local_flow_control_window(inbox.sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                inbox.window = trio.Event()
                await inbox.window.wait()
                continue
            self.h2.send_data(inbox.sid, bytes(view[:window]))
            view = view[window:]
            await self.queued(window)

    def reset(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` unless the stream is closed already."""
        try:
            self.h2.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.kick()


def h2_error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
