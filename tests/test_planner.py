"""The per-request planner (sans-IO) on a virtual clock: head checks, order, retry rules, baselines."""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpnd.errors import HttpError
from cpnd.load import LatencyCorrection, OwnTimes, SendAccount
from cpnd.names import service_label
from cpnd.planner import MAX_ATTEMPTS, Attempt, Planner
from cpnd.rib import Rib
from cpnd.selection import TtlCache, flooded_view
from cpnd.tunnel import NO_BUDGET, ResetCode
from cpnd.wire import RouteAdv, Update

LABEL = service_label("/yolo")


def make_rib(*instances: tuple[str, str, int, float], full: tuple[str, ...] = ()) -> Rib:
    """gw1's RIB with (peer, instance, compute µs, price) routes of /yolo, each peer 2 ms away; those in
    ``full`` at their capacity."""
    rib = Rib("gw1")
    for peer, iid, comp, price in instances:
        rib.set_link_cost(peer, 2000)
        load = 1.0 if iid in full else 0.0
        rib.apply_update(peer, Update((RouteAdv("/yolo", iid, peer, 1, LABEL, (peer,), 0, 50.0, load, price, comp,
                                                gateway_us=0),)), 0)
    return rib


def planner(rib: Rib, mode: str = "per-request", seed: int = 1) -> Planner:
    return Planner(rib, lambda key, best, now: flooded_view(rib, best), SendAccount(), OwnTimes(), LatencyCorrection(),
                   mode=mode, ttl=TtlCache(5.0), rng=random.Random(seed))


def hdr(**kw: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x")] + [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]


THREE = make_rib(("gw2", "a", 1000, 1.0), ("gw3", "b", 2000, 2.0), ("gw4", "c", 3000, 3.0))


@pytest.mark.parametrize(("target", "headers", "status", "error"), [
    (b"/nothing", hdr(), 404, "no_such_service"),
    (b"/yolo/../x", hdr(), 400, "bad_request"),
    (b"/yolo", hdr(CPN_Max_Latency="soon"), 400, "bad_header"),
    (b"/yolo", hdr(Content_Length="1", Transfer_Encoding="chunked"), 400, "bad_request"),
    (b"/yolo", hdr(X_Big="x" * 70_000), 431, "headers_too_large"),
    (b"/yolo", hdr(CPN_Max_Price="0.5"), 503, "no_instance"),
    (b"/yolo", hdr(CPN_Max_Latency="1ms"), 503, "no_instance"),
])
def test_a_head_that_cannot_be_planned_gets_its_error(target, headers, status, error) -> None:
    with pytest.raises(HttpError) as ei:
        planner(THREE).plan(b"GET", target, headers, {}, 0.0, 0.0)
    assert (ei.value.status, ei.value.error) == (status, error)


def test_an_unrefused_retry_goes_on_and_a_delivered_post_does_not() -> None:
    p = planner(THREE)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Prefer="price"), {}, 0.0, 0.0)
    first = plan.next(0.0)
    assert first is not None and first.instance == "a"  # the cheapest, and no other is near-equal
    assert plan.failed(first, ResetCode.REFUSED, False, "full", 0.001)
    second = plan.next(0.001)
    assert second is not None and second.instance != "a"
    post = p.plan(b"POST", b"/yolo", hdr(), {}, 0.0, 0.0)
    cand = post.next(0.0)
    assert cand is not None
    assert not post.failed(cand, ResetCode.INSTANCE_FAILED, True, "broke mid-request", 0.002)
    assert post.next(0.002) is None
    assert post.error().status == 502


