"""Tunnel streams over a peer connection (the trio side of ``tunnel``).

Many streams share one encrypted session; each has its own flow-control window, so a
slow reader or a long stream never holds up another (no head-of-line blocking), and
memory per stream is bounded by the window.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from .errors import TunnelSub
from .tunnel import (
    FLAG_END,
    INITIAL_WINDOW,
    MAX_DATA,
    MAX_STREAMS,
    ExtHeader,
    FlowWindow,
    FrameType,
    ResetCode,
    StreamIds,
    decode_frame,
    encode_frame,
    load_payload,
    parse_load,
    parse_reset,
    reset_payload,
    tunnel_error,
)

if TYPE_CHECKING:
    from .daemon import Connection

log = logging.getLogger("cpnd.streams")


class StreamReset(Exception):
    """The other end abandoned the stream (RESET), or its session went down."""

    def __init__(self, code: int, delivered: bool, text: str = "") -> None:
        super().__init__(f"stream reset: {ResetCode(code).name if code in ResetCode._value2member_map_ else code}: {text}")
        self.code = code
        self.delivered = delivered
        self.text = text


class ByteStream(Protocol):
    """What ingress, egress and transit need of a stream, tunnelled or local."""

    load_report: tuple[float, float, int] | None

    async def receive(self) -> bytes: ...
    async def send(self, data: bytes, end: bool = False) -> None: ...
    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None: ...
    def report_load(self, load: float, bload: float, compute_us: float) -> None: ...


class _Inbox:
    """Received chunks waiting for the reader; ``b""`` marks the end."""

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.event = trio.Event()
        self.ended = False
        self.reset: StreamReset | None = None

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self.event.set()

    def fail(self, exc: StreamReset) -> None:
        if self.reset is None:
            self.reset = exc
        self.event.set()

    async def pop(self) -> bytes:
        while not self.chunks:
            if self.reset is not None:
                raise self.reset
            if self.ended:
                return b""
            self.event = trio.Event()
            await self.event.wait()
        return self.chunks.popleft()


class TunnelStream:
    """One request/response exchange multiplexed on a peer connection."""

    def __init__(self, mux: Mux, sid: int, ext: ExtHeader | None) -> None:
        self.mux = mux
        self.id = sid
        self.ext = ext
        self.window = FlowWindow(mux.initial_window)
        self._inbox = _Inbox()
        self._credit = trio.Event()
        self.sent_end = False
        self.closed = False
        self.load_report: tuple[float, float, int] | None = None
        self.relay_to: TunnelStream | None = None  # transit: LOAD frames are passed on as they come

    @property
    def peer(self) -> str:
        return self.mux.peer_id

    async def receive(self) -> bytes:
        """Next chunk from the peer, ``b""`` at the end; StreamReset if abandoned."""
        data = await self._inbox.pop()
        if data and self._inbox.chunks:
            # Everything that arrived meanwhile in one piece: one h11 cycle and one write
            # downstream instead of one per frame (at most the stream's window).
            data = b"".join((data, *self._inbox.chunks))
            self._inbox.chunks.clear()
        self._maybe_close()
        if data and not self.closed:
            inc = self.window.on_consumed(len(data))
            if inc:
                self.mux.send_frame(encode_frame(self.id, FrameType.WINDOW, inc.to_bytes(4, "big")))
        return data

    async def send(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` (split into frames within the window), optionally ending our side."""
        view = memoryview(data)
        while view or end:
            if self._inbox.reset is not None:
                raise self._inbox.reset
            if self.closed:
                raise StreamReset(ResetCode.CANCEL, False, "stream closed")
            n = min(len(view), self.mux.max_data, self.window.send_credit)
            if n == 0 and view:
                self._credit = trio.Event()
                await self._credit.wait()
                continue
            await self.mux.writable()
            last = end and n == len(view)
            self.window.send_credit -= n
            self.mux.send_frame(encode_frame(self.id, FrameType.DATA, bytes(view[:n]), FLAG_END if last else 0))
            view = view[n:]
            if last:
                self.sent_end = True
                self._maybe_close()
                return

    def report_load(self, load: float, bload: float, compute_us: float) -> None:
        """Piggy-back the instance's current load on this stream (egress, before the response)."""
        if not self.closed:
            self.mux.send_frame(encode_frame(self.id, FrameType.LOAD, load_payload(load, bload, compute_us)))

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        """Abandon the stream and tell the peer why."""
        if self.closed:
            return
        self.mux.send_frame(encode_frame(self.id, FrameType.RESET, reset_payload(code, delivered, text)))
        self._inbox.fail(StreamReset(code, delivered, "reset locally: " + text))
        self._close()

    def _maybe_close(self) -> None:
        if self.sent_end and self._inbox.ended and not self._inbox.chunks:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._credit.set()
            self.mux._forget(self)

    # ---- called by the mux

    def _on_data(self, data: bytes, end: bool) -> None:
        if not self.window.on_receive(len(data)):
            self.reset(ResetCode.FLOW_CONTROL, False, "peer overran its window")
            return
        if data:
            self._inbox.push(data)
        if end:
            self._inbox.ended = True
            self._inbox.event.set()
            # The reader may never ask again (h11 already saw the message end): close here.
            self._maybe_close()

    def _on_window(self, inc: int) -> None:
        self.window.send_credit += inc
        self._credit.set()

    def _on_reset(self, exc: StreamReset) -> None:
        self._inbox.fail(exc)
        self._close()


