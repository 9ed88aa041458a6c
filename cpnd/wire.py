"""Wire codec: frames, handshake and session messages, msgpack schemas (sans-IO).

Every decode either returns a validated record or raises ``ProtocolError`` with the
code/subcode protocol-spec/messages.md assigns; no other exception escapes.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import msgpack

from .errors import Code, HandshakeSub, MessageSub, ProtocolError, UpdateSub
from .names import id_problem, service_label, service_problem

# ---- limits (protocol-spec/limits.md) ----
LENGTH_HEADER = 4
MAX_HANDSHAKE_BODY = 512
MAX_PLAINTEXT = 65536  # content type byte + payload
AEAD_TAG = 16
MAX_RECORD = MAX_PLAINTEXT + AEAD_TAG
MAX_PATH_LEN = 32
MAX_UPDATE_ENTRIES = 2048
MAX_CAPS = 16
GRACEFUL_RESTART_CAP = "graceful-restart"
INSTANCE_DOWN_CAP = "instance-down"  # the sender takes routes whose instance is down (messages.md, "Route")
ROUTE_LIMITS_CAP = "route-limits"  # both OPENs list it: each side sends LIMITS before its first KEEPALIVE
GATEWAY_TIME_CAP = "gateway-time"  # the sender takes Routes carrying `gw` (messages.md, "Route")
# Routes carry the origin's signature `osig`, its adjacency token `oadj` and its certificate `cert`
# (routing.md, "Origin validation"); the sender signs its own instances' routes.
ORIGIN_SIG_CAP = "origin-sig"
SIGNATURE = 64
MAX_CERT_BYTES = 1024
MAX_RESTART_MS = 600_000
# The `tunnel-window` capability brings OPEN's `tw` key: what the sender of the OPEN accepts on
# the session's tunnel (protocol-spec/tunnel.md, "Flow control").
TUNNEL_WINDOW_CAP = "tunnel-window"
MIN_TUNNEL_WINDOW = 16384
MAX_TUNNEL_WINDOW = (1 << 31) - 1
MAX_TUNNEL_STREAMS = 1 << 20
MAX_NOTIFICATION_TEXT = 256
U63 = (1 << 63) - 1
U64 = (1 << 64) - 1
MIN_HOLD_MS = 200
MAX_HOLD_MS = 3_600_000
PROTOCOL_VERSION = 1

_LEN = struct.Struct(">I")


class MsgType(enum.IntEnum):
    """The ``t`` field of every message (protocol-spec/messages.md)."""

    OPEN = 1
    KEEPALIVE = 2
    UPDATE = 3
    NOTIFICATION = 4
    ROUTE_REFRESH = 5
    LIMITS = 6
    HELLO = 16
    HELLO_ACK = 17
    FINISH = 18
    HS_ERROR = 19


class ContentType(enum.IntEnum):
    """First plaintext byte of an encrypted record."""

    CONTROL = 1
    TUNNEL = 2
    BATCH = 3  # two or more tunnel frames (tunnel.md, "Batches"), with `tunnel-batch` on both OPENs


# ---------------------------------------------------------------- framing


def frame(body: bytes) -> bytes:
    """Prefix ``body`` with its 4-byte big-endian length."""
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into length-prefixed frame bodies, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()  # what is not yet taken (from _pos on); empty: nothing left for next_frame
        self._pos = 0  # frames before this were taken; compacted when the buffer empties or grows

    def set_limit(self, limit: int) -> None:
        self.limit = limit

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Drop what was taken before appending: one move per read, not one per frame
            # (a read holds several records in a bulk transfer).
            del self.buf[: self._pos]
            self._pos = 0
        self.buf += data

    def buffered(self) -> int:
        return len(self.buf) - self._pos

    def take(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """``feed(data)``, then every complete ``(header, body)`` up to one over the limit (``next_frame``
        raises for that one): a read's records in one call, parsed from ``data`` itself when nothing was
        buffered before it."""
        if self.buf:
            self.feed(data)
            data = bytes(self.buf)
            self.buf.clear()
        frames = []
        pos, size, limit = 0, len(data), self.limit
        while size - pos >= LENGTH_HEADER:
            (length,) = _LEN.unpack_from(data, pos)
            end = pos + LENGTH_HEADER + length
            if length > limit or end > size:
                break
            frames.append((data[pos:pos + LENGTH_HEADER], data[pos + LENGTH_HEADER:end]))
            pos = end
        if pos < size:
            self.buf += data[pos:] if pos else data
        return frames

    def next_frame(self) -> tuple[bytes, bytes] | None:
        """Next complete ``(header, body)``, or None until more bytes arrive."""
        pos = self._pos
        if len(self.buf) - pos < LENGTH_HEADER:
            return None
        (length,) = _LEN.unpack_from(self.buf, pos)
        if length > self.limit:
            raise ProtocolError(Code.MESSAGE, MessageSub.FRAME_TOO_LONG, f"frame of {length} bytes exceeds {self.limit}")
        end = pos + LENGTH_HEADER + length
        if len(self.buf) < end:
            return None
        header = bytes(self.buf[pos: pos + LENGTH_HEADER])
        body = bytes(self.buf[pos + LENGTH_HEADER: end])
        if end == len(self.buf):
            self.buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return header, body


# ---------------------------------------------------------------- field checks


def _bad(detail: str, code: int = Code.MESSAGE, sub: int = MessageSub.BAD_FIELD) -> ProtocolError:
    return ProtocolError(code, sub, detail)


def _int(m: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = m[key]
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{key}: must be an integer in [{lo}, {hi}]")
    return v


def _float(m: dict[str, Any], key: str, lo: float, hi: float, *, sub: int = MessageSub.BAD_FIELD, code: int = Code.MESSAGE) -> float:
    v = m[key]
    if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"{key}: must be a finite number in [{lo}, {hi}]", code, sub)
    return float(v)


def _str(m: dict[str, Any], key: str, max_len: int) -> str:
    v = m[key]
    if type(v) is not str or len(v) > max_len:
        raise _bad(f"{key}: must be a string of at most {max_len} characters")
    return v


def _ident(m: dict[str, Any], key: str, code: int = Code.MESSAGE, sub: int = MessageSub.BAD_FIELD) -> str:
    v = m[key]
    problem = id_problem(v)
    if problem:
        raise _bad(f"{key}: {problem}", code, sub)
    return v


def _bin(m: dict[str, Any], key: str, size: int) -> bytes:
    v = m[key]
    if type(v) is not bytes or len(v) != size:
        raise _bad(f"{key}: must be {size} bytes of bin")
    return v


def _keys(m: dict[str, Any], required: Sequence[str], what: str, code: int = Code.MESSAGE, sub: int = MessageSub.BAD_FIELD) -> None:
    missing = [k for k in required if k not in m]
    extra = [k for k in m if k not in required]
    if missing or extra:
        raise _bad(f"{what}: missing {missing} unexpected {extra}", code, sub)


def _unpack(body: bytes) -> dict[str, Any]:
    def no_ext(code: int, data: bytes) -> Any:
        raise ValueError("msgpack ext types are not allowed")

    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=no_ext, use_list=True, timestamp=0)
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise ProtocolError(Code.MESSAGE, MessageSub.MALFORMED, f"not one msgpack object: {type(exc).__name__}") from None
    if type(obj) is not dict or any(type(k) is not str for k in obj):
        raise ProtocolError(Code.MESSAGE, MessageSub.MALFORMED, "message must be a msgpack map with string keys")
    t = obj.get("t")
    if type(t) is not int:
        raise ProtocolError(Code.MESSAGE, MessageSub.BAD_TYPE, "missing integer field t")
    return obj


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------- handshake messages


@attrs.frozen
class Hello:
    versions: tuple[int, ...]
    id: str
    to: str
    eph: bytes
    data: bool = False  # `dc`: a data channel beside the main session (session.md, "Data channels")


@attrs.frozen
class HelloAck:
    version: int
    id: str
    eph: bytes
    sig: bytes


@attrs.frozen
class Finish:
    sig: bytes


@attrs.frozen
class HandshakeError:
    code: int
    subcode: int
    text: str


HandshakeMessage = Hello | HelloAck | Finish | HandshakeError


def encode_handshake(msg: HandshakeMessage) -> bytes:
    """Encode a handshake message body (not yet framed)."""
    if isinstance(msg, Hello):
        d: dict[str, Any] = {"t": MsgType.HELLO, "v": list(msg.versions), "id": msg.id, "to": msg.to, "eph": msg.eph}
        if msg.data:
            d["dc"] = True  # only ever sent as true
    elif isinstance(msg, HelloAck):
        d = {"t": MsgType.HELLO_ACK, "v": msg.version, "id": msg.id, "eph": msg.eph, "sig": msg.sig}
    elif isinstance(msg, Finish):
        d = {"t": MsgType.FINISH, "sig": msg.sig}
    else:
        d = {"t": MsgType.HS_ERROR, "code": msg.code, "sub": msg.subcode, "msg": msg.text[:MAX_NOTIFICATION_TEXT]}
    return _pack(d)


def decode_handshake(body: bytes) -> HandshakeMessage:
    """Decode and validate one handshake message body."""
    try:
        m = _unpack(body)
        t = m["t"]
        hs = (Code.HANDSHAKE, HandshakeSub.MALFORMED)
        if t == MsgType.HELLO:
            _keys(m, ("t", "v", "id", "to", "eph", *(("dc",) if "dc" in m else ())), "hello", *hs)
            if "dc" in m and m["dc"] is not True:
                raise _bad("dc: must be true when present", *hs)
            v = m["v"]
            if type(v) is not list or not 1 <= len(v) <= 8 or any(type(x) is not int or not 0 < x < 256 for x in v):
                raise _bad("v: must be a list of 1-8 versions in [1, 255]", *hs)
            to = "" if m["to"] == "" else _ident(m, "to", *hs)  # "" = whoever answers (identified by key)
            return Hello(tuple(v), _ident(m, "id", *hs), to, _bin(m, "eph", 32), "dc" in m)
        if t == MsgType.HELLO_ACK:
            _keys(m, ("t", "v", "id", "eph", "sig"), "hello-ack", *hs)
            return HelloAck(_int(m, "v", 1, 255), _ident(m, "id", *hs), _bin(m, "eph", 32), _bin(m, "sig", 64))
        if t == MsgType.FINISH:
            _keys(m, ("t", "sig"), "finish", *hs)
            return Finish(_bin(m, "sig", 64))
        if t == MsgType.HS_ERROR:
            _keys(m, ("t", "code", "sub", "msg"), "error", *hs)
            return HandshakeError(_int(m, "code", 0, 255), _int(m, "sub", 0, 255), _str(m, "msg", MAX_NOTIFICATION_TEXT))
    except ProtocolError as exc:
        raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, exc.detail) from None
    raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, f"unexpected message type {t} during handshake")


# ---------------------------------------------------------------- session messages


@attrs.frozen
class TunnelLimits:
    """OPEN's `tw`: the stream window, connection window and most open streams its sender accepts."""

    stream_window: int = attrs.field(validator=[attrs.validators.ge(MIN_TUNNEL_WINDOW), attrs.validators.le(MAX_TUNNEL_WINDOW)])
    conn_window: int = attrs.field(validator=[attrs.validators.ge(MIN_TUNNEL_WINDOW), attrs.validators.le(MAX_TUNNEL_WINDOW)])
    max_streams: int = attrs.field(validator=[attrs.validators.ge(1), attrs.validators.le(MAX_TUNNEL_STREAMS)])