def test_a_deadline_reset_ends_the_request_and_all_refusals_make_503() -> None:
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Timeout="1s"), {}, 0.0, 0.0)
    cand = plan.next(0.0)
    assert cand is not None and not plan.failed(cand, ResetCode.DEADLINE, False, "", 0.97)  # our clock agrees
    assert plan.next(0.97) is None and plan.error().status == 504
    # One that comes long before our own deadline (a far end that lies, or a bug) fails one attempt.
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Timeout="1s"), {}, 0.0, 0.0)
    first = plan.next(0.0)
    assert first is not None and plan.failed(first, ResetCode.DEADLINE, False, "early", 0.1)
    second = plan.next(0.1)
    assert second is not None and second.key != first.key
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(), {}, 0.0, 0.0)
    while (cand := plan.next(0.0)) is not None:
        plan.failed(cand, ResetCode.REFUSED, False, f"{cand.instance} full", 0.0)
    assert len(plan.failures) == 3 and plan.error().status == 503 and "a full" in plan.error().detail


def test_no_attempt_starts_after_the_deadline_and_a_retry_must_still_make_the_bound() -> None:
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Timeout="1s"), {}, 0.0, 0.0)
    cand = plan.next(0.0)
    assert cand is not None
    plan.failed(cand, ResetCode.INSTANCE_FAILED, False, "", 1.0)
    with pytest.raises(HttpError) as ei:
        plan.next(1.0)
    assert ei.value.status == 504
    # Bound 4.5 ms: a (3 ms) and b (4 ms) make it, tried in rank order; after a failed
    # 1.2 ms in, b (4 + 1.2 ms) no longer would.
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="4.5ms"), {}, 0.0, 0.0)
    assert [c.instance for c in plan.remaining] == ["a", "b"]
    cand = plan.next(0.0)
    assert cand is not None and cand.instance == "a"
    assert plan.failed(cand, ResetCode.REFUSED, False, "", 0.0012)
    assert plan.next(0.0012) is None and plan.error().status == 503


def test_a_body_that_cannot_be_sent_twice_gets_no_retry() -> None:
    plan = planner(THREE).plan(b"PUT", b"/yolo", hdr(), {}, 0.0, 0.0)
    cand = plan.next(0.0, replayable=False)
    assert cand is not None and plan.failed(cand, ResetCode.REFUSED, False, "", 0.0)
    assert plan.next(0.0, replayable=False) is None and not plan.more(False)


def test_a_flexible_attempt_yields_while_another_candidate_has_room_and_may_be_tried() -> None:
    """EXT_FLAG_YIELDS (selection.md, "Choice"): a flexible request with another candidate not estimated
    full (nor held after a refusal) and an attempt left; never a latency-bound one, nor a body that cannot
    be sent twice, nor the last attempt."""
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(), {}, 0.0, 0.0)
    for left in (True, True, False):  # the third attempt is the last
        cand = plan.next(0.0)
        assert cand is not None and plan.yields() is left
        plan.failed(cand, ResetCode.REFUSED, False, "", 0.0)
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(), {}, 0.0, 0.0)
    assert plan.next(0.0, replayable=False) is not None and not plan.yields(replayable=False)
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="50ms"), {}, 0.0, 0.0)
    assert plan.next(0.0) is not None and not plan.yields()
    two_full = make_rib(("gw2", "a", 1000, 1.0), ("gw3", "b", 2000, 2.0), ("gw4", "c", 3000, 3.0), full=("b", "c"))
    plan = planner(two_full).plan(b"GET", b"/yolo", hdr(), {}, 0.0, 0.0)
    cand = plan.next(0.0)
    assert cand is not None and cand.instance == "a" and not plan.yields()  # the others are full
    two = make_rib(("gw2", "a", 1000, 1.0), ("gw3", "b", 2000, 1.0))
    p = planner(two)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Prefer="price"), {}, 0.0, 0.0)
    first = plan.next(0.0)
    assert first is not None and plan.yields()
    plan.failed(first, ResetCode.REFUSED, False, "full", 0.001)  # held as full for flexible requests a while
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Prefer="price"), {}, 0.002, 0.002)
    cand = plan.next(0.002)
    assert cand is not None and cand.key != first.key and not plan.yields()


