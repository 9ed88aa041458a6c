"""End-to-end sealed streams (sans-IO): the ingress and the egress share keys, transits relay ciphertext.

The origin publishes an X25519 key in its signed routes (`xk`); the ingress draws an ephemeral
key for an epoch (at most EPOCH_S, EPOCH_STREAMS streams), puts its public half in each stream's
extension header, and both derive two keys per stream from the shared secret and the stream's
request id. Each direction of the stream is then a sequence of ChaCha20-Poly1305 records
(protocol-spec/tunnel.md, "Sealed streams"). The egress keeps the secret of recent ephemeral keys
and refuses a (key, request id) pair it has opened before.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import struct
import time
from collections.abc import Callable

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .tunnel import ExtHeader

SEAL_INFO = b"cpn/1 sealed stream"
MAX_SEALED_CHUNK = 16384  # plaintext bytes per record
RECORD_TAG = 16
_LEN = struct.Struct(">I")
MORE, LAST = 0, 1
_MORE, _LAST = bytes([MORE]), bytes([LAST])
REPLAY_WINDOW = 65536  # (ephemeral key, request id) pairs an egress remembers: a replayed stream is refused
SECRETS = 1024  # ephemeral keys' X25519 secrets an egress keeps (the least recently used go; a miss recomputes)
READY_KEYS = 256  # origins' keys an ingress keeps an epoch (and one drawn ahead) for, per session
EPOCH_S = 10.0  # an ingress's ephemeral key seals streams for at most this long after it was drawn
EPOCH_STREAMS = 4096  # ... and at most this many streams


try:  # CPython's own SHA-256 (_sha2 from 3.12, _sha256 before), not OpenSSL's: see _hmac_sha256
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - the interpreter decides
    try:
        from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _sha256 = hashlib.sha256  # type: ignore[assignment]
_IPAD = bytes(b ^ 0x36 for b in range(256))  # key.translate(_IPAD): the key xor 0x36 byte by byte
_OPAD = bytes(b ^ 0x5C for b in range(256))


class SealError(ValueError):
    """A sealed record that does not open, or a stream that ends without its last record."""


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _lp(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def _hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) over CPython's own SHA-256. ``hmac.digest`` goes through OpenSSL 3's
    one-shot MAC, which looks the MAC and the digest up in its provider tables on every call: 1.6 µs
    warm, but ~17 µs with the caches cold, as they are when an idle gateway wakes for a request (this
    is 1.3 / 5.6; tests/test_seal.py holds it to ``hmac``)."""
    if len(key) > 64:
        key = _sha256(key).digest()
    key = key.ljust(64, b"\0")
    return _sha256(key.translate(_OPAD) + _sha256(key.translate(_IPAD) + msg).digest()).digest()


def derive(shared: bytes, eph: bytes, static: bytes, request_id: bytes, label: int, origin: str,
           instance: str) -> tuple[bytes, bytes]:
    """(request key, response key): HKDF-SHA256 over the X25519 secret, salted with the request id,
    bound to both public keys and the stream's target, so a transit that edits the header breaks it."""
    info = SEAL_INFO + eph + static + label.to_bytes(4, "big") + _lp(origin) + _lp(instance)
    # HKDF-SHA256 (RFC 5869) with L = 64: extract, then two blocks of expand. On every sealed
    # stream's path at both ends (cold: ~24 µs through hmac.digest, ~11 so).
    prk = _hmac_sha256(request_id, shared)
    t1 = _hmac_sha256(prk, info + b"\x01")
    return t1, _hmac_sha256(prk, t1 + info + b"\x02")


