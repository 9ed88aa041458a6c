"""The control -> worker RIB feed (cpnd/ribfeed.py), sans-IO: a worker's mirror ends equal to the
control's Loc-RIB for peers' routes after a snapshot in batches and deltas, keeps its own instances,
and the channel's framing refuses what no process of ours sends."""

from __future__ import annotations

import attrs
import pytest

from cpnd.names import service_label
from cpnd.rib import Rib
from cpnd.ribfeed import (FEED_BATCH, MAX_FRAME, RIB, SIBLINGS, TUNNEL, ChannelError, Deframer, FeedOut, Mirror, encode,
                          read_siblings, siblings_message)
from cpnd.wire import RouteAdv, Update, Withdrawal


def adv(i: int, origin: str = "b", *, path: tuple[str, ...] = ("b",), load: float = 0.0) -> RouteAdv:
    return RouteAdv(service=f"/s{i % 7}", instance=f"i{i}", origin=origin, seq=1, label=service_label(f"/s{i % 7}"), path=path, latency_us=100,
                    capacity=10.0, load=load, price=1.0)


def drain(feed: FeedOut, control: Rib, worker: Rib, mirror: Mirror, peers: dict[str, bool], now: float = 1.0) -> int:
    frames = Deframer()
    n = 0
    while (data := feed.take(control, peers, now)) is not None:
        for kind, payload in frames.feed(data):
            assert kind == RIB
            mirror.apply(worker, payload, now)
            n += 1
    return n


def peer_view(rib: Rib) -> dict:
    return {k: (b.route.adv, b.route.peer, b.latency_us, b.fresh) for k, b in rib.loc.items() if b.route.peer is not None}


def test_snapshot_then_deltas_make_the_mirror_equal() -> None:
    control, worker, feed, mirror = Rib("a"), Rib("a"), FeedOut(), Mirror()
    control.set_link_cost("b", 500)
    control.apply_update("b", Update(adv=tuple(adv(i) for i in range(600)), wd=()), 0.0)
    own = RouteAdv(service="/mine", instance="m1", origin="a", seq=1, label=service_label("/mine"), path=("a",), latency_us=0, capacity=5.0,
                   load=0.0, price=1.0)
    control.set_local([own], 0.0)
    worker.set_local([own], 0.0)
    assert drain(feed, control, worker, mirror, {"b": True}) == -(-601 // FEED_BATCH)  # batches of FEED_BATCH
    assert mirror.synced and mirror.peers == {"b": True}
    assert peer_view(worker) == peer_view(control) and len(peer_view(worker)) == 600
    assert worker.loc[own.key].route.peer is None  # ours stays ours
    assert worker.by_service == control.by_service and worker.by_label == control.by_label

    changed = control.apply_update("b", Update(adv=(adv(1, load=0.5),), wd=(Withdrawal("/s2", "b", "i2"),)), 2.0)
    feed.mark(changed)
    assert drain(feed, control, worker, mirror, {"b": True}) == 1
    assert peer_view(worker) == peer_view(control)
    assert worker.loc[("/s1", "b", "i1")].fresh.load == 0.5 and ("/s2", "b", "i2") not in worker.loc

    feed.mark(control.peer_down("b"))
    drain(feed, control, worker, mirror, {})
    assert peer_view(worker) == {} and list(worker.loc) == [own.key] and mirror.peers == {}
    assert feed.take(control, {}, 3.0) is None  # up to date: nothing to send


def test_a_session_going_up_is_sent_without_a_route_change() -> None:
    control, worker, feed, mirror = Rib("a"), Rib("a"), FeedOut(), Mirror()
    drain(feed, control, worker, mirror, {})
    assert feed.take(control, {}, 1.0) is None
    drain(feed, control, worker, mirror, {"c": False})
    assert mirror.peers == {"c": False}


def test_framing_bounds_and_kinds() -> None:
    frames = Deframer()
    data = encode(TUNNEL, b"x" * 10) + encode(RIB, b"y")
    assert frames.feed(data[:7]) == []
    assert frames.feed(data[7:]) == [(TUNNEL, b"x" * 10), (RIB, b"y")]
    with pytest.raises(ChannelError):
        Deframer().feed((MAX_FRAME + 1).to_bytes(4, "big") + bytes([TUNNEL]))  # refused from its head alone
    with pytest.raises(ChannelError):
        Deframer().feed(encode(9, b""))
    with pytest.raises(ChannelError):
        Mirror().apply(Rib("a"), b"\x93\x01\x02\x03", 0.0)  # msgpack, but not a feed message


def test_siblings_add_up_the_other_workers_sends_and_bad_ones_are_refused() -> None:
    a, b = ("/s", "g", "i"), ("/s", "g", "j")
    frames = Deframer().feed(siblings_message([{a: 3}, {a: 4, b: 1}]))
    assert [k for k, _ in frames] == [SIBLINGS]
    assert read_siblings(frames[0][1]) == {a: 7, b: 1}
    many = [{("/" + "s" * 255, "g" * 64, f"{w:02}" + "i" * 62): 1 + w} for w in range(1200)]  # worst-case keys
    head, payload = Deframer().feed(siblings_message(many))[0]
    assert head == SIBLINGS and len(payload) < MAX_FRAME and len(read_siblings(payload)) == 1024
    assert min(read_siblings(payload).values()) == 1200 - 1024 + 1  # the busiest kept
    for bad in (b"\xc1", b"\x91\x93\x01\x02\x03", b"\x01"):
        with pytest.raises(ChannelError):
            read_siblings(bad)


def test_an_id_the_workers_file_gives_up_shows_the_controls_route_at_once() -> None:
    """The control's route for an id the worker serves from its own file is kept aside, not dropped:
    a reload that removes the id from the file (the control has it registered now) shows it at once."""
    control, worker, feed, mirror = Rib("a"), Rib("a"), FeedOut(), Mirror()
    mine = RouteAdv(service="/mine", instance="m1", origin="a", seq=1, label=service_label("/mine"), path=("a",),
                    latency_us=0, capacity=5.0, load=0.0, price=1.0)
    control.set_local([mine], 0.0)
    worker.set_local([mine], 0.0)
    drain(feed, control, worker, mirror, {})
    assert worker.loc[mine.key].route.peer is None  # the worker's own
    registered = attrs.evolve(mine, seq=2, price=0.5)  # the file dropped m1 and it was registered at the control
    feed.mark(control.set_local([registered], 1.0))
    drain(feed, control, worker, mirror, {})
    assert worker.loc[mine.key].route.peer is None  # still the worker's own until it reloads
    worker.set_local([], 2.0)  # the worker's reload
    assert mirror.unshadow(worker) == {mine.key}
    assert worker.loc[mine.key].route.peer == "a" and worker.loc[mine.key].fresh.price == 0.5  # via the control
