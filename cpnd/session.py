"""The peer session state machine (sans-IO): handshake, OPEN, keepalives, UPDATEs.

Feed it bytes with ``receive_data(data, now)`` and timer expiries with
``handle_timer(now)``; pull ``next_event()`` and ``data_to_send()``. Time is a float
in seconds from any monotonic clock. The transition table below is the one printed
in protocol-spec/session.md (a test keeps them equal).
"""

from __future__ import annotations

import collections
import enum
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .crypto import Handshake, RecordLayer, Role, handshake_error_frame
from .tunnel import LARGE_DATA_CAP, SEALED_CAP, TUNNEL_BATCH_CAP, batch_fits, encode_batch, split_batch
from .errors import CeaseSub, Code, FsmSub, HandshakeSub, OpenSub, ProtocolError, RecordSub, describe
from .limits import DEFAULT_PEER_ROUTES, TokenBucket
from .wire import (
    GATEWAY_TIME_CAP,
    GRACEFUL_RESTART_CAP,
    INSTANCE_DOWN_CAP,
    MAX_HANDSHAKE_BODY,
    MAX_HOLD_MS,
    MAX_RECORD,
    MIN_HOLD_MS,
    ORIGIN_SIG_CAP,
    ROUTE_LIMITS_CAP,
    TUNNEL_WINDOW_CAP,
    ContentType,
    Finish,
    FrameReader,
    HandshakeError,
    Hello,
    HelloAck,
    Keepalive,
    Limits,
    Message,
    MsgType,
    Notification,
    Open,
    PendingUpdate,
    RouteAdv,
    TunnelLimits,
    RouteRefresh,
    Update,
    Withdrawal,
    decode_handshake,
    decode_message_lazily,
    encode_message,
    frame,
    split_update,
)

log = logging.getLogger("cpnd.session")

MAX_RTT_SAMPLE = 60.0
TUNNEL_CAP = "tunnel"
RTT_WINDOW = 8  # samples in the min-RTT filter
# The first keepalives after OPEN come quickly so the min-RTT filter fills in well
# under a second instead of RTT_WINDOW keepalive intervals.
STARTUP_PROBES = 4
STARTUP_PROBE_INTERVAL_S = 0.1
# Route entries of one UPDATE handed out per next_event(): a 2048-entry UPDATE is validated
# and applied in steps of a few milliseconds, not in one block that holds up every user.
UPDATE_SLICE = 32


class State(enum.Enum):
    WAIT_HELLO = "wait-hello"
    WAIT_ACK = "wait-ack"
    WAIT_FINISH = "wait-finish"
    OPEN_SENT = "open-sent"
    OPEN_CONFIRM = "open-confirm"
    ESTABLISHED = "established"
    CLOSED = "closed"


class Input(enum.Enum):
    HELLO = "HELLO"
    HELLO_ACK = "HELLO_ACK"
    FINISH = "FINISH"
    HS_ERROR = "HS_ERROR"
    OPEN = "OPEN"
    KEEPALIVE = "KEEPALIVE"
    UPDATE = "UPDATE"
    NOTIFICATION = "NOTIFICATION"
    ROUTE_REFRESH = "ROUTE_REFRESH"
    LIMITS = "LIMITS"
    HOLD_TIMER = "hold-timer"
    KEEPALIVE_TIMER = "keepalive-timer"
    EOF = "eof"


MAX_SEND_BUDGET = 1 << 30  # a peer that announced no pace

_HANDSHAKE_STATES = (State.WAIT_HELLO, State.WAIT_ACK, State.WAIT_FINISH)
_OPEN_STATES = (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED)
_TUNNEL = int(ContentType.TUNNEL)  # a plain int: compared and sealed on every tunnel record
_BATCH = int(ContentType.BATCH)


def _common(states: Sequence[State], row: dict[Input, tuple[str, State]]) -> dict[State, dict[Input, tuple[str, State]]]:
    return {s: dict(row) for s in states}


