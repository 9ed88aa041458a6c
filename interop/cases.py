"""Conformance cases: each a named check against a running gateway, citing its spec section."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .wire import (
    BATCH,
    FINISH,
    HELLO_ACK,
    KEEPALIVE,
    OPEN,
    ROUTE_REFRESH,
    TUNNEL,
    UPDATE,
    Closed,
    Peer,
    batch_frames,
    frame,
    new_route,
    pack,
    random_id,
)

SPEC = Path(__file__).resolve().parent.parent / "protocol-spec"


@attrs.define
class Target:
    addr: tuple[str, int]
    pub: Ed25519PublicKey
    my_id: str
    key: Ed25519PrivateKey
    http: str | None = None
    target_id: str | None = None

    def peer(self) -> Peer:
        return Peer(self.addr, self.target_id, self.pub, self.my_id, self.key)

    def session(self, **kw: Any) -> Peer:
        p = self.peer()
        p.open_session(**kw)
        self.target_id = p.target_id
        return p


Case = Callable[[Target], None]
NEEDS_HTTP = "needs --http"


class Skipped(Exception):
    """The target offers nothing this case can check (reported, never counted as a failure)."""
CASES: list[tuple[str, str, Case]] = []


def case(name: str, section: str) -> Callable[[Case], Case]:
    def deco(fn: Case) -> Case:
        CASES.append((name, section, fn))
        return fn
    return deco


def expect(p: Peer, code: int, sub: int | None = None) -> None:
    err = p.expect_error()
    p.close()
    if err is None:
        raise AssertionError(f"closed without saying why; expected {code}/{sub}")
    if err[0] != code or (sub is not None and err[1] != sub):
        raise AssertionError(f"expected {code}/{sub}, got {err[0]}/{err[1]}: {err[2]}")


# ---------------------------------------------------------------- vectors (our own codec against the spec)


@case("vectors-labels", "messages.md#identifiers")
def _labels(t: Target) -> None:
    from .wire import label

    for svc, want in json.loads((SPEC / "vectors.json").read_text())["labels"].items():
        assert label(svc) == want, svc


# ---------------------------------------------------------------- handshake


@case("handshake-established", "handshake.md#handshake, session.md")
def _established(t: Target) -> None:
    p = t.session()
    assert p.rtt is not None and 0 <= p.rtt < 5, f"RTT sample {p.rtt}"
    p.close()


@case("handshake-wrong-key", "handshake.md#handshake (7/3)")
def _wrong_key(t: Target) -> None:
    p = t.peer()
    try:
        p.handshake(sign_with=Ed25519PrivateKey.generate())
    except Closed as c:
        raise AssertionError(f"refused too early: {c}") from None
    expect(p, 7, 3)


@case("handshake-unknown-id", "handshake.md#handshake (7/2)")
def _unknown(t: Target) -> None:
    p = t.peer()
    p.hello(my_id=random_id())
    expect(p, 7, 2)


@case("handshake-bad-version", "handshake.md#handshake (7/1)")
def _version(t: Target) -> None:
    p = t.peer()
    p.hello(versions=[99])
    expect(p, 7, 1)


@case("handshake-wrong-responder", "handshake.md#handshake (7/4)")
def _wrong_to(t: Target) -> None:
    p = t.peer()
    p.hello(to=random_id())
    expect(p, 7, 4)


@case("handshake-low-order-share", "handshake.md#handshake (7/5)")
def _low_order(t: Target) -> None:
    p = t.peer()
    p.hello(eph=bytes(32))
    expect(p, 7, 5)


@case("handshake-garbage", "handshake.md#framing (7/6 or 1/x)")
def _garbage(t: Target) -> None:
    p = t.peer()
    p.send_raw(frame(b"\xc1not msgpack"))
    err = p.expect_error()
    p.close()
    assert err is not None and err[0] in (1, 7), err


@case("handshake-oversized-frame", "handshake.md#framing (1/1)")
def _oversized_hs(t: Target) -> None:
    p = t.peer()
    p.send_raw(struct.pack(">I", 10_000))
    expect(p, 1, 1)


@case("handshake-replayed-finish", "handshake.md#handshake (7/3)")
def _replayed_finish(t: Target) -> None:
    p1 = t.peer()
    p1.handshake()
    # Capture a FINISH by signing the first transcript, then offer it in a new handshake.
    p1.close()
    p2 = t.peer()
    p2.hello()
    ack = p2.read_handshake()
    assert ack["t"] == HELLO_ACK
    p2.send_raw(frame(pack({"t": FINISH, "sig": os.urandom(64)})))
    expect(p2, 7, 3)


@case("collision-redial-replaces", "session.md#collisions (6/7, rule 1)")
def _collision(t: Target) -> None:
    # A peer dials only when it holds no connection: a second session from the same dialler
    # means it gave the first up, so the new one replaces the old at once.
    first = t.session()
    second = t.peer()
    try:
        second.open_session()
        err = first.expect_error(5.0)
        assert err is not None and err[:2] == (6, 7), f"the old session was not closed with 6/7: {err}"
        # The new one is the session now: it answers.
        second.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
        second.send_msg({"t": ROUTE_REFRESH})
        second.recv(3)
    finally:
        first.close()
        second.close()


@case("data-channel-beside-session", "session.md#data-channels")
def _data_channel(t: Target) -> None:
    # A data channel comes up beside the session without a collision; both stay usable.
    main = t.session()
    dc = t.peer()
    try:
        their_open = dc.open_session(caps=["tunnel"], dc=True)
        assert "tunnel" in their_open["caps"], their_open
        for p in (main, dc):
            p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
        main.send_msg({"t": ROUTE_REFRESH})
        main.recv(3)  # the session answers (its routes, or End-of-RIB): it was not closed
        _, msg = dc.recv(3)
        assert msg.get("t") == KEEPALIVE, f"expected only KEEPALIVE on a data channel, got {msg}"
    finally:
        main.close()
        dc.close()


@case("data-channel-without-session", "session.md#data-channels (6/5)")
def _data_channel_alone(t: Target) -> None:
    p = t.peer()
    try:
        p.open_session(caps=["tunnel"], dc=True)
    except Closed as c:
        p.close()
        assert c.error is not None and c.error[:2] == (6, 5), c.error
        return
    expect(p, 6, 5)


@case("data-channel-ends-with-session", "session.md#data-channels (6/5)")
def _data_channel_ends(t: Target) -> None:
    main = t.session()
    dc = t.peer()
    try:
        dc.open_session(caps=["tunnel"], dc=True)
        main.close()  # the session ends: the target closes the data channel too
        err = dc.expect_error(5.0)
        assert err is not None and err[:2] == (6, 5), f"the data channel was not closed with 6/5: {err}"
    finally:
        dc.close()


@case("data-channel-update", "session.md#data-channels (5/3)")
def _data_channel_update(t: Target) -> None:
    main = t.session()
    dc = t.peer()
    try:
        dc.open_session(caps=["tunnel"], dc=True)
        dc.send_msg({"t": UPDATE, "adv": [], "wd": []})  # even End-of-RIB
        expect(dc, 5, 3)
    finally:
        main.close()


# ---------------------------------------------------------------- records


@case("record-tampered", "handshake.md#record-layer (8/1)")
def _tampered(t: Target) -> None:
    p = t.session()
    rec = bytearray(p.records.seal(1, pack({"t": KEEPALIVE, "ts": 1, "echo": 0, "dly": 0})))  # type: ignore[union-attr]
    rec[-1] ^= 1
    p.send_raw(bytes(rec))
    expect(p, 8, 1)


@case("record-replayed", "handshake.md#record-layer (8/1)")
def _replayed(t: Target) -> None:
    p = t.session()
    rec = p.send_msg({"t": KEEPALIVE, "ts": 1, "echo": 0, "dly": 0})
    p.send_raw(rec)
    expect(p, 8, 1)


@case("record-oversized", "handshake.md#framing (1/1)")
def _oversized(t: Target) -> None:
    p = t.session()
    p.send_raw(struct.pack(">I", 70_000))
    expect(p, 1, 1)


# ---------------------------------------------------------------- OPEN and timers


def _open_with(t: Target, open_msg: dict[str, Any]) -> Peer:
    p = t.peer()
    p.handshake()
    p.send_msg(open_msg)
    return p


@case("open-bad-hold", "messages.md#session-messages (2/3)")
def _bad_hold(t: Target) -> None:
    expect(_open_with(t, {"t": OPEN, "id": t.my_id, "hold": 10, "caps": [], "ts": 1}), 2, 3)


@case("open-wrong-id", "messages.md#session-messages (2/2)")
def _open_id(t: Target) -> None:
    expect(_open_with(t, {"t": OPEN, "id": random_id(), "hold": 3000, "caps": [], "ts": 1}), 2, 2)


@case("open-negotiates-hold", "session.md#timers")
def _hold_negotiated(t: Target) -> None:
    p = t.peer()
    their = p.open_session(hold_ms=600)
    assert 200 <= their["hold"] <= 3_600_000
    # Keepalives must now come at least every 600/3 ms; then go silent and expect 4/0.
    got, deadline = 0, time.monotonic() + 1.0
    while time.monotonic() < deadline:
        p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
        try:
            _, msg = p.recv(0.15)
            got += msg.get("t") == KEEPALIVE
        except (socket.timeout, TimeoutError):
            pass
    assert got >= 3, f"{got} keepalives in 1 s with a 600 ms hold"
    start = time.monotonic()
    err = p.expect_error(5.0)
    p.close()
    assert err is not None and err[:2] == (4, 0), err
    assert time.monotonic() - start < 1.5, "hold timer fired late"


@case("message-unknown-type", "messages.md (1/2)")
def _unknown_type(t: Target) -> None:
    p = t.session()
    p.send_msg({"t": 99})
    expect(p, 1, 2)


@case("message-second-open", "session.md (5/3)")
def _second_open(t: Target) -> None:
    p = t.session()
    p.send_msg({"t": OPEN, "id": t.my_id, "hold": 3000, "caps": [], "ts": 1})
    expect(p, 5, 3)


# ---------------------------------------------------------------- UPDATE


def _update(t: Target, adv: list[dict[str, Any]], wd: list[list[str]] | None = None) -> Peer:
    p = t.session()
    p.send_msg({"t": UPDATE, "adv": adv, "wd": wd or []})
    return p


@case("update-loop-in-path", "messages.md#route (3/2)")
def _loop(t: Target) -> None:
    expect(_update(t, [new_route("/interop", "i1", "o1", path=[t.my_id, "o1", t.my_id])]), 3, 2)


@case("update-path-not-from-sender", "routing.md#receiving-an-update (3/2)")
def _not_sender(t: Target) -> None:
    expect(_update(t, [new_route("/interop", "i1", "o1", path=["someone", "o1"])]), 3, 2)


@case("update-label-mismatch", "messages.md#route (3/4)")
def _label(t: Target) -> None:
    expect(_update(t, [new_route("/interop", "i1", t.my_id, label=1)]), 3, 4)


@case("update-bad-attribute", "messages.md#route (3/3)")
def _bad_attr(t: Target) -> None:
    expect(_update(t, [new_route("/interop", "i1", t.my_id, cap=0.0)]), 3, 3)


@case("update-too-many-entries", "messages.md#session-messages (3/5)")
def _too_many(t: Target) -> None:
    wd = [["/f", "o", f"i{n}"] for n in range(2049)]
    expect(_update(t, [], wd), 3, 5)


@case("update-valid-then-withdraw-and-refresh", "routing.md, session.md")
def _valid(t: Target) -> None:
    p = _update(t, [new_route("/interop/probe", "i1", t.my_id, path=[t.my_id])])
    # The target must keep the session; a ROUTE-REFRESH makes it send its whole table again.
    p.send_msg({"t": UPDATE, "adv": [], "wd": [["/interop/probe", t.my_id, "i1"]]})
    p.send_msg({"t": ROUTE_REFRESH})
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        _, msg = p.recv(3)
        if msg.get("t") == UPDATE:
            for r in msg["adv"]:
                assert r["path"][0] == p.target_id and t.my_id not in r["path"], r
            p.close()
            return
    p.close()
    raise AssertionError("no UPDATE after ROUTE-REFRESH (a target with no routes at all would fail this)")


# ---------------------------------------------------------------- route limits

LIMITS_CAPS = ["route-refresh", "tunnel", "route-limits"]
FLOOD_S = 2.0  # the churn flood: this long, or this many route entries, whichever comes first
FLOOD_MAX = 200_000


def _limits_session(t: Target, limits: tuple[int, int, int] = (10_000, 1000, 10_000)) -> Peer:
    p = t.session(caps=LIMITS_CAPS, limits=limits)
    if "route-limits" not in p.target_caps:
        p.close()
        raise Skipped("the target does not offer route-limits")
    return p


def _held_until_quiet(p: Peer, bound: int, held: set[tuple[str, str, str]] | None = None, *,
                      first: bool = True, quiet: float = 0.5, limit: float = 10.0) -> set[tuple[str, str, str]]:
    """Replay the target's UPDATEs into what it makes us hold, never more than ``bound``, until
    ``quiet`` s pass without one (after a first one, End-of-RIB included, when ``first``)."""
    held = set(held or ())
    deadline = time.monotonic() + limit
    last = last_keepalive = time.monotonic()
    seen = not first
    while time.monotonic() < deadline and not (seen and time.monotonic() - last >= quiet):
        if time.monotonic() - last_keepalive > 0.5:
            _keepalive_now(p)
            last_keepalive = time.monotonic()
        try:
            ctype, msg = p.recv(0.1)
        except (socket.timeout, TimeoutError):
            continue
        if ctype == TUNNEL or msg.get("t") != UPDATE:
            continue
        seen, last = True, time.monotonic()
        wd = {tuple(w) for w in msg["wd"]}
        adv = {(r["svc"], r["origin"], r["inst"]) for r in msg["adv"]}
        assert not wd & adv, f"one UPDATE both withdraws and advertises {sorted(wd & adv)[:3]}"
        held = (held - wd) | adv
        assert len(held) <= bound, f"the target made us hold {len(held)} routes; our LIMITS said {bound}"
    if not seen:
        raise AssertionError("no UPDATE (not even End-of-RIB) from the target")
    return held


@case("route-limits-exchanged", "session.md, messages.md#session-messages (LIMITS)")
def _limits_exchanged(t: Target) -> None:
    """Both OPENs list route-limits: the target sends LIMITS, within bounds, before its first KEEPALIVE."""
    p = _limits_session(t)
    lim = p.target_limits
    p.close()
    assert lim is not None and 0 <= lim["routes"] <= 0xFFFFFFFF and 1 <= lim["rate"] <= 0xFFFFFFFF \
        and 1 <= lim["burst"] <= 0xFFFFFFFF, lim


@case("route-limit-honoured", "routing.md#route-limits (the sender)")
def _limit_honoured(t: Target) -> None:
    """We take one route fewer than the target has for us: it sends exactly that many, never
    more, its own instances first, and a ROUTE-REFRESH changes nothing of that."""
    everything = advertised_routes(t)
    if not everything:
        raise Skipped("the target advertises no route: nothing to withhold")
    limit = len(everything) - 1
    p = _limits_session(t, (limit, 1000, 10_000))
    try:
        held = _held_until_quiet(p, limit)
        assert len(held) == limit, f"{len(held)} routes sent for a limit of {limit} ({len(everything)} to send)"
        own = {r for r in everything if r[1] == t.target_id}
        assert len(own) > limit or own <= held, f"its own instances withheld first: {sorted(own - held)[:3]}"
        p.send_msg({"t": ROUTE_REFRESH})
        assert _held_until_quiet(p, limit, held, first=False, quiet=1.0) == held
    finally:
        p.close()


@case("route-limit-exceeded", "routing.md#receiving-an-update (6/1)")
def _limit_exceeded(t: Target) -> None:
    """One route more than the target's LIMITS allow: cease/max-routes."""
    p = _limits_session(t)
    assert p.target_limits is not None
    routes, rate, burst = (p.target_limits[k] for k in ("routes", "rate", "burst"))
    over = routes + 1
    if over > 50_000 or max(0, over - burst) / rate > 20:
        p.close()
        raise Skipped(f"a limit of {routes} routes at {rate}/s takes too long to exceed")
    svc = f"/interop-limit-{random_id()}"
    try:
        for start in range(0, over, 300):  # 300 routes: under 64 KiB a message
            p.send_msg({"t": UPDATE, "adv": [new_route(svc, f"i{n}", t.my_id) for n in range(start, min(over, start + 300))],
                        "wd": []})
    except OSError:
        pass  # it hung up on the way: its NOTIFICATION says why
    err = p.expect_error(10.0 + max(0, over - burst) / rate)
    p.close()
    assert err is not None and err[:2] == (6, 1), f"expected 6/1 after {over} routes, got {err}"


