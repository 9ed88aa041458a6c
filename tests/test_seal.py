"""Sealed streams, sans-IO: keys, records, truncation, tampering, replay, and the spec's vectors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cpnd.seal import MAX_SEALED_CHUNK, Ephemerals, Opener, SealError, StreamSealer, outbound, x25519_public
from cpnd.tunnel import ExtHeader

RID = bytes(range(16))


def pair(opener: Opener | None = None):
    opener = opener or Opener(X25519PrivateKey.generate())
    eph, ingress = outbound(opener.public, RID, 7, "gw3", "s1")
    return ingress, opener.inbound(eph, RID, 7, "gw3", "s1"), opener, eph


def test_round_trip_in_pieces_and_both_ways() -> None:
    ingress, egress, _, _ = pair()
    body = bytes(range(256)) * 300  # several records
    wire = ingress.send.seal(body[:1000], False) + ingress.send.seal(body[1000:], True)
    got = b"".join(egress.recv.open(wire[i:i + 777]) for i in range(0, len(wire), 777))
    egress.recv.finish()
    assert got == body and len(wire) > len(body) + 16 * (len(body) // MAX_SEALED_CHUNK)
    assert ingress.recv.open(egress.send.seal(b"HTTP/1.1 200 OK\r\n\r\n", True)) == b"HTTP/1.1 200 OK\r\n\r\n"
    ingress.recv.finish()


def test_truncation_tampering_reordering_and_replay_are_refused() -> None:
    ingress, egress, opener, eph = pair()
    first, second = ingress.send.seal(b"a" * 10, False), ingress.send.seal(b"b" * 10, True)
    egress.recv.open(first)
    with pytest.raises(SealError, match="before its last record"):
        egress.recv.finish()  # a transit cut the stream short
    for bad in (first, second[:-1] + bytes([second[-1] ^ 1])):
        _, fresh, _, _ = pair(opener)
        with pytest.raises(SealError):
            fresh.recv.open(bad if bad is not first else second)  # out of order, or flipped
    with pytest.raises(SealError, match="replayed"):
        opener.inbound(eph, RID, 7, "gw3", "s1")
    other = Opener(X25519PrivateKey.generate())
    e2, ing2 = outbound(other.public, RID, 7, "gw3", "s1")
    moved = opener.inbound(e2, RID, 7, "gw3", "s1")  # sealed to someone else's key
    with pytest.raises(SealError, match="authentication"):
        moved.recv.open(ing2.send.seal(b"x", True))
    e3, ing3 = outbound(opener.public, RID, 7, "gw3", "s1")
    edited = opener.inbound(e3, RID, 7, "gw3", "s2")  # a transit changed the target in the header
    with pytest.raises(SealError):
        edited.recv.open(ing3.send.seal(b"x", True))


def test_stream_sealer_seals_as_ingress_only_and_opens_only_as_egress() -> None:
    opener = Opener(X25519PrivateKey.generate())
    keys = {"gw3": opener.public}
    s = StreamSealer("gw1", Opener(X25519PrivateKey.generate()), lambda ext: keys.get(ext.origin))
    ext, sealing, static = s.outbound(ExtHeader(7, "gw3", "s1"))
    assert ext.eph is not None and sealing is not None and s.counters["sealed_streams_out"] == 1
    assert static == opener.public
    relayed = ExtHeader.decode(ExtHeader(7, "gw9", "s1").encode())  # from a peer: a transit passes it on
    assert s.outbound(relayed) == (relayed, None, None)
    assert s.outbound(ExtHeader(7, "nobody", "s1"))[1] is None  # no verified key: not sealed
    assert s.inbound(ExtHeader.decode(ext.encode())) is None  # gw1 is not the egress of gw3's instance
    egress = StreamSealer("gw3", opener, lambda ext: None)
    got = egress.inbound(ExtHeader.decode(ext.encode()))
    assert got is not None and got.recv.open(sealing.send.seal(b"GET", True)) == b"GET"


def test_sealed_vectors(vectors) -> None:
    v = vectors["sealed"]
    static = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["origin_private"]))
    eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["eph_private"]))
    rid = bytes.fromhex(v["request_id"])
    pub, ingress = outbound(x25519_public(static), rid, v["label"], v["origin"], v["instance"], eph)
    assert pub.hex() == v["eph_public"] and x25519_public(static).hex() == v["origin_public"]
    assert (ingress.send.key.hex(), ingress.recv.key.hex()) == (v["request_key"], v["response_key"])
    assert ingress.send.seal(bytes.fromhex(v["request"]), True).hex() == v["sealed_request"]
    egress = Opener(static).inbound(pub, rid, v["label"], v["origin"], v["instance"])
    assert egress.recv.open(bytes.fromhex(v["sealed_request"])).hex() == v["request"]
    assert egress.send.seal(bytes.fromhex(v["response"]), True).hex() == v["sealed_response"]


def test_no_seal_when_the_first_hop_is_the_origin() -> None:
    """Sealing is for transits: a stream whose next hop is its origin is already encrypted end to end
    by the session (tunnel.md, "Sealed streams"); for any other origin the RIB's verified key is asked."""
    import types

    from cpnd.policy import stream_sealer
    from cpnd.rib import Rib
    from cpnd.tunnel import SEALED_CAP

    asked: list[str] = []
    rib = Rib("gw1")
    rib.opener = Opener(X25519PrivateKey.generate())
    rib.lookup_target = lambda label, origin, instance: asked.append(origin)  # type: ignore[method-assign]
    config = types.SimpleNamespace(gateway=types.SimpleNamespace(id="gw1", seal_streams=True))
    sealer = stream_sealer(rib, config, (SEALED_CAP,), "gw3")  # type: ignore[arg-type]
    assert sealer is not None
    assert sealer.key_for(ExtHeader(7, "gw3", "s1")) is None and asked == []  # next hop = origin: not sealed
    sealer.key_for(ExtHeader(7, "gw5", "s1"))
    assert asked == ["gw5"]  # through gw3 to gw5: the verified key decides


def test_an_exchange_drawn_ahead_seals_one_stream_only() -> None:
    """The ingress draws the next stream's X25519 exchange once a request is out: the stream that takes
    it opens at the egress as a fresh one would, and no two streams share an ephemeral key."""
    opener = Opener(X25519PrivateKey.generate())
    s = StreamSealer("gw1", Opener(X25519PrivateKey.generate()), lambda ext: opener.public)
    egress = StreamSealer("gw3", opener, lambda ext: None)
    s.draw_ahead(opener.public)
    drawn = s.ephemerals._ready[opener.public][0]
    s.draw_ahead(opener.public)  # one waits already: kept, not replaced
    assert s.ephemerals._ready[opener.public][0] == drawn
    keys = []
    for _ in range(3):
        ext, sealing, static = s.outbound(ExtHeader(7, "gw3", "s1"))
        assert sealing is not None and static == opener.public
        keys.append(ext.eph)
        got = egress.inbound(ExtHeader.decode(ext.encode()))  # the replay window would refuse a reused key
        assert got is not None and got.recv.open(sealing.send.seal(b"GET", True)) == b"GET"
        assert sealing.recv.open(got.send.seal(b"200", True)) == b"200"
    assert keys[0] == drawn and len(set(keys)) == 3 and not s.ephemerals._ready  # taken once; none drawn since
    small = StreamSealer("gw1", opener, lambda ext: None, ephemerals=Ephemerals(size=2))
    for _ in range(3):
        small.draw_ahead(Opener(X25519PrivateKey.generate()).public)
    assert len(small.ephemerals._ready) == 2  # bounded: one per origin key, the oldest dropped