def test_budget_and_slack_for_the_extension_header() -> None:
    plan = planner(THREE).plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms", CPN_Timeout="2s"), {}, 0.0, 0.0)
    cand = plan.next(0.001)
    assert cand is not None
    assert plan.budget_us(0.001) == 1_999_000
    # The bound less the 1 ms spent, the 2 ms path and everything but compute.
    assert plan.slack_us(cand, 0.001) == 10_000 - 1000 - 2000
    base = planner(THREE, mode="per-connection").plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 0.0, 0.0)
    assert base.slack_us(cand, 0.0) == NO_BUDGET


def test_baselines_keep_their_choice_and_never_retry() -> None:
    pinned: dict = {}
    p = planner(THREE, mode="per-connection")
    first = p.plan(b"GET", b"/yolo", hdr(), pinned, 0.0, 0.0)
    assert first.max_attempts == 1 and pinned["/yolo"] == first.remaining[0].key
    again = p.plan(b"GET", b"/yolo", hdr(CPN_Prefer="price"), pinned, 1.0, 1.0)
    assert again.remaining[0].key == pinned["/yolo"]
    dns = planner(THREE, mode="dns-ttl")
    chosen = dns.plan(b"GET", b"/yolo", hdr(), {}, 0.0, 0.0).remaining[0].key
    assert dns.plan(b"GET", b"/yolo", hdr(), {}, 4.9, 4.9).remaining[0].key == chosen  # held for the TTL (5 s)


def test_observed_learns_only_from_whole_requests_and_flags_late_ones() -> None:
    p = planner(THREE)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 0.0, 0.0)
    cand = plan.next(0.0)
    assert cand is not None
    upload = Attempt(head_at=0.050, whole=False)
    assert not p.observed(plan, cand, upload, 0.0, 0.050)  # the user's upload pace: nothing learnt
    late = Attempt(sent_at=0.0005, upstream_head_at=0.0115, head_at=0.012, whole=True, instance_s=0.001)
    assert p.observed(plan, cand, late, 0.0, 0.012)
    on_time = Attempt(sent_at=0.0005, upstream_head_at=0.004, head_at=0.0045, whole=True)
    assert not p.observed(plan, cand, on_time, 0.0, 0.0045)


def test_the_bound_is_the_head_deadline_in_per_request_mode_only() -> None:
    p = planner(THREE)
    bound = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.001)
    assert bound.bound_at == pytest.approx(3.010) and bound.head_deadline() == pytest.approx(3.010)
    assert bound.deadline > bound.bound_at  # the request's timeout is later: the bound decides
    free = p.plan(b"GET", b"/yolo", hdr(), {}, 3.0, 3.001)
    assert free.bound_at is None and free.head_deadline() == free.deadline
    anycast = planner(THREE, mode="per-connection").plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.0)
    assert anycast.bound_at is None  # a baseline answers late, as the scheme it emulates would
    cand = bound.next(3.001)
    assert cand is not None
    before = p.correction.value_us(cand.key, 3.010)
    for _ in range(3):  # cut while the user was still uploading: its pace, nothing learnt
        p.missed(cand, Attempt(whole=False), 3.001, 3.010)
    assert p.correction.value_us(cand.key, 3.010) == before
    for _ in range(3):  # one user's requests cut at the bound: maybe its own long jobs, nothing learnt
        p.missed(cand, Attempt(whole=True), 3.001, 3.010, "192.0.2.1")
    assert p.correction.value_us(cand.key, 3.010) == before
    for _ in range(3):  # two users' cut: the correction learns they took at least that long
        p.missed(cand, Attempt(whole=True), 3.001, 3.010, "192.0.2.2")
    assert p.correction.value_us(cand.key, 3.010) > before


