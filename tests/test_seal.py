"""Sealed streams, sans-IO: keys, records, truncation, tampering, replay by (ephemeral key, request id),
the ingress's epochs on a virtual clock, the egress's secrets, and the spec's vectors."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd import seal
from cpnd.seal import (
    EPOCH_S,
    EPOCH_STREAMS,
    MAX_SEALED_CHUNK,
    Ephemerals,
    Opener,
    SealError,
    StreamSealer,
    _hmac_sha256,
    exchange,
    outbound,
    x25519_public,
)
from cpnd.tunnel import ExtHeader

RID = bytes(range(16))


def pair(opener: Opener | None = None):
    opener = opener or Opener(X25519PrivateKey.generate())
    eph, ingress = outbound(opener.public, RID, 7, "gw3", "s1")
    return ingress, opener.inbound(eph, RID, 7, "gw3", "s1"), opener, eph


@given(st.binary(max_size=130), st.binary(max_size=300))
def test_hmac_is_rfc_2104s(key: bytes, msg: bytes) -> None:
    """derive's HMAC over CPython's own SHA-256 is the standard library's, for keys under and over a
    block; and over hashlib's SHA-256, the fallback where the interpreter has no SHA-256 of its own."""
    assert _hmac_sha256(key, msg) == hmac.digest(key, msg, hashlib.sha256)
    own = seal._sha256
    try:
        seal._sha256 = hashlib.sha256
        assert _hmac_sha256(key, msg) == hmac.digest(key, msg, hashlib.sha256)
    finally:
        seal._sha256 = own


def test_round_trip_in_pieces_and_both_ways() -> None:
    ingress, egress, _, _ = pair()
    body = bytes(range(256)) * 300  # several records
    wire = ingress.send.seal(body[:1000], False) + ingress.send.seal(body[1000:], True)
    got = b"".join(egress.recv.open(wire[i:i + 777]) for i in range(0, len(wire), 777))
    egress.recv.finish()
    assert got == body and len(wire) > len(body) + 16 * (len(body) // MAX_SEALED_CHUNK)
    assert ingress.recv.open(egress.send.seal(b"HTTP/1.1 200 OK\r\n\r\n", True)) == b"HTTP/1.1 200 OK\r\n\r\n"
    ingress.recv.finish()


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.lists(st.integers(0, 400), max_size=6),
       st.integers(0, 3))
def test_records_open_alike_however_the_chunks_cut_them(parts: list[bytes], cuts: list[int], extra: int) -> None:
    """A chunk that is one whole record opens without the buffer; any other cut through the buffer:
    the same plaintext, and the same refusals (bytes after the last record, a bad length)."""
    ingress, egress, _, _ = pair()
    wire = b"".join(ingress.send.seal(p, i == len(parts) - 1) for i, p in enumerate(parts))
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    got = b"".join(egress.recv.open(wire[a:b]) for a, b in zip(bounds, bounds[1:]))
    egress.recv.finish()
    assert got == b"".join(parts)
    with pytest.raises(SealError, match="after the last"):
        egress.recv.open(ingress.send.seal(b"x", True))
    _, fresh, _, _ = pair()
    with pytest.raises(SealError, match="sealed record of"):
        fresh.recv.open(extra.to_bytes(4, "big") + bytes(extra))  # too short to hold a tag


def test_truncation_tampering_reordering_and_replay_are_refused() -> None:
    ingress, egress, opener, eph = pair()
    first, second = ingress.send.seal(b"a" * 10, False), ingress.send.seal(b"b" * 10, True)
    egress.open(first)  # authenticated: its pair is in the window now
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
    opener = Opener(static)
    egress = opener.inbound(pub, rid, v["label"], v["origin"], v["instance"])
    assert egress.open(bytes.fromhex(v["sealed_request"])).hex() == v["request"]
    assert egress.send.seal(bytes.fromhex(v["response"]), True).hex() == v["sealed_response"]
    # The epoch's second stream: the same eph, its own request id and keys; the egress opens both.
    e = v["epoch"]
    rid2 = bytes.fromhex(e["request_id"])
    pub2, ingress2 = outbound(x25519_public(static), rid2, v["label"], v["origin"], v["instance"], eph)
    assert pub2 == pub and (ingress2.send.key.hex(), ingress2.recv.key.hex()) == (e["request_key"], e["response_key"])
    assert ingress2.send.seal(bytes.fromhex(v["request"]), True).hex() == e["sealed_request"]
    egress2 = opener.inbound(pub, rid2, v["label"], v["origin"], v["instance"])
    assert egress2.open(bytes.fromhex(e["sealed_request"])).hex() == v["request"]
    assert egress2.send.seal(bytes.fromhex(v["response"]), True).hex() == e["sealed_response"]
    with pytest.raises(SealError, match="replayed"):
        opener.inbound(pub, rid2, v["label"], v["origin"], v["instance"])
    assert opener.exchanges == 1


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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sealers(clock: Clock, size: int = 256) -> tuple[StreamSealer, StreamSealer, Opener]:
    """An ingress (gw1) on a virtual clock and the egress (gw3) it seals to."""
    opener = Opener(X25519PrivateKey.generate())
    ingress = StreamSealer("gw1", Opener(X25519PrivateKey.generate()), lambda ext: opener.public,
                           ephemerals=Ephemerals(size, clock))
    return ingress, StreamSealer("gw3", opener, lambda ext: None), opener


