"""Tunnel framing (sans-IO): streams of encapsulated HTTP inside session records.

A tunnel frame is the payload of a record of content type 2 (protocol-spec/tunnel.md):
``stream_id u32 | type u8 | flags u8 | payload``, or one entry of a record of content type 3
(a batch: ``len u16 | frame``, two or more, with `tunnel-batch`). Streams carry one request and
its response each, opened by an extension header, with per-stream flow control.
"""

from __future__ import annotations

import enum
import functools
import os
import struct

import attrs

from .errors import Code, ProtocolError, TunnelSub
from .names import id_problem
from .wire import TunnelLimits

FRAME_HEADER = struct.Struct(">IBB")
MAX_DATA = 16384
# With the `tunnel-large-data` capability on both ends of a session: DATA up to 65024 bytes
# (one record holds it), so a bulk transfer costs a quarter of the frames, and windows of
# 1 MiB: with two busy gateways, credit takes a millisecond or two to come back, and a
# 256 KiB window then held a 5 MB transfer to half of what their CPUs allow.
MAX_DATA_LARGE = 65024
LARGE_DATA_CAP = "tunnel-large-data"
INITIAL_WINDOW = 256 * 1024
INITIAL_WINDOW_LARGE = 1024 * 1024
MAX_WINDOW = (1 << 31) - 1
MAX_STREAMS = 1024  # without `tunnel-window`: the most streams a peer may open at once
UNLIMITED = 1 << 62  # send credit on a connection without a connection window
NO_BUDGET = 0xFFFFFFFF
MAX_RESET_TEXT = 256


class FrameType(enum.IntEnum):
    OPEN = 1
    DATA = 2
    WINDOW = 3
    RESET = 4
    LOAD = 5


FLAG_END = 0x01


class QoS(enum.IntEnum):
    REALTIME = 0
    INTERACTIVE = 1
    BULK = 2


class ResetCode(enum.IntEnum):
    """Why a stream was abandoned; ``delivered`` in the RESET says whether the instance saw it."""

    NO_ROUTE = 1
    HOP_LIMIT = 2
    DEADLINE = 3
    REFUSED = 4
    INSTANCE_UNREACHABLE = 5
    INSTANCE_FAILED = 6
    BAD_REQUEST = 7
    FLOW_CONTROL = 8
    CANCEL = 9
    TOO_MANY_STREAMS = 10
    NO_SUCH_INSTANCE = 11
    INTERNAL = 12


def tunnel_error(sub: TunnelSub, detail: str) -> ProtocolError:
    return ProtocolError(Code.TUNNEL, sub, detail)


_EXT = struct.Struct(">BBBBIII16s")
EXT_VERSION = 1
EXT_FLAG_IDEMPOTENT = 0x01
EXT_FLAG_SEALED = 0x02  # the header ends with the ingress's ephemeral X25519 key: DATA is sealed end to end
EXT_FLAG_YIELDS = 0x04  # no latency bound, and the ingress has room for it elsewhere: a bounded share counts it not
SEALED_CAP = "sealed-streams"  # both OPENs list it: OPENs on the session may carry EXT_FLAG_SEALED