@case("route-churn-flood", "routing.md#route-limits (the receiver's pace)")
def _churn_flood(t: Target) -> None:
    """200 routes advertised and withdrawn as fast as the target lets us, for 2 s: exceeding
    its pace is no error (it reads slower), and afterwards it is up, with its other sessions."""
    routes = advertised_routes(t)
    p = t.session(caps=LIMITS_CAPS)
    svc, keys = f"/interop-churn-{random_id()}", 200
    up = pack({"t": UPDATE, "adv": [new_route(svc, f"c{n}", t.my_id) for n in range(keys)], "wd": []})
    down = pack({"t": UPDATE, "adv": [], "wd": [[svc, t.my_id, f"c{n}"] for n in range(keys)]})
    sent, start = 0, time.monotonic()
    p.sock.settimeout(0.5)
    try:
        while time.monotonic() - start < FLOOD_S and sent < FLOOD_MAX:
            p.send_msg(up if (sent // keys) % 2 == 0 else down)
            sent += keys
    except (socket.timeout, TimeoutError):
        pass  # it reads slower than we write: what its pace is for
    except OSError:
        err = p.expect_error(2.0)
        raise AssertionError(f"the target hung up on the flood after {sent} entries: {err}") from None
    try:
        while True:  # what it sent us meanwhile: no NOTIFICATION
            p.recv(0.2)
    except (socket.timeout, TimeoutError):
        pass
    except Closed as c:
        raise AssertionError(f"the target closed the flooding session after {sent} entries: {c.error}") from None
    # Reset, not close: what the target has not read yet goes with the connection.
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.close()
    deadline, why = time.monotonic() + 15, "not checked"
    while time.monotonic() < deadline:
        why = alive(t, routes)  # a collision while it still reads the old session: try again
        if why is None:
            return
        time.sleep(0.2)
    raise AssertionError(f"after {sent} route entries in {FLOOD_S:g} s: {why}")


# ---------------------------------------------------------------- tunnel


def _tunnel(t: Target, payload: bytes) -> Peer:
    p = t.session()
    p.send_msg(payload, ctype=TUNNEL)
    return p


@case("tunnel-stream-zero", "tunnel.md#streams (9/2)")
def _stream_zero(t: Target) -> None:
    expect(_tunnel(t, struct.pack(">IBB", 0, 2, 0) + b"x"), 9, 2)


@case("tunnel-never-opened", "tunnel.md#streams (9/2)")
def _never_opened(t: Target) -> None:
    expect(_tunnel(t, struct.pack(">IBB", 7, 2, 0) + b"x"), 9, 2)


@case("tunnel-oversized-data", "tunnel.md#tunnel-frames (9/1)")
def _big_data(t: Target) -> None:
    expect(_tunnel(t, struct.pack(">IBB", 1, 2, 0) + b"x" * 16385), 9, 1)


@case("tunnel-large-data", "tunnel.md#tunnel-frames (9/1, 9/2)")
def _large_data(t: Target) -> None:
    """With tunnel-large-data offered by both ends, DATA up to 65024 bytes is well-formed."""
    p = t.session(caps=LARGE_CAPS)
    if "tunnel-large-data" not in p.target_caps:
        p.close()
        raise Skipped("the target does not offer tunnel-large-data")
    p.send_msg(struct.pack(">IBB", 7, 2, 0) + b"x" * 65024, ctype=TUNNEL)
    expect(p, 9, 2)  # the size is fine; stream 7 was never opened
    expect(_tunnel_large(t, 65025), 9, 1)


BATCH_CAPS = ["route-refresh", "tunnel", "tunnel-batch"]


def _batch_vectors() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads((SPEC / "vectors.json").read_text())["tunnel-batch"]}


def _batch_session(t: Target) -> Peer:
    """A session offering `tunnel-batch`; Skipped if the target does not offer it."""
    p = t.session(caps=BATCH_CAPS)
    if "tunnel-batch" not in p.target_caps:
        p.close()
        raise Skipped("the target does not offer tunnel-batch")
    return p


def _frames_from(p: Peer, timeout: float) -> list[bytes]:
    """The tunnel frames of the target's next tunnel record (content type 2, or a batch's, 3)."""
    deadline = time.monotonic() + timeout
    while True:  # UPDATEs and KEEPALIVEs may come first
        ctype, payload = p.recv(max(0.01, deadline - time.monotonic()))
        if ctype == TUNNEL:
            return [payload]
        if ctype == BATCH:
            return batch_frames(payload)


@case("tunnel-batch", "tunnel.md#batches")
def _batch(t: Target) -> None:
    """The spec's open-data batch (an OPEN of stream 1 to s1 at gw3, and its whole request): the target
    takes both frames and answers the stream: RESET no-route or no-such-instance where it knows no such
    instance (a LOAD may come first), else the response."""
    p = _batch_session(t)
    try:
        p.send_msg(bytes.fromhex(_batch_vectors()["open-data"]["hex"]), ctype=BATCH)
        deadline = time.monotonic() + 5
        while True:
            for f in _frames_from(p, deadline - time.monotonic()):
                sid, ftype, _ = struct.unpack(">IBB", f[:6])
                if (sid, ftype) == (1, 5):
                    continue  # a LOAD
                if (sid, ftype) == (1, 2):  # a target that can reach s1 at gw3 answers it
                    assert f[6:].startswith(b"HTTP/1.1 "), f[6:40]
                    return
                assert (sid, ftype) == (1, 4), f"expected RESET on stream 1, got stream {sid} type {ftype}"
                code, delivered = struct.unpack(">HB", f[6:9])
                assert code in (1, 11) and delivered == 0, (code, delivered)
                return
    finally:
        p.close()


@case("tunnel-batch-malformed", "tunnel.md#batches (9/4, 9/1, 9/2)")
def _batch_malformed(t: Target) -> None:
    """Each malformed batch of the spec ends the session with its NOTIFICATION: 9/4 for the batch's own
    shape, a bad frame inside with that frame's code."""
    for name, v in _batch_vectors().items():
        if "error" in v and "tunnel-batch" in v["caps"]:
            p = _batch_session(t)
            p.send_msg(bytes.fromhex(v["hex"]), ctype=BATCH)
            try:
                expect(p, *v["error"])
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


@case("tunnel-batch-not-negotiated", "tunnel.md#batches (8/4)")
def _batch_not_negotiated(t: Target) -> None:
    """A batch on a session whose OPENs do not both list tunnel-batch is a bad content type."""
    v = _batch_vectors()["without-capability"]
    p = t.session(caps=["route-refresh", "tunnel"])
    p.send_msg(bytes.fromhex(v["hex"]), ctype=BATCH)
    expect(p, *v["error"])


def _tunnel_large(t: Target, size: int) -> Peer:
    p = t.session(caps=LARGE_CAPS)
    p.send_msg(struct.pack(">IBB", 1, 2, 0) + b"x" * size, ctype=TUNNEL)
    return p


def _reset_for_open(t: Target, svc: str, origin: str, inst: str, *, hop_limit: int = 8,
                    budget_us: int = 0xFFFFFFFF) -> tuple[int, int]:
    """Open stream 1 towards (svc, origin, inst) with an empty GET; the target's RESET as (code, delivered)."""
    from .wire import label

    ext = struct.pack(">BBBBIII16s", 1, 1, hop_limit, 1, label(svc), budget_us, 0xFFFFFFFF, os.urandom(16))
    ext += bytes([len(origin)]) + origin.encode() + bytes([len(inst)]) + inst.encode()
    p = _tunnel(t, struct.pack(">IBB", 1, 1, 0) + ext)
    try:
        p.send_msg(struct.pack(">IBB", 1, 2, 1) + f"GET {svc} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), ctype=TUNNEL)
        deadline = time.monotonic() + 5
        while True:  # UPDATEs, KEEPALIVEs and a LOAD frame may come first
            ctype, payload = p.recv(max(0.01, deadline - time.monotonic()))
            if ctype != TUNNEL:
                continue
            sid, ftype, _ = struct.unpack(">IBB", payload[:6])
            if sid == 1 and ftype == 5:
                continue
            assert (sid, ftype) == (1, 4), f"expected RESET on stream 1, got stream {sid} type {ftype}"
            code, delivered = struct.unpack(">HB", payload[6:9])
            return code, delivered
    finally:
        p.close()


def _transit_route(t: Target) -> tuple[str, str, str]:
    """A route the target learnt from another peer: a stream for it makes the target a transit."""
    routes = sorted(r for r in advertised_routes(t) if r[1] != t.target_id)
    if not routes:
        raise Skipped("the target learnt no route from another peer: it is never a transit")
    return routes[0]


@case("tunnel-unroutable-target", "tunnel.md#what-each-gateway-does-with-an-open")
def _unroutable(t: Target) -> None:
    code, delivered = _reset_for_open(t, "/nowhere", random_id(), random_id())
    assert code in (1, 11) and delivered == 0, (code, delivered)


@case("tunnel-hop-limit", "tunnel.md#what-each-gateway-does-with-an-open (RESET 2)")
def _hop_limit(t: Target) -> None:
    """A transit that would forward with no hop left answers RESET hop-limit, delivered 0."""
    assert _reset_for_open(t, *_transit_route(t), hop_limit=1) == (2, 0)


@case("tunnel-deadline-exhausted", "tunnel.md#what-each-gateway-does-with-an-open (RESET 3)")
def _deadline(t: Target) -> None:
    """A request whose budget is already spent is not forwarded: RESET deadline, delivered 0."""
    assert _reset_for_open(t, *_transit_route(t), budget_us=0) == (3, 0)


DATA_MAX = 16384
DATA_MAX_LARGE = 65024
INITIAL_WINDOW = 262144
INITIAL_WINDOW_LARGE = 1048576  # both OPENs list tunnel-large-data
LARGE_CAPS = ["route-refresh", "tunnel", "tunnel-large-data"]
FLOW_CONTROL_LIMIT = 64 * 1024 * 1024  # a target that enforces its window resets us long before this


def _tunnel_frames(p: Peer, timeout: float) -> list[tuple[int, int, int, bytes]]:
    """Tunnel frames that arrive within ``timeout`` (control messages are read and dropped)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctype, payload = p.recv(max(0.001, deadline - time.monotonic()))
        except (socket.timeout, TimeoutError):
            return out
        if ctype == TUNNEL:
            sid, ftype, flags = struct.unpack(">IBB", payload[:6])
            out.append((sid, ftype, flags, payload[6:]))
        if time.monotonic() >= deadline:
            return out


def _stream_to_us(t: Target, p: Peer, tag: str) -> tuple[int, socket.socket]:
    """Advertise an instance of our own, have a user that reads nothing ask the target for it,
    and answer the stream the target opens to us with a 200 head of 1 GB: (stream id, user).

    The user never reads, so the target cannot pass our bytes on for long: what it may buffer
    is bounded by the credit it gave us.
    """
    svc = f"/interop-{tag}-{random_id()}"
    p.send_msg({"t": UPDATE, "adv": [new_route(svc, tag, t.my_id)], "wd": []})
    opened, user = None, None
    for _ in range(10):  # the UPDATE and the HTTP request race on two connections
        if user is not None:
            user.close()
        host, port = t.http.rsplit(":", 1)
        user = socket.create_connection((host, int(port)), timeout=5)
        user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a user that reads nothing
        user.sendall(f"GET {svc} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        opened = next((f for f in _tunnel_frames(p, 0.5) if f[1] == 1), None)
        if opened is not None:
            break
    assert user is not None
    if opened is None:
        user.close()
        raise AssertionError(f"the target never opened a stream to our instance of {svc}")
    sid = opened[0]
    assert sid % 2 == 0, f"the responder opened odd stream {sid}"
    p.send_msg(struct.pack(">IBBIII", sid, 5, 0, 0, 0, 1000), ctype=TUNNEL)
    return sid, user


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"


def _keepalive_now(p: Peer) -> None:
    p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})


@case("tunnel-flow-control-overrun", "tunnel.md#flow-control (RESET 8)")
def _flow_control(t: Target) -> None:
    """We serve a route of our own and answer a request with DATA far beyond the window.

    The user never reads, so the target cannot pass our bytes on and must stop crediting:
    it has to reset the stream with flow-control instead of buffering without bound.
    """
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = t.session()
    user = None
    try:
        sid, user = _stream_to_us(t, p, "fc")
        p.send_msg(struct.pack(">IBB", sid, 2, 0) + _HEAD, ctype=TUNNEL)
        chunk = struct.pack(">IBB", sid, 2, 0) + b"x" * DATA_MAX
        sent = len(_HEAD)
        last_keepalive = time.monotonic()
        while sent < FLOW_CONTROL_LIMIT:
            for _ in range(16):
                p.send_msg(chunk, ctype=TUNNEL)  # a target that stops reading its session blocks us: OSError
            sent += 16 * DATA_MAX
            for fsid, ftype, _, body in _tunnel_frames(p, 0.001):
                if fsid == sid and ftype == 4:
                    code, delivered = struct.unpack(">HB", body[:3])
                    assert code == 8, f"expected RESET flow-control (8), got {code} after {sent} bytes"
                    assert sent > INITIAL_WINDOW, f"reset after {sent} bytes, within the initial window"
                    return
            if time.monotonic() - last_keepalive > 0.5:
                _keepalive_now(p)
                last_keepalive = time.monotonic()
        raise AssertionError(f"{sent} bytes sent beyond any credit without a RESET flow-control")
    finally:
        if user is not None:
            user.close()
        p.close()


def _within_credit(t: Target, caps: list[str] | None, window: int, data_max: int) -> None:
    """Send DATA up to exactly the credit the target gave (its initial window plus every
    WINDOW it sent), all at once: a target that enforces a smaller window than the session
    agreed resets the stream, which is the failure this checks for."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = t.session(caps=caps) if caps is not None else t.session()
    user = None
    try:
        if caps is not None and "tunnel-large-data" not in p.target_caps:
            raise Skipped("the target does not offer tunnel-large-data")
        sid, user = _stream_to_us(t, p, "win")
        credit, sent = window, 0

        def take(frames: list[tuple[int, int, int, bytes]]) -> None:
            nonlocal credit
            for fsid, ftype, _, body in frames:
                if fsid != sid:
                    continue
                if ftype == 3:
                    credit += int.from_bytes(body[:4], "big")
                elif ftype == 4:
                    code = struct.unpack(">H", body[:2])[0]
                    raise AssertionError(f"RESET {code} after {sent} bytes, within the {credit} bytes of credit"
                                         f" (initial window {window})")

        payload = _HEAD
        while True:
            n = min(data_max, credit - sent)
            if n <= 0:
                break
            piece, payload = (payload[:n], payload[n:]) if payload else (b"x" * n, b"")
            p.send_msg(struct.pack(">IBB", sid, 2, 0) + piece, ctype=TUNNEL)
            sent += len(piece)
            take(_tunnel_frames(p, 0.0005))
        assert sent >= window, f"only {sent} bytes sent"
        _keepalive_now(p)
        take(_tunnel_frames(p, 1.0))  # no RESET for what it allowed
    finally:
        if user is not None:
            user.close()
        p.close()


@case("tunnel-window", "tunnel.md#flow-control")
def _window(t: Target) -> None:
    """A session without tunnel-large-data: 262144 bytes of DATA in flight are allowed."""
    _within_credit(t, None, INITIAL_WINDOW, DATA_MAX)


@case("tunnel-window-large", "tunnel.md#flow-control")
def _window_large(t: Target) -> None:
    """With tunnel-large-data agreed: 1048576 bytes of DATA in flight are allowed."""
    _within_credit(t, LARGE_CAPS, INITIAL_WINDOW_LARGE, DATA_MAX_LARGE)


def _tw_session(t: Target, tw: list[int]) -> Peer:
    """A session offering `tunnel-window` with ``tw``; Skipped if the target does not offer it."""
    p = t.session(caps=LARGE_CAPS, tw=tw)
    if p.target_tw is None:
        p.close()
        raise Skipped("the target does not offer tunnel-window")
    sw, cw, ms = p.target_tw
    assert 16384 <= sw <= 2**31 - 1 and 16384 <= cw <= 2**31 - 1 and 1 <= ms <= 2**20, f"bad tw {p.target_tw}"
    return p


def _users_to_us(t: Target, p: Peer, n: int, body: int) -> tuple[list[socket.socket], dict[int, int]]:
    """Advertise an instance of ours and have ``n`` users each POST ``body`` bytes to it through the
    target; we never credit anything. Returns the users and the DATA bytes per stream seen in ~1.5 s."""
    svc = f"/interop-tw-{random_id()}"
    p.send_msg({"t": UPDATE, "adv": [new_route(svc, "tw", t.my_id)], "wd": []})
    host, port = t.http.rsplit(":", 1)
    users: list[socket.socket] = []
    data: dict[int, int] = {}
    deadline = time.monotonic() + 5
    while not data and time.monotonic() < deadline:  # the UPDATE and the first request race
        for u in users:
            u.close()
        users = [socket.create_connection((host, int(port)), timeout=5) for _ in range(n)]
        for u in users:
            u.sendall(f"POST {svc} HTTP/1.1\r\nHost: x\r\nContent-Length: {body}\r\n"
                      f"CPN-Timeout: 5s\r\n\r\n".encode() + b"b" * body)
        for sid, ftype, _, payload in _tunnel_frames(p, 1.5):
            if ftype == 1:
                data.setdefault(sid, 0)
            elif ftype == 2:
                data[sid] = data.get(sid, 0) + len(payload)
    return users, data


@case("tunnel-connection-window-honoured", "tunnel.md#flow-control")
def _conn_window_honoured(t: Target) -> None:
    """We grant 16384 bytes a stream and 32768 on the connection: four uploads of 20000 bytes each
    through the target must stop there until we credit (we never do)."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = _tw_session(t, [16384, 32768, 64])
    users: list[socket.socket] = []
    try:
        users, data = _users_to_us(t, p, 4, 20000)
        assert data, "the target opened no stream to our instance"
        assert max(data.values()) <= 16384, f"a stream carried {max(data.values())} bytes, our stream window is 16384"
        assert sum(data.values()) <= 32768, f"{sum(data.values())} bytes on the connection, our window is 32768"
    finally:
        for u in users:
            u.close()
        p.close()


@case("tunnel-client-address", "tunnel.md#client-address")
def _client_address(t: Target) -> None:
    """A user that claims another address (X-Forwarded-For, Forwarded, CPN-Client) asks the target for
    our instance: the tunnelled head carries the address the user connected from, once, in
    CPN-Client, the target's id in CPN-Ingress, and none of the user's claims."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = t.session()
    svc = f"/interop-fwd-{random_id()}"
    p.send_msg({"t": UPDATE, "adv": [new_route(svc, "fwd", t.my_id)], "wd": []})
    host, port = t.http.rsplit(":", 1)
    head, sid, user = b"", None, None
    try:
        deadline = time.monotonic() + 5
        while sid is None and time.monotonic() < deadline:  # the UPDATE and the request race
            if user is not None:
                user.close()
            user = socket.create_connection((host, int(port)), timeout=5)
            user.sendall(f"GET {svc}/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
                         f"Forwarded: for=6.6.6.6\r\nCPN-Client: 6.6.6.6\r\nCPN-Ingress: evil\r\n\r\n".encode())
            for fsid, ftype, _, payload in _tunnel_frames(p, 1.0):
                if ftype == 1 and sid is None:
                    sid = fsid
                elif ftype == 2 and fsid == sid:
                    head += payload
        assert sid is not None and user is not None, "the target opened no stream to our instance"
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        got = {n: [v for m, v in headers if m == n] for n in ("cpn-client", "cpn-ingress", "x-forwarded-for", "forwarded")}
        assert got["cpn-client"] == [user.getsockname()[0]], f"CPN-Client {got['cpn-client']}, the user is {user.getsockname()[0]}"
        assert got["cpn-ingress"] == [p.target_id], f"CPN-Ingress {got['cpn-ingress']}, the target is {p.target_id}"
        assert not got["x-forwarded-for"] and not got["forwarded"], f"the user's claims travelled: {got}"
        p.send_msg(struct.pack(">IBBHB", sid, 4, 0, 9, 1) + b"interop done", ctype=TUNNEL)  # RESET cancel
    finally:
        if user is not None:
            user.close()
        p.close()


@case("tunnel-stream-limit-honoured", "tunnel.md#streams")
def _stream_limit_honoured(t: Target) -> None:
    """We keep at most 2 streams open: the target must not open a third while two are."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = _tw_session(t, [65536, 1 << 20, 2])
    users: list[socket.socket] = []
    try:
        users, data = _users_to_us(t, p, 4, 10)
        assert 1 <= len(data) <= 2, f"the target opened {len(data)} streams to us, our limit is 2"
    finally:
        for u in users:
            u.close()
        p.close()


@case("tunnel-stream-limit-enforced", "tunnel.md#streams (RESET 10)")
def _stream_limit_enforced(t: Target) -> None:
    """Open one stream more than the target's announced limit (each relayed, so each stays open):
    the last is answered RESET too-many-streams, delivered 0."""
    from .wire import label

    route = _transit_route(t)
    p = _tw_session(t, [65536, 1 << 20, 64])
    try:
        limit = p.target_tw[2]  # type: ignore[index]
        if limit > 4096:
            raise Skipped(f"the target allows {limit} streams: too many to open here")
        svc, origin, inst = route
        ext = struct.pack(">BBBBIII16s", 1, 1, 8, 1, label(svc), 0xFFFFFFFF, 0xFFFFFFFF, os.urandom(16))
        ext += bytes([len(origin)]) + origin.encode() + bytes([len(inst)]) + inst.encode()
        reset: dict[int, int] = {}
        for i in range(limit + 1):
            p.send_msg(struct.pack(">IBB", 2 * i + 1, 1, 0) + ext, ctype=TUNNEL)
            if i % 64 == 63:
                reset.update((sid, int.from_bytes(b[:2], "big")) for sid, ft, _, b in _tunnel_frames(p, 0.001) if ft == 4)
        last = 2 * limit + 1
        deadline = time.monotonic() + 5
        while last not in reset and time.monotonic() < deadline:
            reset.update((sid, int.from_bytes(b[:2], "big")) for sid, ft, _, b in _tunnel_frames(p, 0.2) if ft == 4)
        assert reset.get(last) == 10, f"stream {last} beyond the limit of {limit}: {reset.get(last)}"
        early = {sid: code for sid, code in reset.items() if sid != last and code == 10}
        assert not early, f"streams within the limit refused: {sorted(early)[:5]}"
    finally:
        p.close()


# ---------------------------------------------------------------- HTTP contract (with --http)


def _http(t: Target, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{t.http}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _json_error(status: int, headers: dict[str, str], body: bytes, want: int) -> dict[str, Any]:
    assert status == want, f"expected {want}, got {status}: {body[:200]!r}"
    assert "cpn-instance" not in headers and "cpn-origin" not in headers, "gateway-made errors carry no CPN-Instance"
    obj = json.loads(body)
    assert set(obj) == {"error", "detail"} and obj["error"] and obj["detail"], obj
    return obj


@case("http-404", "selection.md#matching", )
def _h404(t: Target) -> None:
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    _json_error(*_http(t, "GET", "/interop-" + random_id()), 404)


@case("http-400-bad-header", "selection.md#inputs")
def _h400(t: Target) -> None:
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    _json_error(*_http(t, "GET", "/interop", {"CPN-Max-Latency": "soon"}), 400)


@case("http-503-or-404-impossible-constraint", "selection.md#choice")
def _h503(t: Target) -> None:
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    status, headers, body = _http(t, "GET", "/", {"CPN-Max-Price": "0", "CPN-Max-Latency": "1us"})
    assert status in (503, 404), status  # 404 when "/" matches no service
    _json_error(status, headers, body, status)


def _poll_http(t: Target, path: str, until: Callable[[int], bool], limit: float = 3.0) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` until ``until(status)`` or ``limit`` s pass (the target applies an UPDATE when it reads it)."""
    deadline = time.monotonic() + limit
    while True:
        answer = _http(t, "GET", path)
        if until(answer[0]) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


@case("http-503-every-instance-down", "routing.md#instances-that-are-down, selection.md#matching")
def _all_down(t: Target) -> None:
    """A service whose only instance its origin marks down stays known: 503 no_instance, not 404."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    svc = "/interop-down-" + random_id()
    p = t.session(caps=["route-refresh", "tunnel", "instance-down"])
    try:
        p.send_msg({"t": UPDATE, "adv": [new_route(svc, "i1", t.my_id, down=True)], "wd": []})
        obj = _json_error(*_poll_http(t, svc, lambda s: s != 404), 503)
        assert obj["error"] == "no_instance", obj
        p.send_msg({"t": UPDATE, "adv": [], "wd": [[svc, t.my_id, "i1"]]})
        obj = _json_error(*_poll_http(t, svc, lambda s: s == 404), 404)
        assert obj["error"] == "no_such_service", obj
    finally:
        p.close()


GATEWAY_TIME_CAPS = ["route-refresh", "tunnel", "gateway-time"]


def _refreshed_routes(p: Peer, quiet: float = 0.5, limit: float = 3.0) -> list[dict[str, Any]]:
    """Every Route the target sends on ``p`` after a ROUTE-REFRESH, until ``quiet`` s pass without one."""
    p.send_msg({"t": ROUTE_REFRESH})
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit
    last = time.monotonic()
    try:
        while time.monotonic() < min(deadline, last + quiet):
            ctype, msg = p.recv(max(0.01, min(deadline, last + quiet) - time.monotonic()))
            if ctype != TUNNEL and msg.get("t") == UPDATE and msg["adv"]:
                out += msg["adv"]
                last = time.monotonic()
    except (socket.timeout, TimeoutError):
        pass
    return out


@case("route-gateway-time", "messages.md#route, routing.md#gateway-time")
def _gateway_time(t: Target) -> None:
    """With gateway-time on both OPENs every Route carries `gw` (µs, 0..2^32-1); without it, none does."""
    p = t.session(caps=GATEWAY_TIME_CAPS)
    try:
        if "gateway-time" not in p.target_caps:
            raise Skipped("the target does not offer gateway-time")
        routes = _refreshed_routes(p)
    finally:
        p.close()
    if not routes:
        raise Skipped("the target advertises no route")
    for r in routes:
        gw = r.get("gw")
        assert type(gw) is int and 0 <= gw <= 0xFFFFFFFF, r
    p = t.session()
    try:
        assert all("gw" not in r for r in _refreshed_routes(p)), "gw sent to a peer without gateway-time"
    finally:
        p.close()


@case("http-503-gateways-over-the-bound", "selection.md#estimate, routing.md#gateway-time")
def _gateways_over_bound(t: Target) -> None:
    """A route whose gateways alone take 2 s cannot serve a 1 s bound: 503 no_instance at once (the bound is
    end to end: selection.md), and the session stays up (a Route with `gw` is valid under gateway-time)."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    svc = "/interop-gw-" + random_id()
    p = t.session(caps=GATEWAY_TIME_CAPS)
    try:
        if "gateway-time" not in p.target_caps:
            raise Skipped("the target does not offer gateway-time")
        p.send_msg({"t": UPDATE, "adv": [new_route(svc, "i1", t.my_id, gw=2_000_000)], "wd": []})
        deadline = time.monotonic() + 3.0
        while True:  # the target applies the UPDATE when it reads it
            status, headers, body = _http(t, "GET", svc, {"CPN-Max-Latency": "1s"})
            if status != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # Refused by the estimate, at once: a gateway that tried us would wait for an answer we never
        # give (and this case would fail on its HTTP timeout).
        obj = _json_error(status, headers, body, 503)
        assert obj["error"] == "no_instance", obj
        _refreshed_routes(p, quiet=0.2)  # still up: Closed here if the target ended the session
        p.send_msg({"t": UPDATE, "adv": [], "wd": [[svc, t.my_id, "i1"]]})
    finally:
        p.close()


def advertised_routes(t: Target, quiet: float = 0.5, limit: float = 3.0) -> set[tuple[str, str, str]]:
    """(service, origin, instance) of every route the target advertises to us, after a ROUTE-REFRESH.

    Routes learnt from the target's other peers vanish when those sessions go down, so this
    is how a black-box tool sees them (routing.md). Reads until ``quiet`` s pass without an UPDATE.
    """
    p = t.session()
    routes: set[tuple[str, str, str]] = set()
    p.send_msg({"t": ROUTE_REFRESH})
    deadline = time.monotonic() + limit
    last = time.monotonic()
    try:
        while time.monotonic() < min(deadline, last + quiet):
            ctype, msg = p.recv(max(0.01, min(deadline, last + quiet) - time.monotonic()))
            if ctype != TUNNEL and msg.get("t") == UPDATE:
                routes |= {(r["svc"], r["origin"], r["inst"]) for r in msg["adv"]}
                routes -= {tuple(w) for w in msg["wd"]}
                last = time.monotonic()
    except (socket.timeout, TimeoutError):
        pass
    finally:
        p.close()
    return routes


def alive(t: Target, routes: set[tuple[str, str, str]]) -> str | None:
    """None when the target still completes a session, still advertises ``routes`` (so the other
    sessions they came over are up) and answers HTTP (with --http); else why not."""
    try:
        gone = routes - advertised_routes(t)
        if gone:
            return f"routes withdrawn since the start (another session of the target went down?): {sorted(gone)[:5]}"
        if t.http:
            host, port = t.http.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"GET /interop-alive-check HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.settimeout(5)
                answer = s.recv(65536)
            if not answer.startswith(b"HTTP/1.1 404"):
                return f"HTTP ingress answered {answer[:40]!r} to an unknown path"
        return None
    except (Closed, OSError, AssertionError, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"


@case("http-served-carries-cpn-instance", "README: CPN-Instance/CPN-Origin")
def _served(t: Target) -> None:
    """Any service the target advertises, called once: the answer names who served it."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    services = {svc for svc, _, _ in advertised_routes(t)}
    if not services:
        raise Skipped("the target advertises no service")
    status, headers, _ = _http(t, "GET", sorted(services)[0])
    if status == 200:
        assert headers.get("cpn-instance") and headers.get("cpn-origin"), headers
    else:
        assert status in (502, 503, 504), status


# ---------------------------------------------------------------- origin validation

ORIGIN_CAPS = ["route-refresh", "tunnel", "instance-down", "origin-sig"]


@case("vectors-origin", "routing.md#origin-validation")
def _origin_vectors(t: Target) -> None:
    """Our own certificate, origin signature and adjacency bytes against the spec's vectors."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey as Pub

    from .wire import adjacency_message, origin_message

    v = json.loads((SPEC / "vectors.json").read_text())["origin"]
    pub = lambda b64: Pub.from_public_bytes(base64.b64decode(b64))  # noqa: E731
    cert = msgpack.unpackb(bytes.fromhex(v["certificate"]["hex"]), raw=False)
    body = b"cpn/1 certificate\x00" + msgpack.packb([cert["v"], cert["id"], cert["key"], cert["svc"], cert["exp"],
                                                      cert["iss"]], use_bin_type=True)
    assert body.hex() == v["certificate"]["signed_hex"]
    pub(v["domain_public_key"]).verify(cert["sig"], body)
    route = {k: bytes.fromhex(x["bin"]) if isinstance(x, dict) else x for k, x in v["origin_signature"]["route"].items()}
    assert origin_message(route).hex() == v["origin_signature"]["signed_hex"]
    pub(v["gw3_public_key"]).verify(bytes.fromhex(v["origin_signature"]["osig"]), origin_message(route))
    assert adjacency_message("gw3", "gw1").hex() == v["adjacency"]["signed_hex"]
    pub(v["gw3_public_key"]).verify(bytes.fromhex(v["adjacency"]["oadj"]), adjacency_message("gw3", "gw1"))


@case("vectors-sealed", "tunnel.md#sealed-streams")
def _sealed_vectors(t: Target) -> None:
    """Our own key derivation and records against the spec's sealed-stream vectors."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey as XKey, X25519PublicKey as XPub
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    v = json.loads((SPEC / "vectors.json").read_text())["sealed"]
    raw = lambda k: k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # noqa: E731
    static = XKey.from_private_bytes(bytes.fromhex(v["origin_private"]))
    eph = XKey.from_private_bytes(bytes.fromhex(v["eph_private"]))
    xk, e = raw(static), raw(eph)
    lp = lambda s: bytes([len(s.encode())]) + s.encode()  # noqa: E731
    info = b"cpn/1 sealed stream" + e + xk + v["label"].to_bytes(4, "big") + lp(v["origin"]) + lp(v["instance"])
    shared = eph.exchange(XPub.from_public_bytes(xk))
    # The epoch's two streams: one ephemeral key (one exchange), each request id its own keys.
    for w in (v, v["epoch"]):
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=bytes.fromhex(w["request_id"]), info=info).derive(shared)
        assert okm[:32].hex() == w["request_key"] and okm[32:].hex() == w["response_key"]
        for key, plain, sealed in ((okm[:32], v["request"], w["sealed_request"]), (okm[32:], v["response"], w["sealed_response"])):
            ct = ChaCha20Poly1305(key).encrypt(bytes(12), b"\x01" + bytes.fromhex(plain), None)  # counter 0, the last record
            assert (struct.pack(">I", len(ct)) + ct).hex() == sealed


SEALED_CAPS = [*ORIGIN_CAPS, "sealed-streams"]


def _sealed_keys(eph_priv: Any, xk: bytes, rid: bytes, svc_label: int, origin: str, inst: str) -> tuple[bytes, bytes]:
    """(request key, response key) of one sealed stream (tunnel.md, "Sealed streams")."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey as XPub
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    e = eph_priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    lp = lambda s: bytes([len(s.encode())]) + s.encode()  # noqa: E731
    info = b"cpn/1 sealed stream" + e + xk + svc_label.to_bytes(4, "big") + lp(origin) + lp(inst)
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=rid, info=info).derive(eph_priv.exchange(XPub.from_public_bytes(xk)))
    return okm[:32], okm[32:]


def _sealed_stream(p: Peer, sid: int, ext: bytes, record: bytes) -> tuple[str, Any]:
    """OPEN ``sid`` with ``ext`` and send ``record`` with END: ("reset", (code, delivered)) or
    ("data", the response's bytes up to its END)."""
    p.send_msg(struct.pack(">IBB", sid, 1, 0) + ext, ctype=TUNNEL)
    p.send_msg(struct.pack(">IBB", sid, 2, 1) + record, ctype=TUNNEL)
    data, deadline = b"", time.monotonic() + 10
    while True:
        ctype, payload = p.recv(max(0.01, deadline - time.monotonic()))
        if ctype != TUNNEL or struct.unpack(">I", payload[:4])[0] != sid:
            continue
        ftype, flags = payload[4], payload[5]
        if ftype == 4:
            return "reset", struct.unpack(">HB", payload[6:9])
        if ftype == 2:
            data += payload[6:]
            if flags & 1:
                return "data", data


@case("sealed-epoch-and-replay", "tunnel.md#sealed-streams")
def _sealed_epoch(t: Target) -> None:
    """Two sealed streams under one ephemeral key (an epoch), each with its own request id: both are
    served and their answers open with their own keys; the first replayed (same key, same request id)
    is refused, RESET bad-request, delivered 0."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey as XKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from .wire import label

    p = t.session(caps=SEALED_CAPS)
    try:
        if "sealed-streams" not in p.target_caps or "origin-sig" not in p.target_caps:
            raise Skipped("the target does not offer sealed-streams and origin-sig")
        keyed = [r for r in _refreshed_routes(p) if r.get("xk") and r["origin"] != t.my_id and not r.get("down")]
        if not keyed:
            raise Skipped("the target advertises no route with a sealing key")
        r = sorted(keyed, key=lambda r: (r["svc"], r["origin"], r["inst"]))[0]
        svc, origin, inst, xk = r["svc"], r["origin"], r["inst"], bytes(r["xk"])
        eph = XKey.generate()
        pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        request = f"GET {svc} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        sent = []
        for sid in (1, 3):
            rid = os.urandom(16)
            ext = struct.pack(">BBBBIII16s", 1, 1, 8, 0x01 | 0x02, label(svc), 0xFFFFFFFF, 0xFFFFFFFF, rid)
            ext += bytes([len(origin)]) + origin.encode() + bytes([len(inst)]) + inst.encode() + pub
            req_key, resp_key = _sealed_keys(eph, xk, rid, label(svc), origin, inst)
            ct = ChaCha20Poly1305(req_key).encrypt(bytes(12), b"\x01" + request, None)  # counter 0, the last record
            record = struct.pack(">I", len(ct)) + ct
            kind, got = _sealed_stream(p, sid, ext, record)
            assert kind == "data", f"stream {sid} of the epoch was not served: RESET {got}"
            n = struct.unpack(">I", got[:4])[0]
            plain = ChaCha20Poly1305(resp_key).decrypt(bytes(12), got[4:4 + n], None)  # its own key opens it
            assert plain[1:].startswith(b"HTTP/1.1 "), plain[:40]
            sent.append((ext, record))
        assert _sealed_stream(p, 5, *sent[0]) == ("reset", (7, 0)), "a replayed (eph, request id) was not refused"
    finally:
        p.close()


@case("origin-sig-routes-signed", "messages.md#route, routing.md#origin-validation")
def _origin_signed(t: Target) -> None:
    """Under origin-sig the target's own routes carry its signature and its adjacency token naming us;
    without origin-sig no route carries osig, oadj or cert."""
    from .wire import adjacency_message, origin_message

    p = t.session(caps=ORIGIN_CAPS)
    try:
        if "origin-sig" not in p.target_caps:
            raise Skipped("the target does not offer origin-sig")
        routes = _refreshed_routes(p)
    finally:
        p.close()
    if not routes:
        raise Skipped("the target advertises no route")
    for r in routes:
        assert ("osig" in r) == ("oadj" in r), r
        if r["path"] == [p.target_id]:  # its own: we know its key (routes of others' we cannot check)
            t.pub.verify(r["osig"], origin_message(r))
            t.pub.verify(r["oadj"], adjacency_message(p.target_id, t.my_id))
        elif "osig" in r:
            assert type(r["osig"]) is bytes and len(r["osig"]) == 64 and len(r["oadj"]) == 64, r
    p = t.session()
    try:
        assert all(not {"osig", "oadj", "cert"} & set(r) for r in _refreshed_routes(p)), "signatures sent without origin-sig"
    finally:
        p.close()


@case("origin-sig-invalid-dropped", "routing.md#origin-validation")
def _origin_invalid(t: Target) -> None:
    """Routes of ours whose signature fails, or that come unsigned once we sign, are dropped (404), the session
    kept; a correctly signed one is taken (its instance down: 503 no_instance, at once)."""
    if not t.http:
        raise Skipped(NEEDS_HTTP)
    from .wire import sign_route

    p = t.session(caps=ORIGIN_CAPS)
    try:
        if "origin-sig" not in p.target_caps:
            raise Skipped("the target does not offer origin-sig")
        tag = random_id()
        forged = dict(sign_route(new_route(f"/interop-forged-{tag}", "i1", t.my_id, down=True), t.key, p.target_id),
                      price=1e12)
        unsigned = new_route(f"/interop-unsigned-{tag}", "i1", t.my_id, down=True)
        good = sign_route(new_route(f"/interop-signed-{tag}", "i1", t.my_id, down=True), t.key, p.target_id)
        p.send_msg({"t": UPDATE, "adv": [forged, unsigned], "wd": []})
        p.send_msg({"t": UPDATE, "adv": [good], "wd": []})
        obj = _json_error(*_poll_http(t, f"/interop-signed-{tag}", lambda s: s != 404), 503)
        assert obj["error"] == "no_instance", obj
        for svc in (f"/interop-forged-{tag}", f"/interop-unsigned-{tag}"):
            assert _json_error(*_http(t, "GET", svc), 404)["error"] == "no_such_service"
        _refreshed_routes(p, quiet=0.2)  # still up: Closed here if the target ended the session
        p.send_msg({"t": UPDATE, "adv": [], "wd": [[f"/interop-signed-{tag}", t.my_id, "i1"]]})
    finally:
        p.close()


def run_case(t: Target, name: str, section: str, fn: Case) -> dict[str, Any]:
    start = time.monotonic()
    skipped = False
    try:
        fn(t)
        ok, detail = True, ""
    except Skipped as exc:
        ok, detail, skipped = True, f"skipped: {exc}", True
    except (AssertionError, Closed, OSError, ValueError, KeyError, msgpack.ExtraData) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return {"case": name, "section": section, "passed": ok, "skipped": skipped, "detail": detail,
            "seconds": round(time.monotonic() - start, 3)}


@case("tunnel-http2-trailers", "tunnel.md#http2-and-grpc-requests-in-the-stream")
def _http2_trailers(t: Target) -> None:
    """An HTTP/2 user's gRPC-style call to our instance: the target writes it into the stream chunked
    with ``TE: trailers``, and our response's trailers reach the user as HTTP/2 trailers."""
    import h2.config
    import h2.connection
    import h2.events

    if not t.http:
        raise Skipped(NEEDS_HTTP)
    p = t.session()
    svc = f"/interop-h2-{random_id()}"
    p.send_msg({"t": UPDATE, "adv": [new_route(svc, "h2", t.my_id)], "wd": []})
    host, port = t.http.rsplit(":", 1)
    sock: socket.socket | None = None
    try:
        opened = None
        for _ in range(10):  # the UPDATE and the request race on two connections
            if sock is not None:
                sock.close()
            sock = socket.create_connection((host, int(port)), timeout=5)
            user = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            user.initiate_connection()
            user.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
                                  (b":path", f"{svc}/Say".encode()), (b"content-type", b"application/grpc"),
                                  (b"te", b"trailers")])
            user.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
            sock.sendall(user.data_to_send())
            frames = _tunnel_frames(p, 0.5)
            opened = next((f for f in frames if f[1] == 1), None)
            if opened is not None:
                break
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in user.receive_data(_recv_some(sock))):
                raise Skipped("the target does not serve HTTP/2 on its HTTP port")
        assert opened is not None, f"the target never opened a stream to our instance of {svc}"
        sid = opened[0]
        request = b"".join(f[3] for f in frames if f[0] == sid and f[1] == 2)
        while not any(f[0] == sid and f[1] == 2 and f[2] & 1 for f in frames):
            more = _tunnel_frames(p, 1.0)
            assert more, "the tunnelled request never ended"
            frames += more
            request += b"".join(f[3] for f in more if f[0] == sid and f[1] == 2)
        head, _, body = request.partition(b"\r\n\r\n")
        lines = [line.lower() for line in head.split(b"\r\n")]
        assert lines[0] == f"post {svc}/say http/1.1".encode(), lines[0]
        assert b"transfer-encoding: chunked" in lines and b"te: trailers" in lines, lines
        assert _dechunk(body) == b"\x00\x00\x00\x00\x02hi", body
        p.send_msg(struct.pack(">IBBIII", sid, 5, 0, 0, 0, 1000), ctype=TUNNEL)
        response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"7\r\n\x00\x00\x00\x00\x02ok\r\n0\r\ngrpc-status: 0\r\nx-custom: yes\r\n\r\n")
        p.send_msg(struct.pack(">IBB", sid, 2, 1) + response, ctype=TUNNEL)
        events: list[Any] = []
        deadline = time.monotonic() + 5
        while not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in events):
            assert time.monotonic() < deadline, f"no end of the HTTP/2 response: {events}"
            events += user.receive_data(_recv_some(sock))
            sock.sendall(user.data_to_send())
        trailers = next((dict(e.headers) for e in events if isinstance(e, h2.events.TrailersReceived)), None)
        assert trailers == {b"grpc-status": b"0", b"x-custom": b"yes"}, events
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        assert data == b"\x00\x00\x00\x00\x02ok", data
    finally:
        if sock is not None:
            sock.close()
        p.close()


def _recv_some(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise AssertionError("the target closed the HTTP/2 connection")
    return data


def _dechunk(body: bytes) -> bytes:
    """A whole chunked body's content (chunk boundaries carry no meaning); AssertionError if malformed."""
    out = b""
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        assert sep, "chunked body cut short"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert body.endswith(b"\r\n"), "chunked body without its final CRLF"
            return out
        out, body = out + body[:size], body[size + 2:]
