"""cpn/1 as protocol-spec/ describes it, written from the spec alone (this package never imports cpnd).

Framing, the handshake, records, message encodings and a blocking peer over one TCP socket.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# message types (messages.md)
OPEN, KEEPALIVE, UPDATE, NOTIFICATION, ROUTE_REFRESH, LIMITS = 1, 2, 3, 4, 5, 6
HELLO, HELLO_ACK, FINISH, HS_ERROR = 16, 17, 18, 19
CONTROL, TUNNEL, BATCH = 1, 2, 3  # BATCH: two or more tunnel frames, with `tunnel-batch` (tunnel.md, "Batches")
MAX_HANDSHAKE_BODY = 512
MAX_RECORD = 65552


class Closed(Exception):
    """The target closed the connection (with the error it sent first, if any)."""

    def __init__(self, error: tuple[int, int, str] | None) -> None:
        super().__init__(f"closed by target{f' with {error[0]}/{error[1]}: {error[2]}' if error else ''}")
        self.error = error


def label(service: str) -> int:
    return int.from_bytes(hashlib.sha256(b"cpn-label:" + service.encode()).digest()[:4], "big") & 0x7FFFFFFF


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw_pub(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_key(path: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(open(path, "rb").read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


def parse_pub(b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))


def transcript(version: int, initiator: str, responder: str, eph_i: bytes, eph_r: bytes, dc: bool = False) -> bytes:
    """handshake.md's th; a data channel's (HELLO `dc`) ends with "data-channel"."""
    lp = lambda s: bytes([len(s.encode())]) + s.encode()  # noqa: E731
    tail = b"data-channel" if dc else b""
    return hashlib.sha256(b"cpn/1" + bytes([version]) + lp(initiator) + lp(responder) + eph_i + eph_r + tail).digest()


def traffic_keys(shared: bytes, th: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=th, info=b"cpn/1 traffic keys").derive(shared)
    return okm[:32], okm[32:]


class Records:
    """ChaCha20-Poly1305 with per-direction counter nonces (handshake.md, "Record layer")."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self.send, self.recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self.send_n = self.recv_n = 0

    def seal(self, ctype: int, payload: bytes) -> bytes:
        pt = bytes([ctype]) + payload
        header = struct.pack(">I", len(pt) + 16)
        ct = self.send.encrypt(b"\0" * 4 + struct.pack(">Q", self.send_n), pt, header)
        self.send_n += 1
        return header + ct

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        pt = self.recv.decrypt(b"\0" * 4 + struct.pack(">Q", self.recv_n), body, header)
        self.recv_n += 1
        return pt[0], pt[1:]