def test_a_head_wait_is_cut_when_a_head_could_no_longer_leave_by_the_bound() -> None:
    p = planner(THREE)
    first = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.0)
    assert first.cut_at == pytest.approx(3.010) and first.cut_deadline() == pytest.approx(3.010)  # nothing learnt yet
    cand = first.next(3.0)
    assert cand is not None
    for i in range(60):  # answered attempts whose heads each took 0.3 ms from their arrival to leaving
        p.observed(first, cand, Attempt(sent_at=3.0005, upstream_head_at=3.004, head_at=3.0043, whole=True), 3.0, 3.0045)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.0)
    assert plan.cut_at == pytest.approx(3.0097, abs=2e-5) and plan.bound_at == pytest.approx(3.010)
    assert plan.head_deadline() == pytest.approx(3.010)  # the bound itself is unchanged (a late 200 is still 504)
    p.observed(plan, cand, Attempt(sent_at=3.0005, head_at=3.0043, whole=True), 3.0, 3.0045)  # local: no head in
    assert p.cut.lead_s == pytest.approx(0.0003, abs=2e-5)
    for _ in range(60):
        p.cut.learn(0.5)  # a held body's wait, a stalled write: one head counts at most 1 ms
    assert p.cut.lead_s == pytest.approx(0.001, abs=1e-6)  # and the lead is at most 1 ms
    assert p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.0).cut_at == pytest.approx(3.009)
    assert p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="5ms"), {}, 3.0, 3.0).cut_at == pytest.approx(3.0045)  # a tenth
    free = p.plan(b"GET", b"/yolo", hdr(), {}, 3.0, 3.0)
    assert free.cut_at is None and free.cut_deadline() == free.deadline


@given(st.lists(st.tuples(st.sampled_from(list(ResetCode)), st.booleans()), max_size=6),
       st.sampled_from([b"GET", b"POST"]), st.integers(0, 2**16))
def test_attempts_are_bounded_and_never_repeat_an_instance(failures, method: bytes, seed: int) -> None:
    p = planner(THREE, seed=seed)
    plan = p.plan(method, b"/yolo", hdr(), {}, 0.0, 0.0)
    tried = []
    for code, delivered in failures:
        cand = plan.next(0.0)
        if cand is None:
            break
        tried.append(cand.instance)
        if not plan.failed(cand, code, delivered, "", 0.0):
            assert plan.next(0.0) is None
            break
    assert len(tried) == len(set(tried)) <= MAX_ATTEMPTS
    if plan.failures:
        assert plan.error().status in (502, 503, 504)


def test_one_ipv6_host_is_one_party_to_the_correction() -> None:
    """A host holds a whole /64 (source_key): cuts from many of its addresses are still one
    party's, as for the fair share, so they cannot hold an instance out for everyone else."""
    p = planner(THREE)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 3.0, 3.001)
    cand = plan.next(3.001)
    assert cand is not None
    before = p.correction.value_us(cand.key, 3.010)
    for i in range(6):  # one user, six addresses of its /64
        p.missed(cand, Attempt(whole=True), 3.001, 3.010, f"2001:db8:1:2::{i + 1}")
    assert p.correction.value_us(cand.key, 3.010) == before
    p.missed(cand, Attempt(whole=True), 3.001, 3.010, "2001:db8:1:3::1")  # another /64: a second user's
    assert p.correction.value_us(cand.key, 3.010) > before


def corrected_planner(rib: Rib) -> Planner:
    """A planner whose estimate carries its own correction, as the daemon's (select.ingress_view) does."""
    corr = LatencyCorrection()
    return Planner(rib, lambda key, best, now: attrs.evolve(flooded_view(rib, best), correction_us=corr.value_us(key, now)),
                   SendAccount(), OwnTimes(), corr, rng=random.Random(1))


