"""The wire codec: round trips, strict validation, and the spec's vectors."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.errors import Code, MessageSub, ProtocolError, UpdateSub
from cpnd.names import service_label
from cpnd.wire import (
    MAX_PLAINTEXT,
    FrameReader,
    Keepalive,
    Notification,
    Open,
    RouteAdv,
    RouteRefresh,
    Update,
    Withdrawal,
    decode_handshake,
    decode_message,
    encode_message,
    frame,
    split_update,
)

ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)
services = st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def routes(draw: st.DrawFn) -> RouteAdv:
    svc = draw(services)
    path = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    return RouteAdv(svc, draw(ids), path[-1], draw(st.integers(0, 2**64 - 1)), service_label(svc), tuple(path),
                    draw(st.integers(0, 2**32 - 1)), draw(finite) + 0.5, draw(st.floats(0, 1000)), draw(finite),
                    draw(st.integers(0, 2**32 - 1)), draw(st.floats(0, 1000)), draw(st.booleans()),
                    draw(st.none() | st.integers(0, 2**32 - 1)))


messages = st.one_of(
    st.builds(Open, ids, st.integers(200, 3_600_000), st.lists(ids, max_size=4).map(tuple), st.integers(0, 2**63 - 1)),
    st.builds(Open, ids, st.integers(200, 3_600_000), st.lists(ids, max_size=3).map(lambda c: (*c, "graceful-restart")),
              st.integers(0, 2**63 - 1), st.integers(0, 600_000)),
    st.builds(Keepalive, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    st.builds(Update, st.lists(routes(), max_size=5).map(tuple),
              st.lists(st.builds(Withdrawal, services, ids, ids), max_size=5).map(tuple)),
    st.builds(Notification, st.integers(0, 255), st.integers(0, 255), st.text(max_size=100)),
    st.just(RouteRefresh()),
)


@given(messages)
def test_round_trip(msg) -> None:
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    for decode in (decode_message, decode_handshake):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=500)
@given(messages, st.data())
def test_mutated_messages_only_raise_protocol_errors(msg, data) -> None:
    body = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    try:
        decode_message(bytes(body))
    except ProtocolError:
        pass


def _route_dict(**over) -> dict:
    d = {"svc": "/yolo", "inst": "s1", "origin": "gw3", "seq": 1, "label": service_label("/yolo"),
         "path": ["gw3"], "lat": 0, "cap": 50.0, "load": 0.0, "bload": 0.0, "price": 2.0, "comp": 1000}
    d.update(over)
    return d


@pytest.mark.parametrize(("over", "sub"), [
    ({"path": ["gw1", "gw3", "gw1"]}, UpdateSub.BAD_PATH),
    ({"path": ["gw1"]}, UpdateSub.BAD_PATH),  # does not end at origin
    ({"path": []}, UpdateSub.BAD_PATH),
    ({"label": 7}, UpdateSub.LABEL_MISMATCH),
    ({"cap": 0.0}, UpdateSub.BAD_ATTRIBUTE),
    ({"cap": float("nan")}, UpdateSub.BAD_ATTRIBUTE),
    ({"load": -1.0}, UpdateSub.BAD_ATTRIBUTE),
    ({"price": "free"}, UpdateSub.BAD_ATTRIBUTE),
    ({"svc": "yolo"}, UpdateSub.MALFORMED_ROUTE),
    ({"svc": "/a//b"}, UpdateSub.MALFORMED_ROUTE),
    ({"seq": True}, UpdateSub.MALFORMED_ROUTE),
    ({"extra": 1}, UpdateSub.MALFORMED_ROUTE),
    ({"gw": -1}, UpdateSub.MALFORMED_ROUTE),
    ({"gw": 2**32}, UpdateSub.MALFORMED_ROUTE),
    ({"gw": True}, UpdateSub.MALFORMED_ROUTE),
    ({"gw": 1.5}, UpdateSub.MALFORMED_ROUTE),
])
def test_bad_routes_get_their_subcode(over, sub) -> None:
    body = msgpack.packb({"t": 3, "adv": [_route_dict(**over)], "wd": []})
    with pytest.raises(ProtocolError) as ei:
        decode_message(body)
    assert (ei.value.code, ei.value.subcode) == (Code.UPDATE, sub)


def test_gateway_time_is_optional_and_travels_only_when_set() -> None:
    """messages.md, "Route": `gw` present only when the sender has it for a peer that offered gateway-time."""
    plain = decode_message(msgpack.packb({"t": 3, "adv": [_route_dict()], "wd": []}))
    assert plain.adv[0].gateway_us is None
    told = decode_message(msgpack.packb({"t": 3, "adv": [_route_dict(gw=1250)], "wd": []}))
    assert told.adv[0].gateway_us == 1250
    assert "gw" not in msgpack.unpackb(encode_message(plain))["adv"][0]
    assert msgpack.unpackb(encode_message(told))["adv"][0]["gw"] == 1250


@pytest.mark.parametrize(("body", "sub"), [
    (b"\xc1", MessageSub.MALFORMED),
    (msgpack.packb([1, 2]), MessageSub.MALFORMED),
    (msgpack.packb({"t": 99}), MessageSub.BAD_TYPE),
    (msgpack.packb({"t": "1"}), MessageSub.BAD_TYPE),
    (msgpack.packb({"t": 2, "ts": 1, "echo": 0}), MessageSub.BAD_FIELD),
    (msgpack.packb({"t": 2, "ts": -1, "echo": 0, "dly": 0}), MessageSub.BAD_FIELD),
    (msgpack.packb({"t": 5}) + b"\x00", MessageSub.MALFORMED),  # trailing bytes
    (msgpack.packb({"t": 5, 1: 2}, strict_types=False), MessageSub.MALFORMED),
])
def test_bad_messages_get_their_subcode(body, sub) -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_message(body)
    assert (ei.value.code, ei.value.subcode) == (Code.MESSAGE, sub)


def test_frame_reader_bounds_and_splits() -> None:
    r = FrameReader(limit=10)
    r.feed(frame(b"abc") + frame(b"")[:2])
    assert r.next_frame() == (b"\x00\x00\x00\x03", b"abc")
    assert r.next_frame() is None
    r.feed(b"\x00\x00")
    assert r.next_frame() == (b"\x00\x00\x00\x00", b"")
    r.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.subcode == MessageSub.FRAME_TOO_LONG


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_frame_reader_reassembles_any_split(bodies: list[bytes], cuts: list[int]) -> None:
    """Frames fed in arbitrary pieces come out whole and in order; nothing is held twice."""
    stream = b"".join(frame(b) for b in bodies)
    r, out, i, k = FrameReader(limit=300), [], 0, 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        r.feed(stream[i:i + n])
        i, k = i + n, k + 1
        while (fr := r.next_frame()) is not None:
            out.append(fr[1])
        assert r.buffered() == len(stream[:i]) - sum(len(frame(b)) for b in out)
    assert out == bodies and r.buffered() == 0


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 700), min_size=1, max_size=20),
       st.booleans())
def test_frame_reader_take_is_next_frame_in_one_call(bodies: list[bytes], cuts: list[int], mixed: bool) -> None:
    """take() gives what feed() and next_frame() would, a read at a time, whatever the pieces (mixed: some
    reads taken by next_frame, leaving bytes buffered before the next take)."""
    stream = b"".join(frame(b) for b in bodies)
    r, out, i, k = FrameReader(limit=300), [], 0, 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        if mixed and k % 2:
            r.feed(stream[i:i + n])
            while (fr := r.next_frame()) is not None:
                out.append(fr)
        else:
            out += r.take(stream[i:i + n])
        i, k = i + n, k + 1
        assert r.buffered() == len(stream[:i]) - sum(len(frame(b)) for _, b in out)
    assert [b for _, b in out] == bodies and all(h == frame(b)[:4] for h, b in out)


def test_frame_reader_take_leaves_a_frame_over_the_limit_to_next_frame() -> None:
    r = FrameReader(limit=10)
    assert r.take(frame(b"abc") + b"\x00\x00\x00\x0b" + b"x" * 11) == [(b"\x00\x00\x00\x03", b"abc")]
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.subcode == MessageSub.FRAME_TOO_LONG


@given(st.lists(routes(), max_size=400), st.lists(st.builds(Withdrawal, services, ids, ids), max_size=50))
@settings(max_examples=30)
def test_split_update_fits_and_keeps_everything(advs, wds) -> None:
    parts = list(split_update(advs, wds))
    assert [a for p in parts for a in p.adv] == advs
    assert [w for p in parts for w in p.wd] == wds
    for p in parts:
        assert len(encode_message(p)) + 1 <= MAX_PLAINTEXT


def _jsonable(obj):
    """As gen_vectors writes decoded forms: bin values as {"bin": hex}."""
    if isinstance(obj, bytes):
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def test_message_vectors(vectors) -> None:
    for v in vectors["messages"]:
        body = bytes.fromhex(v["hex"])
        if v.get("error"):
            with pytest.raises(ProtocolError) as ei:
                decode_message(body)
            assert [ei.value.code, ei.value.subcode] == v["error"], v["name"]
        else:
            msg = decode_message(body)
            assert encode_message(msg) == body, v["name"]
            assert _jsonable(msgpack.unpackb(body)) == v["decoded"], v["name"]


def test_shared_table_keeps_types_apart_and_is_bounded(monkeypatch) -> None:
    from cpnd import wire

    t = wire.SharedTable()
    a, b = t.get(1.0), t.get(1)
    assert type(a) is float and type(b) is int  # 1 == 1.0, but they encode differently
    first = t.get(tuple(["gw1", "gw2"]))
    again = tuple(["gw1", "gw2"])
    assert again is not first and t.get(again) is first  # equal paths: one copy
    monkeypatch.setattr(wire, "MAX_SHARED", 4)
    for i in range(10):
        t.get(f"name{i}")
    assert t.size <= 4  # cleared and refilled, never past the bound
