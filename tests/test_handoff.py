"""Sealed streams at a gateway with workers (cpnd/handoff.py): every process holds the sealing key
but has its own replay window, so each (ephemeral key, request id) pair has one owner worker, the only
process that opens it; a recorded stream replayed through another session or data channel meets the
same window, and an ingress's epoch (one key, many streams) spreads over the workers."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cpnd.handoff import PartSealer, owner
from cpnd.seal import Opener, SealError, StreamSealer, exchange, outbound, x25519_public
from cpnd.tunnel import ExtHeader

N = 2


def worker_sealer(key: X25519PrivateKey, index: int) -> PartSealer:
    opener = Opener(key)  # a process's own window over the one key
    base = StreamSealer("b", opener, lambda ext: None)
    return PartSealer(base, lambda: opener, lambda ext: owner(ext.eph, ext.request_id, N) == index)


def test_one_owner_opens_each_pair_and_a_replay_meets_its_window() -> None:
    key = X25519PrivateKey.generate()
    workers = [worker_sealer(key, i) for i in range(N)]
    owners = set()
    drawn = exchange(x25519_public(key))  # one epoch: every stream under one ephemeral key
    for _ in range(20):
        ext = ExtHeader(label=7, origin="b", instance="s1")
        eph, ingress = outbound(x25519_public(key), ext.request_id, 7, "b", "s1", drawn=drawn)
        sealed = ExtHeader(label=7, origin="b", instance="s1", request_id=ext.request_id, eph=eph)
        opened = [w.inbound(sealed) for w in workers]
        assert sum(o is not None for o in opened) == 1  # the others pass it on, still sealed
        who = owner(eph, ext.request_id, N)
        owners.add(who)
        got = opened[who]
        assert got is not None and got.open(ingress.send.seal(b"GET", True)) == b"GET"
        with pytest.raises(SealError, match="replayed"):
            workers[who].inbound(sealed)  # the same pair again: refused, wherever it came in
        assert workers[1 - who].inbound(sealed) is None
    assert owners == {0, 1}  # one epoch's streams spread over the workers


def test_not_ours_or_not_sealed_is_never_opened() -> None:
    w = worker_sealer(X25519PrivateKey.generate(), 0)
    assert w.inbound(ExtHeader(label=7, origin="b", instance="s1")) is None
    assert w.inbound(ExtHeader(label=7, origin="c", instance="s1", eph=bytes(32))) is None  # a transit's: relayed
