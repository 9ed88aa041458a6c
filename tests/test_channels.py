"""Data channels (protocol-spec/session.md, "Data channels"), sans-IO: a worker's data-only session
(cpnd/channels.py) beside the main session of two gateway cores, without a collision; refused without
an established session or past the peer's limit; closed with the main session; an UPDATE on one is an
error; the HELLO's `dc` flag is signed (flipped in transit, the handshake fails); a worker handed
peers' data channels accepts them within its share, while the session is up, and nothing else; and a
reload closes the channels of a changed peer and dials new peers."""

from __future__ import annotations

import attrs

from cpnd.channels import DataChannels
from cpnd.config import Address
from cpnd.crypto import Handshake, Role
from cpnd.errors import CeaseSub, Code, FsmSub, HandshakeSub, ProtocolError
from cpnd.gateway import Dial, LinkDown, LinkUp
from cpnd.names import service_label
from cpnd.session import Session, State
from cpnd.vnet import Net, config_for
from cpnd.wire import Hello, RouteAdv, decode_handshake, encode_handshake

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


def _between(dc_a: DataChannels, la, dc_b: DataChannels, lb, now: float = 0.0) -> None:
    for _ in range(20):
        out, back = dc_a.data_to_send(la), dc_b.data_to_send(lb)
        if out:
            dc_b.receive_data(lb, out, now)
        if back:
            dc_a.receive_data(la, back, now)
        if not out and not back:
            return


def test_a_worker_accepts_handed_data_channels_within_its_share() -> None:
    """b's worker, handed a's workers' connections by b's control process, is their responder: while
    b has a session with a (the feed says so), up to its share of max_data_channels_per_peer."""
    a = core("a", ("b",))
    b_worker = DataChannels(core("b", ("a",)).config, inbound_limit=1)
    b_worker.want({"a"}, 0.0)
    links = []
    for _ in range(2):
        dc = DataChannels(a.config)
        dc.want({"b"}, 0.0)
        dc.handle_timer(0.0)
        la, lb = dc.connected("b", 0.0), b_worker.accept("127.0.0.1:1", 0.0)
        _between(dc, la, b_worker, lb)
        links.append((la, lb))
    (la1, lb1), (la2, lb2) = links
    assert la1.established and lb1.established and lb1 in b_worker.peers["a"].inbound
    assert lb2.session.closed.subcode == CeaseSub.CONNECTION_REJECTED and "at most 1" in lb2.session.closed.text
    b_worker.want(set(), 0.0)  # b's session with a ended: the feed says so, its channels close
    assert lb1.session.state is State.CLOSED and "its session ended" in lb1.session.closed.text


def test_a_handed_connection_that_is_not_a_data_channel_is_refused() -> None:
    b_worker = DataChannels(core("b", ("a",)).config)
    b_worker.want({"a"}, 0.0)
    s = Session(Role.INITIATOR, "a", KEYS["a"], {"b": PUB["b"]}, 0.0, expected_peer="b")  # a session, not a channel
    lb = b_worker.accept("127.0.0.1:1", 0.0)
    for _ in range(10):
        out, back = s.data_to_send(), b_worker.data_to_send(lb)
        if out:
            b_worker.receive_data(lb, out, 0.0)
        if back:
            s.receive_data(back, 0.0)
        if not out and not back:
            break
    assert lb.session.closed is not None and "not a data channel" in lb.session.closed.text


def test_a_reload_closes_the_channels_of_a_changed_peer_and_adds_new_ones() -> None:
    net, a, b = pair()
    dc = worker_of(a)
    dlink, blink, _ = open_channel(net, b, dc)
    assert dlink.established
    new = config_for("a", KEYS["a"], {"b": PUB["b"], "c": PUB["c"]})  # c is new, b moved (another address)
    new = attrs.evolve(new, peers=tuple(attrs.evolve(p, address=Address("127.0.0.1", 2)) if p.id == "b" else p
                                        for p in new.peers))
    dc.reconfigure(new)
    assert dlink.session.state is State.CLOSED and dlink.session.closed.subcode == CeaseSub.CONFIG_CHANGE
    assert set(dc.peers) == {"b", "c"} and dc.peers["b"].config.address.port == 2
    dc.link_gone(dlink, net.now)
    dc.want({"b", "c"}, net.now)
    dc.handle_timer(net.now + 5)
    assert sorted(e.peer_id for e in dc.events() if isinstance(e, Dial)) == ["b", "c"]