@attrs.frozen
class Open:
    id: str
    hold_ms: int
    caps: tuple[str, ...]
    ts: int
    restart_ms: int | None = attrs.field(default=None)  # the `gr` key: present exactly when caps offer graceful-restart
    tunnel: TunnelLimits | None = attrs.field(default=None)  # the `tw` key: present exactly when caps offer tunnel-window

    @restart_ms.validator
    def _gr_with_its_cap(self, _: object, value: int | None) -> None:
        if (value is not None) != (GRACEFUL_RESTART_CAP in self.caps):
            raise ValueError("restart_ms goes with the graceful-restart capability, and only with it")

    @tunnel.validator
    def _tw_with_its_cap(self, _: object, value: TunnelLimits | None) -> None:
        if (value is not None) != (TUNNEL_WINDOW_CAP in self.caps):
            raise ValueError("tunnel goes with the tunnel-window capability, and only with it")


@attrs.frozen
class Keepalive:
    ts: int
    echo: int = 0
    dly: int = 0


def _nonneg(_inst: object, attr: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attr.name} must be finite and >= 0")


@attrs.frozen
class RouteAdv:
    """One advertised path to one instance (protocol-spec/messages.md, "Route")."""

    service: str
    instance: str
    origin: str
    seq: int
    label: int
    path: tuple[str, ...]
    latency_us: int
    capacity: float = attrs.field(validator=_nonneg)
    load: float = attrs.field(validator=_nonneg)
    price: float = attrs.field(validator=_nonneg)
    compute_us: int = 0
    bload: float = attrs.field(default=0.0, validator=_nonneg)  # latency-bound demand, fraction of capacity
    down: bool = False  # the origin's health checks took the instance out: its service stays known
    # The gateways' own processing from the sender to the origin, µs (`gw`); None: not told (an older peer).
    gateway_us: int | None = None
    # Origin validation (routing.md): the origin's Ed25519 signature over what only it may say
    # (`osig`), its signature naming the first gateway it sent the route to (`oadj`), and the
    # certificate that binds its key to the services it may originate (`cert`); None: not carried.
    osig: bytes | None = attrs.field(default=None, repr=False)
    oadj: bytes | None = attrs.field(default=None, repr=False)
    cert: bytes | None = attrs.field(default=None, repr=False)
    # The origin's X25519 key for sealed streams (`xk`, tunnel.md "Sealed streams"), under its signature.
    seal_key: bytes | None = attrs.field(default=None, repr=False)
    # (service, origin, instance), made once: the RIB's tables all share this one tuple.
    key: tuple[str, str, str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", shared((self.service, self.origin, self.instance)))


@attrs.frozen
class Withdrawal:
    service: str
    origin: str
    instance: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.service, self.origin, self.instance)