def served(ingress: StreamSealer, egress: StreamSealer, rid: bytes | None = None) -> ExtHeader:
    """One stream through both: its request and its answer open at the other end."""
    ext, sealing, _ = ingress.outbound(ExtHeader(7, "gw3", "s1", rid or os.urandom(16)))
    got = egress.inbound(ExtHeader.decode(ext.encode()))
    assert sealing is not None and got is not None
    assert got.open(sealing.send.seal(b"GET", True)) == b"GET"
    assert sealing.recv.open(got.send.seal(b"200", True)) == b"200"
    return ext


def test_an_epoch_seals_many_streams_under_one_key_each_with_its_own_keys() -> None:
    ingress, egress, opener = sealers(Clock())
    streams = []
    for _ in range(5):
        ext, sealing, _ = ingress.outbound(ExtHeader(7, "gw3", "s1"))
        assert sealing is not None
        streams.append((ext, sealing))
    assert len({ext.eph for ext, _ in streams}) == 1  # one exchange for the epoch
    assert len({s.send.key for _, s in streams} | {s.recv.key for _, s in streams}) == 10  # the request id salts each
    for ext, sealing in streams:
        got = egress.inbound(ExtHeader.decode(ext.encode()))
        assert got is not None and got.open(sealing.send.seal(b"GET", True)) == b"GET"
    assert opener.exchanges == 1 and egress.counters["sealed_exchanges_in"] == 1  # the egress kept the secret
    assert ingress.counters["sealed_epochs_out"] == 1 and egress.counters["sealed_streams_in"] == 5


def test_an_epoch_ends_after_epoch_s_and_the_next_is_drawn_ahead() -> None:
    clock = Clock()
    ingress, egress, _ = sealers(clock)
    first = served(ingress, egress).eph
    ingress.draw_ahead(egress.opener.public)
    assert not ingress.ephemerals._next  # young: nothing drawn yet
    clock.now += EPOCH_S / 2
    assert served(ingress, egress).eph == first
    ingress.draw_ahead(egress.opener.public)  # half spent: the next drawn now, off the next request's path
    ahead = ingress.ephemerals._next[egress.opener.public].pub
    clock.now += EPOCH_S / 2 - 0.001
    assert served(ingress, egress).eph == first  # 9.999 s after it was drawn: still the epoch's
    clock.now += 0.001
    assert served(ingress, egress).eph == ahead and not ingress.ephemerals._next  # 10 s: the drawn one took over
    assert ingress.counters["sealed_epochs_out"] == 2
    clock.now += EPOCH_S  # idle: both expire; the next stream draws its own at once
    ingress.draw_ahead(egress.opener.public)
    clock.now += EPOCH_S
    third = served(ingress, egress).eph
    assert third not in (first, ahead)
    assert list(ingress.ephemerals._current) == [egress.opener.public] and not ingress.ephemerals._next


def test_an_epoch_ends_after_epoch_streams() -> None:
    clock = Clock()
    eph = Ephemerals(clock=clock)
    static = Opener(X25519PrivateKey.generate()).public
    keys = [eph.take(static, i.to_bytes(16, "big")) for i in range(EPOCH_STREAMS + 1)]
    assert keys[0][2] and not any(k[2] for k in keys[1:EPOCH_STREAMS]) and keys[EPOCH_STREAMS][2]
    assert len({k[0] for k in keys[:EPOCH_STREAMS]}) == 1 and keys[EPOCH_STREAMS][0] != keys[0][0]


def test_a_request_id_sent_under_the_epoch_begins_a_new_one() -> None:
    """A retry of one request to the same origin keeps its request id: under the same key its pair
    would be a replay at the egress (and its keys the first try's), so it starts a new epoch."""
    ingress, egress, _ = sealers(Clock())
    rid = os.urandom(16)
    first = served(ingress, egress, rid).eph
    assert served(ingress, egress).eph == first
    again = served(ingress, egress, rid).eph  # served: the egress would have refused it under `first`
    assert again != first and served(ingress, egress).eph == again