@attrs.define
class Direction:
    """One direction's record stream: sealing with a counter nonce, or opening a byte stream of records."""

    key: bytes
    counter: int = 0
    buf: bytearray = attrs.field(factory=bytearray)
    done: bool = False  # the LAST record went (sender) or came (receiver)
    _aead: ChaCha20Poly1305 | None = None

    def _cipher(self) -> ChaCha20Poly1305:
        if self._aead is None:
            self._aead = ChaCha20Poly1305(self.key)
        return self._aead

    def prepare(self) -> None:
        """Make the cipher now, ahead of the first record (~7 µs with the caches cold: OpenSSL's
        cipher contexts set up), when the caller has time to spare."""
        self._cipher()

    def _nonce(self) -> bytes:
        n = b"\x00" * 4 + self.counter.to_bytes(8, "big")
        self.counter += 1
        return n

    def seal(self, data: bytes, last: bool) -> bytes:
        """``data`` as records of at most MAX_SEALED_CHUNK plaintext; ``last`` marks the final one."""
        if len(data) <= MAX_SEALED_CHUNK:  # one record (most requests and responses): no slicing
            ct = self._cipher().encrypt(self._nonce(), (_LAST if last else _MORE) + data, None)
            self.done = last
            return _LEN.pack(len(ct)) + ct
        out = bytearray()
        view = memoryview(data)
        while True:
            chunk, view = view[:MAX_SEALED_CHUNK], view[MAX_SEALED_CHUNK:]
            final = last and not view
            ct = self._cipher().encrypt(self._nonce(), bytes([LAST if final else MORE]) + bytes(chunk), None)
            out += _LEN.pack(len(ct)) + ct
            if not view:
                break
        self.done = last
        return bytes(out)

    def open(self, data: bytes) -> bytes:
        """The plaintext of every whole record in what came so far; SealError on a record that does not open."""
        if not self.buf and len(data) >= _LEN.size and _LEN.unpack_from(data)[0] == len(data) - _LEN.size:
            return self._record(data[_LEN.size:])  # one whole record, as most chunks are: no buffer
        self.buf += data
        out = bytearray()
        while len(self.buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buf)
            if not RECORD_TAG < n <= MAX_SEALED_CHUNK + 1 + RECORD_TAG:
                raise SealError(f"sealed record of {n} bytes")
            if len(self.buf) < _LEN.size + n:
                break
            ct = bytes(self.buf[_LEN.size:_LEN.size + n])
            del self.buf[:_LEN.size + n]
            out += self._record(ct)
        return bytes(out)

    def _record(self, ct: bytes) -> bytes:
        """One whole record's plaintext (its length prefix taken off)."""
        if not RECORD_TAG < len(ct) <= MAX_SEALED_CHUNK + 1 + RECORD_TAG:
            raise SealError(f"sealed record of {len(ct)} bytes")
        if self.done:
            raise SealError("bytes after the last sealed record")
        try:
            pt = self._cipher().decrypt(self._nonce(), ct, None)
        except InvalidTag:
            raise SealError("a sealed record failed authentication") from None
        if pt[0] not in (MORE, LAST):
            raise SealError("bad sealed record marker")
        self.done = pt[0] == LAST
        return pt[1:]

    def finish(self) -> None:
        """The stream ended: it must have ended with the LAST record, whole (a transit cannot cut it short)."""
        if not self.done or self.buf:
            raise SealError("the sealed stream ended before its last record")


@attrs.define
class Sealing:
    """Both directions of one sealed stream, from one side's point of view."""

    send: Direction
    recv: Direction
    # The egress: called once the peer's first record authenticated (Opener.record: the stream's
    # pair joins the replay window then, so a header alone, which anyone on the path has, plants nothing).
    first: Callable[[], None] | None = None

    def open(self, data: bytes) -> bytes:
        """``recv.open``, and ``first`` once a record opened; SealError from either."""
        plain = self.recv.open(data)
        if self.first is not None and self.recv.counter:
            first, self.first = self.first, None
            first()
        return plain


def exchange(static: bytes, eph: X25519PrivateKey | None = None) -> tuple[bytes, bytes]:
    """The ingress's half of a key agreement: (ephemeral public key, X25519 secret), from a fresh key
    pair unless ``eph`` is given. It names no stream: an epoch's streams share it (``Ephemerals``)."""
    eph = eph or X25519PrivateKey.generate()
    return x25519_public(eph), eph.exchange(X25519PublicKey.from_public_bytes(static))