@attrs.frozen
class Update:
    adv: tuple[RouteAdv, ...] = ()
    wd: tuple[Withdrawal, ...] = ()


@attrs.frozen
class Notification:
    code: int
    subcode: int
    text: str = ""


@attrs.frozen
class RouteRefresh:
    pass


def _u32(lo: int) -> Any:
    return attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.ge(lo), attrs.validators.le(0xFFFFFFFF))


@attrs.frozen
class Limits:
    """What the sender takes from its peer (routing.md, "Route limits"): at most ``routes``
    held at once, route entries at ``rate`` a second with bursts of ``burst``."""

    routes: int = attrs.field(validator=_u32(0))
    rate: int = attrs.field(validator=_u32(1))
    burst: int = attrs.field(validator=_u32(1))


Message = Open | Keepalive | Update | Notification | RouteRefresh | Limits

_ROUTE_KEYS = ("svc", "inst", "origin", "seq", "label", "path", "lat", "cap", "load", "bload", "price", "comp")
_OPTIONAL_ROUTE_KEYS = ("down", "gw", "osig", "oadj", "cert", "xk")


def _route_dict(r: RouteAdv) -> dict[str, Any]:
    d = {
        "svc": r.service, "inst": r.instance, "origin": r.origin, "seq": r.seq, "label": r.label,
        "path": list(r.path), "lat": r.latency_us, "cap": float(r.capacity), "load": float(r.load),
        "bload": float(r.bload), "price": float(r.price), "comp": r.compute_us,
    }
    if r.down:
        d["down"] = True  # only ever sent as true, and only to peers that offered instance-down
    if r.gateway_us is not None:
        d["gw"] = r.gateway_us  # only to peers that offered gateway-time
    if r.osig is not None and r.oadj is not None:  # only to peers that offered origin-sig, always together
        d["osig"] = r.osig
        d["oadj"] = r.oadj
        if r.seal_key is not None:  # signed with them: never without them
            d["xk"] = r.seal_key
    if r.cert is not None:
        d["cert"] = r.cert
    return d