@attrs.frozen
class ExtHeader:
    """The extension header that opens a stream (protocol-spec/tunnel.md)."""

    label: int
    origin: str
    instance: str
    request_id: bytes = attrs.field(factory=lambda: os.urandom(16))
    qos: QoS = QoS.INTERACTIVE
    hop_limit: int = 16
    budget_us: int = NO_BUDGET  # remaining deadline budget, µs; NO_BUDGET = none
    flags: int = 0
    slack_us: int = NO_BUDGET  # compute latency the user's latency bound leaves, µs; NO_BUDGET = unbounded
    eph: bytes | None = None  # sealed (EXT_FLAG_SEALED): the ingress's ephemeral X25519 public key
    # Decoded from a peer's OPEN (kept through attrs.evolve): a transit passes it on, never seals it itself.
    from_peer: bool = attrs.field(default=False, eq=False, repr=False)

    def onward(self, budget_us: int) -> ExtHeader:
        """This header for the next hop (a transit's): one hop fewer, ``budget_us`` left (attrs.evolve's
        result, without its calls)."""
        return ExtHeader(self.label, self.origin, self.instance, self.request_id, self.qos, self.hop_limit - 1,
                         budget_us, self.flags, self.slack_us, self.eph, from_peer=self.from_peer)

    def sealed(self, eph: bytes) -> ExtHeader:
        """This header sealed with ``eph`` (the ingress's; attrs.evolve's result, without its calls)."""
        return ExtHeader(self.label, self.origin, self.instance, self.request_id, self.qos, self.hop_limit,
                         self.budget_us, self.flags, self.slack_us, eph, from_peer=self.from_peer)

    def encode(self) -> bytes:
        flags = (self.flags & ~EXT_FLAG_SEALED) | (EXT_FLAG_SEALED if self.eph is not None else 0)
        return (_EXT.pack(EXT_VERSION, self.qos, self.hop_limit, flags, self.label, self.budget_us,
                          self.slack_us, self.request_id)
                + _ext_name(self.origin) + _ext_name(self.instance) + (self.eph or b""))

    @classmethod
    def decode(cls, data: bytes) -> ExtHeader:
        """Parse an extension header; ProtocolError(tunnel/malformed-frame) on any defect."""
        # Every OPEN: a well-formed header is taken in one pass of comparisons; anything else goes
        # through _decode_checked, which finds the defect and names it.
        size = len(data)
        if size >= 34:  # _EXT.size + 2
            ver, qos, hops, flags, label, budget, slack, rid = _EXT.unpack_from(data)
            o = 33 + data[32]  # the origin is data[33:o], then the instance's length byte
            if o < size:
                i = o + 1 + data[o]
                sealed = flags & EXT_FLAG_SEALED
                if ver == EXT_VERSION and qos <= 2 and label <= 0x7FFFFFFF and (i + 32 if sealed else i) == size:
                    return cls(label, _ext_id(data[33:o]), _ext_id(data[o + 1:i]), rid, _QOS_BY_VALUE[qos], hops,
                               budget, flags & ~EXT_FLAG_SEALED, slack, data[i:] if sealed else None, from_peer=True)
        return cls._decode_checked(data)

    @classmethod
    def _decode_checked(cls, data: bytes) -> ExtHeader:
        """``decode``, one check at a time: the error names the first defect."""
        if len(data) < _EXT.size + 2:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "extension header too short")
        ver, qos_value, hops, flags, label, budget, slack, rid = _EXT.unpack_from(data)
        if ver != EXT_VERSION:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"extension header version {ver}")
        qos = _QOS.get(qos_value)
        if qos is None:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"qos {qos_value}")
        if label > 0x7FFFFFFF:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "label has its top bit set")
        pos = _EXT.size
        names = []
        for _ in range(2):
            if pos >= len(data):
                raise tunnel_error(TunnelSub.MALFORMED_FRAME, "extension header truncated")
            n = data[pos]
            raw = data[pos + 1: pos + 1 + n]
            if len(raw) != n:
                raise tunnel_error(TunnelSub.MALFORMED_FRAME, "extension header truncated")
            names.append(_ext_id(raw))
            pos += 1 + n
        eph = None
        if flags & EXT_FLAG_SEALED:
            eph = data[pos:pos + 32]
            if len(eph) != 32:
                raise tunnel_error(TunnelSub.MALFORMED_FRAME, "sealed extension header without its 32-byte key")
            pos += 32
        if pos != len(data):
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "trailing bytes after extension header")
        return cls(label, names[0], names[1], rid, qos, hops, budget, flags & ~EXT_FLAG_SEALED, slack, eph,
                   from_peer=True)


_QOS = {int(q): q for q in QoS}
_QOS_BY_VALUE = tuple(QoS)  # QoS(n) is _QOS_BY_VALUE[n] for 0 <= n <= 2 (a tuple index, no dict lookup)


