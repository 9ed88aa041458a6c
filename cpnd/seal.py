"""End-to-end sealed streams (sans-IO): the ingress and the egress share keys, transits relay ciphertext.

The origin publishes an X25519 key in its signed routes (`xk`); the ingress draws an ephemeral
key, puts its public half in the stream's extension header, and both derive two keys from the
shared secret. Each direction of the stream is then a sequence of ChaCha20-Poly1305 records
(protocol-spec/tunnel.md, "Sealed streams").
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import struct
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
REPLAY_WINDOW = 65536  # ephemeral keys an egress remembers: a replayed stream is refused
READY_KEYS = 256  # origins' keys an ingress keeps one ephemeral exchange drawn ahead for


class SealError(ValueError):
    """A sealed record that does not open, or a stream that ends without its last record."""


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _lp(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def derive(shared: bytes, eph: bytes, static: bytes, request_id: bytes, label: int, origin: str,
           instance: str) -> tuple[bytes, bytes]:
    """(request key, response key): HKDF-SHA256 over the X25519 secret, salted with the request id,
    bound to both public keys and the stream's target, so a transit that edits the header breaks it."""
    info = SEAL_INFO + eph + static + label.to_bytes(4, "big") + _lp(origin) + _lp(instance)
    # HKDF-SHA256 (RFC 5869) with L = 64, in hmac's one-shot calls: a fifth of cryptography's HKDF object.
    prk = hmac.digest(request_id, shared, hashlib.sha256)
    t1 = hmac.digest(prk, info + b"\x01", hashlib.sha256)
    return t1, hmac.digest(prk, t1 + info + b"\x02", hashlib.sha256)


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
        self.buf += data
        out = bytearray()
        while len(self.buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buf)
            if not RECORD_TAG < n <= MAX_SEALED_CHUNK + 1 + RECORD_TAG:
                raise SealError(f"sealed record of {n} bytes")
            if len(self.buf) < _LEN.size + n:
                break
            if self.done:
                raise SealError("bytes after the last sealed record")
            ct = bytes(self.buf[_LEN.size:_LEN.size + n])
            del self.buf[:_LEN.size + n]
            try:
                pt = self._cipher().decrypt(self._nonce(), ct, None)
            except InvalidTag:
                raise SealError("a sealed record failed authentication") from None
            if pt[0] not in (MORE, LAST):
                raise SealError("bad sealed record marker")
            self.done = pt[0] == LAST
            out += pt[1:]
        return bytes(out)

    def finish(self) -> None:
        """The stream ended: it must have ended with the LAST record, whole (a transit cannot cut it short)."""
        if not self.done or self.buf:
            raise SealError("the sealed stream ended before its last record")


@attrs.define
class Sealing:
    """Both directions of one sealed stream, from one side's point of view."""

    send: Direction
    recv: Direction


def exchange(static: bytes, eph: X25519PrivateKey | None = None) -> tuple[bytes, bytes]:
    """The ingress's half of a stream's key agreement: (ephemeral public key, X25519 secret), from a
    fresh key pair unless ``eph`` is given. It names no stream: it can be drawn ahead (``Ephemerals``)."""
    eph = eph or X25519PrivateKey.generate()
    return x25519_public(eph), eph.exchange(X25519PublicKey.from_public_bytes(static))


def outbound(static: bytes, request_id: bytes, label: int, origin: str, instance: str,
             eph: X25519PrivateKey | None = None, *, drawn: tuple[bytes, bytes] | None = None) -> tuple[bytes, Sealing]:
    """The ingress: (ephemeral public key for the extension header, its sealing); ``drawn``: an
    ``exchange`` made ahead for ``static`` (used for this stream only)."""
    pub, shared = drawn or exchange(static, eph)
    req, resp = derive(shared, pub, static, request_id, label, origin, instance)
    return pub, Sealing(Direction(req), Direction(resp))


class Ephemerals:
    """One ephemeral exchange drawn ahead per origin key, so that a sealed stream's X25519 work (a key
    pair and an exchange, ~130 µs here) is done while the previous request is out, not before the next
    one leaves. Each is taken once, for one stream, as a freshly drawn one would be."""

    def __init__(self, size: int = READY_KEYS) -> None:
        self.size = size
        self._ready: collections.OrderedDict[bytes, tuple[bytes, bytes]] = collections.OrderedDict()

    def take(self, static: bytes) -> tuple[bytes, bytes] | None:
        """The exchange drawn ahead for ``static`` (gone from here), or None."""
        return self._ready.pop(static, None)

    def draw(self, static: bytes) -> None:
        """Draw the next exchange for ``static`` unless one is waiting (the least recently drawn key goes
        beyond ``size``)."""
        if static not in self._ready:
            self._ready[static] = exchange(static)
            if len(self._ready) > self.size:
                self._ready.popitem(last=False)


class Opener:
    """The egress: our sealing key (one per process: routes carry it) and the replay window."""

    def __init__(self, key: X25519PrivateKey) -> None:
        self.key = key
        self.public = x25519_public(key)
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def inbound(self, eph: bytes, request_id: bytes, label: int, origin: str, instance: str) -> Sealing:
        """The sealing of a stream an ingress sealed to our key; SealError if replayed or bad."""
        if eph in self._seen:
            raise SealError("a replayed sealed stream (its ephemeral key was used before)")
        try:
            shared = self.key.exchange(X25519PublicKey.from_public_bytes(eph))
        except ValueError:
            raise SealError("bad ephemeral key") from None
        self._seen[eph] = None
        if len(self._seen) > REPLAY_WINDOW:
            self._seen.popitem(last=False)
        req, resp = derive(shared, eph, self.public, request_id, label, origin, instance)
        return Sealing(Direction(resp), Direction(req))


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
        eph, sealing = outbound(static, ext.request_id, ext.label, ext.origin, ext.instance,
                                drawn=self.ephemerals.take(static))
        self.counters["sealed_streams_out"] += 1
        return ext.sealed(eph), sealing, static

    def draw_ahead(self, static: bytes) -> None:
        """A sealed request to ``static``'s origin is out: draw the next stream's exchange while it is
        answered (off the next request's path)."""
        self.ephemerals.draw(static)

    def inbound(self, ext: ExtHeader) -> Sealing | None:
        """A sealed stream opened to us: its sealing when we are its egress (SealError if it cannot be
        opened), None when we only relay it."""
        if ext.eph is None or ext.origin != self.local_id:
            return None
        sealing = self.opener.inbound(ext.eph, ext.request_id, ext.label, ext.origin, ext.instance)
        self.counters["sealed_streams_in"] += 1
        return sealing