def encode_message(msg: Message) -> bytes:
    """Encode a session message body (msgpack), before record protection."""
    if isinstance(msg, Open):
        d: dict[str, Any] = {"t": MsgType.OPEN, "id": msg.id, "hold": msg.hold_ms, "caps": list(msg.caps), "ts": msg.ts}
        if msg.restart_ms is not None:
            d["gr"] = msg.restart_ms
        if msg.tunnel is not None:
            d["tw"] = [msg.tunnel.stream_window, msg.tunnel.conn_window, msg.tunnel.max_streams]
    elif isinstance(msg, Keepalive):
        d = {"t": MsgType.KEEPALIVE, "ts": msg.ts, "echo": msg.echo, "dly": msg.dly}
    elif isinstance(msg, Update):
        d = {"t": MsgType.UPDATE, "adv": [_route_dict(r) for r in msg.adv],
             "wd": [[w.service, w.origin, w.instance] for w in msg.wd]}
    elif isinstance(msg, Notification):
        d = {"t": MsgType.NOTIFICATION, "code": msg.code, "sub": msg.subcode, "msg": msg.text[:MAX_NOTIFICATION_TEXT]}
    elif isinstance(msg, Limits):
        d = {"t": MsgType.LIMITS, "routes": msg.routes, "rate": msg.rate, "burst": msg.burst}
    else:
        d = {"t": MsgType.ROUTE_REFRESH}
    return _pack(d)