def test_an_instance_out_of_the_bound_by_the_correction_alone_is_probed_and_let_back_by_good_answers() -> None:
    p = corrected_planner(make_rib(("gw2", "a", 6000, 1.0)))  # 2 ms + 6 ms: 8 ms, under a 10 ms bound
    bound = hdr(CPN_Max_Latency="10ms")
    first = p.plan(b"GET", b"/yolo", bound, {}, 1.0, 1.0)
    cand = first.next(1.0)
    assert cand is not None and not cand.probe and cand.estimate_us == 8000
    for i in range(10):  # slow answers: 11 ms, 3 ms over the estimate
        p.observed(first, cand, Attempt(head_at=1.011, whole=True), 1.0, 1.011 + i / 1000)
    assert p.correction.value_us(cand.key, 1.03) == pytest.approx(3000, abs=1)

    def plan_at(now: float):
        return p.plan(b"GET", b"/yolo", bound, {}, now, now).next(now)

    def answer(c, took: float, now: float) -> None:
        plan = p.plan(b"GET", b"/yolo", hdr(), {}, now - took, now - took)  # (only its start matters here)
        p.observed(plan, c, Attempt(head_at=now, whole=True), now - took, now)

    probe = plan_at(1.1)  # no instance within the bound: the one out by the correction alone is probed
    assert probe is not None and probe.probe and probe.total_us == 9900 and probe.correction_us == 1900
    with pytest.raises(HttpError) as ei:
        plan_at(1.12)  # one probe per 50 ms
    assert ei.value.error == "no_instance"
    answer(probe, 0.0085, 1.1085)  # good: 0.5 ms over the estimate, within the 1.9 ms the bound left
    answer(plan_at(1.16), 0.0085, 1.1685)
    cut = plan_at(1.22)
    assert cut is not None and cut.probe
    p.missed(cut, Attempt(whole=True), 1.22, 1.2299, "192.0.2.9")  # a probe cut at the bound: the run starts again
    with pytest.raises(HttpError):
        plan_at(1.30)  # and probes back off: the next one 100 ms after it
    answer(plan_at(1.33), 0.0085, 1.3385)  # good: every 50 ms again
    answer(plan_at(1.39), 0.0085, 1.3985)
    assert p.correction.value_us(cand.key, 1.40) == pytest.approx(3000, abs=1)  # two good ones in a row: still out
    answer(plan_at(1.45), 0.0085, 1.4585)  # three: the evidence from before them goes
    back = plan_at(1.46)
    assert back is not None and not back.probe and back.correction_us == pytest.approx(500, abs=1)
    assert p.correction._probes[cand.key].let_in_at == pytest.approx(1.4585)
    for i in range(10):  # slow again at once: out again, and now six good probes in a row let it back in
        p.observed(p.plan(b"GET", b"/yolo", hdr(), {}, 1.5, 1.5), back, Attempt(head_at=1.511, whole=True), 1.5,
                   1.511 + i / 1000)
    for k in range(5):
        answer(plan_at(1.6 + k * 0.06), 0.0085, 1.6085 + k * 0.06)
    assert p.correction.value_us(cand.key, 1.95) > 1900  # five: still out
    answer(plan_at(1.96), 0.0085, 1.9685)
    assert not plan_at(1.97).probe  # six


def test_probes_of_an_instance_that_stays_slow_back_off_to_one_in_0_8_s() -> None:
    corr = LatencyCorrection()
    key = ("/yolo", "gw2", "a")
    for i in range(10):
        corr.observe(key, 1.0 + i / 1000, 11_000, 8000)
    sent = []
    for step in range(600):  # 3 s, a request every 5 ms: every probe cut
        now = 1.1 + step * 0.005
        if corr.probe_due(key, now):
            sent.append(now)
            corr.probed(key, now + 0.0099, False)
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8], abs=0.006)  # doubled from 50 ms by each cut, at most 0.8 s