# Every OPEN names an origin and an instance, the same few over and over: their verdicts are kept,
# and their encodings.
@functools.lru_cache(maxsize=4096)
def _ext_name(name: str) -> bytes:
    """An id as an extension header carries it: its length (u8), then its UTF-8."""
    raw = name.encode()
    return bytes([len(raw)]) + raw


@functools.lru_cache(maxsize=4096)
def _ext_id(raw: bytes) -> str:
    """An id of an extension header, checked; ProtocolError(tunnel/malformed-frame) if it is not one."""
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, "id is not UTF-8") from None
    problem = id_problem(name)
    if problem:
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"bad id in extension header: {problem}")
    return name


@attrs.frozen
class Frame:
    stream_id: int
    type: FrameType
    flags: int
    payload: bytes

    @property
    def end(self) -> bool:
        return bool(self.flags & FLAG_END)


def encode_frame(stream_id: int, ftype: FrameType, payload: bytes = b"", flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(stream_id, ftype, flags) + payload


# ---------------------------------------------------------------- batches (content type 3)

# Both OPENs list it: a frame sent and at once followed by another on the session (an OPEN and its
# request, a LOAD and its response) travels with it in one record: one seal, one open, one write.
TUNNEL_BATCH_CAP = "tunnel-batch"
MAX_BATCH_PAYLOAD = 65535  # a record's plaintext (65536) less its content type byte
# Entries a batch may carry (cpnd sends 2): without a cap one record of minimal frames held ~8,000, one
# session read ~32,000, all taken by the Mux before its next checkpoint.
MAX_BATCH_ENTRIES = 16


def encode_batch(first: bytes, second: bytes) -> bytes:
    """A batch record's payload: each frame after its length (u16)."""
    return len(first).to_bytes(2, "big") + first + len(second).to_bytes(2, "big") + second


def batch_fits(first: bytes, second: bytes) -> bool:
    """Whether the two frames fit one batch record."""
    return len(first) + len(second) + 4 <= MAX_BATCH_PAYLOAD


def split_batch(payload: bytes) -> list[bytes]:
    """A batch record's frames, in order (each still to be checked as a frame); ProtocolError
    ``tunnel/malformed-batch`` for fewer than two entries or more than MAX_BATCH_ENTRIES, a length cut
    short or one past the end."""
    frames, at, end = [], 0, len(payload)
    while at < end:
        if len(frames) == MAX_BATCH_ENTRIES:
            raise tunnel_error(TunnelSub.MALFORMED_BATCH, f"batch of more than {MAX_BATCH_ENTRIES} entries")
        if at + 2 > end:
            raise tunnel_error(TunnelSub.MALFORMED_BATCH, f"batch entry at {at}: its length is cut short")
        n = (payload[at] << 8) | payload[at + 1]
        at += 2
        if at + n > end:
            raise tunnel_error(TunnelSub.MALFORMED_BATCH, f"batch entry of {n} bytes at {at - 2} runs past the end")
        frames.append(payload[at:at + n])
        at += n
    if len(frames) < 2:
        raise tunnel_error(TunnelSub.MALFORMED_BATCH, f"batch of {len(frames)} entries (at least 2)")
    return frames


def decode_frame(data: bytes, max_data: int = MAX_DATA, *, conn_window: bool = False, timed_load: bool = False) -> Frame:
    """Parse one tunnel frame and check its payload's shape for its type (DATA up to ``max_data``).

    ``conn_window``: the session agreed `tunnel-window`, so WINDOW on stream 0 credits the connection.
    ``timed_load``: the session agreed `gateway-time`, so LOAD carries the instance's time too.
    """
    sid, ftype, flags, payload = parse_frame(data, max_data, conn_window, timed_load)
    return Frame(sid, FrameType(ftype), flags, payload)


_T_OPEN, _T_DATA, _T_WINDOW, _T_RESET, _T_LOAD = (int(t) for t in FrameType)  # plain ints: the Mux dispatches on them
_FRAME_TYPES = frozenset(FrameType._value2member_map_)


def parse_frame(data: bytes, max_data: int, conn_window: bool, timed_load: bool) -> tuple[int, int, int, bytes]:
    """``decode_frame``'s checks, its result as plain ``(stream id, type, flags, payload)``: what the Mux
    takes of every frame (no Frame, no FrameType built)."""
    if len(data) < 6:  # FRAME_HEADER.size
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, "frame shorter than its header")
    sid, ftype, flags = FRAME_HEADER.unpack_from(data)
    payload = data[6:]
    if ftype == _T_DATA and sid and not flags & ~FLAG_END:  # the common frame, with decode_frame's checks in its order
        if len(payload) > max_data:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"DATA of {len(payload)} bytes exceeds {max_data}")
        return sid, ftype, flags, payload
    if ftype == _T_OPEN and sid and not flags:  # every stream's first (its header is ExtHeader.decode's to check)
        return sid, ftype, flags, payload
    if ftype not in _FRAME_TYPES:
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"unknown frame type {ftype}")
    if sid == 0 and not (conn_window and ftype == _T_WINDOW):
        raise tunnel_error(TunnelSub.BAD_STREAM_ID, f"{FrameType(ftype).name} on stream id 0")
    if flags & ~FLAG_END or (flags and ftype != _T_DATA):
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"flags {flags:#x} on {FrameType(ftype).name}")
    if ftype == _T_DATA and len(payload) > max_data:
        raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"DATA of {len(payload)} bytes exceeds {max_data}")
    if ftype == _T_WINDOW:
        if len(payload) != 4 or not 0 < int.from_bytes(payload, "big") <= MAX_WINDOW:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "WINDOW must carry an increment in 1..2^31-1")
    elif ftype == _T_LOAD:
        size = _LOAD_TIMED.size if timed_load else _LOAD.size
        if len(payload) != size:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, f"LOAD must carry {size} bytes")
        load_milli, bload_milli, _ = _LOAD.unpack_from(payload)
        if load_milli > 1_000_000 or bload_milli > 1_000_000:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "LOAD load over 1000")
    elif ftype == _T_RESET:
        if not 3 <= len(payload) <= 3 + MAX_RESET_TEXT or payload[2] > 1:
            raise tunnel_error(TunnelSub.MALFORMED_FRAME, "RESET must be code u16, delivered u8, text")
    return sid, ftype, flags, payload