def _decode_route(r: object) -> RouteAdv:
    up = (Code.UPDATE, UpdateSub.MALFORMED_ROUTE)
    if type(r) is not dict or any(type(k) is not str for k in r):
        raise _bad("route must be a map", *up)
    _keys(r, (*_ROUTE_KEYS, *(k for k in _OPTIONAL_ROUTE_KEYS if k in r)), "route", *up)
    svc = r["svc"]
    problem = service_problem(svc)
    if problem:
        raise _bad(f"svc: {problem}", *up)
    inst = _ident(r, "inst", *up)
    origin = _ident(r, "origin", *up)
    path = r["path"]
    if type(path) is not list or not 1 <= len(path) <= MAX_PATH_LEN:
        raise _bad(f"path: must be a list of 1-{MAX_PATH_LEN} gateway ids", Code.UPDATE, UpdateSub.BAD_PATH)
    for hop in path:
        if id_problem(hop):
            raise _bad("path: every hop must be a gateway id", Code.UPDATE, UpdateSub.BAD_PATH)
    if len(set(path)) != len(path) or path[-1] != origin:
        raise _bad("path: must not repeat a gateway and must end at origin", Code.UPDATE, UpdateSub.BAD_PATH)
    try:
        seq = _int(r, "seq", 0, U64)
        lat = _int(r, "lat", 0, 0xFFFFFFFF)
        comp = _int(r, "comp", 0, 0xFFFFFFFF)
        label = _int(r, "label", 0, 0x7FFFFFFF)
        gw = _int(r, "gw", 0, 0xFFFFFFFF) if "gw" in r else None
    except ProtocolError as exc:
        raise _bad(exc.detail, *up) from None
    ba = (Code.UPDATE, UpdateSub.BAD_ATTRIBUTE)
    cap = _float(r, "cap", 0.0, 1e9, code=ba[0], sub=ba[1])
    if cap <= 0:
        raise _bad("cap: must be > 0", *ba)
    load = _float(r, "load", 0.0, 1000.0, code=ba[0], sub=ba[1])
    bload = _float(r, "bload", 0.0, 1000.0, code=ba[0], sub=ba[1])
    price = _float(r, "price", 0.0, 1e12, code=ba[0], sub=ba[1])
    down = r.get("down", False)
    if down is not True and "down" in r:
        raise _bad("down: must be true when present", *ba)
    if label != service_label(svc):
        raise _bad(f"label: {label} is not the label of {svc!r}", Code.UPDATE, UpdateSub.LABEL_MISMATCH)
    osig, oadj, cert, xk = _signatures(r)
    # A RIB holds the same few names, paths and numbers in every route it learns: one copy
    # each, not one per route (a float or a large int is an object of its own, 24-28 bytes).
    # Not the latency: it differs from path to path, so a shared copy would cost more than it saves.
    sh = shared
    return RouteAdv(sh(svc), sh(inst), sh(origin), sh(seq), sh(label), sh(tuple(map(sh, path))),
                    lat, sh(cap), sh(load), sh(price), sh(comp), sh(bload), down, None if gw is None else sh(gw),
                    osig, sh(oadj), cert if cert is None else sh(cert), xk if xk is None else sh(xk))


def _signatures(r: dict[str, Any]) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None]:
    """`osig` and `oadj` (together or neither), `cert` and `xk` (only with `osig`), checked for shape
    only: what they say is the receiver's origin validation (routing.md), never a reason to end the session."""
    if ("osig" in r) != ("oadj" in r) or ("xk" in r and "osig" not in r):
        raise _bad("osig and oadj: both or neither; xk only with them", Code.UPDATE, UpdateSub.MALFORMED_ROUTE)
    try:
        osig = _bin(r, "osig", SIGNATURE) if "osig" in r else None
        oadj = _bin(r, "oadj", SIGNATURE) if "oadj" in r else None
        xk = _bin(r, "xk", 32) if "xk" in r else None
    except ProtocolError as exc:
        raise _bad(exc.detail, Code.UPDATE, UpdateSub.MALFORMED_ROUTE) from None
    cert = r.get("cert")
    if cert is not None and (type(cert) is not bytes or not 0 < len(cert) <= MAX_CERT_BYTES):
        raise _bad(f"cert: must be 1-{MAX_CERT_BYTES} bytes of bin", Code.UPDATE, UpdateSub.MALFORMED_ROUTE)
    return osig, oadj, cert, xk


