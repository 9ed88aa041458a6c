"""Tunnel streams over a fake link: stream and connection windows, stream limits, credit on every path."""

from __future__ import annotations

import h11
import pytest
import trio

from cpnd.errors import ProtocolError
from cpnd.streams import BufferAccount, Mux, StreamReset, TunnelStream
from cpnd.tunnel import (
    ExtHeader,
    FrameType,
    QoS,
    ResetCode,
    decode_frame,
    encode_frame,
    mux_settings,
)
from cpnd.wire import TunnelLimits

EXT = ExtHeader(7, "o", "i", b"\0" * 16, QoS.INTERACTIVE, 8, 1_000_000)


class Link:
    """Stands in for a peer Connection: frames go straight to the other mux, nothing is queued."""

    def __init__(self) -> None:
        self.other: Mux | None = None
        self.sent: list[bytes] = []
        self.up = True

    def send_tunnel(self, frame: bytes, *, flush: bool = False, soon: bool = False) -> None:
        self.sent.append(frame)
        if self.up and self.other is not None:
            self.other.handle(frame)

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()


def pair(a: TunnelLimits, b: TunnelLimits | None, *, b_offers: bool = True) -> tuple[Mux, Mux, list[TunnelStream]]:
    """Muxes for gateways A (session initiator) and B; B without `tunnel-window` when ``b`` is None."""
    opened: list[TunnelStream] = []
    la, lb = Link(), Link()
    sa = mux_settings(a, b, True)
    sb = mux_settings(b, a, True) if b is not None else mux_settings(TunnelLimits(1 << 20, 1 << 30, 1024), None, True)
    ma = Mux(la, "b", True, opened.append, sa, BufferAccount())  # type: ignore[arg-type]
    mb = Mux(lb, "a", False, opened.append, sb, BufferAccount())  # type: ignore[arg-type]
    la.other, lb.other = mb, ma
    return ma, mb, opened


SMALL = TunnelLimits(stream_window=32768, conn_window=65536, max_streams=4)


async def test_connection_window_bounds_what_one_peer_buffers() -> None:
    a, b, opened = pair(SMALL, SMALL)
    streams = [a.open(EXT) for _ in range(4)]
    sent = [0] * 4

    async def send(i: int) -> None:
        await streams[i].send(b"x" * 30000, end=True)
        sent[i] = 30000

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(send, i)
        await trio.testing.wait_all_tasks_blocked()
        # Nobody reads at B: it holds at most its connection window, every stream together.
        done = [i for i in range(4) if sent[i]]
        assert len(done) == 2 and b.account.buffered == SMALL.conn_window
        assert a.conn_window.send_credit == 0
        for i in done:  # B passes two streams on; their credit comes back, the others finish
            assert await opened[i].receive() == b"x" * 30000
            assert await opened[i].receive() == b""  # asking again credits the chunk passed on
    assert sent == [30000] * 4
    assert b.account.buffered == 60000 <= SMALL.conn_window
    for i in set(range(4)) - set(done):
        while await opened[i].receive():
            pass
    assert b.account.buffered == 0


async def test_stream_limit_counts_both_sides() -> None:
    a, b, opened = pair(SMALL, TunnelLimits(32768, 65536, 8))
    for _ in range(3):
        a.open(EXT)
    b.open(EXT)  # B's own stream counts in A's four as well
    with pytest.raises(StreamReset) as ei:
        a.open(EXT)
    assert ei.value.code == ResetCode.TOO_MANY_STREAMS and not ei.value.delivered
    with pytest.raises(StreamReset):
        b.open(EXT)  # B keeps to A's announced limit, not only its own


async def test_an_open_beyond_the_limit_is_reset_by_the_receiver() -> None:
    a, b, opened = pair(SMALL, SMALL)
    b.conn.up = False  # type: ignore[attr-defined]  # A is played by hand
    for sid in (1, 3, 5, 7, 9):  # a peer that ignores the announced limit
        b.handle(encode_frame(sid, FrameType.OPEN, EXT.encode()))
    assert len(b.streams) == 4 and len(opened) == 4
    last = decode_frame(b.conn.sent[-1], conn_window=True)  # type: ignore[attr-defined]
    assert (last.stream_id, last.type) == (9, FrameType.RESET)
    assert int.from_bytes(last.payload[:2], "big") == ResetCode.TOO_MANY_STREAMS


