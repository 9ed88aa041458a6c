"""Handshake and record layer: authentication, key agreement, replay and tamper."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cpnd.crypto import (
    Handshake,
    KeyFileError,
    RecordLayer,
    Role,
    load_private_key,
    parse_public_key,
    public_key_b64,
    write_private_key,
)
from cpnd.errors import Code, HandshakeSub, ProtocolError, RecordSub
from cpnd.wire import ContentType, Hello, decode_message, encode_handshake


def pair(keys, *, resp_peers=None, init_peers=None, expected="b"):
    init = Handshake(Role.INITIATOR, "a", keys["a"], init_peers or {"b": keys["b"].public_key()}, expected_peer=expected)
    resp = Handshake(Role.RESPONDER, "b", keys["b"], resp_peers or {"a": keys["a"].public_key()})
    return init, resp


def test_handshake_agrees_on_keys(keys) -> None:
    init, resp = pair(keys)
    fin = init.receive(resp.receive(init.start()))
    assert resp.receive(fin) is None
    assert init.complete and resp.complete
    assert init.traffic_keys() == resp.traffic_keys()[::-1]
    assert init.peer_id == "b" and resp.peer_id == "a"


def test_unknown_initiator_is_refused(keys) -> None:
    init, resp = pair(keys, resp_peers={"c": keys["c"].public_key()})
    with pytest.raises(ProtocolError) as ei:
        resp.receive(init.start())
    assert (ei.value.code, ei.value.subcode) == (Code.HANDSHAKE, HandshakeSub.UNKNOWN_PEER)


def test_initiator_with_wrong_key_fails_at_finish(keys) -> None:
    init, resp = pair(keys, resp_peers={"a": keys["c"].public_key()})
    fin = init.receive(resp.receive(init.start()))
    with pytest.raises(ProtocolError) as ei:
        resp.receive(fin)
    assert ei.value.subcode == HandshakeSub.BAD_SIGNATURE


def test_responder_with_wrong_key_fails_at_ack(keys) -> None:
    init, resp = pair(keys, init_peers={"b": keys["c"].public_key()})
    with pytest.raises(ProtocolError) as ei:
        init.receive(resp.receive(init.start()))
    assert ei.value.subcode == HandshakeSub.BAD_SIGNATURE


def test_wrong_responder_id(keys) -> None:
    init, resp = pair(keys, init_peers={"c": keys["b"].public_key()}, expected="c")
    with pytest.raises(ProtocolError) as ei:
        resp.receive(init.start())  # hello is addressed to "c", this is "b"
    assert ei.value.subcode == HandshakeSub.WRONG_PEER


def test_unsupported_version(keys) -> None:
    _, resp = pair(keys)
    hello = encode_handshake(Hello((7,), "a", "b", os.urandom(32)))
    with pytest.raises(ProtocolError) as ei:
        resp.receive(hello)
    assert ei.value.subcode == HandshakeSub.UNSUPPORTED_VERSION


def test_low_order_key_share(keys) -> None:
    _, resp = pair(keys)
    with pytest.raises(ProtocolError) as ei:
        resp.receive(encode_handshake(Hello((1,), "a", "b", bytes(32))))
    assert ei.value.subcode == HandshakeSub.BAD_KEY_SHARE


def test_replayed_finish_from_old_handshake_fails(keys) -> None:
    init, resp = pair(keys)
    fin = init.receive(resp.receive(init.start()))
    resp.receive(fin)
    init2, resp2 = pair(keys)
    resp2.receive(init2.start())
    with pytest.raises(ProtocolError) as ei:
        resp2.receive(fin)  # signed over another transcript
    assert ei.value.subcode == HandshakeSub.BAD_SIGNATURE


def records() -> tuple[RecordLayer, RecordLayer]:
    k1, k2 = os.urandom(32), os.urandom(32)
    return RecordLayer(k1, k2), RecordLayer(k2, k1)


def _split(fr: bytes) -> tuple[bytes, bytes]:
    return fr[:4], fr[4:]


def test_records_round_trip_and_count() -> None:
    a, b = records()
    for i in range(3):
        assert b.open(*_split(a.seal(ContentType.CONTROL, b"msg%d" % i))) == (1, b"msg%d" % i)
    assert a.send_counter == b.recv_counter == 3


@pytest.mark.parametrize("attack", ["replay", "reorder", "tamper", "truncate", "header"])
def test_record_attacks_are_fatal(attack: str) -> None:
    a, b = records()
    r1, r2 = a.seal(1, b"one"), a.seal(1, b"two")
    if attack == "replay":
        b.open(*_split(r1))
        bad = r1
    elif attack == "reorder":
        bad = r2
    elif attack == "tamper":
        bad = r1[:-1] + bytes([r1[-1] ^ 1])
    elif attack == "truncate":
        bad = r1[:4] + r1[4:10]
    else:
        bad = b"\x00\x00\x01\x00" + r1[4:]  # the length header is authenticated data
    with pytest.raises(ProtocolError) as ei:
        b.open(*_split(bad))
    assert (ei.value.code, ei.value.subcode) == (Code.RECORD, RecordSub.DECRYPT_FAILED)


def test_key_files(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "k.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_b64(load_private_key(path)) == public_key_b64(key)
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(path, Ed25519PrivateKey.generate())
    write_private_key(path, Ed25519PrivateKey.generate(), force=True)
    assert public_key_b64(load_private_key(path)) != public_key_b64(key)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"readable by group or others \(mode 0644\); chmod 600 it"):
        load_private_key(path)
    (tmp_path / "junk").write_text("hello")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_private_key(tmp_path / "junk")
    with pytest.raises(KeyFileError, match="no such file"):
        load_private_key(tmp_path / "missing")


@pytest.mark.parametrize(("text", "why"), [("!!", "base64"), ("AAAA", "32 bytes")])
def test_bad_public_keys(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_public_key(text)


@pytest.mark.parametrize("which", ["handshake", "handshake-data-channel"])
def test_handshake_vector(vectors, which: str) -> None:
    v = vectors[which]
    ki = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["initiator"]["identity_seed"]))
    kr = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["responder"]["identity_seed"]))
    assert public_key_b64(ki) == v["initiator"]["public_key"]
    init = Handshake(Role.INITIATOR, "gw1", ki, {"gw2": kr.public_key()}, expected_peer="gw2",
                     random_bytes=lambda n: bytes.fromhex(v["initiator"]["ephemeral_seed"])[:n],
                     data_channel=which == "handshake-data-channel")
    resp = Handshake(Role.RESPONDER, "gw2", kr, {"gw1": ki.public_key()},
                     random_bytes=lambda n: bytes.fromhex(v["responder"]["ephemeral_seed"])[:n])
    hello = init.start()
    assert (len(hello).to_bytes(4, "big") + hello).hex() == v["hello_frame"]
    ack = resp.receive(hello)
    assert (len(ack).to_bytes(4, "big") + ack).hex() == v["hello_ack_frame"]
    fin = init.receive(ack)
    assert (len(fin).to_bytes(4, "big") + fin).hex() == v["finish_frame"]
    resp.receive(fin)
    send, recv = init.traffic_keys()
    assert send.hex() == v["key_initiator_to_responder"] and recv.hex() == v["key_responder_to_initiator"]
    rr = RecordLayer(*resp.traffic_keys())
    for rec in v["initiator_records"]:
        fr = bytes.fromhex(rec["frame"])
        ctype, payload = rr.open(fr[:4], fr[4:])
        assert ctype == rec["content_type"]
        decode_message(payload)
    assert init.transcript.hex() == resp.transcript.hex() == v["transcript_hash"]
    assert resp.data_channel is (which == "handshake-data-channel")