MAX_SHARED = 1 << 18


class SharedTable:
    """One copy of each equal value, kept per type (1 == 1.0 == True, but they encode
    differently), at most MAX_SHARED in all; bounded, like everything peers fill."""

    __slots__ = ("by_type", "size")

    def __init__(self) -> None:
        self.by_type: dict[type, dict[Any, Any]] = {}
        self.size = 0

    def get(self, value: Any) -> Any:
        table = self.by_type.get(type(value))
        if table is None:
            table = self.by_type[type(value)] = {}
        found = table.get(value)
        if found is None:
            if self.size >= MAX_SHARED:  # sharing is an optimisation, never a table to grow without end
                self.by_type.clear()
                self.size = 0
                table = self.by_type[type(value)] = {}
            found = table[value] = value
            self.size += 1
        return found


_TABLE = SharedTable()


def use_shared_table(table: SharedTable) -> None:
    """Make ``table`` the one ``shared`` fills: a simulation of many gateways in one process
    gives each its own, so that none shares what in a deployment it would hold alone."""
    global _TABLE
    _TABLE = table


def shared(value: Any) -> Any:
    """One copy of an equal name, path, key or number already seen (not sys.intern: peers
    choose these strings, and interned strings may live for ever). RIBs hold the same few
    of them in every route they learn and export."""
    return _TABLE.get(value)


def _decode_withdrawal(w: object) -> Withdrawal:
    up = (Code.UPDATE, UpdateSub.MALFORMED_ROUTE)
    if type(w) is not list or len(w) != 3:
        raise _bad("withdrawal must be [svc, origin, inst]", *up)
    svc, origin, inst = w
    if service_problem(svc) or id_problem(origin) or id_problem(inst):
        raise _bad("withdrawal: bad service path or id", *up)
    return Withdrawal(svc, origin, inst)


def _tunnel_limits(tw: Any) -> TunnelLimits:
    if type(tw) is not list or len(tw) != 3 or any(type(x) is not int for x in tw):
        raise _bad("tw: must be a list of 3 integers")
    sw, cw, ms = tw
    if not (MIN_TUNNEL_WINDOW <= sw <= MAX_TUNNEL_WINDOW and MIN_TUNNEL_WINDOW <= cw <= MAX_TUNNEL_WINDOW):
        raise _bad(f"tw: windows must be in [{MIN_TUNNEL_WINDOW}, {MAX_TUNNEL_WINDOW}]")
    if not 1 <= ms <= MAX_TUNNEL_STREAMS:
        raise _bad(f"tw: max streams must be in [1, {MAX_TUNNEL_STREAMS}]")
    return TunnelLimits(sw, cw, ms)


class PendingUpdate:
    """An UPDATE whose envelope is checked and whose entries are decoded on demand, a slice at
    a time, withdrawals first (routing.md applies them first): a receiver bounds the work of
    one step whatever the size of the message. A bad entry raises when its slice is taken."""

    __slots__ = ("_wd", "_adv", "_next")

    def __init__(self, adv: list[Any], wd: list[Any]) -> None:
        self._wd, self._adv, self._next = wd, adv, 0

    def __len__(self) -> int:
        return len(self._wd) + len(self._adv)

    @property
    def remaining(self) -> int:
        return len(self) - self._next

    def take(self, n: int) -> Update:
        """The next ``n`` (or fewer, at the end) entries, validated."""
        start, stop = self._next, min(len(self), self._next + n)
        nwd = len(self._wd)
        wd = tuple(_decode_withdrawal(w) for w in self._wd[start:min(stop, nwd)]) if start < nwd else ()
        adv = tuple(_decode_route(r) for r in self._adv[max(0, start - nwd):stop - nwd]) if stop > nwd else ()
        self._next = stop
        return Update(adv, wd)


def decode_message(body: bytes) -> Message:
    """Decode and validate one session message body."""
    msg = _decode_message(body, lazy=False)
    assert not isinstance(msg, PendingUpdate)
    return msg