class Mux:
    """All tunnel streams of one established peer connection."""

    def __init__(self, conn: Connection, peer_id: str, initiator: bool, on_open: Callable[[TunnelStream], None],
                 *, max_data: int = MAX_DATA, initial_window: int = INITIAL_WINDOW) -> None:
        self.conn = conn
        # MAX_DATA_LARGE and INITIAL_WINDOW_LARGE when both ends offered tunnel-large-data
        self.max_data = max_data
        self.initial_window = initial_window
        self.peer_id = peer_id
        self.ids = StreamIds(initiator)
        self.streams: dict[int, TunnelStream] = {}
        self.remote_open = 0
        self._on_open = on_open
        self.dead: StreamReset | None = None

    def open(self, ext: ExtHeader) -> TunnelStream:
        """Open a stream towards the peer with ``ext`` as its extension header."""
        if self.dead is not None:
            raise self.dead
        sid = self.ids.allocate()
        stream = TunnelStream(self, sid, ext)
        self.streams[sid] = stream
        self.send_frame(encode_frame(sid, FrameType.OPEN, ext.encode()))
        return stream

    def send_frame(self, frame: bytes) -> None:
        self.conn.send_tunnel(frame)

    async def writable(self) -> None:
        await self.conn.wait_writable()

    def handle(self, payload: bytes) -> None:
        """Dispatch one received tunnel frame; ProtocolError means the session must end."""
        fr = decode_frame(payload, self.max_data)
        stream = self.streams.get(fr.stream_id)
        if fr.type is FrameType.OPEN:
            self.ids.accept_open(fr.stream_id)
            ext = ExtHeader.decode(fr.payload)
            stream = TunnelStream(self, fr.stream_id, ext)
            if self.remote_open >= MAX_STREAMS:
                self.send_frame(encode_frame(fr.stream_id, FrameType.RESET,
                                             reset_payload(ResetCode.TOO_MANY_STREAMS, False, f"more than {MAX_STREAMS} streams")))
                return
            self.streams[fr.stream_id] = stream
            self.remote_open += 1
            self._on_open(stream)
            return
        if stream is None:
            if not self.ids.known(fr.stream_id):
                raise tunnel_error(TunnelSub.BAD_STREAM_ID, f"{fr.type.name} for stream {fr.stream_id} never opened")
            return  # a frame racing the stream's close: ignore, like HTTP/2
        if fr.type is FrameType.DATA:
            stream._on_data(fr.payload, fr.end)
        elif fr.type is FrameType.WINDOW:
            stream._on_window(int.from_bytes(fr.payload, "big"))
        elif fr.type is FrameType.RESET:
            code, delivered, text = parse_reset(fr.payload)
            stream._on_reset(StreamReset(code, delivered, text))
        elif fr.type is FrameType.LOAD:
            if stream.relay_to is not None:
                stream.relay_to.report_load(*parse_load(fr.payload))
            else:
                stream.load_report = parse_load(fr.payload)

    def _forget(self, stream: TunnelStream) -> None:
        if self.streams.pop(stream.id, None) is not None and not self.ids.is_local(stream.id):
            self.remote_open -= 1

    def fail_all(self, text: str) -> None:
        """The session went down: every stream on it is abandoned, never delivered by us."""
        self.dead = StreamReset(ResetCode.NO_ROUTE, True, f"session to {self.peer_id} lost: {text}")
        for stream in list(self.streams.values()):
            # Whether the far end had passed the request on is unknown: assume it had.
            stream._on_reset(self.dead)