def test_no_probe_for_an_instance_whose_estimate_alone_misses_the_bound() -> None:
    p = corrected_planner(make_rib(("gw2", "a", 9000, 1.0)))  # 2 + 9 = 11 ms: over 10 ms without any correction
    with pytest.raises(HttpError) as ei:
        p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 1.0, 1.0)
    assert ei.value.error == "no_instance"
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="20ms"), {}, 1.0, 1.0)
    cand = plan.next(1.0)
    for i in range(10):
        p.observed(plan, cand, Attempt(head_at=1.013, whole=True), 1.0, 1.013 + i / 1000)  # 2 ms over
    with pytest.raises(HttpError):  # out by its estimate: no probe, with or without a correction
        p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, 1.1, 1.1)
    with pytest.raises(HttpError):  # priced out: no probe either
        p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="12ms", CPN_Max_Price="0.5"), {}, 1.2, 1.2)
    assert p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="12ms"), {}, 1.3, 1.3).next(1.3).probe


def test_an_instance_time_told_in_load_counts_at_most_the_ingress_s_own_wait_for_the_head() -> None:
    """LOAD's instance time comes from the far end (a transit may forge it, threats.md): set against
    the estimate, it counts at most as our own wait from the request sent to its head received, so a
    lie can hide the path and the gateways on the way, never the instance's compute."""
    p = corrected_planner(make_rib(("gw2", "a", 6000, 1.0), ("gw3", "b", 2000, 1.0)))  # a: 8 ms, b: 4 ms
    key = next(c.key for c in p.plan(b"GET", b"/yolo", hdr(), {}, 1.0, 1.0).remaining if c.instance == "a")
    for i in range(32):  # answered in 8 ms as estimated (7.9 ms of it upstream), "the instance took 4000 s"
        t = 1.0 + i * 0.01
        plan = p.plan(b"GET", b"/yolo", hdr(), {}, t, t)
        a = next(c for c in plan.remaining if c.instance == "a")
        p.observed(plan, a, Attempt(sent_at=t, upstream_head_at=t + 0.0079, head_at=t + 0.008, whole=True,
                                    instance_s=4000.0), t, t + 0.008)
    # At worst the 7.9 ms upstream were all the instance's: -1.9 ms (the path's), not the floor of -6 ms
    # (its compute) that made a the best of all for any bound down to 2 ms, which it never meets.
    assert p.correction.value_us(key, 1.4) == pytest.approx(-1900, abs=10)
    plan = p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="6ms"), {}, 1.4, 1.4)
    assert [c.instance for c in plan.remaining] == ["b"]
    with pytest.raises(HttpError) as ei:
        p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="3ms"), {}, 1.4, 1.4)
    assert ei.value.error == "no_instance"


@pytest.mark.parametrize("mode", ["per-connection", "dns-ttl"])
def test_the_baselines_never_probe(mode: str) -> None:
    """Probes are per-request selection's (selection.md, "Probes"): the baselines, which emulate
    network-layer schemes that know nothing of a bound, send every request where they chose, late or not."""
    corr = LatencyCorrection()
    rib = make_rib(("gw2", "a", 6000, 1.0))  # 8 ms: within a 10 ms bound by its estimate
    p = Planner(rib, lambda key, best, now: attrs.evolve(flooded_view(rib, best), correction_us=corr.value_us(key, now)),
                SendAccount(), OwnTimes(), corr, mode=mode, ttl=TtlCache(0.0), rng=random.Random(1))
    first = p.plan(b"GET", b"/yolo", hdr(), {}, 1.0, 1.0)
    cand = first.next(1.0)
    for i in range(10):  # 3 ms over the estimate: out of a 10 ms bound by the correction alone
        p.observed(first, cand, Attempt(head_at=1.011, whole=True), 1.0, 1.011 + i / 1000)
    for k in range(5):
        now = 1.1 + k * 0.1
        with pytest.raises(HttpError) as ei:
            p.plan(b"GET", b"/yolo", hdr(CPN_Max_Latency="10ms"), {}, now, now)
        assert ei.value.error == "no_instance"
    assert not p.correction._probes