def _build_table() -> dict[State, dict[Input, tuple[str, State]]]:
    t: dict[State, dict[Input, tuple[str, State]]] = {s: {} for s in State if s is not State.CLOSED}
    for s, row in _common(_HANDSHAKE_STATES, {
        Input.HS_ERROR: ("peer_refused", State.CLOSED),
        Input.HOLD_TIMER: ("handshake_timeout", State.CLOSED),
        Input.EOF: ("connection_lost", State.CLOSED),
    }).items():
        t[s].update(row)
    for s, row in _common(_OPEN_STATES, {
        Input.NOTIFICATION: ("peer_notified", State.CLOSED),
        Input.HOLD_TIMER: ("hold_expired", State.CLOSED),
        Input.EOF: ("connection_lost", State.CLOSED),
    }).items():
        t[s].update(row)
    t[State.WAIT_HELLO][Input.HELLO] = ("send_hello_ack", State.WAIT_FINISH)
    t[State.WAIT_ACK][Input.HELLO_ACK] = ("send_finish_and_open", State.OPEN_SENT)
    t[State.WAIT_FINISH][Input.FINISH] = ("verify_finish_and_open", State.OPEN_SENT)
    t[State.OPEN_SENT][Input.HS_ERROR] = ("peer_refused", State.CLOSED)
    t[State.OPEN_SENT][Input.OPEN] = ("accept_open", State.OPEN_CONFIRM)
    t[State.OPEN_CONFIRM][Input.LIMITS] = ("accept_limits", State.OPEN_CONFIRM)
    t[State.OPEN_CONFIRM][Input.KEEPALIVE] = ("establish", State.ESTABLISHED)
    t[State.OPEN_CONFIRM][Input.KEEPALIVE_TIMER] = ("send_keepalive", State.OPEN_CONFIRM)
    t[State.ESTABLISHED][Input.KEEPALIVE] = ("measure_rtt", State.ESTABLISHED)
    t[State.ESTABLISHED][Input.KEEPALIVE_TIMER] = ("send_keepalive", State.ESTABLISHED)
    t[State.ESTABLISHED][Input.UPDATE] = ("deliver_update", State.ESTABLISHED)
    t[State.ESTABLISHED][Input.ROUTE_REFRESH] = ("deliver_refresh", State.ESTABLISHED)
    return t


TRANSITIONS = _build_table()

_UNEXPECTED_SUB = {
    State.OPEN_SENT: FsmSub.UNEXPECTED_IN_OPEN_SENT,
    State.OPEN_CONFIRM: FsmSub.UNEXPECTED_IN_OPEN_CONFIRM,
    State.ESTABLISHED: FsmSub.UNEXPECTED_IN_ESTABLISHED,
}

_MESSAGE_INPUT = {
    MsgType.HELLO: Input.HELLO, MsgType.HELLO_ACK: Input.HELLO_ACK, MsgType.FINISH: Input.FINISH,
    MsgType.HS_ERROR: Input.HS_ERROR, MsgType.OPEN: Input.OPEN, MsgType.KEEPALIVE: Input.KEEPALIVE,
    MsgType.UPDATE: Input.UPDATE, MsgType.NOTIFICATION: Input.NOTIFICATION,
    MsgType.ROUTE_REFRESH: Input.ROUTE_REFRESH, MsgType.LIMITS: Input.LIMITS,
}
_INPUT_OF_CLASS = {Open: Input.OPEN, Keepalive: Input.KEEPALIVE, Update: Input.UPDATE, PendingUpdate: Input.UPDATE,
                   Notification: Input.NOTIFICATION, RouteRefresh: Input.ROUTE_REFRESH, Limits: Input.LIMITS}


class CloseReason(enum.Enum):
    """Why a session ended, logged on every peer-down (like GoBGP's PeerDownReason)."""

    LOCAL_ERROR = "local-error"  # we found the peer in breach and sent a NOTIFICATION
    PEER_NOTIFICATION = "peer-notification"
    HOLD_EXPIRED = "hold-expired"
    CONNECTION_LOST = "connection-lost"
    ADMIN = "admin"


# ---------------------------------------------------------------- events


@attrs.frozen
class Authenticated:
    peer_id: str


@attrs.frozen
class Established:
    peer_id: str
    hold_ms: int
    caps: tuple[str, ...]


@attrs.frozen
class UpdateReceived:
    """One UPDATE, or one slice of a large one (withdrawals first); an empty one is End-of-RIB."""

    update: Update


@attrs.frozen
class RefreshRequested:
    pass


@attrs.frozen
class RttMeasured:
    sample: float
    srtt: float
    min_rtt: float


@attrs.frozen
class TunnelFrame:
    """A record of content type 2 (protocol-spec/tunnel.md), for the data plane."""

    payload: bytes


@attrs.frozen
class Closed:
    reason: CloseReason
    code: int = 0
    subcode: int = 0
    text: str = ""

    def describe(self) -> str:
        what = f" {describe(self.code, self.subcode)}" if self.code else ""
        return f"{self.reason.value}{what}{': ' + self.text if self.text else ''}"


Event = Authenticated | Established | UpdateReceived | RefreshRequested | RttMeasured | TunnelFrame | Closed


DEFAULT_CAPS = ("route-refresh", TUNNEL_CAP, LARGE_DATA_CAP, INSTANCE_DOWN_CAP, ROUTE_LIMITS_CAP, GATEWAY_TIME_CAP,
                ORIGIN_SIG_CAP, SEALED_CAP, TUNNEL_BATCH_CAP)