_LOAD = struct.Struct(">III")
_LOAD_TIMED = struct.Struct(">IIII")  # with `gateway-time`: and the instance's time to its response head
NO_TIME = 0xFFFFFFFF  # LOAD's instance time when the instance gave no response (a refusal)


def _milli(x: float) -> int:
    return min(1_000_000, max(0, round(x * 1000)))


def load_payload(load: float, bload: float, compute_us: float, instance_us: float | None = None, *,
                 timed: bool = False) -> bytes:
    """LOAD: load and latency-bound demand in thousandths of capacity (u32 each), base compute µs (u32);
    ``timed`` (`gateway-time`): then this request's instance time to its response head, µs (u32; NO_TIME: none)."""
    # _milli inline: the egress builds one LOAD a request
    head = (min(1_000_000, max(0, round(load * 1000))), min(1_000_000, max(0, round(bload * 1000))),
            min(0xFFFFFFFF, max(0, round(compute_us))))
    if not timed:
        return _LOAD.pack(*head)
    return _LOAD_TIMED.pack(*head, NO_TIME if instance_us is None else min(NO_TIME - 1, max(0, round(instance_us))))


def parse_load(payload: bytes) -> tuple[float, float, int, int | None]:
    """(load, bload, base compute µs, the instance's time µs or None) of a checked LOAD payload."""
    milli, bmilli, comp = _LOAD.unpack_from(payload)
    inst = _LOAD_TIMED.unpack(payload)[3] if len(payload) == _LOAD_TIMED.size else NO_TIME
    return milli / 1000, bmilli / 1000, comp, None if inst == NO_TIME else inst


def reset_payload(code: ResetCode, delivered: bool, text: str = "") -> bytes:
    return struct.pack(">HB", code, 1 if delivered else 0) + text.encode()[:MAX_RESET_TEXT]


def parse_reset(payload: bytes) -> tuple[int, bool, str]:
    code, delivered = struct.unpack_from(">HB", payload)
    return code, bool(delivered), payload[3:].decode("utf-8", "replace")


