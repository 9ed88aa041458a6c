"""Tunnel framing: extension header, frames, stream ids, flow-control windows."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.errors import Code, ProtocolError, TunnelSub
from cpnd.tunnel import (
    FLAG_END,
    INITIAL_WINDOW,
    INITIAL_WINDOW_LARGE,
    MAX_DATA,
    ExtHeader,
    FlowWindow,
    FrameType,
    QoS,
    ResetCode,
    MAX_BATCH_PAYLOAD,
    StreamIds,
    batch_fits,
    decode_frame,
    MAX_BATCH_ENTRIES,
    encode_batch,
    encode_frame,
    parse_frame,
    parse_load,
    parse_reset,
    reset_payload,
    split_batch,
)

ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
# Flag 0x02 (sealed) is not a free flag: it says the ephemeral key `eph` ends the header.
exts = st.builds(ExtHeader, st.integers(0, 2**31 - 1), ids, ids, st.binary(min_size=16, max_size=16),
                 st.sampled_from(list(QoS)), st.integers(0, 255), st.integers(0, 2**32 - 1),
                 st.integers(0, 255).map(lambda f: f & ~0x02), st.integers(0, 2**32 - 1),
                 st.none() | st.binary(min_size=32, max_size=32))


@given(exts)
def test_ext_header_round_trip(ext: ExtHeader) -> None:
    assert ExtHeader.decode(ext.encode()) == ext


@given(exts, st.integers(0, 2**32 - 1))
def test_onward_is_evolve(ext: ExtHeader, budget: int) -> None:
    """A transit's next-hop header, built directly, is what attrs.evolve made (from_peer kept)."""
    ext = ExtHeader.decode(ext.encode())
    onward = ext.onward(budget)
    assert onward == attrs.evolve(ext, hop_limit=ext.hop_limit - 1, budget_us=budget)
    assert onward.from_peer and repr(onward) == repr(attrs.evolve(ext, hop_limit=ext.hop_limit - 1, budget_us=budget))


@settings(max_examples=1000)
@given(st.binary(max_size=40) | st.builds(encode_frame, st.integers(0, 3), st.sampled_from(list(FrameType)),
                                          st.binary(max_size=20), st.integers(0, 2)),
       st.integers(0, 20), st.booleans(), st.booleans())
def test_parse_frame_agrees_with_decode_frame(data: bytes, max_data: int, conn_window: bool, timed: bool) -> None:
    """The Mux's parse_frame accepts what decode_frame accepts, with the same result, and refuses the
    rest with the same error (DATA frames, its fast path, included)."""
    try:
        want = decode_frame(data, max_data, conn_window=conn_window, timed_load=timed)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as ei:
            parse_frame(data, max_data, conn_window, timed)
        assert (ei.value.code, ei.value.subcode, ei.value.detail) == (exc.code, exc.subcode, exc.detail)
        return
    assert parse_frame(data, max_data, conn_window, timed) == (want.stream_id, want.type, want.flags, want.payload)


@settings(max_examples=500)
@given(exts, st.data())
def test_mutated_ext_headers_only_raise_protocol_errors(ext: ExtHeader, data) -> None:
    raw = bytearray(ext.encode())
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut] if data.draw(st.booleans()) else raw
    if raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        ExtHeader.decode(bytes(raw))
    except ProtocolError as exc:
        assert exc.code == Code.TUNNEL


@settings(max_examples=1000)
@given(exts, st.data())
def test_ext_decode_agrees_with_checked_decode(ext: ExtHeader, data) -> None:
    """decode's one-pass path accepts what the check-by-check decode accepts, with the same result,
    and refuses the rest with the same error."""
    raw = bytearray(ext.encode())
    for _ in range(data.draw(st.integers(0, 2))):
        if data.draw(st.booleans()):
            del raw[data.draw(st.integers(0, len(raw))):]
        elif raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        want = ExtHeader._decode_checked(bytes(raw))
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as ei:
            ExtHeader.decode(bytes(raw))
        assert (ei.value.code, ei.value.subcode, ei.value.detail) == (exc.code, exc.subcode, exc.detail)
        return
    got = ExtHeader.decode(bytes(raw))
    assert got == want and got.from_peer and repr(got) == repr(want)


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_random_frames_only_raise_protocol_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except ProtocolError as exc:
        assert exc.code == Code.TUNNEL


