"""Tunnel streams over a peer connection (the trio side of ``tunnel``).

Many streams share one encrypted session; each has its own flow-control window, so a
slow reader or a long stream never holds up another (no head-of-line blocking), and
memory per stream is bounded by the window.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .errors import TunnelSub
from .pending import AtOnce
from .seal import Direction, Sealing, SealError, StreamSealer
from .tunnel import (
    FLAG_END,
    FRAME_HEADER,
    UNLIMITED,
    ExtHeader,
    FlowWindow,
    FrameType,
    MuxSettings,
    ResetCode,
    StreamIds,
    encode_frame,
    load_payload,
    parse_frame,
    parse_load,
    parse_reset,
    reset_payload,
    tunnel_error,
)

log = logging.getLogger("cpnd.streams")


class Connection(Protocol):
    """What a ``Mux`` needs of the peer connection it runs on (the daemon's Connection; no import of it)."""

    def send_tunnel(self, frame: bytes, *, flush: bool = False, soon: bool = False) -> None: ...

    async def wait_writable(self) -> None: ...

    @property
    def congested(self) -> bool: ...


class Relayer(Protocol):
    """A transit's relay of two streams (cpnd/transit.py), told of what happens to either."""

    def moved(self, stream: TunnelStream) -> None: ...
    def credited(self, stream: TunnelStream) -> None: ...
    def reset_by(self, stream: TunnelStream, exc: StreamReset) -> None: ...


class StreamReset(Exception):
    """The other end abandoned the stream (RESET), or its session went down."""

    def __init__(self, code: int, delivered: bool, text: str = "") -> None:
        super().__init__(f"stream reset: {ResetCode(code).name if code in ResetCode._value2member_map_ else code}: {text}")
        self.code = code
        self.delivered = delivered
        self.text = text


class ByteStream(Protocol):
    """What ingress, egress and transit need of a stream, tunnelled or local."""

    load_report: tuple[float, float, int, int | None] | None

    @property
    def closed(self) -> bool: ...
    def cancel_on_abandon(self, scope: trio.CancelScope) -> None: ...
    async def receive(self) -> bytes: ...
    async def send(self, data: bytes, end: bool = False) -> None: ...
    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None: ...
    def report_load(self, load: float, bload: float, compute_us: float, instance_us: float | None = None,
                    *, soon: bool = False) -> None: ...


class Abandon:
    """Cancel scopes of the work done for a stream, cancelled when the stream is abandoned."""

    def __init__(self) -> None:
        self._scopes: list[trio.CancelScope] = []

    def add(self, scope: trio.CancelScope) -> None:
        self._scopes.append(scope)

    def fire(self) -> None:
        scopes, self._scopes = self._scopes, []
        for scope in scopes:
            scope.cancel()


class _Inbox:
    """Received chunks waiting for the reader; ``b""`` marks the end."""

    # Defaults at class level, set on the instance when they change (one store each fewer per stream)
    waiter: trio.lowlevel.Task | None = None  # the reader, parked (most chunks find it not waiting)
    ended = False
    reset: StreamReset | None = None

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()

    def wake(self) -> None:
        """The parked reader runs again (a direct reschedule: a trio.Event made, waited on and set
        per wait was ~10 calls more, on every response's way to its ingress task)."""
        task = self.waiter
        if task is not None:
            self.waiter = None
            trio.lowlevel.reschedule(task)

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.waiter is not None:
            self.wake()

    def end(self) -> None:
        self.ended = True
        if self.waiter is not None:
            self.wake()

    def fail(self, exc: StreamReset) -> None:
        if self.reset is None:
            self.reset = exc
        if self.waiter is not None:
            self.wake()

    async def pop(self) -> bytes:
        while not self.chunks:
            if self.ended:  # complete before any reset: the reader gets all of it
                return b""
            if self.reset is not None:
                raise self.reset
            self.waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        return self.chunks.popleft()

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        """The parked reader was cancelled: it waits no more."""
        self.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class TunnelStream:
    """One request/response exchange multiplexed on a peer connection."""

    # Defaults at class level, set on the instance when they change (a stream is opened per request:
    # ten stores fewer each)
    buffered = 0  # DATA received and not yet passed on (counts against the connection window)
    _passing = 0  # of which the chunk the reader took last, credited when it asks again
    _credit: trio.Event | None = None  # while a sender waits for credit
    sent_end = False
    closed = False
    load_report: tuple[float, float, int, int | None] | None = None
    relay_to: TunnelStream | None = None  # transit: LOAD frames are passed on as they come
    relay: Relayer | None = None  # transit: DATA, credit and resets go to the relay at once
    _dropped = False  # reset by us: what it held unread is gone
    _abandon: Abandon | None = None
    peer_reset_code: int | None = None  # the far end's RESET, if it sent one (fairshare: a user gone is CANCEL)

    def __init__(self, mux: Mux, sid: int, ext: ExtHeader | None) -> None:
        self.mux = mux
        self.id = sid
        self.ext = ext
        settings = mux.settings
        self.window = FlowWindow(settings.recv_window, settings.send_window, settings.recv_window)
        self._inbox = _Inbox()

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the peer abandons the stream (its RESET, an overrun, the session lost):
        the work done for it (an instance call) stops with it."""
        if self._abandon is None:
            self._abandon = Abandon()
        self._abandon.add(scope)

    def _abandoned(self) -> None:
        if self._abandon is not None:
            self._abandon.fire()

    def _credited(self) -> None:
        if self._credit is not None:
            self._credit.set()

    @property
    def peer(self) -> str:
        return self.mux.peer_id

    async def receive(self) -> bytes:
        """Next chunk from the peer, ``b""`` at the end; StreamReset if abandoned.

        The stream's window is credited as a chunk is taken, the connection's only when the reader
        asks again (it has passed the chunk on): what the gateway holds while a slow destination
        drains stays within the connection window, and one stream's transfer is not slowed (tunnel.md).
        """
        if self._passing:
            self._pass_on()
        inbox = self._inbox
        return self._taken(inbox.chunks.popleft() if inbox.chunks else await inbox.pop())

    def receive_nowait(self) -> bytes | None:
        """What ``receive`` would return now, or None if it would have to wait."""
        inbox = self._inbox
        if not inbox.chunks and not inbox.ended:
            if inbox.reset is not None:
                raise inbox.reset
            return None
        if self._passing:  # (asked here: a relay's every move, most with nothing to credit)
            self._pass_on()
        return self._taken(inbox.chunks.popleft() if inbox.chunks else b"")

    @property
    def complete(self) -> bool:
        """The peer's END came and what it sent is here to read, even after its RESET (never after ours)."""
        return self._inbox.ended and not self._dropped

    @property
    def at_end(self) -> bool:
        """Everything the peer sent has been taken, its end included."""
        return self._inbox.ended and not self._inbox.chunks

    def pass_on(self) -> None:
        """The chunk taken last has been passed on: credit the connection now (a relay, which
        does not ask again until more comes)."""
        self._pass_on()

    def _pass_on(self) -> None:
        """The reader asks again: the chunk it took last has been passed on (the connection's credit)."""
        if self._passing:
            self.buffered -= self._passing
            self.mux.consumed(self._passing)
            self._passing = 0

    def _taken(self, data: bytes) -> bytes:
        if data and self._inbox.chunks:
            # What arrived meanwhile in one piece: one h11 cycle and one write downstream instead
            # of one per frame, up to half the window (the peer keeps the other half to send).
            parts, size, cap = [data], len(data), self.window.initial // 2
            while self._inbox.chunks and size + len(self._inbox.chunks[0]) <= cap:
                parts.append(self._inbox.chunks.popleft())
                size += len(parts[-1])
            data = b"".join(parts) if len(parts) > 1 else data
        self._passing = len(data)
        if not self.closed:
            if self.sent_end and self._inbox.ended and not self._inbox.chunks:  # (_maybe_close, inline)
                self._close()
        elif not self._inbox.chunks:
            self._release()  # closed with its data complete: the reader will not ask again
        if data and not self.closed:
            inc = self.window.on_consumed(len(data))
            if inc:
                self.mux.send_frame(encode_frame(self.id, FrameType.WINDOW, inc.to_bytes(4, "big")))
        return data

    async def send(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` (split into frames within the window), optionally ending our side."""
        conn = self.mux.conn
        await conn.wait_writable()
        sent = self.send_nowait(data, end)
        if sent == len(data) and (self.sent_end or not end):
            return  # all of it at once (usually: no view to slice)
        view = memoryview(data)[sent:]
        while True:
            credit = self._credit = trio.Event()  # set by the stream's or the connection's WINDOW (or a reset)
            await credit.wait()
            self._credit = None
            await conn.wait_writable()
            view = view[self.send_nowait(view, end):]
            if not view and (self.sent_end or not end):
                return

    def send_nowait(self, data: bytes | memoryview, end: bool = False) -> int:
        """Send what the stream's and the connection's windows take now, ending our side with the last
        byte if ``end``: the bytes sent (the last frame written at once; a relay's move is made from
        the step that received the bytes)."""
        if self._inbox.reset is not None:
            raise self._inbox.reset
        if self.closed:
            raise StreamReset(ResetCode.CANCEL, False, "stream closed")
        mux = self.mux
        conn, window, size = mux.conn_window, self.window, len(data)
        if size <= window.send_credit and size <= conn.send_credit and size <= mux.settings.max_data and (size or end):
            # All of it in one frame (a request's or a response's whole body, usually): no views, no loop.
            window.send_credit -= size
            conn.send_credit -= size
            mux.send_frame(FRAME_HEADER.pack(self.id, FrameType.DATA, FLAG_END if end else 0) + data, flush=True)
            if end:
                self.sent_end = True
                self._maybe_close()
            return size
        sent, view = 0, memoryview(data)
        while view or end:
            size = len(view)
            n = min(size, mux.settings.max_data, window.send_credit, conn.send_credit)
            if n == 0 and view:
                if conn.send_credit <= 0:
                    mux.blocked.add(self)  # credited by the connection's WINDOW
                break
            last = end and n == size
            window.send_credit -= n
            conn.send_credit -= n
            chunk, view = view[:n], view[n:]
            # The frame built here (bytes + a memoryview copies once): no encode_frame call, no bytes(chunk).
            mux.send_frame(FRAME_HEADER.pack(self.id, FrameType.DATA, FLAG_END if last else 0) + chunk,
                           flush=not view)
            sent += n
            if last:
                self.sent_end = True
                self._maybe_close()
                break
        return sent

    def report_load(self, load: float, bload: float, compute_us: float, instance_us: float | None = None,
                    *, soon: bool = False) -> None:
        """Piggy-back the instance's current load on this stream (egress, before the response), and
        with `gateway-time` the instance's time to this response's head (tunnel.md, "Load piggy-backing").
        ``soon``: the response (or a RESET) follows from the same step and takes it along."""
        if not self.closed:
            payload = load_payload(load, bload, compute_us, instance_us, timed=self.mux.settings.timed_load)
            self.mux.send_frame(encode_frame(self.id, FrameType.LOAD, payload), soon=soon)

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        """Abandon the stream (and what it holds unread) and tell the peer why."""
        if not self.closed:
            self.mux.send_frame(encode_frame(self.id, FrameType.RESET, reset_payload(code, delivered, text)), flush=True)
            self._inbox.fail(StreamReset(code, delivered, "reset locally: " + text))
        self._inbox.chunks.clear()
        self._dropped = True
        self._close()
        self._release()
        if self.relay is not None:
            self.relay.reset_by(self, StreamReset(code, delivered, text))

    def _maybe_close(self) -> None:
        if self.sent_end and self._inbox.ended and not self._inbox.chunks:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._credited()
            if not self._inbox.chunks:
                self._release()
            self.mux._forget(self)

    def _release(self) -> None:
        """Credit the peer's connection window with all this stream still holds."""
        if self.buffered:
            self.mux.consumed(self.buffered)
            self.buffered = self._passing = 0

    # ---- called by the mux

    def _on_data(self, data: bytes, end: bool) -> None:
        size = len(data)
        window = self.window
        window.recv_allowed -= size  # window.on_receive, inline on every DATA frame
        if window.recv_allowed < 0:
            self.mux.consumed(0, dropped=size)
            self.reset(ResetCode.FLOW_CONTROL, False, "peer overran the stream's window")
            self._abandoned()
            return
        if data:
            self.buffered += size
            account = self.mux.account  # account.add and _inbox.push, inline on every DATA frame
            account.buffered += size
            if account.buffered > account.peak:
                account.peak = account.buffered
            inbox = self._inbox
            inbox.chunks.append(data)
            if inbox.waiter is not None:
                inbox.wake()
        if end:
            self._inbox.end()
            # The reader may never ask again (h11 already saw the message end): close here.
            self._maybe_close()
        if self.relay is not None:
            self.relay.moved(self)

    def _on_window(self, inc: int) -> None:
        self.window.send_credit += inc
        self._credited()
        if self.relay is not None:
            self.relay.credited(self)

    def _on_reset(self, exc: StreamReset) -> None:
        self.peer_reset_code = exc.code
        self._inbox.fail(exc)
        if not self._inbox.ended:  # what the peer completed before resetting (a response) stays readable
            self._inbox.chunks.clear()
        self._close()
        self._abandoned()
        if self.relay is not None:
            self.relay.reset_by(self, exc)


class Meanwhile(AtOnce):
    """A sealed stream's egress sink's ``later`` (cpnd/pending.py; relay.StreamSink): accounting at once,
    as any stream's, and at ``run`` (the instance has the request) the response's cipher made, off
    the response's path while the instance answers (~7 µs with the caches cold)."""

    __slots__ = ("direction",)

    def __init__(self, direction: Direction) -> None:
        self.direction = direction

    def run(self) -> None:  # type: ignore[override]
        self.direction.prepare()


class SealedStream:
    """A tunnel stream sealed end to end (tunnel.md, "Sealed streams"): what goes out is sealed,
    what comes in is opened; everything else is the stream's own."""

    def __init__(self, stream: TunnelStream, sealing: Sealing, *, egress: bool,
                 sent: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._sealing = sealing
        self._egress = egress  # a record that does not open: before the instance (egress) or after it
        self._sent = sent  # the ingress: called once its whole request is out (the next epoch is drawn then)
        # What the data plane reads of every stream, taken once here: through ``__getattr__`` each read
        # is two calls. The rest is the stream's own, through ``__getattr__``.
        self.ext, self.id, self.mux = stream.ext, stream.id, stream.mux
        self.reset, self.report_load, self.cancel_on_abandon = stream.reset, stream.report_load, stream.cancel_on_abandon
        if egress:
            self.later = Meanwhile(sealing.send)  # the egress's sink takes it (relay.StreamSink)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def closed(self) -> bool:
        return self._stream.closed

    @property
    def load_report(self) -> tuple[float, float, int, int | None] | None:
        return self._stream.load_report

    @property
    def peer(self) -> str:
        return self.mux.peer_id

    def _broken(self, exc: SealError) -> StreamReset:
        code = ResetCode.BAD_REQUEST if self._egress else ResetCode.INTERNAL
        self._stream.reset(code, not self._egress, str(exc))
        return StreamReset(code, not self._egress, f"sealed stream: {exc}")

    async def receive(self) -> bytes:
        while True:
            plain = self._open(await self._stream.receive())
            if plain is not None:
                return plain

    def receive_nowait(self) -> bytes | None:
        """What ``receive`` would return now (opened), or None if it would have to wait."""
        while True:
            data = self._stream.receive_nowait()
            if data is None:
                return None
            plain = self._open(data)
            if plain is not None:
                return plain

    def _open(self, data: bytes) -> bytes | None:
        """The plaintext of what came (``b""``: the end), or None for a record that carried none."""
        try:
            if not data:
                self._sealing.recv.finish()
                return b""
            plain = self._sealing.open(data)  # the egress's replay window takes the pair at the first record
        except SealError as exc:
            raise self._broken(exc) from None
        return plain or None

    async def send(self, data: bytes, end: bool = False) -> None:
        if data or end:
            await self._stream.send(self._sealing.send.seal(data, end), end)
        if end and self._sent is not None:
            sent, self._sent = self._sent, None
            self._sealing.recv.prepare()  # the response's cipher, made while the request is answered
            sent()


class BufferAccount:
    """Tunnel bytes held for every peer together, and the most since the last look (for trimming)."""

    def __init__(self) -> None:
        self.buffered = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.buffered += n
        if self.buffered > self.peak:
            self.peak = self.buffered

    def take_peak(self) -> int:
        """The most held since the last call; starts the next period."""
        peak, self.peak = self.peak, self.buffered
        return peak


class Mux:
    """All tunnel streams of one established peer connection."""

    def __init__(self, conn: Connection, peer_id: str, initiator: bool, on_open: Callable[[TunnelStream], None],
                 settings: MuxSettings, account: BufferAccount | None = None) -> None:
        self.conn = conn
        # Frames go straight to the connection (one call fewer on every frame).
        self.send_frame: Callable[..., None] = conn.send_tunnel
        self.settings = settings
        self.peer_id = peer_id
        self.ids = StreamIds(initiator)
        self.streams: dict[int, TunnelStream] = {}
        # What the peer may have buffered here, every stream together; without `tunnel-window`
        # the peer does not know it, and overruns are reset all the same.
        self.conn_window = FlowWindow(settings.recv_conn_window,
                                      settings.send_conn_window if settings.conn_frames else UNLIMITED,
                                      settings.recv_conn_window)
        self.account = account or BufferAccount()
        self.blocked: set[TunnelStream] = set()  # senders waiting for connection credit
        # Relays' streams waiting for the connection to drain, in the order they came (a dict as an
        # ordered set): the longest waiting goes first, and one that fills the queue again waits at
        # the back, so relays sharing a congested connection take turns.
        self.drain_waiters: dict[TunnelStream, None] = {}
        self._on_open = on_open
        self.dead: StreamReset | None = None
        # End-to-end sealing (tunnel.md, "Sealed streams"): None when the session did not agree on it.
        self.sealer: StreamSealer | None = None

    def open(self, ext: ExtHeader, *, soon: bool = False) -> TunnelStream | SealedStream:
        """Open a stream towards the peer with ``ext`` as its extension header (sealed, as the ingress,
        when the session and the origin allow it); ``soon``: the request follows from the same step."""
        if self.dead is not None:
            raise self.dead
        sealing = static = None
        if self.sealer is not None:
            ext, sealing, static = self.sealer.outbound(ext)
        elif ext.eph is not None:  # a transit whose next hop does not take sealed streams
            raise StreamReset(ResetCode.NO_ROUTE, False, f"{self.peer_id} does not take sealed streams")
        limit = min(self.settings.max_streams, self.settings.peer_max_streams)
        if len(self.streams) >= limit:
            raise StreamReset(ResetCode.TOO_MANY_STREAMS, False, f"{len(self.streams)} streams open with {self.peer_id}")
        sid = self.ids.allocate()
        stream = TunnelStream(self, sid, ext)
        self.streams[sid] = stream
        self.send_frame(FRAME_HEADER.pack(sid, FrameType.OPEN, 0) + ext.encode(), soon=soon)  # (encode_frame's body)
        if sealing is None:
            return stream
        sealer = self.sealer
        assert sealer is not None and static is not None
        return SealedStream(stream, sealing, egress=False, sent=lambda: sealer.draw_ahead(static))

    def congested(self) -> bool:
        """Too much is queued for the peer: relays wait (``wait_drained``) as senders do (``wait_writable``)."""
        return self.conn.congested

    def wait_drained(self, stream: TunnelStream) -> None:
        self.drain_waiters.setdefault(stream, None)

    def drained(self) -> None:
        """The connection's queue fell below its low-water mark: relays move again, in turn. Once
        one fills the queue again, those not yet woken keep their places ahead of it."""
        waiters, self.drain_waiters = list(self.drain_waiters), {}
        for i, stream in enumerate(waiters):
            if self.congested():
                self.drain_waiters = dict.fromkeys(waiters[i:]) | self.drain_waiters
                return
            if stream.relay is not None:
                stream.relay.credited(stream)

    def consumed(self, n: int, *, dropped: int = 0) -> None:
        """``n`` buffered bytes were passed on or abandoned, ``dropped`` never buffered: credit the peer."""
        self.account.buffered -= n
        inc = self.conn_window.on_consumed(n + dropped)
        if inc and self.settings.conn_frames:
            self.send_frame(encode_frame(0, FrameType.WINDOW, inc.to_bytes(4, "big")))

    def handle(self, payload: bytes) -> None:
        """Dispatch one received tunnel frame; ProtocolError means the session must end."""
        settings = self.settings
        sid, ftype, flags, data = parse_frame(payload, settings.max_data, settings.send_conn_window is not None,
                                              settings.timed_load)
        if sid == 0:  # WINDOW for the connection (parse_frame allows nothing else)
            self._on_conn_window(int.from_bytes(data, "big"))
            return
        stream = self.streams.get(sid)
        if ftype == FrameType.DATA and stream is not None:
            window = self.conn_window
            window.recv_allowed -= len(data)  # window.on_receive, inline on every DATA frame
            if window.recv_allowed < 0:
                window.recv_allowed += len(data)  # not taken: never buffered, never credited
                stream.reset(ResetCode.FLOW_CONTROL, False, "peer overran the connection window")
                stream._abandoned()
                return
            stream._on_data(data, flags == FLAG_END)
        elif ftype == FrameType.OPEN:
            self._on_open_frame(sid, data)
        elif stream is None:
            if not self.ids.known(sid):
                raise tunnel_error(TunnelSub.BAD_STREAM_ID, f"{FrameType(ftype).name} for stream {sid} never opened")
            if ftype == FrameType.DATA and self.conn_window.on_receive(len(data)):
                self.consumed(0, dropped=len(data))  # the sender counted it: credit it back
            elif ftype == FrameType.DATA:
                self.conn_window.recv_allowed += len(data)  # an overrun: never credited
            # else, or after: a frame racing the stream's close: ignore, like HTTP/2
        elif ftype == FrameType.LOAD:
            back = stream.relay_to
            if back is not None and back.mux.settings.timed_load == settings.timed_load:
                if not back.closed:  # as it came (the same layout both ways); the reader's step writes it
                    back.mux.send_frame(encode_frame(back.id, FrameType.LOAD, data), soon=True)
            elif back is not None:
                back.report_load(*parse_load(data), soon=True)  # the reader's step writes it
            else:
                stream.load_report = parse_load(data)
        elif ftype == FrameType.WINDOW:
            stream._on_window(int.from_bytes(data, "big"))
        else:  # RESET
            code, delivered, text = parse_reset(data)
            stream._on_reset(StreamReset(code, delivered, text))

    def _on_open_frame(self, sid: int, payload: bytes) -> None:
        self.ids.accept_open(sid)
        ext = ExtHeader.decode(payload)
        if len(self.streams) >= self.settings.max_streams:
            self.send_frame(encode_frame(sid, FrameType.RESET, reset_payload(
                ResetCode.TOO_MANY_STREAMS, False, f"{len(self.streams)} streams open, at most {self.settings.max_streams}")))
            return
        stream = TunnelStream(self, sid, ext)
        self.streams[sid] = stream
        if ext.eph is not None:
            try:
                if self.sealer is None:
                    raise SealError("sealed stream on a session without sealed-streams")
                sealing = self.sealer.inbound(ext)
            except SealError as exc:
                stream.reset(ResetCode.BAD_REQUEST, False, str(exc))
                return
            if sealing is not None:  # we are its egress; a transit relays the ciphertext as it comes
                self._on_open(SealedStream(stream, sealing, egress=True))  # type: ignore[arg-type]
                return
        self._on_open(stream)

    def _on_conn_window(self, inc: int) -> None:
        self.conn_window.send_credit += inc
        blocked, self.blocked = self.blocked, set()
        for stream in blocked:
            stream._credited()
            if stream.relay is not None:
                stream.relay.credited(stream)

    def _forget(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.id, None)
        if self.blocked:
            self.blocked.discard(stream)
        if self.drain_waiters:
            self.drain_waiters.pop(stream, None)

    def fail_all(self, text: str) -> None:
        """The session went down: every stream on it is abandoned, never delivered by us."""
        self.dead = StreamReset(ResetCode.NO_ROUTE, True, f"session to {self.peer_id} lost: {text}")
        for stream in list(self.streams.values()):
            # Whether the far end had passed the request on is unknown: assume it had.
            stream._on_reset(self.dead)