@attrs.define
class StreamIds:
    """Stream id allocation and checking for one connection (odd: session initiator's)."""

    initiator: bool
    next_local: int = 0
    last_remote: int = 0
    open_remote: int = 0

    def __attrs_post_init__(self) -> None:
        self.next_local = 1 if self.initiator else 2

    def allocate(self) -> int:
        sid = self.next_local
        if sid > 0xFFFFFFFF:
            raise tunnel_error(TunnelSub.BAD_STREAM_ID, "stream ids exhausted")
        self.next_local += 2
        return sid

    def is_local(self, sid: int) -> bool:
        return (sid % 2 == 1) == self.initiator

    def accept_open(self, sid: int) -> None:
        """Check an OPEN from the peer: its parity, and ids only ever grow."""
        if (sid % 2 == 1) == self.initiator or sid <= self.last_remote:  # (is_local, inline: every OPEN)
            raise tunnel_error(TunnelSub.BAD_STREAM_ID, f"OPEN for stream {sid} (last {self.last_remote})")
        self.last_remote = sid

    def known(self, sid: int) -> bool:
        """Could ``sid`` have been opened already (by either side)?"""
        return sid < self.next_local if self.is_local(sid) else sid <= self.last_remote


@attrs.define
class FlowWindow:
    """Credit-based flow control of one stream or one connection (like HTTP/2's): ``initial`` is
    what we accept, ``send_credit`` what the other side accepts from us (by default the same)."""

    initial: int = INITIAL_WINDOW
    send_credit: int = attrs.field(default=attrs.Factory(lambda self: self.initial, takes_self=True))
    recv_allowed: int = attrs.field(default=attrs.Factory(lambda self: self.initial, takes_self=True))
    recv_unacked: int = 0

    def on_receive(self, n: int) -> bool:
        """Account ``n`` received bytes; False when the peer overran its credit."""
        self.recv_allowed -= n
        return self.recv_allowed >= 0

    def on_consumed(self, n: int) -> int:
        """The peer's bytes were passed on; returns a WINDOW increment to send, or 0."""
        self.recv_unacked += n
        if self.recv_unacked >= self.initial // 2:
            inc, self.recv_unacked = self.recv_unacked, 0
            self.recv_allowed += inc
            return inc
        return 0


@attrs.frozen
class MuxSettings:
    """What one session's tunnel allows each way (protocol-spec/tunnel.md, "Flow control")."""

    max_data: int
    recv_window: int  # each stream's window we grant the peer
    send_window: int  # each stream's window the peer grants us
    recv_conn_window: int  # all DATA the peer may have un-credited here, every stream together
    send_conn_window: int | None  # the same the peer grants us; None: no connection window (no `tunnel-window`)
    max_streams: int  # streams open at once on the session, opened by either side (ours)
    peer_max_streams: int  # the same, the peer's
    timed_load: bool = False  # both OPENs list `gateway-time`: LOAD carries the instance's time

    @property
    def conn_frames(self) -> bool:
        """WINDOW on stream 0 is part of this session's protocol."""
        return self.send_conn_window is not None


def mux_settings(ours: TunnelLimits, theirs: TunnelLimits | None, large_data: bool, *,
                 timed_load: bool = False) -> MuxSettings:
    """The session's settings from both OPENs' `tw` (``theirs`` None: the peer has no `tunnel-window`).

    Without it the peer knows only the fixed windows of version 1, so those apply both ways; we
    still bound what it may have buffered here by our connection window (overruns are reset).
    """
    max_data = MAX_DATA_LARGE if large_data else MAX_DATA
    if theirs is None:
        fixed = INITIAL_WINDOW_LARGE if large_data else INITIAL_WINDOW
        return MuxSettings(max_data, fixed, fixed, ours.conn_window, None, ours.max_streams, MAX_STREAMS, timed_load)
    return MuxSettings(max_data, ours.stream_window, theirs.stream_window, ours.conn_window, theirs.conn_window,
                       ours.max_streams, theirs.max_streams, timed_load)