class Peer:
    """One blocking session to the target, as peer ``my_id``."""

    def __init__(self, target: tuple[str, int], target_id: str | None, target_pub: Ed25519PublicKey, my_id: str,
                 key: Ed25519PrivateKey, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(target, timeout=timeout)
        self.sock.settimeout(timeout)
        self.target_id, self.target_pub, self.my_id, self.key = target_id, target_pub, my_id, key
        self.records: Records | None = None
        self.buf = b""
        self.rtt: float | None = None
        self.target_caps: list[str] = []  # from its OPEN
        self.target_limits: dict[str, int] | None = None  # its LIMITS, when both OPENs list route-limits

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self, deadline: float | None = None) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    header, body, self.buf = self.buf[:4], self.buf[4:4 + n], self.buf[4 + n:]
                    return header, body
            if deadline is not None:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                raise Closed(None)
            self.buf += chunk

    # ---- handshake

    def hello(self, *, versions: list[int] | None = None, my_id: str | None = None, to: str | None = None,
              eph: bytes | None = None, dc: bool = False) -> X25519PrivateKey:
        e = X25519PrivateKey.generate()
        msg = {"t": HELLO, "v": versions or [1], "id": my_id or self.my_id,
               "to": to if to is not None else (self.target_id or ""), "eph": eph if eph is not None else raw_pub(e)}
        if dc:
            msg["dc"] = True  # a data channel (session.md, "Data channels")
        self.send_raw(frame(pack(msg)))
        return e

    def read_handshake(self) -> dict[str, Any]:
        _, body = self.read_frame()
        msg = msgpack.unpackb(body, raw=False)
        if msg.get("t") == HS_ERROR:
            raise Closed((msg["code"], msg["sub"], msg["msg"]))
        return msg

    def handshake(self, *, sign_with: Ed25519PrivateKey | None = None, dc: bool = False) -> None:
        e = self.hello(dc=dc)
        ack = self.read_handshake()
        if ack.get("t") != HELLO_ACK or (self.target_id is not None and ack["id"] != self.target_id):
            raise AssertionError(f"expected HELLO-ACK from {self.target_id or 'the target'}, got {ack}")
        self.target_id = ack["id"]
        th = transcript(ack["v"], self.my_id, ack["id"], raw_pub(e), ack["eph"], dc)
        try:
            self.target_pub.verify(ack["sig"], b"cpn/1 responder\x00" + th)
        except InvalidSignature:
            raise AssertionError("the target's HELLO-ACK signature does not verify") from None
        sig = (sign_with or self.key).sign(b"cpn/1 initiator\x00" + th)
        self.send_raw(frame(pack({"t": FINISH, "sig": sig})))
        k_i2r, k_r2i = traffic_keys(e.exchange(X25519PublicKey.from_public_bytes(ack["eph"])), th)
        self.records = Records(k_i2r, k_r2i)

    # ---- records and messages

    def send_msg(self, msg: dict[str, Any] | bytes, ctype: int = CONTROL) -> bytes:
        assert self.records is not None
        rec = self.records.seal(ctype, msg if isinstance(msg, bytes) else pack(msg))
        self.send_raw(rec)
        return rec

    def recv(self, timeout: float = 5.0) -> tuple[int, Any]:
        """Next record as (content type, decoded message or raw tunnel payload); Closed on a NOTIFICATION or EOF."""
        assert self.records is not None
        header, body = self.read_frame(time.monotonic() + timeout)
        try:
            ctype, payload = self.records.open(header, body)
        except InvalidTag:
            msg = msgpack.unpackb(body, raw=False) if len(body) <= MAX_HANDSHAKE_BODY else None
            if isinstance(msg, dict) and msg.get("t") == HS_ERROR:
                raise Closed((msg["code"], msg["sub"], msg["msg"])) from None
            raise AssertionError("a record from the target failed authentication") from None
        if ctype != CONTROL:
            return ctype, payload
        msg = msgpack.unpackb(payload, raw=False)
        if msg.get("t") == NOTIFICATION:
            raise Closed((msg["code"], msg["sub"], msg["msg"]))
        return ctype, msg

    def open_session(self, hold_ms: int = 3000, caps: list[str] | None = None,
                     tw: list[int] | None = None, limits: tuple[int, int, int] | None = None, dc: bool = False) -> dict[str, Any]:
        """Handshake, OPEN both ways (and LIMITS, when ``caps`` and the target's both list
        route-limits: ``limits`` = routes, rate, burst) and the first KEEPALIVEs; the target's OPEN.

        ``tw``: our tunnel limits, sent with the `tunnel-window` capability (tunnel.md, "Flow control").
        ``dc``: a data channel (session.md, "Data channels").
        """
        self.handshake(dc=dc)
        ts = int(time.monotonic() * 1e6)
        caps = caps if caps is not None else ["route-refresh", "tunnel"]
        mine: dict[str, Any] = {"t": OPEN, "id": self.my_id, "hold": hold_ms, "caps": caps, "ts": ts}
        if tw is not None:
            mine["caps"] = [*caps, "tunnel-window"]
            mine["tw"] = tw
        self.send_msg(mine)
        _, their_open = self.recv()
        if their_open.get("t") != OPEN:
            raise AssertionError(f"expected OPEN, got {their_open}")
        self.target_caps = list(their_open.get("caps", []))
        self.target_tw: list[int] | None = their_open.get("tw") if tw is not None and "tunnel-window" in self.target_caps else None
        both_limits = "route-limits" in caps and "route-limits" in self.target_caps
        if both_limits:
            routes, rate, burst = limits or (10_000, 1000, 10_000)
            self.send_msg({"t": LIMITS, "routes": routes, "rate": rate, "burst": burst})
        self.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": their_open["ts"], "dly": 0})
        while True:
            _, msg = self.recv()
            if msg.get("t") == LIMITS:
                if not both_limits or self.target_limits is not None:
                    raise AssertionError(f"LIMITS from the target without route-limits on both OPENs, or twice: {msg}")
                self.target_limits = {k: msg[k] for k in ("routes", "rate", "burst")}
            if msg.get("t") == KEEPALIVE:
                if both_limits and self.target_limits is None:
                    raise AssertionError("the target's first KEEPALIVE came before its LIMITS (session.md)")
                if msg["echo"]:
                    self.rtt = (time.monotonic() * 1e6 - msg["echo"] - msg["dly"]) / 1e6
                return their_open

    def expect_error(self, timeout: float = 5.0) -> tuple[int, int, str] | None:
        """Read until the target closes; the error it sent on the way, if any."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.records is None:
                    self.read_handshake()
                else:
                    self.recv(max(0.01, deadline - time.monotonic()))
        except Closed as c:
            return c.error if c.error else None
        except (socket.timeout, TimeoutError):
            raise AssertionError("the target neither answered with an error nor closed") from None
        raise AssertionError("the target kept the session open")


def batch_frames(payload: bytes) -> list[bytes]:
    """The tunnel frames of a batch record from the target (``len u16 | frame`` each); AssertionError if
    it is not two or more whole entries."""
    frames, at = [], 0
    while at < len(payload):
        assert at + 2 <= len(payload), "a batch from the target ends inside an entry's length"
        n = int.from_bytes(payload[at:at + 2], "big")
        assert at + 2 + n <= len(payload), "a batch entry from the target runs past the record's end"
        frames.append(payload[at + 2:at + 2 + n])
        at += 2 + n
    assert len(frames) >= 2, f"a batch of {len(frames)} entries from the target"
    return frames


def new_route(service: str, instance: str, origin: str, seq: int = 1, **over: Any) -> dict[str, Any]:
    r = {"svc": service, "inst": instance, "origin": origin, "seq": seq, "label": label(service), "path": [origin],
         "lat": 0, "cap": 10.0, "load": 0.0, "bload": 0.0, "price": 1.0, "comp": 1000}
    r.update(over)
    return r


def random_id() -> str:
    return "x" + os.urandom(4).hex()


# ---- origin validation (routing.md, "Origin validation"), from the spec alone

def origin_message(r: dict[str, Any]) -> bytes:
    """What an origin signs for Route ``r``."""
    return b"cpn/1 origin\x00" + msgpack.packb(
        [r["svc"], r["inst"], r["origin"], r["seq"], float(r["cap"]), float(r["load"]), float(r["bload"]),
         float(r["price"]), r["comp"], bool(r.get("down", False)), r.get("xk")], use_bin_type=True)


def adjacency_message(origin: str, neighbour: str) -> bytes:
    o, n = origin.encode(), neighbour.encode()
    return b"cpn/1 adjacency\x00" + bytes([len(o)]) + o + bytes([len(n)]) + n


def sign_route(r: dict[str, Any], key: Ed25519PrivateKey, neighbour: str) -> dict[str, Any]:
    """``r`` signed by its origin (``key``), sent to ``neighbour``: with `osig` and `oadj`."""
    return {**r, "osig": key.sign(origin_message(r)), "oadj": key.sign(adjacency_message(r["origin"], neighbour))}


def certificate(ca: Ed25519PrivateKey, key: Ed25519PublicKey, services: list[str], exp: int, gw_id: str = "") -> bytes:
    """A certificate from trust anchor ``ca``: ``key`` (of ``gw_id``) may originate ``services`` until ``exp``."""
    iss, k = raw_pub(ca), key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body = b"cpn/1 certificate\x00" + msgpack.packb([1, gw_id, k, services, exp, iss], use_bin_type=True)
    return msgpack.packb({"v": 1, "id": gw_id, "key": k, "svc": services, "exp": exp, "iss": iss, "sig": ca.sign(body)},
                         use_bin_type=True)