def outbound(static: bytes, request_id: bytes, label: int, origin: str, instance: str,
             eph: X25519PrivateKey | None = None, *, drawn: tuple[bytes, bytes] | None = None) -> tuple[bytes, Sealing]:
    """The ingress: (ephemeral public key for the extension header, its sealing); ``drawn``: an
    ``exchange`` with ``static`` (an epoch's: the request id makes this stream's keys its own)."""
    pub, shared = drawn or exchange(static, eph)
    req, resp = derive(shared, pub, static, request_id, label, origin, instance)
    return pub, Sealing(Direction(req), Direction(resp))


@attrs.define
class Epoch:
    """One ephemeral key's exchange with one origin key, shared by the streams of an epoch."""

    pub: bytes
    shared: bytes
    born: float  # when it was drawn: nothing is sealed under it EPOCH_S later
    ids: set[bytes] = attrs.field(factory=set)  # the request ids sealed under it (a pair is used once)

    def takes(self, request_id: bytes, now: float) -> bool:
        return now - self.born < EPOCH_S and len(self.ids) < EPOCH_STREAMS and request_id not in self.ids

    def waning(self, now: float) -> bool:
        """Half spent: the next epoch's exchange is drawn now (it is young when it takes over)."""
        return now - self.born >= EPOCH_S / 2 or len(self.ids) >= EPOCH_STREAMS // 2


class Ephemerals:
    """The ingress's epochs: per origin key, the ephemeral exchange its sealed streams share (one X25519
    key pair and exchange, ~130 µs here, per epoch instead of per stream), and the next one drawn
    ahead off the request path. An epoch ends after EPOCH_S (counted from its draw), EPOCH_STREAMS
    streams, or a request id it already sealed (a retry of one request to the same origin: the
    egress opens each (key, request id) pair once). At most ``size`` origin keys have either; the
    oldest epochs go first."""

    def __init__(self, size: int = READY_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.clock = clock
        self._current: collections.OrderedDict[bytes, Epoch] = collections.OrderedDict()  # in the order they began
        self._next: collections.OrderedDict[bytes, Epoch] = collections.OrderedDict()

    def take(self, static: bytes, request_id: bytes) -> tuple[bytes, bytes, bool]:
        """(ephemeral public key, secret, whether an epoch began) for a stream with ``request_id`` to
        ``static``'s origin: the current epoch's, else the one drawn ahead, else one drawn now."""
        now = self.clock()
        self._expire(now)
        epoch = self._current.get(static)
        begun = epoch is None or not epoch.takes(request_id, now)
        if begun:
            epoch = self._next.pop(static, None)
            if epoch is None or not epoch.takes(request_id, now):
                epoch = Epoch(*exchange(static), now)
            self._current.pop(static, None)
            self._current[static] = epoch
            if len(self._current) > self.size:
                self._current.popitem(last=False)
        assert epoch is not None
        epoch.ids.add(request_id)
        return epoch.pub, epoch.shared, begun

    def draw(self, static: bytes) -> None:
        """Draw the next epoch's exchange for ``static`` if the current one is half spent and none waits."""
        now = self.clock()
        current = self._current.get(static)
        if (current is not None and not current.waning(now)) or static in self._next:
            return
        self._next[static] = Epoch(*exchange(static), now)
        if len(self._next) > self.size:
            self._next.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Forget the epochs past EPOCH_S at the front of each table (the order they began in, within
        EPOCH_S of the order drawn): their secrets go with them. None is ever used past it (``takes``)."""
        for table in (self._current, self._next):
            while table and now - next(iter(table.values())).born >= EPOCH_S:
                table.popitem(last=False)


class Opener:
    """The egress: our sealing key (one per process: routes carry it), the secrets of recent
    ephemeral keys, and the replay window of (ephemeral key, request id) pairs."""

    def __init__(self, key: X25519PrivateKey, *, secrets: int = SECRETS, window: int = REPLAY_WINDOW) -> None:
        self.key = key
        self.public = x25519_public(key)
        self.secrets, self.window = secrets, window
        self.exchanges = 0  # X25519 exchanges made (a secret not kept)
        self._secrets: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def inbound(self, eph: bytes, request_id: bytes, label: int, origin: str, instance: str) -> Sealing:
        """The sealing of a stream an ingress sealed to our key; SealError if replayed or bad. Its pair
        joins the window once its first record opens (``Sealing.first``), before any plaintext is read."""
        pair = eph + request_id
        if pair in self._seen:
            raise SealError("a replayed sealed stream (its ephemeral key and request id were used before)")
        req, resp = derive(self._secret(eph), eph, self.public, request_id, label, origin, instance)
        return Sealing(Direction(resp), Direction(req), functools.partial(self.record, pair))

    def record(self, pair: bytes) -> None:
        """An authenticated stream's (ephemeral key, request id): refused if another stream had it first."""
        if pair in self._seen:
            raise SealError("a replayed sealed stream (its ephemeral key and request id were used before)")
        self._seen[pair] = None
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)

    def _secret(self, eph: bytes) -> bytes:
        shared = self._secrets.get(eph)
        if shared is not None:
            self._secrets.move_to_end(eph)
            return shared
        self.exchanges += 1
        try:
            shared = self.key.exchange(X25519PublicKey.from_public_bytes(eph))
        except ValueError:
            raise SealError("bad ephemeral key") from None
        self._secrets[eph] = shared
        if len(self._secrets) > self.secrets:
            self._secrets.popitem(last=False)
        return shared