def decode_message_lazily(body: bytes) -> Message | PendingUpdate:
    """As ``decode_message``, but an UPDATE with entries comes back as a ``PendingUpdate``
    whose entries are validated as they are taken (a session delivers them in slices)."""
    return _decode_message(body, lazy=True)


def _decode_message(body: bytes, *, lazy: bool) -> Message | PendingUpdate:
    m = _unpack(body)
    t = m["t"]
    if t == MsgType.OPEN:
        caps = m.get("caps")
        if type(caps) is not list or len(caps) > MAX_CAPS or any(type(c) is not str or not 0 < len(c) <= 32 for c in caps):
            raise _bad(f"caps: must be a list of at most {MAX_CAPS} strings of 1-32 characters")
        gr = GRACEFUL_RESTART_CAP in caps  # a capability brings its key with it
        tw = TUNNEL_WINDOW_CAP in caps
        _keys(m, ("t", "id", "hold", "caps", "ts", *(("gr",) if gr else ()), *(("tw",) if tw else ())), "open")
        return Open(_ident(m, "id"), _int(m, "hold", 0, U63), tuple(caps), _int(m, "ts", 0, U63),
                    _int(m, "gr", 0, MAX_RESTART_MS) if gr else None, _tunnel_limits(m["tw"]) if tw else None)
    if t == MsgType.KEEPALIVE:
        _keys(m, ("t", "ts", "echo", "dly"), "keepalive")
        return Keepalive(_int(m, "ts", 0, U63), _int(m, "echo", 0, U63), _int(m, "dly", 0, U63))
    if t == MsgType.UPDATE:
        _keys(m, ("t", "adv", "wd"), "update")
        adv, wd = m["adv"], m["wd"]
        if type(adv) is not list or type(wd) is not list:
            raise _bad("adv and wd must be lists", Code.UPDATE, UpdateSub.MALFORMED_ROUTE)
        if len(adv) + len(wd) > MAX_UPDATE_ENTRIES:
            raise _bad(f"more than {MAX_UPDATE_ENTRIES} entries", Code.UPDATE, UpdateSub.TOO_MANY_ENTRIES)
        pending = PendingUpdate(adv, wd)
        return pending if lazy and len(pending) else pending.take(len(pending))
    if t == MsgType.NOTIFICATION:
        _keys(m, ("t", "code", "sub", "msg"), "notification")
        return Notification(_int(m, "code", 0, 255), _int(m, "sub", 0, 255), _str(m, "msg", MAX_NOTIFICATION_TEXT))
    if t == MsgType.ROUTE_REFRESH:
        _keys(m, ("t",), "route-refresh")
        return RouteRefresh()
    if t == MsgType.LIMITS:
        _keys(m, ("t", "routes", "rate", "burst"), "limits")
        return Limits(_int(m, "routes", 0, 0xFFFFFFFF), _int(m, "rate", 1, 0xFFFFFFFF), _int(m, "burst", 1, 0xFFFFFFFF))
    raise ProtocolError(Code.MESSAGE, MessageSub.BAD_TYPE, f"unknown message type {t}")


def split_update(adv: Sequence[RouteAdv], wd: Sequence[Withdrawal], max_body: int = MAX_PLAINTEXT - 1) -> Iterator[Update]:
    """Pack routes and withdrawals into as few UPDATEs as fit ``max_body`` bytes each."""
    budget = max_body - 64  # map header, keys and list headers
    cur_adv: list[RouteAdv] = []
    cur_wd: list[Withdrawal] = []
    size = 0
    items: list[RouteAdv | Withdrawal] = [*wd, *adv]
    for item in items:
        if isinstance(item, RouteAdv):
            n = len(_pack(_route_dict(item)))
        else:
            n = len(_pack([item.service, item.origin, item.instance]))
        if cur_adv or cur_wd:
            if size + n > budget or len(cur_adv) + len(cur_wd) >= MAX_UPDATE_ENTRIES:
                yield Update(tuple(cur_adv), tuple(cur_wd))
                cur_adv, cur_wd, size = [], [], 0
        if isinstance(item, RouteAdv):
            cur_adv.append(item)
        else:
            cur_wd.append(item)
        size += n
    if cur_adv or cur_wd:
        yield Update(tuple(cur_adv), tuple(cur_wd))
