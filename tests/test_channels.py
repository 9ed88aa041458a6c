"""Data channels (protocol-spec/session.md, "Data channels"), sans-IO: a worker's data-only session
(cpnd/channels.py) beside the main session of two gateway cores, without a collision; refused without
an established session or past the peer's limit; closed with the main session; an UPDATE on one is an
error; and the HELLO's `dc` flag is signed (flipped in transit, the handshake fails)."""

from __future__ import annotations

from cpnd.channels import DataChannels
from cpnd.crypto import Handshake, Role
from cpnd.errors import CeaseSub, Code, FsmSub, HandshakeSub, ProtocolError
from cpnd.gateway import Dial, LinkDown, LinkUp
from cpnd.names import service_label
from cpnd.session import State
from cpnd.wire import Hello, RouteAdv, decode_handshake, encode_handshake

from cpnd.vnet import Net

from test_gateway import KEYS, PUB, core, pair


def open_channel(net, b, dc: DataChannels):
    """Dial b from ``dc`` (a's worker) and shuttle bytes until both ends are quiet: (a's link, b's link, a's events)."""
    dc.want({"b"}, net.now)
    dc.handle_timer(net.now)
    assert [type(e) for e in dc.events()] == [Dial]
    dlink = dc.connected("b", net.now)
    blink = b.accept("127.0.0.1", "127.0.0.1:1", net.now)
    return dlink, blink, shuttle(net, dc, dlink, b, blink)


def shuttle(net, dc, dlink, b, blink) -> list:
    events = []
    for _ in range(20):
        out = dc.data_to_send(dlink)
        if out:
            b.receive_data(blink, out, net.now)
        back = b.data_to_send(blink)
        if back:
            dc.receive_data(dlink, back, net.now)
        events += list(dc.events())
        net.pump("b")
        if not out and not back:
            break
    return events


def worker_of(a) -> DataChannels:
    return DataChannels(a.config)


def test_a_data_channel_comes_up_beside_the_session_without_a_collision() -> None:
    net, a, b = pair()
    main_a, main_b = a.established_link("b"), b.established_link("a")
    dc = worker_of(a)
    dlink, blink, events = open_channel(net, b, dc)
    assert [type(e) for e in events] == [LinkUp] and dlink.established and blink.established
    assert blink.session.data_channel and not main_b.session.data_channel
    assert b.established_link("a") is main_b and a.established_link("b") is main_a  # no collision
    assert blink in b.peers["a"].channels and blink not in b.peers["a"].links and b.peers["a"].flaps == 0
    assert b.peer_status(net.now)[0].state == "established"
    b.receive_data(blink, dc.send_tunnel(dlink, b"\x00\x00\x00\x01\x04\x00" + b"\x00" * 3), net.now)  # a RESET frame
    shuttle(net, dc, dlink, b, blink)
    assert blink.session.stats["tunnel_in"] == 1
    net.run_for(1.0)
    assert main_a.established and main_b.established  # routes and keepalives go on as before


def test_refused_without_an_established_session_and_past_the_limit() -> None:
    net, a, b = pair(max_data_channels_per_peer=1)
    dc = worker_of(a)
    first, _, _ = open_channel(net, b, dc)
    assert first.established
    dlink, blink, events = open_channel(net, b, worker_of(a))
    # (its OPEN and KEEPALIVE may come before the refusal: the responder's session answers the OPEN at once)
    assert type(events[-1]) is LinkDown and dlink.session.closed.subcode == CeaseSub.CONNECTION_REJECTED
    assert b.stats["data_channels_refused"] == 1 and first.established

    lone = core("b", ("a",))  # b with no session to a at all
    net2 = Net()
    net2.add(lone, start=False)
    dc2 = worker_of(a)
    dlink, _, events = open_channel(net2, lone, dc2)
    assert type(events[-1]) is LinkDown
    assert dlink.session.closed.code == Code.CEASE and dlink.session.closed.subcode == CeaseSub.CONNECTION_REJECTED
    assert "established session" in dlink.session.closed.text


def test_the_channel_ends_with_the_main_session() -> None:
    net, a, b = pair()
    dc = worker_of(a)
    dlink, blink, _ = open_channel(net, b, dc)
    b.close(b.established_link("a"), Code.CEASE, CeaseSub.ADMIN_RESET, "test")
    events = shuttle(net, dc, dlink, b, blink)
    assert LinkDown in [type(e) for e in events] and dlink.session.state is State.CLOSED
    assert dlink.session.closed.subcode == CeaseSub.CONNECTION_REJECTED and "its session ended" in dlink.session.closed.text
    dc.link_gone(dlink, net.now)
    assert dc.peers["b"].dial_at is not None  # while the control process still wants it: dialled again


def test_an_update_on_a_data_channel_is_an_fsm_error() -> None:
    net, a, b = pair()
    dc = worker_of(a)
    dlink, blink, _ = open_channel(net, b, dc)
    adv = RouteAdv(service="/s", instance="x1", origin="a", seq=1, label=service_label("/s"), path=("a",), latency_us=0, capacity=1.0,
                   load=0.0, price=0.0)
    dlink.session.send_update([adv], [])
    shuttle(net, dc, dlink, b, blink)
    assert blink.session.closed is not None and (blink.session.closed.code, blink.session.closed.subcode) == (
        Code.FSM, FsmSub.UNEXPECTED_IN_ESTABLISHED)
    assert "x1" not in str(b.rib.loc) and b.established_link("a") is not None


def test_the_dc_flag_is_signed() -> None:
    init = Handshake(Role.INITIATOR, "a", KEYS["a"], {"b": PUB["b"]}, expected_peer="b", data_channel=True)
    resp = Handshake(Role.RESPONDER, "b", KEYS["b"], {"a": PUB["a"]})
    hello = decode_handshake(init.start())
    assert isinstance(hello, Hello) and hello.data
    stripped = Hello(hello.versions, hello.id, hello.to, hello.eph)  # a man in the middle drops `dc`
    assert b"dc" not in encode_handshake(stripped)
    ack = resp.handle(stripped)
    try:
        init.receive(ack)
    except ProtocolError as exc:
        assert (exc.code, exc.subcode) == (Code.HANDSHAKE, HandshakeSub.BAD_SIGNATURE)
    else:
        raise AssertionError("a HELLO without its dc flag was accepted")
