"""Route limits between peers, sans-IO: LIMITS, the pace of UPDATEs in and out, withholding.

Time is an input everywhere here (a virtual clock); nothing sleeps and nothing opens a socket.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.crypto import Role
from cpnd.errors import CeaseSub, Code, FsmSub, ProtocolError
from cpnd.limits import DEFAULT_PEER_ROUTES, TokenBucket
from cpnd.names import service_label
from cpnd.rib import AdjRibOut, Rib, export_rank
from cpnd.session import UPDATE_SLICE, Closed, Session, SessionConfig, State, UpdateReceived
from cpnd.wire import Keepalive, Limits, RouteAdv, Update, Withdrawal, encode_message

from test_session import Link, _inject

LABEL = service_label("/svc")


def adv(inst: str, origin: str, path: tuple[str, ...], lat: int = 0, seq: int = 1) -> RouteAdv:
    return RouteAdv("/svc", inst, origin, seq, LABEL, path, lat, 10.0, 0.0, 1.0, 0)


# ---------------------------------------------------------------- the token bucket


def test_bucket_starts_full_refills_at_rate_and_caps_at_burst() -> None:
    b = TokenBucket(10, 20)
    assert b.take(20, 0.0) and not b.take(1, 0.0)
    assert b.ready_at(5, 0.0) == pytest.approx(0.5)
    assert not b.take(5, 0.4) and b.take(5, 0.5)
    assert b.level(100.0) == 20  # never more than the burst
    b.charge(30, 100.0)  # work already done is counted, below zero
    assert b.level(100.0) == -10 and b.ready_at(0, 100.0) == pytest.approx(101.0)
    assert b.level(99.0) == -10  # a clock that steps back refills nothing
    assert b.ready_at(1000, 100.0) == pytest.approx(103.0)  # asking for more than the burst waits for a full one


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.integers(1, 50)), max_size=60))
def test_bucket_never_gives_more_than_burst_plus_rate_times_time(steps) -> None:
    b = TokenBucket(25, 40)
    now, taken = 0.0, 0
    for dt, n in steps:
        now += dt
        if b.take(n, now):
            taken += n
    assert taken <= 40 + 25 * now + 1e-6


# ---------------------------------------------------------------- LIMITS in the session


def test_limits_exchanged_when_both_offer_route_limits(keys) -> None:
    link = Link(keys, cfg_a=SessionConfig(limits=Limits(500, 100, 600)), cfg_b=SessionConfig(limits=Limits(7, 3, 9)))
    link.pump()
    assert link.a.state is link.b.state is State.ESTABLISHED
    assert link.a.peer_limits == Limits(7, 3, 9) and link.b.peer_limits == Limits(500, 100, 600)
    assert link.a.export_limit == 7 and link.b.export_limit == 500
    assert link.a.send_budget(link.now) <= 9  # a counts what it sends against b's pace


def test_a_peer_without_route_limits_is_assumed_to_take_the_old_default(keys) -> None:
    old = SessionConfig(caps=("route-refresh", "tunnel"))
    link = Link(keys, cfg_a=old)
    link.pump()
    assert link.a.state is link.b.state is State.ESTABLISHED
    assert link.a.peer_limits is None and link.b.peer_limits is None  # no LIMITS either way
    assert link.b.export_limit == DEFAULT_PEER_ROUTES == 10_000
    assert link.b.send_budget(link.now) > 1_000_000  # nothing announced: no pace to honour


def _b_in_open_confirm(link: Link) -> Link:
    """b has a's OPEN and is in open-confirm; a has not heard b's OPEN, LIMITS or KEEPALIVE."""
    link.b.receive_data(link.a.data_to_send(), link.now)  # HELLO
    link.a.receive_data(link.b.data_to_send(), link.now)  # HELLO-ACK -> FINISH, OPEN
    link.b.receive_data(link.a.data_to_send(), link.now)
    link.b.data_to_send()  # b's OPEN, LIMITS, KEEPALIVE: never delivered
    assert link.b.state is State.OPEN_CONFIRM
    return link


def test_keepalive_before_limits_is_an_fsm_error(keys) -> None:
    link = _b_in_open_confirm(Link(keys))
    _inject(link, link.a, encode_message(Keepalive(1, 0, 0)))
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.FSM, FsmSub.UNEXPECTED_IN_OPEN_CONFIRM)


def test_limits_twice_is_an_fsm_error(keys) -> None:
    link = _b_in_open_confirm(Link(keys))
    _inject(link, link.a, encode_message(Limits(1, 1, 1)))
    assert link.b.state is State.OPEN_CONFIRM
    _inject(link, link.a, encode_message(Limits(1, 1, 1)))
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.FSM, FsmSub.UNEXPECTED_IN_OPEN_CONFIRM)


def test_limits_once_established_is_an_fsm_error(keys) -> None:
    link = Link(keys)
    link.pump()
    _inject(link, link.a, encode_message(Limits(1, 1, 1)))
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.FSM, FsmSub.UNEXPECTED_IN_ESTABLISHED)


def test_limits_without_the_capability_is_an_fsm_error(keys) -> None:
    link = _b_in_open_confirm(Link(keys, cfg_a=SessionConfig(caps=("route-refresh",))))
    _inject(link, link.a, encode_message(Limits(1, 1, 1)))
    assert (link.b.closed.code, link.b.closed.subcode) == (Code.FSM, FsmSub.UNEXPECTED_IN_OPEN_CONFIRM)


# ---------------------------------------------------------------- UPDATEs in slices, at the peer's pace


def _entries(events) -> list:
    return [x for e in events if isinstance(e, UpdateReceived) for x in (*e.update.wd, *e.update.adv)]


def test_a_large_update_comes_in_slices_withdrawals_first(keys) -> None:
    link = Link(keys)
    link.pump()
    advs = [adv(f"i{n}", "a", ("a",)) for n in range(150)]
    wds = [Withdrawal("/svc", "a", f"w{n}") for n in range(40)]
    link.a.send_update(advs, wds)
    link.pump()
    slices = [e for e in link.events["b"] if isinstance(e, UpdateReceived)]
    assert len(slices) == math.ceil(190 / UPDATE_SLICE) and all(len(s.update.adv) + len(s.update.wd) <= UPDATE_SLICE for s in slices)
    assert _entries(slices) == [*wds, *advs]  # every entry once, in order, withdrawals first


def test_the_inbound_pace_holds_updates_back_and_the_hold_timer_waits(keys) -> None:
    # b takes 20 entries a second, bursts of 20, with a 600 ms hold: a (not honouring it) sends 100.
    link = Link(keys, cfg_b=SessionConfig(hold_ms=600, limits=Limits(1000, 20, 20)))
    link.pump()
    link.a.outbound = None  # a dishonest sender: no pace of its own
    link.a.send_update([adv(f"i{n}", "a", ("a",)) for n in range(100)], [])
    link.pump()
    assert len(_entries(link.events["b"])) == 20  # the burst
    assert not link.b.wants_data() and link.b.resume_at() == pytest.approx(link.now + 1.0, abs=0.01)
    start = link.now
    link.advance(2.0)
    got = len(_entries(link.events["b"]))
    assert 20 < got <= 20 + 20 * 2.0  # the pace (a's KEEPALIVEs take their token each too)
    link.advance(10.0)
    assert len(_entries(link.events["b"])) == 100 and link.b.wants_data()
    # Seconds of pacing with a 600 ms hold, and nobody hung up: our own pause is not the peer's silence.
    assert link.now - start >= 4.0 and link.a.state is link.b.state is State.ESTABLISHED


def test_messages_without_entries_cost_a_token_each(keys) -> None:
    link = Link(keys, cfg_b=SessionConfig(limits=Limits(1000, 10, 5)))
    link.pump()
    for n in range(12):
        _inject(link, link.a, encode_message(Keepalive(n + 1, 0, 0)))
    assert link.b.inbound.level(link.now) < 0 and not link.b.wants_data()
    assert link.b.resume_at() > link.now


def test_a_bad_entry_after_good_slices_ends_the_session(keys) -> None:
    import msgpack

    link = Link(keys)
    link.pump()
    good = [{"svc": "/svc", "inst": f"i{n}", "origin": "a", "seq": 1, "label": LABEL, "path": ["a"], "lat": 0,
             "cap": 1.0, "load": 0.0, "bload": 0.0, "price": 1.0, "comp": 0} for n in range(UPDATE_SLICE * 2)]
    bad = dict(good[0], inst="bad", cap=0.0)
    _inject(link, link.a, msgpack.packb({"t": 3, "adv": [*good, bad], "wd": []}))
    assert len(_entries(link.events["b"])) == UPDATE_SLICE * 2
    closed = [e for e in link.events["b"] if isinstance(e, Closed)]
    assert closed and (closed[0].code, closed[0].subcode) == (Code.UPDATE, 3)
    link.pump()  # b found the bad entry while handing out events: its NOTIFICATION goes now
    assert link.a.closed is not None and link.a.closed.code == Code.UPDATE  # a was told


def test_the_sender_counts_what_it_sends_against_the_peers_pace(keys) -> None:
    link = Link(keys, cfg_b=SessionConfig(limits=Limits(1000, 10, 50)))
    link.pump()
    before = link.a.send_budget(link.now)
    link.a.send_update([adv(f"i{n}", "a", ("a",)) for n in range(30)], [])
    assert link.a.send_budget(link.now) == before - 30
    assert link.a.send_ready_at(before, link.now) == pytest.approx(link.now + 3.0)


# ---------------------------------------------------------------- withholding (Adj-RIB-Out with a limit)


def _rib_with(n_own: int, learned: dict[str, list[tuple[str, tuple[str, ...], int]]]) -> Rib:
    rib = Rib("me", max_routes_per_peer=100_000)
    rib.set_local([adv(f"own{n}", "me", ("me",)) for n in range(n_own)], 0.0)
    for peer, routes in learned.items():
        rib.set_link_cost(peer, 1)
        rib.apply_update(peer, Update(tuple(adv(i, path[-1], path, lat) for i, path, lat in routes)), 0.0)
    return rib


def test_limit_keeps_own_instances_then_fewest_hops_then_lowest_latency() -> None:
    rib = _rib_with(2, {"p": [("far", ("p", "x", "y"), 0), ("slow", ("p",), 900), ("fast", ("p",), 5)]})
    out = AdjRibOut("q", 0.0, max_routes=4)
    out.mark_all(rib)
    adv_, wd = out.flush(rib, 0.0)
    assert sorted(a.instance for a in adv_) == ["fast", "own0", "own1", "slow"] and not wd
    assert list(out.withheld) == [("/svc", "y", "far")] and out.withheld_total == 1


def test_a_better_route_displaces_the_worst_sent_and_room_brings_withheld_back() -> None:
    rib = _rib_with(0, {"p": [(f"r{n}", ("p", "o"), 100) for n in range(3)]})
    out = AdjRibOut("q", 0.0, max_routes=2)
    out.mark_all(rib)
    out.flush(rib, 0.0)
    assert len(out.sent) == 2 and len(out.withheld) == 1
    # Our own instance appears: it goes out, the worst learned route is withdrawn for it.
    out.mark(rib.set_local([adv("mine", "me", ("me",))], 1.0))
    adv_, wd = out.flush(rib, 1.0)
    assert [a.instance for a in adv_] == ["mine"] and len(wd) == 1 and len(out.withheld) == 2
    # Two learned routes go away: both withheld ones fit again.
    gone = [k for k in out.sent if k[2] != "mine"][:1]
    out.mark(rib.apply_update("p", Update((), tuple(Withdrawal(*k) for k in gone)), 2.0))
    adv_, wd = out.flush(rib, 2.0)
    assert len(out.sent) == 2 and len(out.withheld) == 1 and len(wd) == 1 and len(adv_) == 1


def test_limit_zero_sends_nothing() -> None:
    rib = _rib_with(3, {})
    out = AdjRibOut("q", 0.0, max_routes=0)
    out.mark_all(rib)
    assert out.flush(rib, 0.0) == ([], []) and len(out.withheld) == 3


def test_a_budget_cuts_a_burst_into_steps_that_follow_at_once() -> None:
    rib = _rib_with(10, {})
    out = AdjRibOut("q", 5.0)
    out.mark_all(rib)
    adv_, _ = out.flush(rib, 0.0, budget=4)
    assert len(adv_) == 4 and out.due(0.0) == 0.0 and not out.initial_done  # the rest of the burst goes on now
    adv2, _ = out.flush(rib, 0.0, budget=100)
    assert len(adv2) == 6 and out.initial_done and out.due(0.0) is None
    out.mark(rib.set_local([], 1.0))
    assert out.due(1.0) == 5.0  # a new burst waits for the minimum interval


def test_refresh_resends_unchanged_routes_and_costs_one_flag() -> None:
    rib = _rib_with(3, {})
    out = AdjRibOut("q", 0.0)
    out.mark_all(rib)
    out.flush(rib, 0.0)
    for _ in range(1000):  # a flood of ROUTE-REFRESH: one pass
        out.mark_all(rib)
    adv_, _ = out.flush(rib, 1.0)
    assert len(adv_) == 3 and out.due(2.0) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.lists(st.tuples(st.sampled_from(["p", "r"]), st.integers(0, 20), st.booleans(),
                                             st.integers(1, 3), st.integers(0, 50)), min_size=1, max_size=40),
       st.integers(1, 7))
def test_never_more_than_the_limit_and_at_rest_the_best_are_sent(limit, changes, budget) -> None:
    """Random churn from two peers, flushed with a small budget: the peer never holds more than
    its limit, and once the flushes catch up it holds exactly the best-ranked exportable routes."""
    rib = _rib_with(2, {})
    out = AdjRibOut("q", 0.0, max_routes=limit)
    out.mark_all(rib)
    held: dict = {}  # what the peer holds, replayed from what we sent it
    now = 0.0

    def flush(budget: int | None) -> bool:
        adv_, wd = out.flush(rib, now, budget)
        for w in wd:
            held.pop(w.key)
        for a in adv_:
            held[a.key] = a
        assert len(held) <= limit
        return bool(adv_ or wd)

    def flush_all() -> None:
        while out.due(now) is not None:
            if not flush(budget) and not out._plan:  # noqa: SLF001
                break  # only a swap the budget cannot afford remains

    for peer, n, add, hops, lat in changes:
        now += 0.01
        path = (peer, *(f"h{k}" for k in range(hops - 1)), f"o{n}")
        upd = Update((adv(f"i{n}", f"o{n}", path, lat),), ()) if add else Update((), (Withdrawal("/svc", f"o{n}", f"i{n}"),))
        out.mark(rib.apply_update(peer, upd, now))
        flush_all()
    flush(None)  # no budget: every pending swap
    assert out.due(now) is None
    exportable = [e for k in rib.loc if (e := rib.export("q", k)) is not None]
    want = sorted(exportable, key=export_rank)[:limit]
    assert set(held) == set(out.sent) == {a.key for a in want}
    assert set(out.withheld) == {a.key for a in exportable} - set(held)
    assert all(held[a.key] == a for a in want)


# ---------------------------------------------------------------- the receiver's limit (Rib)


def test_over_the_limit_is_cease_max_routes_and_the_announced_limit_is_per_session() -> None:
    rib = Rib("me", max_routes_per_peer=5)
    rib.import_limits["p"] = 3  # what p's session was told
    rib.apply_update("p", Update(tuple(adv(f"i{n}", "o", ("p", "o")) for n in range(3))), 0.0)
    with pytest.raises(ProtocolError) as exc:
        rib.apply_update("p", Update((adv("i9", "o", ("p", "o")),)), 0.0)
    assert (exc.value.code, exc.value.subcode) == (Code.CEASE, CeaseSub.MAX_ROUTES)
    rib.apply_update("q", Update(tuple(adv(f"i{n}", "o", ("q", "o")) for n in range(5))), 0.0)  # q: the default 5


def test_routes_kept_stale_through_a_restart_do_not_count_against_the_new_session() -> None:
    rib = Rib("me", max_routes_per_peer=3)
    rib.apply_update("p", Update(tuple(adv(f"old{n}", "o", ("p", "o")) for n in range(3))), 0.0)
    rib.peer_stale("p", 100.0)
    # The new session sends three other routes: with the three stale ones that is six held for a moment.
    rib.apply_update("p", Update(tuple(adv(f"new{n}", "o", ("p", "o")) for n in range(3))), 1.0)
    assert len(rib.adj_in["p"]) == 6
    rib.end_of_rib("p")
    assert len(rib.adj_in["p"]) == 3


def test_session_limits_default_to_the_gateway_defaults(keys) -> None:
    cfg = SessionConfig()
    assert cfg.limits == Limits(10_000, 1000, 10_000) and "route-limits" in cfg.caps
    s = Session(Role.RESPONDER, "a", keys["a"], {}, 0.0)
    assert s.inbound.rate == 1000 and s.inbound.burst == 10_000