async def test_overrunning_the_connection_window_resets_not_buffers() -> None:
    a, b, opened = pair(SMALL, TunnelLimits(65536, 65536, 4))
    b.conn.up = False  # type: ignore[attr-defined]  # A is played by hand
    for sid in (1, 3):
        b.handle(encode_frame(sid, FrameType.OPEN, EXT.encode()))
    b.handle(encode_frame(1, FrameType.DATA, b"x" * 60000))
    b.handle(encode_frame(3, FrameType.DATA, b"y" * 10000))  # 70000 > 65536 on the connection
    assert b.account.buffered == 60000 and 3 not in b.streams
    with pytest.raises(StreamReset) as ei:
        await opened[1].receive()
    assert ei.value.code == ResetCode.FLOW_CONTROL


async def test_reset_and_racing_frames_give_credit_back() -> None:
    a, b, opened = pair(SMALL, SMALL)
    s = a.open(EXT)
    await s.send(b"x" * 30000)
    assert a.conn_window.send_credit == 65536 - 30000
    opened[0].reset(ResetCode.CANCEL, False, "gone")  # unread bytes dropped: their credit returns
    assert b.account.buffered == 0
    b.conn.up = False  # type: ignore[attr-defined]  # frames already on the wire when B reset
    b.handle(encode_frame(1, FrameType.DATA, b"z" * 20000))
    b.conn.up = True  # type: ignore[attr-defined]
    credited = [decode_frame(f, conn_window=True) for f in b.conn.sent]  # type: ignore[attr-defined]
    conn_credit = sum(int.from_bytes(f.payload, "big") for f in credited if f.stream_id == 0)
    assert conn_credit == 50000  # both, once half the connection window had come back
    assert (b.conn_window.recv_allowed, b.conn_window.recv_unacked) == (65536, 0)


async def test_a_response_completed_before_a_reset_stays_readable() -> None:
    a, b, opened = pair(SMALL, SMALL)
    s = a.open(EXT)
    await opened[0].send(b"response", end=True)
    opened[0].reset(ResetCode.CANCEL, True, "answered before the whole request came")
    assert await s.receive() == b"response"
    assert await s.receive() == b""
    assert s.closed and a.account.buffered == 0
    with pytest.raises(StreamReset):
        await s.send(b"more of the request")


async def test_without_tunnel_window_no_connection_frames_either_way() -> None:
    a, b, opened = pair(SMALL, None)
    assert not a.settings.conn_frames and not b.settings.conn_frames
    s = a.open(EXT)
    await s.send(b"x" * 100000, end=True)  # the peer's fixed 1 MiB window applies, no connection window
    while await opened[0].receive():
        pass
    assert not [f for f in b.conn.sent if decode_frame(f, conn_window=True).stream_id == 0]  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError) as ei:
        b.handle(encode_frame(0, FrameType.WINDOW, (1000).to_bytes(4, "big")))
    assert (ei.value.code, ei.value.subcode) == (9, 2)


def test_settings_from_both_opens() -> None:
    ours, theirs = TunnelLimits(1 << 20, 60 << 20, 1024), TunnelLimits(256 << 10, 8 << 20, 16)
    s = mux_settings(ours, theirs, True)
    assert (s.recv_window, s.send_window, s.recv_conn_window, s.send_conn_window) == (1 << 20, 256 << 10, 60 << 20, 8 << 20)
    assert (s.max_streams, s.peer_max_streams, s.conn_frames) == (1024, 16, True)
    old = mux_settings(ours, None, False)
    assert (old.recv_window, old.send_window, old.recv_conn_window, old.send_conn_window) == (262144, 262144, 60 << 20, None)




def test_relays_waiting_on_a_congested_connection_take_turns() -> None:
    """Relays sharing a congested connection move in turn as it drains: one that fills the queue
    again waits behind those not yet woken (woken in a set's order, one relay went first every time
    and the others starved)."""
    ma, _, _ = pair(SMALL, SMALL)
    link = ma.conn
    link.congested = False  # type: ignore[attr-defined]
    woken: list[str] = []

    class Relay:
        def __init__(self, name: str) -> None:
            self.name = name

        def credited(self, stream: object) -> None:
            woken.append(self.name)
            link.congested = True  # type: ignore[attr-defined]  # its bytes fill the queue again
            ma.wait_drained(stream)  # type: ignore[arg-type]

    streams = []
    for name in "abcd":
        st = ma.open(EXT)
        st.relay = Relay(name)  # type: ignore[assignment]
        streams.append(st)
        ma.wait_drained(st)
    ma.wait_drained(streams[0])  # waiting twice keeps its place
    for _ in range(6):
        link.congested = False  # type: ignore[attr-defined]
        ma.drained()
    assert woken == ["a", "b", "c", "d", "a", "b"]