@attrs.frozen
class SessionConfig:
    """The timers a session proposes (the hold time in use is the lower of both sides'), and
    the route limits it announces and enforces (sent in LIMITS when both offer route-limits)."""

    hold_ms: int = attrs.field(default=3000, validator=attrs.validators.and_(attrs.validators.ge(MIN_HOLD_MS), attrs.validators.le(MAX_HOLD_MS)))
    keepalive_ms: int | None = None  # default hold / 3
    handshake_timeout_s: float = 5.0
    caps: tuple[str, ...] = DEFAULT_CAPS
    restart_ms: int = 0  # graceful restart: how long peers should keep our routes (0: off)
    tunnel: TunnelLimits | None = None  # what we accept on the tunnel, offered with tunnel-window
    limits: Limits = Limits(10_000, 1000, 10_000)

    @property
    def open_caps(self) -> tuple[str, ...]:
        return (*self.caps, *((GRACEFUL_RESTART_CAP,) if self.restart_ms else ()),
                *((TUNNEL_WINDOW_CAP,) if self.tunnel is not None else ()))


class Session:
    """One connection to one peer, from the first handshake byte to CLOSED."""

    def __init__(
        self,
        role: Role,
        local_id: str,
        local_key: Ed25519PrivateKey,
        peers: Mapping[str, Ed25519PublicKey],
        now: float,
        *,
        expected_peer: str | None = None,
        config: SessionConfig = SessionConfig(),
        random_bytes: Callable[[int], bytes] | None = None,
        data_channel: bool = False,
    ) -> None:
        kw: dict[str, Any] = {"random_bytes": random_bytes} if random_bytes else {}
        if data_channel:
            kw["data_channel"] = True
        self.role = role
        self.local_id = local_id
        self.config = config
        self._hs = Handshake(role, local_id, local_key, peers, expected_peer=expected_peer, **kw)
        self._records: RecordLayer | None = None
        self._reader = FrameReader(MAX_HANDSHAKE_BODY)
        self._out = bytearray()
        self._events: collections.deque[Event | PendingUpdate] = collections.deque()
        self.state = State.WAIT_HELLO if role is Role.RESPONDER else State.WAIT_ACK
        self.peer_id: str | None = None
        self.peer_caps: tuple[str, ...] = ()
        self.agreed_caps: tuple[str, ...] = ()  # offered by both OPENs: the features this session uses
        self.peer_restart_ms = 0  # the peer's graceful-restart window (its OPEN's `gr`), 0: none
        self.peer_tunnel: TunnelLimits | None = None  # what the peer accepts on the tunnel (its OPEN's `tw`)
        self.hold_ms = config.hold_ms
        self._hold_deadline: float | None = now + config.handshake_timeout_s
        self._keepalive_deadline: float | None = None
        self._peer_ts: int | None = None
        self._peer_ts_at = 0.0
        self.srtt: float | None = None
        self._rtt_window: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)
        self._probes_left = STARTUP_PROBES
        self.established_at: float | None = None
        self.closed: Closed | None = None
        self.stats = collections.Counter[str]()
        self.peer_limits: Limits | None = None  # what the peer takes from us (its LIMITS)
        # What we take from the peer: every message read once established costs a token, an
        # UPDATE one per entry. The shell may share one bucket across a peer's sessions.
        self.inbound = TokenBucket(config.limits.rate, config.limits.burst)
        self.outbound: TokenBucket | None = None  # the peer's announced pace, counted as we send
        self._pending = 0  # PendingUpdates among the events: their entries go out a slice at a time
        # Set by a shell that takes tunnel records straight from ``tunnel_in`` (its Mux is up): a record
        # with no session event before it waiting goes there instead of becoming a TunnelFrame event.
        self.tunnel_direct = False
        self.tunnel_in: list[bytes] = []
        self._tunnel_up = False  # tunnel_enabled, kept by _set_state
        self._batch_up = False  # and both OPENs list tunnel-batch: records of content type 3 go both ways
        self._soon: bytes | None = None  # a frame sent ``soon``, kept for the batch of the frame after it
        self._now = now
        if role is Role.INITIATOR:
            self._out += frame(self._hs.start())

    @property
    def data_channel(self) -> bool:
        """A data channel (HELLO `dc`; session.md, "Data channels"): tunnel streams only, no routes."""
        return self._hs.data_channel

    @property
    def min_rtt(self) -> float | None:
        """Minimum of the last RTT_WINDOW samples: the link's latency without processing noise."""
        return min(self._rtt_window) if self._rtt_window else None

    # ---- public API

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection.

        Feed more only while ``wants_data()``: past the peer's pace, bytes belong in the kernel.
        """
        if self.state is State.CLOSED:
            return
        self._now = now
        self.stats["bytes_in"] += len(data)
        if not data:
            self._input(Input.EOF, None, now)
            return
        reader = self._reader
        try:
            if self.tunnel_direct:  # established, its Mux up: the read's records in one call
                self._take_records(reader.take(data), now)
                if not reader.buf:
                    return  # (the common read: whole records, nothing left for next_frame)
            else:
                reader.feed(data)
            while self.state is not State.CLOSED:  # what take() left: a partial frame, or one over the limit
                fr = reader.next_frame()
                if fr is None:
                    break
                decoded = self._decode(*fr, now)
                if decoded is not None:
                    self._input(*decoded, now)
        except ProtocolError as exc:
            self._fail(exc)

    def _take_records(self, batch: list[tuple[bytes, bytes]], now: float) -> None:
        """A read's whole records: tunnel ones straight to ``tunnel_in`` while nothing but route work
        waits before them (as _opened does), the others through the FSM."""
        records, tunnel_in, events = self._records, self.tunnel_in, self._events
        assert records is not None
        hold_at, taken = now + self.hold_ms / 1000, len(tunnel_in)
        try:
            for header, body in batch:
                ctype, payload = records.open(header, body)
                if ctype == _TUNNEL and (not events or len(events) == self._pending):
                    self._hold_deadline = hold_at  # (as a record of any kind does: the peer is alive)
                    tunnel_in.append(payload)
                    continue
                if ctype == _BATCH and self._batch_up and (not events or len(events) == self._pending):
                    self._hold_deadline = hold_at
                    tunnel_in += split_batch(payload)  # (its frames are the Mux's to check, as any)
                    self.stats["batch_in"] += 1
                    continue
                decoded = self._opened(ctype, payload, now)
                if decoded is not None:
                    self._input(*decoded, now)
                if self.state is State.CLOSED:
                    break
        finally:
            if len(tunnel_in) > taken:  # counted once a read
                self.stats["tunnel_in"] += len(tunnel_in) - taken

    def handle_timer(self, now: float) -> None:
        """Fire whichever timers are due at ``now``."""
        self._now = now
        paused = self._paused_until()
        if paused is not None and self._hold_deadline is not None:
            # We are the ones not reading: the peer's messages wait in the kernel, so its
            # silence is ours. The hold timer runs again once we read.
            self._hold_deadline = max(self._hold_deadline, paused + self.hold_ms / 1000)
        if self._hold_deadline is not None and now >= self._hold_deadline:
            self._input(Input.HOLD_TIMER, None, now)
        if self._keepalive_deadline is not None and now >= self._keepalive_deadline and self.state is not State.CLOSED:
            self._input(Input.KEEPALIVE_TIMER, None, now)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None."""
        if self.state is State.CLOSED:
            return None
        hold, keepalive = self._hold_deadline, self._keepalive_deadline  # looked at twice a read: no list, no min()
        if hold is None or (keepalive is not None and keepalive < hold):
            return keepalive
        return hold

    def resume_at(self) -> float | None:
        """While the inbound pace holds the peer back: when ``next_event()`` has the next UPDATE
        slice, or ``wants_data()`` turns true again. None when nothing is held back."""
        return self._paused_until()

    def next_event(self) -> Event | None:
        """The next event; an UPDATE comes as one or more ``UpdateReceived`` of at most
        UPDATE_SLICE entries each, once the inbound bucket holds their tokens (None until then:
        ``resume_at()`` says when)."""
        while self._events:
            head = self._events[0]
            if not isinstance(head, PendingUpdate):
                return self._events.popleft()
            n = self._slice(head)
            if not self.inbound.take(n, self._now):
                return None
            try:
                update = head.take(n)
            except ProtocolError as exc:
                self._fail(exc)  # drops what is still pending and queues Closed
                continue
            if not head.remaining:
                self._events.popleft()
                self._pending -= 1
            if self._hold_deadline is not None:  # a message of the peer's, read late by our choice
                self._hold_deadline = max(self._hold_deadline, self._now + self.hold_ms / 1000)
            self.stats["route_entries_in"] += n
            return UpdateReceived(update)
        return None

    def has_events(self) -> bool:
        return bool(self._events)

    def next_is_update(self) -> bool:
        """Whether the next event would be (a slice of) an UPDATE with entries."""
        return bool(self._events) and isinstance(self._events[0], PendingUpdate)

    def wants_data(self) -> bool:
        """False while UPDATEs already read wait for tokens, or the peer's messages cost more
        than its bucket held: until then the shell leaves the peer's bytes unread."""
        return self.state is not State.CLOSED and self._paused_until() is None

    def use_inbound_bucket(self, bucket: TokenBucket) -> None:
        """Count what this peer sends in ``bucket`` (one per peer, across its sessions: a
        reconnect does not refill it)."""
        self.inbound = bucket

    @property
    def export_limit(self) -> int:
        """The most routes the peer takes from us: its LIMITS, else what cpn/1 peers enforce by default."""
        return self.peer_limits.routes if self.peer_limits is not None else DEFAULT_PEER_ROUTES

    def send_budget(self, now: float) -> int:
        """Route entries we may send the peer now without outrunning the pace it announced."""
        if self.outbound is None:
            return MAX_SEND_BUDGET
        return max(0, int(self.outbound.level(now)))

    def send_ready_at(self, n: int, now: float) -> float:
        """When ``send_budget`` reaches ``n`` (at most the peer's burst)."""
        return now if self.outbound is None else self.outbound.ready_at(n, now)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        self.stats["bytes_out"] += len(out)
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def send_update(self, adv: Sequence[RouteAdv], wd: Sequence[Withdrawal]) -> int:
        """Queue UPDATEs carrying ``adv`` and ``wd``; returns how many messages."""
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"send_update in state {self.state.value}")
        n = 0
        for upd in split_update(adv, wd):
            self._send(upd)
            n += 1
        return n

    def send_end_of_rib(self) -> None:
        """Queue an empty UPDATE: the initial table is complete (routing.md, graceful restart)."""
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"send_end_of_rib in state {self.state.value}")
        self._send(Update((), ()))

    @property
    def tunnel_enabled(self) -> bool:
        """Both sides offered the tunnel capability and the session is up."""
        return self.state is State.ESTABLISHED and TUNNEL_CAP in self.agreed_caps

    def send_tunnel(self, payload: bytes) -> None:
        """Queue one tunnel frame (content type 2), after a frame ``tunnel_record`` kept (frames keep their order)."""
        if not self.tunnel_enabled:
            raise RuntimeError("tunnel not negotiated on this session")
        assert self._records is not None
        first, self._soon = self._soon, None
        for each in (first, payload) if first is not None else (payload,):
            self._out += self._records.seal(ContentType.TUNNEL, each)
            self.stats["tunnel_out"] += 1

    @property
    def batching(self) -> bool:
        """Both OPENs list `tunnel-batch` (and the tunnel is up): two frames may share a record."""
        return self._batch_up

    def tunnel_record(self, payload: bytes, soon: bool = False) -> bytes:
        """``send_tunnel`` and ``data_to_send`` in one call (the data plane's every frame): the bytes to
        write now, what was queued before it first (records go out in the order they were sealed).

        ``soon``: the caller sends another frame from this same step (an OPEN before its request, a LOAD
        before its response). With `tunnel-batch` the frame is kept, not sealed (b"" back), and goes in one
        batch record with that next frame (tunnel.md, "Batches"); a step that ends without one calls
        ``release_soon``. Without it, the frame is sealed now, as any."""
        first = self._soon
        if first is not None:
            self._soon = None
            if batch_fits(first, payload):
                return self._seal_tunnel(_BATCH, encode_batch(first, payload), 2)
            return self._seal_tunnel(_TUNNEL, first, 1) + self._seal_tunnel(_TUNNEL, payload, 1)
        if soon and self._batch_up:
            self._soon = payload
            return b""
        if not self._tunnel_up:
            raise RuntimeError("tunnel not negotiated on this session")
        return self._seal_tunnel(_TUNNEL, payload, 1)

    def release_soon(self) -> bytes:
        """The frame ``tunnel_record`` kept for a batch, sealed alone (nothing followed it in its step),
        with what was queued before it; b"" when none is kept."""
        first, self._soon = self._soon, None
        if first is None or self.state is State.CLOSED:
            return b""
        return self._seal_tunnel(_TUNNEL, first, 1)

    def _seal_tunnel(self, ctype: int, payload: bytes, frames: int) -> bytes:
        assert self._records is not None
        out = self._records.seal(ctype, payload)
        stats = self.stats
        stats["tunnel_out"] += frames
        if ctype == _BATCH:
            stats["batch_out"] += 1
        if self._out:
            out = bytes(self._out) + out
            self._out.clear()
        stats["bytes_out"] += len(out)
        return out

    def send_route_refresh(self) -> None:
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"route refresh in state {self.state.value}")
        self._send(RouteRefresh())

    def close(self, code: int = Code.CEASE, subcode: int = CeaseSub.ADMIN_SHUTDOWN, text: str = "") -> None:
        """Tell the peer why (NOTIFICATION or handshake error) and end the session."""
        if self.state is State.CLOSED:
            return
        self._notify(ProtocolError(code, subcode, text))
        reason = CloseReason.ADMIN if code == Code.CEASE else CloseReason.LOCAL_ERROR
        self._set_closed(Closed(reason, code, subcode, text))

    # ---- internals

    def _slice(self, pending: PendingUpdate) -> int:
        return min(UPDATE_SLICE, pending.remaining, max(1, int(self.inbound.burst)))

    def _paused_until(self) -> float | None:
        """When reading may go on, if the inbound pace holds it now; else None."""
        if self.state is not State.ESTABLISHED:
            return None
        if self._pending:
            head = self._events[0]
            if not isinstance(head, PendingUpdate):
                return self._now  # events before it go first, at once
            return self.inbound.ready_at(self._slice(head), self._now)
        if self.inbound.tokens < 0 and self.inbound.level(self._now) < 0:  # (a refill only adds: none below 0)
            return self.inbound.ready_at(0, self._now)
        return None

    def _set_state(self, new: State) -> None:
        if new is not self.state:
            log.debug("%s session %s: %s -> %s", self.local_id, self.peer_id or "?", self.state.value, new.value)
            self.state = new
            self._tunnel_up = self.tunnel_enabled  # for every frame sent: a flag, not the property's two tests
            self._batch_up = self._tunnel_up and TUNNEL_BATCH_CAP in self.agreed_caps

    def _decode(self, header: bytes, body: bytes, now: float) -> tuple[Input, object] | None:
        if self._records is None:
            hs = decode_handshake(body)
            return _MESSAGE_INPUT[_hs_type(hs)], hs
        try:
            ctype, payload = self._records.open(header, body)
        except ProtocolError:
            # The responder refuses a bad FINISH in plaintext: before the first record
            # arrives, the initiator also accepts a plaintext handshake error.
            if self.role is Role.INITIATOR and self._records.recv_counter == 0 and len(body) <= MAX_HANDSHAKE_BODY:
                try:
                    hs = decode_handshake(body)
                except ProtocolError:
                    hs = None
                if isinstance(hs, HandshakeError):
                    return Input.HS_ERROR, hs
            raise
        return self._opened(ctype, payload, now)

    def _opened(self, ctype: int, payload: bytes, now: float) -> tuple[Input, object] | None:
        """A record opened: a tunnel frame (to ``tunnel_in`` or as an event), else a control message."""
        if (ctype == ContentType.TUNNEL and self.tunnel_enabled) or (ctype == _BATCH and self._batch_up):
            # Tunnel frames bypass the FSM (they are not session messages) but prove
            # the peer alive like any other record.
            self._hold_deadline = now + self.hold_ms / 1000
            frames = [payload] if ctype == ContentType.TUNNEL else split_batch(payload)
            self.stats["tunnel_in"] += len(frames)
            if ctype == _BATCH:
                self.stats["batch_in"] += 1
            if self.tunnel_direct and len(self._events) == self._pending:
                # Nothing but route work waits before it (that may go after: the data plane does not
                # wait for UPDATE slices): the shell takes it before the events of this read.
                self.tunnel_in += frames
            else:
                self._events.extend(TunnelFrame(f) for f in frames)
            return None
        if ctype != ContentType.CONTROL:
            raise ProtocolError(Code.RECORD, RecordSub.BAD_CONTENT_TYPE, f"content type {ctype}")
        msg = decode_message_lazily(payload)
        self.stats["msgs_in"] += 1
        if self.state is State.ESTABLISHED and not isinstance(msg, PendingUpdate):
            self.inbound.charge(1, now)  # an UPDATE's entries are counted as they are taken
        return _INPUT_OF_CLASS[type(msg)], msg

    def _input(self, inp: Input, msg: object, now: float) -> None:
        row = TRANSITIONS.get(self.state, {})
        if inp not in row:
            if self.state in _UNEXPECTED_SUB:
                err = ProtocolError(Code.FSM, _UNEXPECTED_SUB[self.state], f"{inp.value} in {self.state.value}")
            else:
                err = ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, f"{inp.value} in {self.state.value}")
            self._fail(err)
            return
        action, new_state = row[inp]
        if inp not in (Input.HOLD_TIMER, Input.KEEPALIVE_TIMER, Input.EOF) and self.state in _OPEN_STATES:
            self._hold_deadline = now + self.hold_ms / 1000
        try:
            getattr(self, "_act_" + action)(msg, now)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self.state is not State.CLOSED:
            self._set_state(new_state)

    def _send(self, msg: Message) -> None:
        assert self._records is not None
        self._out += self._records.seal(ContentType.CONTROL, encode_message(msg))
        self.stats["msgs_out"] += 1
        if self.outbound is not None and self.state is State.ESTABLISHED:
            self.outbound.charge(max(1, len(msg.adv) + len(msg.wd)) if isinstance(msg, Update) else 1, self._now)

    def _notify(self, exc: ProtocolError) -> None:
        try:
            if self._records is not None:
                self._send(Notification(exc.code, exc.subcode, exc.detail))
            else:
                self._out += handshake_error_frame(exc)
        except ProtocolError:
            pass  # counter exhausted: nothing more can be said on this connection

    def _fail(self, exc: ProtocolError) -> None:
        if self.state is State.CLOSED:
            return
        self._notify(exc)
        self._set_closed(Closed(CloseReason.LOCAL_ERROR, exc.code, exc.subcode, exc.detail))

    def _set_closed(self, closed: Closed) -> None:
        if self._pending:  # moot: the session is over (a graceful restart resends them)
            self._events = collections.deque(e for e in self._events if not isinstance(e, PendingUpdate))
            self._pending = 0
        self._set_state(State.CLOSED)
        self.closed = closed
        self._hold_deadline = self._keepalive_deadline = None
        self._events.append(closed)

    def _ts(self, now: float) -> int:
        return max(0, int(now * 1_000_000))

    def _start_open(self, now: float) -> None:
        send_key, recv_key = self._hs.traffic_keys()
        self._records = RecordLayer(send_key, recv_key)
        self._reader.set_limit(MAX_RECORD)
        self.peer_id = self._hs.peer_id
        self._events.append(Authenticated(self.peer_id))  # type: ignore[arg-type]
        self._send(Open(self.local_id, self.config.hold_ms, self.config.open_caps, self._ts(now),
                        self.config.restart_ms or None, self.config.tunnel))
        self._hold_deadline = now + self.config.handshake_timeout_s

    def _send_keepalive(self, now: float) -> None:
        echo, dly = 0, 0
        if self._peer_ts is not None:
            echo, dly = self._peer_ts, int((now - self._peer_ts_at) * 1_000_000)
            self._peer_ts = None
        self._send(Keepalive(self._ts(now), echo, max(0, dly)))
        interval = min(self.config.keepalive_ms or self.hold_ms // 3, self.hold_ms // 3) / 1000
        if self._probes_left > 0:
            self._probes_left -= 1
            interval = min(interval, STARTUP_PROBE_INTERVAL_S)
        self._keepalive_deadline = now + interval

    def _on_keepalive(self, msg: Keepalive, now: float) -> None:
        self._peer_ts, self._peer_ts_at = msg.ts, now
        if msg.echo:
            sample = (self._ts(now) - msg.echo - msg.dly) / 1_000_000
            if 0 <= sample <= MAX_RTT_SAMPLE:
                # RFC 6298 smoothing: one noisy sample moves SRTT by an eighth.
                self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
                self._rtt_window.append(sample)
                self._events.append(RttMeasured(sample, self.srtt, self.min_rtt))  # type: ignore[arg-type]

    # ---- actions (named in TRANSITIONS)

    def _act_send_hello_ack(self, msg: object, now: float) -> None:
        reply = self._hs.handle(msg)
        assert reply is not None
        self._out += frame(reply)

    def _act_send_finish_and_open(self, msg: object, now: float) -> None:
        reply = self._hs.handle(msg)
        assert reply is not None
        self._out += frame(reply)
        self._start_open(now)

    def _act_verify_finish_and_open(self, msg: object, now: float) -> None:
        self._hs.handle(msg)
        self._start_open(now)

    def _act_peer_refused(self, msg: HandshakeError, now: float) -> None:
        self._set_closed(Closed(CloseReason.PEER_NOTIFICATION, msg.code, msg.subcode, msg.text))

    def _act_handshake_timeout(self, msg: object, now: float) -> None:
        raise ProtocolError(Code.HANDSHAKE, HandshakeSub.TIMEOUT, f"no handshake within {self.config.handshake_timeout_s:g} s")

    def _act_connection_lost(self, msg: object, now: float) -> None:
        self._set_closed(Closed(CloseReason.CONNECTION_LOST, text="peer closed the connection"))

    def _act_peer_notified(self, msg: Notification, now: float) -> None:
        self._set_closed(Closed(CloseReason.PEER_NOTIFICATION, msg.code, msg.subcode, msg.text))

    def _act_hold_expired(self, msg: object, now: float) -> None:
        if self.state is not State.ESTABLISHED and self.state is not State.OPEN_CONFIRM:
            raise ProtocolError(Code.HOLD_TIMER_EXPIRED, 0, f"no OPEN within {self.config.handshake_timeout_s:g} s")
        self._notify(ProtocolError(Code.HOLD_TIMER_EXPIRED, 0, f"nothing heard for {self.hold_ms} ms"))
        self._set_closed(Closed(CloseReason.HOLD_EXPIRED, Code.HOLD_TIMER_EXPIRED, 0, f"nothing heard for {self.hold_ms} ms"))

    def _act_accept_open(self, msg: Open, now: float) -> None:
        if msg.id != self.peer_id:
            raise ProtocolError(Code.OPEN, OpenSub.BAD_PEER_ID, f"OPEN says {msg.id!r}, handshake authenticated {self.peer_id!r}")
        if not MIN_HOLD_MS <= msg.hold_ms <= MAX_HOLD_MS:
            raise ProtocolError(Code.OPEN, OpenSub.BAD_HOLD_TIME, f"hold {msg.hold_ms} ms outside [{MIN_HOLD_MS}, {MAX_HOLD_MS}]")
        self.hold_ms = min(self.config.hold_ms, msg.hold_ms)
        self.peer_caps = msg.caps
        self.agreed_caps = tuple(sorted(set(msg.caps) & set(self.config.open_caps)))
        self.peer_restart_ms = msg.restart_ms or 0
        self.peer_tunnel = msg.tunnel if TUNNEL_WINDOW_CAP in self.agreed_caps else None
        self._peer_ts, self._peer_ts_at = msg.ts, now
        self._hold_deadline = now + self.hold_ms / 1000
        if ROUTE_LIMITS_CAP in self.agreed_caps:
            self._send(self.config.limits)  # before the KEEPALIVE: the peer knows them once established
        self._send_keepalive(now)

    def _act_accept_limits(self, msg: Limits, now: float) -> None:
        if ROUTE_LIMITS_CAP not in self.agreed_caps or self.peer_limits is not None:
            raise ProtocolError(Code.FSM, FsmSub.UNEXPECTED_IN_OPEN_CONFIRM,
                                "LIMITS twice, or without route-limits in both OPENs")
        self.peer_limits = msg

    def _act_establish(self, msg: Keepalive, now: float) -> None:
        if ROUTE_LIMITS_CAP in self.agreed_caps and self.peer_limits is None:
            raise ProtocolError(Code.FSM, FsmSub.UNEXPECTED_IN_OPEN_CONFIRM, "KEEPALIVE before LIMITS (both OPENs offered route-limits)")
        if self.peer_limits is not None:
            self.outbound = TokenBucket(self.peer_limits.rate, self.peer_limits.burst, at=now)
        self._on_keepalive(msg, now)
        self.established_at = now
        self._set_state(State.ESTABLISHED)
        self._events.append(Established(self.peer_id, self.hold_ms, self.peer_caps))  # type: ignore[arg-type]

    def _act_measure_rtt(self, msg: Keepalive, now: float) -> None:
        self._on_keepalive(msg, now)

    def _act_send_keepalive(self, msg: object, now: float) -> None:
        self._send_keepalive(now)

    def _act_deliver_update(self, msg: Update | PendingUpdate, now: float) -> None:
        if isinstance(msg, PendingUpdate):
            self._events.append(msg)  # taken a slice at a time by next_event()
            self._pending += 1
        else:
            self._events.append(UpdateReceived(msg))  # End-of-RIB

    def _act_deliver_refresh(self, msg: object, now: float) -> None:
        self._events.append(RefreshRequested())


def _hs_type(msg: object) -> MsgType:
    return {Hello: MsgType.HELLO, HelloAck: MsgType.HELLO_ACK, Finish: MsgType.FINISH, HandshakeError: MsgType.HS_ERROR}[type(msg)]  # type: ignore[index]


# ---------------------------------------------------------------- connect retry and collisions


@attrs.define
class Backoff:
    """Connect-retry delays: exponential from ``base`` to ``cap``, jittered to [d/2, d]."""

    base: float = 0.25
    cap: float = 30.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        d = min(self.cap, self.base * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return d * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0


def collision_keeps_new(local_id: str, peer_id: str, existing_established: bool, existing_initiated_locally: bool,
                        new_initiated_locally: bool) -> bool:
    """Which of two connections to one peer survives (protocol-spec/session.md, "Collisions").

    Both initiated by the same gateway: the new one (a gateway dials only when it holds no
    connection to that peer, so it gave the old one up: it restarted, or lost the
    connection without the other end noticing). Otherwise an established session wins,
    then the connection initiated by the gateway with the greater id (byte-wise UTF-8).
    """
    if existing_initiated_locally == new_initiated_locally:
        return True
    if existing_established:
        return False
    winner = local_id if local_id.encode() > peer_id.encode() else peer_id
    new_initiator = local_id if new_initiated_locally else peer_id
    return new_initiator == winner