@pytest.mark.parametrize(("frame", "sub"), [
    (b"\x00\x00\x00", TunnelSub.MALFORMED_FRAME),
    (encode_frame(0, FrameType.DATA, b"x"), TunnelSub.BAD_STREAM_ID),
    (encode_frame(1, 9, b""), TunnelSub.MALFORMED_FRAME),  # type: ignore[arg-type]
    (encode_frame(1, FrameType.DATA, b"x" * (MAX_DATA + 1)), TunnelSub.MALFORMED_FRAME),
    (encode_frame(1, FrameType.WINDOW, b"\x00\x00\x00\x00"), TunnelSub.MALFORMED_FRAME),
    (encode_frame(1, FrameType.WINDOW, b"\x00\x01"), TunnelSub.MALFORMED_FRAME),
    (encode_frame(1, FrameType.RESET, b"\x00"), TunnelSub.MALFORMED_FRAME),
    (encode_frame(1, FrameType.OPEN, b"", FLAG_END), TunnelSub.MALFORMED_FRAME),
    (encode_frame(1, FrameType.DATA, b"", 0x80), TunnelSub.MALFORMED_FRAME),
])
def test_bad_frames(frame: bytes, sub: TunnelSub) -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_frame(frame)
    assert (ei.value.code, ei.value.subcode) == (Code.TUNNEL, sub)


def test_frames_and_resets() -> None:
    f = decode_frame(encode_frame(7, FrameType.DATA, b"abc", FLAG_END))
    assert (f.stream_id, f.type, f.payload, f.end) == (7, FrameType.DATA, b"abc", True)
    r = decode_frame(encode_frame(7, FrameType.RESET, reset_payload(ResetCode.REFUSED, False, "full")))
    assert parse_reset(r.payload) == (ResetCode.REFUSED, False, "full")


def test_stream_ids() -> None:
    a, b = StreamIds(initiator=True), StreamIds(initiator=False)
    assert [a.allocate(), a.allocate()] == [1, 3] and b.allocate() == 2
    b.accept_open(1)
    b.accept_open(3)
    for bad in (3, 1, 2, 4):  # not increasing, or b's own parity
        with pytest.raises(ProtocolError):
            b.accept_open(bad)
    assert b.known(3) and not b.known(5) and b.known(2) and not b.known(4)


