"""The session FSM over a fake link, with time as an input (no sockets, no sleeps)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from cpnd.crypto import RecordLayer, Role
from cpnd.errors import CeaseSub, Code, FsmSub, HandshakeSub, OpenSub, RecordSub
from cpnd.names import service_label
from cpnd.session import (
    TRANSITIONS,
    Authenticated,
    Backoff,
    CloseReason,
    Closed,
    Established,
    RttMeasured,
    Session,
    SessionConfig,
    State,
    UpdateReceived,
    collision_keeps_new,
)
from cpnd.wire import ContentType, Open, RouteAdv, Update, encode_message

ROOT = Path(__file__).resolve().parent.parent


class Link:
    """Two sessions joined by a lossless link with a fixed one-way delay."""

    def __init__(self, keys, *, delay: float = 0.001, cfg_a: SessionConfig = SessionConfig(), cfg_b: SessionConfig = SessionConfig()) -> None:
        self.now = 100.0
        self.delay = delay
        self.a = Session(Role.INITIATOR, "a", keys["a"], {"b": keys["b"].public_key()}, self.now, expected_peer="b", config=cfg_a)
        self.b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["a"].public_key()}, self.now, config=cfg_b)
        self.events: dict[str, list] = {"a": [], "b": []}

    def pump(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            da, db = self.a.data_to_send(), self.b.data_to_send()
            if not da and not db:
                break
            self.now += self.delay
            if da:
                self.b.receive_data(da, self.now)
            if db:
                self.a.receive_data(db, self.now)
        for name, s in (("a", self.a), ("b", self.b)):
            while (e := s.next_event()) is not None:
                self.events[name].append(e)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move time forward, firing timers as they fall due and delivering bytes."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for s in (self.a, self.b):
                # A timer, or the inbound pace letting held-back UPDATEs through (resume_at).
                due = [t for t in (s.get_timer(), s.resume_at()) if t is not None]
                if due and min(due) <= self.now:
                    s.handle_timer(self.now)
            self.pump()


def test_established_and_rtt_measured(keys) -> None:
    link = Link(keys, delay=0.002)
    link.pump()
    assert link.a.state is link.b.state is State.ESTABLISHED
    assert any(isinstance(e, Established) for e in link.events["a"])
    assert isinstance(link.events["a"][0], Authenticated)
    rtts = [e for e in link.events["a"] if isinstance(e, RttMeasured)]
    assert rtts and rtts[0].sample == pytest.approx(0.004, abs=1e-5)


def test_keepalives_keep_session_and_refine_rtt(keys) -> None:
    link = Link(keys, delay=0.003)
    link.pump()
    link.advance(10)
    assert link.a.state is State.ESTABLISHED
    assert link.a.srtt == pytest.approx(0.006, abs=0.0002)
    assert link.a.min_rtt == pytest.approx(0.006, abs=0.0002)


def test_silent_peer_hits_hold_timer(keys) -> None:
    link = Link(keys)
    link.pump()
    t0 = link.now
    while link.a.state is not State.CLOSED:  # b goes silent: never fire its timers, drop its bytes
        link.now = link.a.get_timer()
        link.a.handle_timer(link.now)
        link.a.data_to_send()
    assert link.now - t0 == pytest.approx(3.0, abs=0.01)
    assert link.a.closed.reason is CloseReason.HOLD_EXPIRED


def test_negotiated_hold_is_the_lower(keys) -> None:
    link = Link(keys, cfg_a=SessionConfig(hold_ms=900), cfg_b=SessionConfig(hold_ms=6000))
    link.pump()
    assert link.a.hold_ms == link.b.hold_ms == 900


def test_update_delivered(keys) -> None:
    link = Link(keys)
    link.pump()
    r = RouteAdv("/yolo", "s1", "a", 1, service_label("/yolo"), ("a",), 0, 50.0, 0.0, 2.0, 1000)
    link.a.send_update([r], [])
    link.pump()
    assert UpdateReceived(Update((r,), ())) in link.events["b"]


def test_tunnel_records_keep_their_order_and_go_straight_to_tunnel_in(keys) -> None:
    """tunnel_record hands back what was queued before its record first (records must arrive in the order
    they were sealed); with tunnel_direct, a read's tunnel records go to tunnel_in, an UPDATE among them to
    the FSM."""
    link = Link(keys)
    link.pump()
    assert link.a.tunnel_enabled
    link.b.tunnel_direct = True
    r = RouteAdv("/yolo", "s1", "a", 1, service_label("/yolo"), ("a",), 0, 50.0, 0.0, 2.0, 1000)
    link.a.send_update([r], [])  # sealed first, not yet taken
    out = link.a.tunnel_record(b"frame 1") + link.a.tunnel_record(b"frame 2")
    assert not link.a.has_data_to_send()
    link.b.receive_data(out[:7], link.now)  # a read that ends inside a record
    link.b.receive_data(out[7:], link.now)
    assert link.b.state is State.ESTABLISHED and link.b.tunnel_in == [b"frame 1", b"frame 2"]
    link.pump()
    assert UpdateReceived(Update((r,), ())) in link.events["b"]


def test_notification_closes_both(keys) -> None:
    link = Link(keys)
    link.pump()
    link.a.close(Code.CEASE, CeaseSub.ADMIN_SHUTDOWN, "bye")
    link.pump()
    assert link.b.closed == Closed(CloseReason.PEER_NOTIFICATION, Code.CEASE, CeaseSub.ADMIN_SHUTDOWN, "bye")


def _inject(link: Link, session: Session, payload: bytes, ctype: int = ContentType.CONTROL) -> None:
    """Make ``link.a`` send a raw (validly encrypted) record to b."""
    session._out += session._records.seal(ctype, payload)  # noqa: SLF001 - test reaches into the record layer
    link.pump()


def test_open_in_established_is_fsm_error(keys) -> None:
    link = Link(keys)
    link.pump()
    _inject(link, link.a, encode_message(Open("a", 3000, (), 1)))
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.FSM, FsmSub.UNEXPECTED_IN_ESTABLISHED)
    assert link.a.closed.reason is CloseReason.PEER_NOTIFICATION  # and a was told


def test_unknown_content_type(keys) -> None:
    link = Link(keys)
    link.pump()
    _inject(link, link.a, b"\x00", ctype=9)
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.RECORD, RecordSub.BAD_CONTENT_TYPE)


@pytest.mark.parametrize(("open_msg", "sub"), [
    (Open("x", 3000, (), 1), OpenSub.BAD_PEER_ID),
    (Open("a", 10, (), 1), OpenSub.BAD_HOLD_TIME),
])
def test_bad_open(keys, open_msg, sub) -> None:
    link = Link(keys)
    link.b.receive_data(link.a.data_to_send(), link.now)  # HELLO
    link.a.receive_data(link.b.data_to_send(), link.now)  # HELLO-ACK; a answers FINISH + OPEN
    out = link.a.data_to_send()
    finish_end = int.from_bytes(out[:4], "big") + 4
    link.b.receive_data(out[:finish_end], link.now)  # deliver FINISH, drop a's real OPEN
    assert link.b.state is State.OPEN_SENT
    forged = RecordLayer(*link.a._hs.traffic_keys()).seal(ContentType.CONTROL, encode_message(open_msg))  # noqa: SLF001
    link.b.receive_data(forged, link.now)
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.OPEN, sub)


def test_bad_finish_is_reported_to_initiator(keys) -> None:
    """The responder refuses a bad FINISH in plaintext; the initiator still learns why."""
    a = Session(Role.INITIATOR, "a", keys["a"], {"b": keys["b"].public_key()}, 0.0, expected_peer="b")
    b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["c"].public_key()}, 0.0)
    b.receive_data(a.data_to_send(), 0.0)
    a.receive_data(b.data_to_send(), 0.0)
    b.receive_data(a.data_to_send(), 0.0)
    assert b.closed.subcode == HandshakeSub.BAD_SIGNATURE
    a.receive_data(b.data_to_send(), 0.0)
    assert a.closed.reason is CloseReason.PEER_NOTIFICATION
    assert (a.closed.code, a.closed.subcode) == (Code.HANDSHAKE, HandshakeSub.BAD_SIGNATURE)


def test_handshake_timeout(keys) -> None:
    b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["a"].public_key()}, 0.0, config=SessionConfig(handshake_timeout_s=2))
    assert b.get_timer() == 2
    b.handle_timer(2.0)
    assert (b.closed.code, b.closed.subcode) == (Code.HANDSHAKE, HandshakeSub.TIMEOUT)
    assert b.data_to_send()  # the plaintext refusal


def test_garbage_before_handshake(keys) -> None:
    b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["a"].public_key()}, 0.0)
    b.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    assert b.state is State.CLOSED and b.closed.code in (Code.MESSAGE, Code.HANDSHAKE)


def test_eof_closes(keys) -> None:
    link = Link(keys)
    link.pump()
    link.a.receive_data(b"", link.now)
    assert link.a.closed.reason is CloseReason.CONNECTION_LOST


def test_fsm_table_matches_spec() -> None:
    """protocol-spec/session.md prints exactly TRANSITIONS."""
    text = (ROOT / "protocol-spec" / "session.md").read_text()
    rows = set()
    for line in text.splitlines():
        m = re.fullmatch(r"\|\s*`([a-z-]+)`\s*\|\s*`([A-Za-z_-]+)`\s*\|\s*`([a-z_]+)`\s*\|\s*`([a-z-]+)`\s*\|", line.strip())
        if m:
            rows.add(m.groups())
    code = {(s.value, i.value, a, n.value) for s, row in TRANSITIONS.items() for i, (a, n) in row.items()}
    assert rows == code


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(base=0.25, cap=4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    for i, d in enumerate(delays):
        full = min(4.0, 0.25 * 2**i)
        assert full / 2 <= d <= full
    b.reset()
    assert b.next_delay() <= 0.25


@pytest.mark.parametrize(("local", "peer", "established", "old_local", "new_local", "keep_new"), [
    ("a", "b", True, True, False, False),     # one each way: the established one wins
    ("a", "b", True, False, True, False),
    ("a", "b", False, True, False, True),     # b > a: keep b's (the new incoming) connection
    ("a", "b", False, False, True, False),
    ("b", "a", False, False, True, True),
    ("b", "a", False, True, False, False),
    ("a", "b", True, False, False, True),     # b dialled again: it gave the old one up, established or not
    ("a", "b", False, False, False, True),
    ("b", "a", True, False, False, True),
    ("a", "b", True, True, True, True),       # (we never dial twice; the same rule from the other side)
])
def test_collision_rule(local, peer, established, old_local, new_local, keep_new) -> None:
    assert collision_keeps_new(local, peer, established, old_local, new_local) is keep_new


def test_both_sides_agree_on_collision() -> None:
    # Each side sees the other's connection as "new"; both must keep the same TCP connection.
    for x, y in (("gw1", "gw2"), ("z", "a")):
        keep_x_view = collision_keeps_new(x, y, False, False, new_initiated_locally=True)   # new = x-initiated
        keep_y_view = collision_keeps_new(y, x, False, True, new_initiated_locally=False)  # same conn, seen by y
        assert keep_x_view == keep_y_view
    # A peer that dials again while the other end still holds its old connection: both keep the new one
    # (the dialler has given the old one up; if it still holds it, it is told 6/7 on it).
    assert collision_keeps_new("a", "b", True, False, False) and collision_keeps_new("b", "a", True, True, True)


def test_cores_do_not_import_trio() -> None:
    import ast

    for mod in ("wire", "crypto", "session", "rib", "names", "errors", "heads", "planner", "selection", "load", "tunnel",
                "grpcmap", "preface", "origin", "seal", "policy"):
        tree = ast.parse((ROOT / "cpnd" / f"{mod}.py").read_text())
        imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "trio" not in imported and "socket" not in imported, mod
