"""Identity keys, the authenticated key exchange and the record layer (sans-IO).

The handshake is SIGMA-style (protocol-spec/handshake.md): X25519 ephemeral shares
for forward secrecy, Ed25519 signatures over a transcript hash for mutual
authentication against the peer list, HKDF-SHA256 for the traffic keys, and
ChaCha20-Poly1305 records with per-direction counter nonces.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import Code, CpnError, HandshakeSub, ProtocolError, RecordSub
from .wire import (
    AEAD_TAG,
    MAX_PLAINTEXT,
    PROTOCOL_VERSION,
    Finish,
    HandshakeError,
    HandshakeMessage,
    Hello,
    HelloAck,
    decode_handshake,
    encode_handshake,
    frame,
)

SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)
_RESPONDER_CONTEXT = b"cpn/1 responder\x00"
_INITIATOR_CONTEXT = b"cpn/1 initiator\x00"
_HKDF_INFO = b"cpn/1 traffic keys"


class KeyFileError(CpnError):
    """A key file that is missing, unreadable or not an Ed25519 private key."""


# ---------------------------------------------------------------- identity keys


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The base64 of the raw 32-byte public key: the form config files carry."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key; ValueError with a short reason otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM (PKCS#8) Ed25519 private key written by ``cpnctl keygen``."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file (create it with `cpnctl keygen {path}`)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if mode & 0o077:
        # Like ssh: a private key others can read is not a private key any more.
        raise KeyFileError(f"{path}: readable by group or others (mode {mode & 0o777:04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey, *, force: bool = False) -> None:
    """Write ``key`` to ``path`` with mode 0600, refusing to overwrite unless ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists (use --force to overwrite)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(private_key_pem(key))


# ---------------------------------------------------------------- handshake


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return bytes([len(b)]) + b


def transcript_hash(version: int, initiator: str, responder: str, eph_i: bytes, eph_r: bytes, *,
                    data_channel: bool = False) -> bytes:
    """SHA-256 over everything both sides must agree on (protocol-spec/handshake.md); a data
    channel's (HELLO `dc`) ends with DATA_CHANNEL_TAG, so the flag is signed as the rest is."""
    tail = DATA_CHANNEL_TAG if data_channel else b""
    return hashlib.sha256(b"cpn/1" + bytes([version]) + _lp(initiator) + _lp(responder) + eph_i + eph_r + tail).digest()


DATA_CHANNEL_TAG = b"data-channel"


