"""Batch records (tunnel.md, "Batches"): two sessions and their Muxes over a fake link, sans-IO.

The ``Shell`` below does with a session's tunnel records what daemon.Connection does: each frame goes
through ``Session.tunnel_record`` (a frame sent ``soon`` is kept for the next one's record), and the end
of a step releases a kept frame alone. No sockets, no clock but the one passed in.
"""

from __future__ import annotations

import attrs
import pytest

from cpnd.crypto import Role
from cpnd.errors import Code, ProtocolError, RecordSub, TunnelSub
from cpnd.session import DEFAULT_CAPS, CloseReason, Session, SessionConfig, State, TunnelFrame
from cpnd.streams import BufferAccount, Mux, TunnelStream
from cpnd.tunnel import TUNNEL_BATCH_CAP, ExtHeader, QoS, mux_settings
from cpnd.wire import ContentType, TunnelLimits

EXT = ExtHeader(7, "o", "i", b"\0" * 16, QoS.INTERACTIVE, 8, 1_000_000)
LIMITS = TunnelLimits(1 << 20, 1 << 24, 64)
NO_BATCH = SessionConfig(caps=tuple(c for c in DEFAULT_CAPS if c != TUNNEL_BATCH_CAP))
REQUEST = b"GET /x HTTP/1.1\r\nhost: o\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Shell:
    """One gateway's end: its session, its Mux, the bytes it has written and not yet delivered."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.wire = b""
        self.opened: list[TunnelStream] = []
        self.mux: Mux | None = None

    def start_mux(self) -> None:
        s = self.session
        self.mux = Mux(self, s.peer_id, s.role is Role.INITIATOR, self.opened.append,  # type: ignore[arg-type]
                       mux_settings(LIMITS, None, True), BufferAccount())
        s.tunnel_direct = True

    # ---- what a Mux calls (streams.Connection)

    def send_tunnel(self, frame: bytes, *, flush: bool = False, soon: bool = False) -> None:
        self.wire += self.session.tunnel_record(frame, soon)

    async def wait_writable(self) -> None:
        pass

    @property
    def congested(self) -> bool:
        return False

    def end_step(self) -> None:
        """The step that sent ``soon`` is over: a frame still kept goes alone (daemon.Connection.flush)."""
        self.wire += self.session.release_soon()


@attrs.define
class Pair:
    a: Shell
    b: Shell
    now: float = 100.0

    def step(self) -> None:
        """Both ends end their step; what they wrote reaches the other (sessions, then Muxes)."""
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            src.end_step()
            data, src.wire = src.wire + src.session.data_to_send(), b""
            if data:
                dst.session.receive_data(data, self.now)
                frames, dst.session.tunnel_in = dst.session.tunnel_in, []
                for f in frames:
                    assert dst.mux is not None
                    dst.mux.handle(f)


def established(keys, cfg_a: SessionConfig = SessionConfig(), cfg_b: SessionConfig = SessionConfig()) -> Pair:
    a = Session(Role.INITIATOR, "a", keys["a"], {"b": keys["b"].public_key()}, 100.0, expected_peer="b", config=cfg_a)
    b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["a"].public_key()}, 100.0, config=cfg_b)
    while a.has_data_to_send() or b.has_data_to_send():  # (b"" would be the peer's close)
        if a.has_data_to_send():
            b.receive_data(a.data_to_send(), 100.0)
        if b.has_data_to_send():
            a.receive_data(b.data_to_send(), 100.0)
    assert a.state is b.state is State.ESTABLISHED
    while a.next_event() or b.next_event():
        pass
    pair = Pair(Shell(a), Shell(b))
    pair.a.start_mux()
    pair.b.start_mux()
    return pair


def records(s: Session) -> int:
    """Tunnel records ``s`` sealed: its frames, less one for each batch (two frames, one record)."""
    return s.stats["tunnel_out"] - s.stats["batch_out"]


def one_request(pair: Pair) -> tuple[TunnelStream, TunnelStream]:
    """An ingress's whole request (OPEN soon, then its DATA), the egress's LOAD soon and its whole response."""
    assert pair.a.mux is not None
    up = pair.a.mux.open(EXT, soon=True)
    assert isinstance(up, TunnelStream)
    up.send_nowait(REQUEST, end=True)
    pair.step()
    (down,) = pair.b.opened
    assert down.receive_nowait() == REQUEST
    down.report_load(0.25, 0.1, 1000, soon=True)
    down.send_nowait(RESPONSE, end=True)
    pair.step()
    return up, down


def test_a_request_and_its_response_take_one_record_each_way(keys) -> None:
    pair = established(keys)
    assert pair.a.session.batching and pair.b.session.batching
    up, _ = one_request(pair)
    assert up.receive_nowait() == RESPONSE and up.load_report is not None and up.load_report[:2] == (0.25, 0.1)
    a, b = pair.a.session, pair.b.session
    assert (records(a), records(b)) == (1, 1)  # OPEN + DATA; LOAD + DATA: 4 records -> 2
    assert a.stats["batch_out"] == b.stats["batch_in"] == 1 and b.stats["batch_out"] == a.stats["batch_in"] == 1
    assert b.stats["tunnel_in"] == a.stats["tunnel_in"] == 2


def test_without_the_capability_on_either_side_every_frame_has_its_record(keys) -> None:
    for cfg_a, cfg_b in ((NO_BATCH, SessionConfig()), (SessionConfig(), NO_BATCH)):
        pair = established(keys, cfg_a, cfg_b)
        assert not pair.a.session.batching and not pair.b.session.batching
        assert TUNNEL_BATCH_CAP not in pair.a.session.agreed_caps
        up, _ = one_request(pair)
        assert up.receive_nowait() == RESPONSE and up.load_report is not None
        assert (records(pair.a.session), records(pair.b.session)) == (2, 2)
        assert pair.a.session.stats["batch_out"] == pair.b.session.stats["batch_out"] == 0


def test_a_frame_sent_soon_is_never_held_past_its_step(keys) -> None:
    """Nothing followed it in its step (a request whose body streams later): it goes alone, then."""
    pair = established(keys)
    assert pair.a.mux is not None
    up = pair.a.mux.open(EXT, soon=True)
    assert pair.a.wire == b""  # kept for the frame after it ...
    pair.a.end_step()
    assert pair.a.wire  # ... until the step ends: alone, as a content-type-2 record
    pair.step()
    assert len(pair.b.opened) == 1 and pair.a.session.stats["batch_out"] == 0
    assert isinstance(up, TunnelStream) and records(pair.a.session) == 1
    assert pair.a.session.release_soon() == b""  # nothing kept twice


def test_another_streams_frame_after_a_soon_one_shares_its_record(keys) -> None:
    """What is in hand at once goes together, whatever its stream; the order is kept."""
    pair = established(keys)
    assert pair.a.mux is not None
    first = pair.a.mux.open(EXT, soon=True)
    second = pair.a.mux.open(EXT, soon=True)  # batched with the first OPEN: nothing is kept now
    assert pair.a.wire and pair.a.session.stats["batch_out"] == 1
    second.send_nowait(REQUEST, end=True)
    first.send_nowait(REQUEST, end=True)
    pair.step()
    assert [s.id for s in pair.b.opened] == [1, 3]
    assert [s.receive_nowait() for s in pair.b.opened] == [REQUEST, REQUEST]
    assert records(pair.a.session) == 3


def test_frames_too_large_for_one_record_go_in_two(keys) -> None:
    pair = established(keys)
    a = pair.a.session
    big = bytes(6) + b"x" * 40_000
    assert a.tunnel_record(big, soon=True) == b""
    out = a.tunnel_record(big)
    assert a.stats["batch_out"] == 0 and records(a) == 2
    pair.b.session.tunnel_direct = False
    pair.b.session.receive_data(out, pair.now)
    assert [e.payload for e in iter(pair.b.session.next_event, None) if isinstance(e, TunnelFrame)] == [big, big]


def test_a_batch_without_tunnel_direct_becomes_one_event_per_frame(keys) -> None:
    pair = established(keys)
    b = pair.b.session
    b.tunnel_direct = False
    a = pair.a.session
    out = a.tunnel_record(b"frame 1", soon=True) + a.tunnel_record(b"frame 2")
    b.receive_data(out, pair.now)
    assert [e for e in iter(b.next_event, None)] == [TunnelFrame(b"frame 1"), TunnelFrame(b"frame 2")]
    assert b.stats["batch_in"] == 1 and b.stats["tunnel_in"] == 2


def inject_batch(pair: Pair, payload: bytes) -> None:
    """``a`` seals ``payload`` as a content-type-3 record, however its session was agreed."""
    a = pair.a.session
    a._out += a._records.seal(ContentType.BATCH, payload)  # noqa: SLF001 - the test writes a raw record
    pair.b.session.receive_data(a.data_to_send(), pair.now)


@pytest.mark.parametrize("direct", [True, False])
def test_malformed_batches_end_the_session_with_their_code(keys, vectors, direct: bool) -> None:
    """The spec's malformed batches: the batch's own shape is 9/4 and ends the session in the session core;
    a bad frame inside is the frame's own error, from the Mux, as in a record of its own; on a session
    without `tunnel-batch`, 8/4."""
    for v in vectors["tunnel-batch"]:
        if "error" not in v:
            continue
        cfg = SessionConfig() if "tunnel-batch" in v["caps"] else NO_BATCH
        pair = established(keys, SessionConfig(), cfg)
        b = pair.b.session
        b.tunnel_direct = direct
        inject_batch(pair, bytes.fromhex(v["hex"]))
        code = tuple(v["error"])
        if code[1] == TunnelSub.MALFORMED_BATCH or code == (Code.RECORD, RecordSub.BAD_CONTENT_TYPE):
            assert b.state is State.CLOSED and (b.closed.code, b.closed.subcode) == code, v["name"]
            pair.a.session.receive_data(b.data_to_send(), pair.now)
            assert pair.a.session.closed.reason is CloseReason.PEER_NOTIFICATION, v["name"]
            assert (pair.a.session.closed.code, pair.a.session.closed.subcode) == code, v["name"]
            continue
        assert b.state is State.ESTABLISHED
        frames = b.tunnel_in if direct else [e.payload for e in iter(b.next_event, None) if isinstance(e, TunnelFrame)]
        assert len(frames) >= 2
        assert pair.b.mux is not None
        with pytest.raises(ProtocolError) as ei:
            for f in frames:
                pair.b.mux.handle(f)
        assert (ei.value.code, ei.value.subcode) == code, v["name"]


def test_the_spec_batches_are_taken_frame_by_frame(keys, vectors) -> None:
    """open-data from the spec, sent to a session as it is: b opens stream 1 with its request."""
    (v,) = [v for v in vectors["tunnel-batch"] if v["name"] == "open-data"]
    pair = established(keys)
    inject_batch(pair, bytes.fromhex(v["hex"]))
    assert pair.b.session.tunnel_in == [bytes.fromhex(f) for f in v["frames"]]
    assert pair.b.mux is not None
    for f in pair.b.session.tunnel_in:
        pair.b.mux.handle(f)
    (stream,) = pair.b.opened
    assert stream.id == 1 and stream.ext.origin == "gw3" and stream.receive_nowait().startswith(b"GET /yolo HTTP/1.1")


def test_a_kept_frame_goes_before_one_queued_after_it(keys) -> None:
    """``send_tunnel`` (queued with the session's other records) after a frame kept ``soon``: both alone, in order."""
    pair = established(keys)
    a, b = pair.a.session, pair.b.session
    assert a.tunnel_record(b"frame 1", soon=True) == b""
    a.send_tunnel(b"frame 2")
    b.receive_data(a.data_to_send(), pair.now)
    assert b.tunnel_in == [b"frame 1", b"frame 2"] and a.stats["batch_out"] == 0
    assert a.release_soon() == b""