class StreamSealer:
    """A peer session's sealing policy: which streams we open sealed (as the ingress) and how we
    open the sealed streams addressed to us (as the egress); transits leave both alone."""

    def __init__(self, local_id: str, opener: Opener, key_for: Callable[[ExtHeader], bytes | None], *,
                 seal_outbound: bool = True, counters: collections.Counter[str] | None = None,
                 ephemerals: Ephemerals | None = None) -> None:
        self.local_id = local_id
        self.opener = opener
        self.key_for = key_for  # the origin's published key, from a valid route; None: do not seal
        self.seal_outbound = seal_outbound
        self.counters = counters if counters is not None else collections.Counter()  # sealed_streams_out / _in
        self.ephemerals = ephemerals if ephemerals is not None else Ephemerals()

    def outbound(self, ext: ExtHeader) -> tuple[ExtHeader, Sealing | None, bytes | None]:
        """A stream we open as the ingress: sealed when the origin published a key we verified; and
        that key, for ``draw_ahead`` once the request is out (None: not sealed)."""
        if not self.seal_outbound or ext.eph is not None or ext.from_peer:
            return ext, None, None  # a transit passes the header on as it came
        static = self.key_for(ext)
        if static is None:
            return ext, None, None
        pub, shared, begun = self.ephemerals.take(static, ext.request_id)
        eph, sealing = outbound(static, ext.request_id, ext.label, ext.origin, ext.instance, drawn=(pub, shared))
        self.counters["sealed_streams_out"] += 1
        if begun:
            self.counters["sealed_epochs_out"] += 1
        return ext.sealed(eph), sealing, static

    def draw_ahead(self, static: bytes) -> None:
        """A sealed request to ``static``'s origin is out: draw the next epoch's exchange, if it is due,
        while it is answered (off the next request's path)."""
        self.ephemerals.draw(static)

    def inbound(self, ext: ExtHeader) -> Sealing | None:
        """A sealed stream opened to us: its sealing when we are its egress (SealError if it cannot be
        opened), None when we only relay it."""
        if ext.eph is None or ext.origin != self.local_id:
            return None
        opener = self.opener
        made = opener.exchanges
        sealing = opener.inbound(ext.eph, ext.request_id, ext.label, ext.origin, ext.instance)
        self.counters["sealed_streams_in"] += 1
        if opener.exchanges != made:
            self.counters["sealed_exchanges_in"] += 1
        return sealing