def derive_keys(shared: bytes, th: bytes) -> tuple[bytes, bytes]:
    """(initiator->responder key, responder->initiator key) from the X25519 secret."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=th, info=_HKDF_INFO).derive(shared)
    return okm[:32], okm[32:]


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Handshake:
    """One side of the key exchange: feed it frame bodies, send what it returns."""

    def __init__(
        self,
        role: Role,
        local_id: str,
        local_key: Ed25519PrivateKey,
        peers: Mapping[str, Ed25519PublicKey],
        *,
        expected_peer: str | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        random_bytes: Callable[[int], bytes] = os.urandom,
        data_channel: bool = False,
    ) -> None:
        if role is Role.INITIATOR and expected_peer is None:
            raise ValueError("an initiator must know which peer it dials")
        self.role = role
        self.local_id = local_id
        self._key = local_key
        self._peers = peers
        self.expected_peer = expected_peer
        self._versions = versions
        self._eph = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._eph_pub = self._eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._th = b""
        self._keys: tuple[bytes, bytes] | None = None
        self.peer_id: str | None = None
        self.version: int | None = None
        self.complete = False
        self.data_channel = data_channel  # the initiator's choice; the responder learns it from HELLO

    def start(self) -> bytes:
        """The initiator's HELLO body."""
        assert self.role is Role.INITIATOR and self.expected_peer is not None
        return encode_handshake(Hello(self._versions, self.local_id, self.expected_peer, self._eph_pub, self.data_channel))

    @property
    def transcript(self) -> bytes:
        """The transcript hash both sides signed (empty until known)."""
        return self._th

    def traffic_keys(self) -> tuple[bytes, bytes]:
        """(send key, receive key) once complete."""
        assert self._keys is not None
        k_i2r, k_r2i = self._keys
        return (k_i2r, k_r2i) if self.role is Role.INITIATOR else (k_r2i, k_i2r)

    def _shared(self, peer_eph: bytes) -> bytes:
        try:
            shared = self._eph.exchange(X25519PublicKey.from_public_bytes(peer_eph))
        except ValueError:  # all-zero output: a low-order point
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.BAD_KEY_SHARE, "ephemeral key is a low-order point") from None
        return shared

    def _verify(self, peer: str, context: bytes, sig: bytes) -> None:
        try:
            self._peers[peer].verify(sig, context + self._th)
        except InvalidSignature:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.BAD_SIGNATURE, f"signature of {peer} does not verify against its configured key") from None

    def receive(self, body: bytes) -> bytes | None:
        """Process one handshake body; returns the body to send in reply, if any."""
        return self.handle(decode_handshake(body))

    def handle(self, msg: HandshakeMessage) -> bytes | None:
        """Process one decoded handshake message; returns the body to send in reply, if any."""
        if isinstance(msg, HandshakeError):
            raise ProtocolError(msg.code, msg.subcode, f"peer refused the handshake: {msg.text}")
        if self.role is Role.RESPONDER and self.peer_id is None:
            if not isinstance(msg, Hello):
                raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, "expected hello")
            return self._on_hello(msg)
        if self.role is Role.INITIATOR and not self.complete:
            if not isinstance(msg, HelloAck):
                raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, "expected hello-ack")
            return self._on_ack(msg)
        if self.role is Role.RESPONDER and not self.complete:
            if not isinstance(msg, Finish):
                raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, "expected finish")
            self._verify(self.peer_id, _INITIATOR_CONTEXT, msg.sig)  # type: ignore[arg-type]
            self.complete = True
            return None
        raise ProtocolError(Code.HANDSHAKE, HandshakeSub.MALFORMED, "handshake already complete")

    def _on_hello(self, msg: Hello) -> bytes:
        common = set(msg.versions) & set(self._versions)
        if not common:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.UNSUPPORTED_VERSION, f"offered {list(msg.versions)}, we speak {list(self._versions)}")
        if msg.to and msg.to != self.local_id:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.WRONG_PEER, f"hello is for {msg.to!r}, this is {self.local_id!r}")
        if msg.id not in self._peers:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.UNKNOWN_PEER, f"{msg.id!r} is not in the peer list")
        self.version = max(common)
        self.peer_id = msg.id
        self.data_channel = msg.data
        self._th = transcript_hash(self.version, msg.id, self.local_id, msg.eph, self._eph_pub, data_channel=msg.data)
        self._keys = derive_keys(self._shared(msg.eph), self._th)
        sig = self._key.sign(_RESPONDER_CONTEXT + self._th)
        return encode_handshake(HelloAck(self.version, self.local_id, self._eph_pub, sig))

    def _on_ack(self, msg: HelloAck) -> bytes:
        if msg.version not in self._versions:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.UNSUPPORTED_VERSION, f"peer chose version {msg.version}")
        if msg.id != self.expected_peer:
            raise ProtocolError(Code.HANDSHAKE, HandshakeSub.WRONG_PEER, f"dialled {self.expected_peer!r}, answered by {msg.id!r}")
        self.version = msg.version
        self.peer_id = msg.id
        self._th = transcript_hash(msg.version, self.local_id, msg.id, self._eph_pub, msg.eph, data_channel=self.data_channel)
        self._verify(msg.id, _RESPONDER_CONTEXT, msg.sig)
        self._keys = derive_keys(self._shared(msg.eph), self._th)
        self.complete = True
        return encode_handshake(Finish(self._key.sign(_INITIATOR_CONTEXT + self._th)))


# ---------------------------------------------------------------- record layer

_NONCE = struct.Struct(">4xQ")  # four zero bytes, then the record counter
_LENGTH = struct.Struct(">I")
_CONTENT_TYPE = tuple(bytes([t]) for t in range(256))
MAX_COUNTER = (1 << 64) - 1


class RecordLayer:
    """ChaCha20-Poly1305 records; the nonce is the per-direction record counter."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.send_counter = 0
        self.recv_counter = 0

    def seal(self, content_type: int, payload: bytes) -> bytes:
        """A whole frame (length header + ciphertext) carrying ``payload``."""
        size = len(payload) + 1
        if size > MAX_PLAINTEXT:
            raise ProtocolError(Code.RECORD, RecordSub.TOO_LONG, f"record plaintext of {size} bytes")
        if self.send_counter >= MAX_COUNTER:
            raise ProtocolError(Code.RECORD, RecordSub.COUNTER_EXHAUSTED, "send counter exhausted")
        header = _LENGTH.pack(size + AEAD_TAG)
        nonce = _NONCE.pack(self.send_counter)
        self.send_counter += 1
        return header + self._send.encrypt(nonce, _CONTENT_TYPE[content_type] + payload, header)

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        """Authenticate and decrypt one frame; any replay, reorder or tamper is fatal."""
        if self.recv_counter >= MAX_COUNTER:
            raise ProtocolError(Code.RECORD, RecordSub.COUNTER_EXHAUSTED, "receive counter exhausted")
        if len(body) < AEAD_TAG + 1:
            raise ProtocolError(Code.RECORD, RecordSub.DECRYPT_FAILED, "record shorter than tag + content type")
        nonce = _NONCE.pack(self.recv_counter)
        try:
            plaintext = self._recv.decrypt(nonce, body, header)
        except InvalidTag:
            raise ProtocolError(Code.RECORD, RecordSub.DECRYPT_FAILED, f"record {self.recv_counter} failed authentication") from None
        self.recv_counter += 1
        return plaintext[0], plaintext[1:]


def handshake_error_frame(exc: ProtocolError) -> bytes:
    """The plaintext refusal sent before a handshake completes."""
    return frame(encode_handshake(HandshakeError(exc.code, exc.subcode, exc.detail)))
