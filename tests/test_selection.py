"""Selection: header parsing, longest-prefix matching, choice against a brute-force oracle."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cpnd.load import InstanceMeter, LatencyCorrection, OwnTimes, SendAccount, Stage
from cpnd.names import service_label
from cpnd.rib import Rib
from cpnd.selection import (
    BOUND_MARGIN_FRAC,
    BadHeader,
    Candidate,
    Constraints,
    TtlCache,
    candidate,
    candidates,
    compute_estimate_us,
    expected_us,
    explain_none,
    ingress_view,
    match_service,
    parse_constraints,
    pinned_first,
    probe_candidates,
    rank,
    slack_us,
    within_bound,
)
from cpnd.tunnel import QoS
from cpnd.wire import RouteAdv, Update


def h(**kw: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]


@pytest.mark.parametrize(("headers", "expected"), [
    (h(CPN_Max_Latency="10ms"), Constraints(max_latency_us=10_000)),
    (h(CPN_Max_Latency="10"), Constraints(max_latency_us=10_000)),
    (h(CPN_Max_Latency="0.5s", CPN_Prefer="price"), Constraints(max_latency_us=500_000, prefer="price")),
    (h(CPN_Max_Latency="250us"), Constraints(max_latency_us=250)),
    (h(CPN_Max_Price="1.5", CPN_QoS="realtime"), Constraints(max_price=1.5, qos=QoS.REALTIME, timeout_s=2.0)),
    (h(cpn_prefer="LATENCY", cpn_timeout="3s"), Constraints(timeout_s=3.0)),
    (h(Host="x", CPN_Future_Thing="whatever"), Constraints()),
])
def test_parse_constraints(headers, expected) -> None:
    assert parse_constraints(headers) == expected


@pytest.mark.parametrize(("headers", "needle"), [
    (h(CPN_Max_Latency="fast"), "CPN-Max-Latency"),
    (h(CPN_Max_Latency="-1ms"), "CPN-Max-Latency"),
    (h(CPN_Max_Price="cheap"), "CPN-Max-Price"),
    (h(CPN_Max_Price="nan"), "CPN-Max-Price"),
    (h(CPN_Prefer="speed"), "CPN-Prefer"),
    (h(CPN_QoS="gold"), "CPN-QoS"),
    (h(CPN_Timeout="0s"), "CPN-Timeout"),
    (h(CPN_Instance="s1"), "CPN-Instance"),
    (h(CPN_Max_Price="1") + h(CPN_Max_Price="2"), "at most once"),
    ([(b"cpn-max-price", "1\u00e9".encode())], "ASCII"),
])
def test_bad_headers(headers, needle: str) -> None:
    with pytest.raises(BadHeader, match=needle):
        parse_constraints(headers)


def test_match_service_on_whole_segments() -> None:
    services = {"/yolo", "/ai/llm/v1", "/ai"}
    assert match_service(services, "/yolo") == "/yolo"
    assert match_service(services, "/yolo/detect/x") == "/yolo"
    assert match_service(services, "/yolov2") is None
    assert match_service(services, "/ai/llm/v1/chat") == "/ai/llm/v1"
    assert match_service(services, "/ai/llm/v2") == "/ai"
    assert match_service(services, "/") is None
    assert match_service(services, "") is None


def test_compute_estimate_is_the_papers_f_d() -> None:
    assert compute_estimate_us(1000, 0.2) == 1000
    assert compute_estimate_us(1000, 0.5) == 1000
    assert compute_estimate_us(1000, 0.75) == 1500
    assert compute_estimate_us(1000, 1.0) == 2000


def _cand(i: int, lat: int, comp: int, price: float) -> Candidate:
    return Candidate(("/s", f"g{i}", f"s{i}"), 1, f"g{i}", (f"g{i}",), lat, comp, price, 50.0, 0.0)


cands_st = st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 5_000), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
                    min_size=0, max_size=7)
cons_st = st.builds(Constraints, st.one_of(st.none(), st.integers(0, 25_000)), st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0])),
                    st.sampled_from(["latency", "price"]))


@given(cands_st, cons_st)
def test_rank_matches_brute_force(raw, cons: Constraints) -> None:
    cands = [_cand(i, *r) for i, r in enumerate(raw)]
    got = rank(cands, cons)
    # Oracle: every permutation of admissible candidates; the right one is the
    # lexicographically smallest by the objective, and none admissible is left out.
    ok = [c for c in cands if (cons.max_price is None or c.price <= cons.max_price)
          and (cons.max_latency_us is None or c.total_us <= cons.max_latency_us * (1 - BOUND_MARGIN_FRAC))]
    assert sorted(got, key=lambda c: c.key) == sorted(ok, key=lambda c: c.key)
    if ok:
        obj = (lambda c: (c.price, c.total_us)) if cons.prefer == "price" else (lambda c: (c.total_us, c.price))
        best = min(obj(c) for c in ok)
        assert obj(got[0]) == best
        for a, b in itertools.pairwise(got):
            assert obj(a) <= obj(b)


@given(st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 5_000), st.sampled_from([0.5, 1.0, 2.0, 3.0]),
                          st.floats(0.0, 1.0), st.integers(0, 2_000), st.integers(-8_000, 8_000)), max_size=6),
       cons_st)
@example([(9_900, 0, 1.0, 0.0, 0, 0), (9_901, 0, 1.0, 0.0, 0, 0), (9_000, 0, 2.0, 0.0, 0, -5_000)],
         Constraints(max_latency_us=10_000, max_price=1.0))  # at the limit, just over it, over the price cap
@example([(9_000, 100, 1.0, 0.0, 800, -8_000), (9_899, 0, 1.0, 0.0, 0, 0)],
         Constraints(max_latency_us=10_000))  # a negative correction: the estimate down to the path
def test_only_the_instances_that_may_meet_the_constraints_are_estimated(raw, cons: Constraints) -> None:
    """Estimating only the priced instances whose path is within the bound ranks and probes as estimating
    them all: the correction, even a negative one, never takes an estimate below the path."""
    rib, label = Rib("gw1"), service_label("/yolo")
    own, account, corr = OwnTimes(hint_us=300), SendAccount(), LatencyCorrection()
    for i, (lat, comp, price, load, gw_us, residual) in enumerate(raw):
        rib.set_link_cost(f"g{i}", lat)
        rib.apply_update(f"g{i}", Update((RouteAdv("/yolo", f"s{i}", f"g{i}", 1, label, (f"g{i}",), 0, 50.0, load,
                                                   price, comp, gateway_us=gw_us),)), 0)
        for k in range(12):  # residuals of one sign: the correction goes that way
            corr.observe(("/yolo", f"g{i}", f"s{i}"), 0.01 * k, max(0, 5_000 + residual), 5_000)
    bounded = cons.max_latency_us is not None
    estimate = lambda k, b: ingress_view(rib, k, b, 0.2, own=own, account=account, correction=corr)  # noqa: E731
    every = candidates(rib, "/yolo", estimate, bounded=bounded)
    some = candidates(rib, "/yolo", estimate, bounded=bounded, within=cons)
    assert {c.key for c in some} <= {c.key for c in every}
    assert rank(some, cons) == rank(every, cons)
    if bounded:
        assert probe_candidates(some, cons) == probe_candidates(every, cons)


def test_candidates_from_rib_use_path_latency_and_freshest_attributes() -> None:
    rib = Rib("gw1")
    rib.set_link_cost("gw4", 6000)
    label = service_label("/yolo")
    rib.apply_update("gw4", Update((RouteAdv("/yolo", "s2", "gw4", 3, label, ("gw4",), 0, 50.0, 0.75, 1.0, 3000,
                                             gateway_us=800),)), 0)
    (c,) = candidates(rib, "/yolo")
    # load 0.75 plus this request (1/50): 3000 * (1 + 2 * 0.27); gw4's own processing as the egress: 800 us
    assert (c.path_latency_us, c.gateways_us, c.compute_us, c.total_us, c.next_hop) == (6000, 800, 4620, 11420, "gw4")
    assert rank([c], Constraints(max_latency_us=11_000)) == []
    assert candidates(rib, "/other") == []


def test_latency_bound_requests_see_an_instance_as_full_as_its_latency_bound_demand() -> None:
    # s3 is full of flexible traffic (load 1.0) but little latency-bound demand (0.2):
    # admission would push the flexible traffic aside, so a bounded request must still see
    # s3 as usable (else its demand never reaches s3's gateway and the flexible traffic
    # keeps s3 for good); a flexible request sees it full. Demand beyond capacity (1.6)
    # never makes compute look slower than at full load, nor than at the load admitted (0.6:
    # admission refuses what would miss its bound, so what it admits meets that load). A flexible request sees the load
    # for its compute, but the latency-bound demand fills the instance for it (0.2 / 0.9):
    # admission keeps that capacity for the demand.
    rib = Rib("gw1")
    rib.set_link_cost("gw5", 6000)
    label = service_label("/yolo")
    for load, bload, bounded, compute, fill in ((1.0, 0.2, True, 1000, 0.2), (1.0, 0.2, False, 2000, 1.0),
                                                (1.0, 1.6, True, 2000, 1.6), (0.6, 1.6, True, 1240, 1.6),
                                                (0.2, 0.9, False, 1000, 0.9)):
        rib.apply_update("gw5", Update((RouteAdv("/yolo", "s3", "gw5", 3, label, ("gw5",), 0, 50.0, load, 2.0, 1000,
                                                 bload, gateway_us=0),)), 0)
        (c,) = candidates(rib, "/yolo", bounded=bounded)
        assert (c.compute_us, c.fill, c.load) == (compute, fill, load)
        assert bool(rank([c], Constraints(max_latency_us=7_100))) == (compute == 1000)


def test_paper_low_load_choices() -> None:
    """At low load u1 (<= 10 ms, then cheapest) picks s2 and u2 (fastest) picks s5."""
    rtt = {"gw1": [4, 6, 6, 6, 10], "gw2": [6, 4, 4, 4, 2]}
    comp, price = [1, 3, 1, 3, 1], [2, 1, 2, 1, 2]
    for user, cons, want in (("gw1", Constraints(max_latency_us=10_000, prefer="price"), "s2"),
                             ("gw2", Constraints(prefer="latency"), "s5")):
        cands = [_cand(i + 1, rtt[user][i] * 1000, comp[i] * 1000, price[i]) for i in range(5)]
        assert rank(cands, cons)[0].instance == want


def test_baseline_pins() -> None:
    a, b = _cand(1, 1000, 0, 1.0), _cand(2, 9000, 0, 1.0)
    ranked = rank([a, b], Constraints())
    assert pinned_first(ranked, b.key, [a, b])[0] == b
    assert pinned_first(ranked, ("/s", "gone", "x"), [a, b])[0] == a
    cache = TtlCache(ttl_s=5.0)
    cache.put("/s", Constraints(), b.key, now=10.0)
    assert cache.get("/s", Constraints(), 14.9) == b.key
    assert cache.get("/s", Constraints(), 15.0) is None
    assert cache.get("/s", Constraints(prefer="price"), 11.0) is None


def test_an_unmeetable_request_is_told_what_is_achievable() -> None:
    def cand(iid: str, origin: str, path_us: int, comp_us: int, price: float) -> Candidate:
        return Candidate(("/svc", origin, iid), 1, origin, (origin,), path_us, comp_us, price, 50.0, 0.0)

    cands = [cand("s1", "gw3", 4000, 1000, 2.0), cand("s2", "gw4", 6000, 6400, 1.0)]
    assert explain_none(cands, Constraints(max_price=0.5)) == \
        "the lowest price is 1 (s2 at gw4), over CPN-Max-Price 0.5"
    assert explain_none(cands, Constraints(max_latency_us=10_000, max_price=1.0)) == (
        "the best estimate now is 12.4 ms (s2 at gw4: path 6 ms + gateways 0 ms + compute 6.4 ms), over "
        "CPN-Max-Latency 10 ms less its 1% margin")
    # Every part of the estimate is told, the ingress's correction from what it observed included.
    slow = attrs.evolve(cands[0], gateways_us=2500, correction_us=3100)
    assert explain_none([slow], Constraints(max_latency_us=10_000)) == (
        "the best estimate now is 10.6 ms (s1 at gw3: path 4 ms + gateways 2.5 ms + compute 1 ms + correction 3.1 ms), "
        "over CPN-Max-Latency 10 ms less its 1% margin")


# ---------------------------------------------------------------- end to end accounting


def _e2e_rib() -> Rib:
    """gw1 with s1 behind gw3 (4 ms link; gw3 says its own processing as egress is 700 us), its own s9."""
    rib = Rib("gw1")
    rib.set_link_cost("gw3", 4000)
    label = service_label("/yolo")
    rib.apply_update("gw3", Update((RouteAdv("/yolo", "s1", "gw3", 1, label, ("gw3",), 0, 50.0, 0.0, 2.0, 1000,
                                             gateway_us=700),)), 0)
    rib.set_local([RouteAdv("/yolo", "s9", "gw1", 1, label, ("gw1",), 0, 50.0, 0.0, 5.0, 2000, gateway_us=600)], 0)
    return rib


def test_the_estimate_is_every_part_from_head_in_to_head_out() -> None:
    """selection.md, "Estimate": path + gateways (ours, then the path's `gw`) + compute + correction."""
    rib = _e2e_rib()
    own, account, corr = OwnTimes(hint_us=500), SendAccount(), LatencyCorrection()
    own.add(Stage.INGRESS, 0.0, 300)
    own.add(Stage.INGRESS, 0.0, 300)  # median of 500 (hint), 300, 300
    own.add(Stage.LOCAL, 0.0, 200)
    meter = InstanceMeter(50, 2000)
    key = ("/yolo", "gw3", "s1")
    view = ingress_view(rib, key, rib.loc[key], 1.0, own=own, account=account, correction=corr)
    assert (view.gateways_us, view.compute_us, view.correction_us) == (300 + 700, 1000, 0)
    c = candidate(rib, key, view, bounded=True)
    assert (c.path_latency_us, c.gateways_us, c.compute_us, c.total_us) == (4000, 1000, 1000, 6000)
    mine = ("/yolo", "gw1", "s9")
    local = ingress_view(rib, mine, rib.loc[mine], 1.0, own=own, account=account, correction=corr, meter=meter)
    assert local.gateways_us == 200  # ingress and egress in one: our own time for our own instances
    # What the ingress observed against its estimate: two responses 2.5 ms later than expected.
    for _ in range(2):
        corr.observe(key, 1.2, 8500, c.estimate_us)
    view = ingress_view(rib, key, rib.loc[key], 1.2, own=own, account=account, correction=corr)
    c = candidate(rib, key, view, bounded=True)
    assert (c.correction_us, c.total_us) == (2500, 8500)
    assert "path 4 ms + gateways 1 ms + compute 1 ms + correction 2.5 ms" in explain_none([c], Constraints(max_latency_us=8000))
    assert rank([c], Constraints(max_latency_us=8000)) == [] and rank([c], Constraints(max_latency_us=9000)) == [c]
    # What a response is set against: the estimate without correction, and with the request's own
    # instance time (told by the egress) in place of the estimated compute.
    assert expected_us(c, None) == 6000 and expected_us(c, 40_000) == 45_000
    # A negative correction never takes the estimate below the network alone.
    fast = candidate(rib, key, attrs.evolve(view, correction_us=-50_000), bounded=True)
    assert fast.total_us == fast.path_latency_us == 4000


def test_slack_spends_what_is_left_of_the_bound_honestly() -> None:
    """selection.md, "Admission": the compute time left = bound - time spent - path - gateways - correction."""
    c = Candidate(("/yolo", "gw3", "s1"), 1, "gw3", ("gw3",), 4000, 1000, 2.0, 50.0, 0.0, gateways_us=1500,
                  correction_us=800)
    cons = Constraints(max_latency_us=10_000)
    assert slack_us(c, Constraints(), 0) is None
    assert slack_us(c, cons, 300) == 10_000 - 300 - 4000 - 1500 - 800
    assert slack_us(attrs.evolve(c, correction_us=-3000), cons, 0) == 10_000 - 4000  # never more than bound - path
    assert slack_us(c, cons, 9000) == 0
    assert within_bound(c, cons, 2700) and not within_bound(c, cons, 2701)  # 7300 estimated + time spent


def test_an_instance_slower_than_estimated_is_tried_again_as_its_correction_fades() -> None:
    """On a virtual clock, one ingress and two instances for a 10 ms bound, cheapest first, a request
    every 50 ms: s1 (price 1) is estimated at 6 ms but answers in 10.1 ms (just over) or 16 ms (far
    over); s2 (price 3) in 7 ms as estimated. The ingress learns it from two responses, sends to s2
    meanwhile, and tries s1 again once the correction has faded enough: about a second later when
    just over, about four when far over; never leaves s1 when it is within the bound."""
    def run(late_us: int) -> str:
        rib = _e2e_rib()
        rib.set_link_cost("gw4", 5000)
        label = service_label("/yolo")
        rib.apply_update("gw4", Update((RouteAdv("/yolo", "s2", "gw4", 1, label, ("gw4",), 0, 50.0, 0.0, 3.0, 1000,
                                                 gateway_us=700),)), 0)
        own, account, corr = OwnTimes(hint_us=300), SendAccount(), LatencyCorrection()
        cons = Constraints(max_latency_us=10_000, max_price=4.0, prefer="price")
        late = {("/yolo", "gw3", "s1"): late_us, ("/yolo", "gw4", "s2"): 0}
        chosen = ""
        for i in range(200):
            now = 0.05 * i
            cands = candidates(rib, "/yolo", lambda k, b: ingress_view(rib, k, b, now, own=own, account=account,
                                                                        correction=corr), bounded=True)
            (pick, *_) = rank(cands, cons)
            chosen += pick.instance[1]
            corr.observe(pick.key, now, pick.estimate_us + late[pick.key], pick.estimate_us)
        return chosen

    assert run(3000) == "1" * 200  # 9 ms: within the bound
    just_over, far_over = run(4100), run(10_000)
    assert just_over.startswith("11222") and far_over.startswith("11222")
    tries = [i for i, c in enumerate(just_over) if c == "1"][2:]
    assert len(tries) >= 6 and all(20 <= b - a <= 25 for a, b in itertools.pairwise(tries))  # every 1-1.25 s
    assert 2 <= far_over.count("1") - 2 <= 5 and far_over.index("1", 2) >= 60  # first retry after >= 3 s