def test_the_egress_recomputes_a_secret_it_no_longer_keeps() -> None:
    opener = Opener(X25519PrivateKey.generate(), secrets=2)
    drawn = [exchange(opener.public) for _ in range(3)]

    def stream(d: tuple[bytes, bytes]) -> None:
        rid = os.urandom(16)
        pub, ingress = outbound(opener.public, rid, 7, "gw3", "s1", drawn=d)
        assert opener.inbound(pub, rid, 7, "gw3", "s1").open(ingress.send.seal(b"GET", True)) == b"GET"

    for d in drawn:
        stream(d)
    assert opener.exchanges == 3 and len(opener._secrets) == 2
    stream(drawn[2])
    assert opener.exchanges == 3  # kept
    stream(drawn[0])  # the least recently used went: recomputed, the same keys
    assert opener.exchanges == 4 and len(opener._secrets) == 2


def test_replay_is_refused_by_pair_and_recorded_only_once_authenticated() -> None:
    opener = Opener(X25519PrivateKey.generate())
    drawn, rid = exchange(opener.public), os.urandom(16)
    pub, ingress = outbound(opener.public, rid, 7, "gw3", "s1", drawn=drawn)
    record = ingress.send.seal(b"GET", True)
    # One who knows the header (every transit) but not the secret: its stream fails, and plants nothing.
    forged = opener.inbound(pub, rid, 7, "gw3", "s1")
    with pytest.raises(SealError, match="authentication"):
        forged.open(record[:4] + bytes(len(record) - 4))  # a record of the right length, its own bytes
    # Two streams with the same pair at once (a duplicated OPEN): the first to authenticate is served.
    a, b = opener.inbound(pub, rid, 7, "gw3", "s1"), opener.inbound(pub, rid, 7, "gw3", "s1")
    assert a.open(record) == b"GET"
    with pytest.raises(SealError, match="replayed"):
        b.open(record)
    with pytest.raises(SealError, match="replayed"):
        opener.inbound(pub, rid, 7, "gw3", "s1")  # and later: refused before a record is read
    other = os.urandom(16)
    pub2, ingress2 = outbound(opener.public, other, 7, "gw3", "s1", drawn=drawn)
    assert pub2 == pub  # the same key, another request id: its own stream
    assert opener.inbound(pub, other, 7, "gw3", "s1").open(ingress2.send.seal(b"GET", True)) == b"GET"
    assert opener.exchanges == 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.floats(0, 4)), max_size=60))
def test_epochs_never_reuse_a_pair_nor_outlive_their_bounds(steps) -> None:
    """Any order of streams to a few origins, request ids reused, time passing and draws: no
    (key, request id) pair sealed twice, no key used past EPOCH_S after it was drawn, the tables bounded."""
    clock = Clock()
    eph = Ephemerals(size=3, clock=clock)
    statics = [x25519_public(X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)) for i in range(6)]
    born: dict[bytes, float] = {}
    used: set[bytes] = set()
    for origin, rid, dt in steps:
        clock.now += dt
        pub, _, begun = eph.take(statics[origin], bytes([rid]) * 16)
        if begun and pub not in born:
            born[pub] = clock.now
        assert pub + bytes([rid]) not in used and clock.now - born[pub] < EPOCH_S
        used.add(pub + bytes([rid]))
        eph.draw(statics[origin])
        for table in (eph._current, eph._next):
            assert len(table) <= 3
            for e in table.values():
                born.setdefault(e.pub, e.born)
                assert e.born == born[e.pub]


def test_the_egress_stays_bounded_under_a_flood_of_keys_and_pairs() -> None:
    opener = Opener(X25519PrivateKey.generate(), secrets=8, window=16)
    for _ in range(40):
        drawn = exchange(opener.public)
        for _ in range(3):
            rid = os.urandom(16)
            pub, ingress = outbound(opener.public, rid, 7, "gw3", "s1", drawn=drawn)
            opener.inbound(pub, rid, 7, "gw3", "s1").open(ingress.send.seal(b"GET", True))
        opener.inbound(os.urandom(32), os.urandom(16), 7, "gw3", "s1")  # never authenticates: no pair
        assert len(opener._secrets) <= 8 and len(opener._seen) <= 16
    assert opener.exchanges == 80
    small = Ephemerals(size=2)
    for _ in range(3):
        static = Opener(X25519PrivateKey.generate()).public
        small.take(static, os.urandom(16))
        small.draw(static)
    assert len(small._current) == 2 and len(small._next) <= 2  # one epoch per origin key, the oldest dropped