async def test_a_parked_reader_is_woken_once_by_data_an_end_or_a_reset_and_leaves_when_cancelled() -> None:
    """The stream's reader parks its task itself (no trio.Event): woken by what comes, and a reader
    cancelled while parked is gone from the stream (what comes after does not reschedule it: trio
    would fail on a task that is not waiting), its next receive gets what came."""
    a, b, opened = pair(SMALL, SMALL)
    s = a.open(EXT)
    await s.send(b"req", end=True)
    far = opened[0]
    assert await far.receive() == b"req"
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await s.receive())

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert s._inbox.waiter is not None and not got  # parked
        await far.send(b"one")
        await far.send(b"two")  # if it finds the reader woken already: no second reschedule (trio would fail)
    # Whether the reader ran between the two frames is the scheduler's (trio shuffles its batches): if
    # not, it took both in one piece (TunnelStream._taken joins what arrived meanwhile).
    assert got[0] in (b"one", b"onetwo") and s._inbox.waiter is None
    assert got[0] + (await s.receive() if got[0] == b"one" else b"") == b"onetwo"
    with trio.move_on_after(0.01) as scope:
        await s.receive()  # parked, then cancelled
    assert scope.cancelled_caught and s._inbox.waiter is None
    await far.send(b"three", end=True)  # nobody to wake: no reschedule of the cancelled task
    assert await s.receive() == b"three" and await s.receive() == b""
    t = a.open(EXT)
    async with trio.open_nursery() as n:
        failed: list[BaseException] = []

        async def waiter() -> None:
            try:
                await t.receive()
            except StreamReset as exc:
                failed.append(exc)
        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        opened[1].reset(ResetCode.CANCEL, False, "gone")
    assert len(failed) == 1 and failed[0].code == ResetCode.CANCEL


async def test_sealed_ciphers_are_made_off_the_paths_that_wait_for_them() -> None:
    """The ingress makes its response cipher once its request is out, the egress its own once the
    instance has the request (its sink's ``later``, run then): the answer goes back through both."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from cpnd.h1 import H11Stream
    from cpnd.pending import NOW
    from cpnd.relay import StreamSink
    from cpnd.seal import Opener, StreamSealer
    from cpnd.streams import SealedStream

    a, b, opened = pair(SMALL, SMALL)
    origin = Opener(X25519PrivateKey.generate())
    a.sealer = StreamSealer("i", Opener(X25519PrivateKey.generate()), lambda ext: origin.public)
    b.sealer = StreamSealer("o", origin, lambda ext: None)
    out = a.open(EXT)
    assert isinstance(out, SealedStream) and out._sealing.recv._aead is None
    await out.send(b"GET / HTTP/1.1\r\nHost: o\r\n\r\n", end=True)
    assert out._sealing.recv._aead is not None  # made once the request was out
    inbound = opened[0]
    assert isinstance(inbound, SealedStream) and await inbound.receive() == b"GET / HTTP/1.1\r\nHost: o\r\n\r\n"
    sink = StreamSink(H11Stream(h11.SERVER, inbound, tunnel=True), inbound)  # type: ignore[arg-type]
    assert inbound._sealing.send._aead is None
    sink.later.run()  # the egress: the instance has the request
    assert inbound._sealing.send._aead is not None
    ran: list[int] = []
    sink.later.defer(ran.append, 1)
    assert ran == [1]  # accounting runs at once, as any stream's
    await inbound.send(b"HTTP/1.1 204 No Content\r\n\r\n", end=True)
    assert await out.receive() == b"HTTP/1.1 204 No Content\r\n\r\n" and await out.receive() == b""
    plain = b.open(EXT)
    assert StreamSink(H11Stream(h11.SERVER, plain, tunnel=True), plain).later is NOW  # type: ignore[arg-type]