@pytest.mark.parametrize("initial", [INITIAL_WINDOW, INITIAL_WINDOW_LARGE])
def test_flow_window(initial: int) -> None:
    w = FlowWindow(initial)
    assert (w.send_credit, w.recv_allowed) == (initial, initial)
    assert w.on_receive(initial)
    assert not FlowWindow(initial).on_receive(initial + 1)
    assert w.on_consumed(1000) == 0
    inc = w.on_consumed(initial // 2)  # credit once half the window was passed on
    assert inc == initial // 2 + 1000
    assert w.on_receive(inc) and not w.on_receive(1)


def test_tunnel_vectors(vectors) -> None:
    for v in vectors["tunnel"]:
        raw = bytes.fromhex(v["hex"])
        if "error" in v:
            with pytest.raises(ProtocolError) as ei:
                f = decode_frame(raw)
                if f.type is FrameType.OPEN:
                    ExtHeader.decode(f.payload)
            assert [ei.value.code, ei.value.subcode] == v["error"], v["name"]
        else:
            f = decode_frame(raw, conn_window="tunnel-window" in v.get("caps", []),
                             timed_load="gateway-time" in v.get("caps", []))
            assert [f.stream_id, int(f.type), f.flags] == [v["stream_id"], v["type"], v["flags"]], v["name"]
            if f.type is FrameType.OPEN:
                ext = ExtHeader.decode(f.payload)
                assert ext.encode() == f.payload
                assert [ext.label, ext.origin, ext.instance, int(ext.qos), ext.hop_limit, ext.budget_us, ext.flags] == v["ext"]
            if f.type is FrameType.LOAD:
                assert v["load"] == list(parse_load(f.payload)), v["name"]


def test_large_data_only_where_negotiated() -> None:
    from cpnd.tunnel import MAX_DATA_LARGE

    big = encode_frame(3, FrameType.DATA, b"x" * (MAX_DATA + 1))
    with pytest.raises(ProtocolError):
        decode_frame(big)  # the default limit: the capability was not agreed
    assert len(decode_frame(big, MAX_DATA_LARGE).payload) == MAX_DATA + 1
    assert len(decode_frame(encode_frame(3, FrameType.DATA, b"x" * MAX_DATA_LARGE), MAX_DATA_LARGE).payload) == MAX_DATA_LARGE
    with pytest.raises(ProtocolError) as ei:
        decode_frame(encode_frame(3, FrameType.DATA, b"x" * (MAX_DATA_LARGE + 1)), MAX_DATA_LARGE)
    assert (ei.value.code, ei.value.subcode) == (9, 1)


# ---------------------------------------------------------------- batches (content type 3)


def entries(frames: list[bytes]) -> bytes:
    """A batch payload written here (tunnel.md, "Batches"): ``len u16 | frame`` each."""
    return b"".join(len(f).to_bytes(2, "big") + f for f in frames)


def test_tunnel_batch_vectors(vectors) -> None:
    """Each batch vector's frames come out in order and decode as the frames they are; each malformed
    one is refused with its code: 9/4 for the batch's own shape, the frame's own for a bad frame in it."""
    for v in vectors["tunnel-batch"]:
        payload = bytes.fromhex(v["hex"])
        if "tunnel-batch" not in v["caps"]:
            assert v["error"] == [Code.RECORD, 4]  # a session's matter: tests/test_session.py sends it
            continue
        timed = "gateway-time" in v["caps"]
        if "error" in v:
            with pytest.raises(ProtocolError) as ei:
                for f in split_batch(payload):
                    decode_frame(f, timed_load=timed)
            assert [ei.value.code, ei.value.subcode] == v["error"], v["name"]
            continue
        frames = split_batch(payload)
        assert [f.hex() for f in frames] == v["frames"], v["name"]
        for f in frames:
            decode_frame(f, timed_load=timed)
        if len(frames) == 2:
            assert encode_batch(*frames) == payload, v["name"]


frames_st = st.binary(max_size=300)


@given(frames_st, frames_st)
def test_batch_of_two_round_trip(first: bytes, second: bytes) -> None:
    payload = encode_batch(first, second)
    assert payload == entries([first, second])
    assert split_batch(payload) == [first, second]


@given(st.lists(frames_st, min_size=2, max_size=8))
def test_batch_of_any_length_round_trip(frames: list[bytes]) -> None:
    assert split_batch(entries(frames)) == frames


def assert_malformed_batch(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as ei:
        split_batch(payload)
    assert (ei.value.code, ei.value.subcode) == (Code.TUNNEL, TunnelSub.MALFORMED_BATCH)


@given(st.lists(st.binary(max_size=8), min_size=MAX_BATCH_ENTRIES + 1, max_size=3 * MAX_BATCH_ENTRIES))
def test_a_batch_of_more_entries_than_the_cap_is_refused(frames: list[bytes]) -> None:
    assert_malformed_batch(entries(frames))
    assert len(split_batch(entries(frames[:MAX_BATCH_ENTRIES]))) == MAX_BATCH_ENTRIES  # the cap itself is taken


@given(st.lists(frames_st, max_size=1))
def test_a_batch_of_fewer_than_two_entries_is_refused(frames: list[bytes]) -> None:
    assert_malformed_batch(entries(frames))


@given(st.lists(frames_st, min_size=1, max_size=5), st.data())
def test_a_batch_cut_anywhere_but_between_entries_is_refused(frames: list[bytes], data: st.DataObject) -> None:
    """Every proper prefix of a batch that does not end on an entry's end (a length cut short, an entry
    past the end), and every such payload with one stray byte after it, is 9/4."""
    payload = entries(frames)
    ends = {0, *(sum(len(f) + 2 for f in frames[:i + 1]) for i in range(len(frames)))}
    cut = data.draw(st.integers(0, len(payload)).filter(lambda n: n not in ends))
    assert_malformed_batch(payload[:cut])
    assert_malformed_batch(entries(frames + [b"x"]) + b"\x00")  # one byte of a length after whole entries


@given(st.lists(frames_st, min_size=2, max_size=5), st.data())
def test_an_entry_longer_than_what_is_left_is_refused(frames: list[bytes], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frames) - 1))
    payload = entries(frames[:i])
    left = sum(len(f) + 2 for f in frames[i:]) - 2  # what follows this entry's length
    over = data.draw(st.integers(left + 1, 0xFFFF))
    assert_malformed_batch(payload + over.to_bytes(2, "big") + b"".join(entries([f]) for f in frames[i:])[2:])


@given(st.lists(frames_st, min_size=2, max_size=4), st.data())
def test_a_bad_frame_in_a_batch_is_that_frames_error(frames: list[bytes], data: st.DataObject) -> None:
    """The batch splits; the frame is checked as a content-type-2 record's would be (here: too short, 9/1)."""
    i = data.draw(st.integers(0, len(frames) - 1))
    frames[i] = frames[i][:5]
    with pytest.raises(ProtocolError) as ei:
        for f in split_batch(entries(frames)):
            parse_frame(f, MAX_DATA, False, False)
    assert ei.value.code == Code.TUNNEL and ei.value.subcode in (TunnelSub.MALFORMED_FRAME, TunnelSub.BAD_STREAM_ID)


def test_what_fits_one_batch_record() -> None:
    assert batch_fits(b"x" * 100, b"y" * (MAX_BATCH_PAYLOAD - 104))
    assert not batch_fits(b"x" * 100, b"y" * (MAX_BATCH_PAYLOAD - 103))
    big_open, big_data = b"o" * 200, b"d" * (6 + 65024)  # the largest OPEN and DATA fit together
    assert batch_fits(big_open, big_data)
