"""Load metering, admission, pacing and the ingress's estimate, with a simulated clock."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.load import (
    CORRECTION_MAX_US,
    Hold,
    LONE_PROBE_S,
    MAX_PARTIES,
    MAX_SAMPLE_TTL_S,
    PARTY_SAMPLES,
    REFUSAL_HOLD_S,
    REPROBE_SAMPLES,
    SAMPLE_TTL_S,
    InstanceMeter,
    LatencyCorrection,
    LoadPacer,
    OwnTimes,
    RateWindow,
    SendAccount,
    SlotHolds,
    Stage,
    StageMeter,
    load_factor,
)
from cpnd.selection import Candidate, choose, compute_estimate_us


def test_rate_window_slides() -> None:
    w = RateWindow(window_s=1.0, keep_s=3.0)
    for t in (0.1, 0.5, 0.9, 1.2):
        w.add(t)
    assert w.count(1.2) == 3  # (0.2, 1.2]
    assert w.count(1.95) == 1
    assert w.count(1.95, at=1.0) == 3  # the window that ended at 1.0, still remembered
    assert w.count(5.0) == 0


@given(st.lists(st.tuples(st.floats(0, 0.7), st.booleans()), max_size=60), st.sampled_from([1.0, 3.0]))
def test_rate_window_counts_as_a_plain_list_would(steps, keep_s) -> None:
    w, seen, now = RateWindow(window_s=1.0, keep_s=keep_s), [], 0.0
    for dt, add in steps:
        now += dt
        if add:
            w.add(now)
            seen.append(now)
        assert w.count(now) == sum(1 for t in seen if now - 1.0 < t <= now)


@given(st.lists(st.tuples(st.floats(-0.05, 0.7), st.booleans()), max_size=60), st.sampled_from([1.0, 3.0]))
def test_add_count_is_add_then_count(steps, keep_s) -> None:
    """``add_count`` against ``add`` and ``count`` on a twin window: the same count, the same state
    after, whether the clock moves on, stands, or stutters back (a negative step)."""
    one, two, now = RateWindow(window_s=1.0, keep_s=keep_s), RateWindow(window_s=1.0, keep_s=keep_s), 5.0
    for dt, add in steps:
        now += dt
        if add:
            two.add(now)
            assert one.add_count(now) == two.count(now)
        assert one.count(now) == two.count(now)
        assert (one._times, one._start) == (two._times, two._start)


def _former_admit(m: InstanceMeter, now: float, budget_us: int | None, slack_us: int | None) -> str | None:
    """InstanceMeter.admit as it was before the egress took its counts once (the reference below)."""
    n = m.arrivals.count(now)
    held = m.holds.held(now)
    expect = m.base_us * load_factor((n + 1) / m.capacity)
    if slack_us is not None:
        m.bounded.add(now)
        limit = m.load_limit(slack_us)
        if limit > 0:
            m.servable.add(now)
            m._ceilings.append((now, limit))
    why = None
    if held + 1 > m.capacity:
        why = f"at capacity ({held} requests in the last second, capacity {m.capacity:g}/s)"
    elif budget_us is not None and expect > budget_us:
        why = f"expected compute {expect / 1000:.1f} ms exceeds the remaining {budget_us / 1000:.1f} ms"
    elif slack_us is not None:
        if expect > slack_us and (n + 1) / m.capacity > 0.5:
            why = f"expected compute {expect / 1000:.1f} ms exceeds the {slack_us / 1000:.1f} ms the latency bound leaves"
    else:
        reserved = m.servable.count(now)
        if n + 1 > m.unbounded_ceiling(now) or m.unbounded.count(now) + 1 + reserved > m.capacity:
            why = f"keeping capacity for latency-bound requests ({reserved} req/s of them)"
    if why is not None:
        m.refused += 1
        return why
    m.arrivals.add(now)
    m._last_hold = m.holds.add(now)
    if slack_us is None:
        m.unbounded.add(now)
    m.inflight += 1
    return None


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 12),
       steps=st.lists(st.tuples(st.integers(-20, 400), st.sampled_from(["ask", "bound", "budget", "write", "done", "used_up"]),
                                st.integers(0, 8000)), max_size=80))
def test_admission_taken_once_is_as_counted_twice(capacity: int, steps: list[tuple[int, str, int]]) -> None:
    """The egress's admission (``held`` from its fair share, the arrival load from ``take_admitted``)
    against the former calls (the former ``admit``, ``take_hold`` then ``load``, ``holds.sent``) on a twin
    meter: the same refusals, holds, loads and state, with the clock stuttering back now and then."""
    new, old = (InstanceMeter(capacity=capacity, compute_hint_us=2000) for _ in range(2))
    now, holds = 10.0, []
    for dt_ms, kind, us in steps:
        now += dt_ms / 1000
        if kind == "used_up":
            new.used_up(now)
            old.used_up(now)
        elif kind == "write" and holds:  # the former InstanceMeter.sent: SlotHolds.sent
            hn, ho, _ = holds[us % len(holds)]
            new.sent(hn, now)
            if ho is not None:
                old.holds.sent(ho, now)
        elif kind == "done" and holds:
            hn, ho, load = holds.pop(0)
            new.done(now, us, load, hn, "p")
            old.done(now, us, load, ho, "p")
        elif kind in ("ask", "bound", "budget"):
            slack = us if kind == "bound" else None
            budget = us if kind == "budget" else None
            got = new.admit(now, budget, slack, new.holds.held(now))
            assert got == _former_admit(old, now, budget, slack)
            if got is None:
                at = now + (us % 3) * 0.4  # (taken later, by a caller that reads the clock anew: counted then)
                hn, load = new.take_admitted(at)
                ho = old.take_hold()
                assert load == old.load(at)
                assert hn == ho
                holds.append((hn, ho, load))
        assert new.loads(now) == (old.load(now), old.bounded_load(now))
        assert new.holds._until == old.holds._until and new.refused == old.refused and new.inflight == old.inflight
        for window in ("arrivals", "bounded", "servable", "unbounded"):
            assert getattr(new, window)._times == getattr(old, window)._times


def test_load_factor_is_f_d() -> None:
    assert [load_factor(x) for x in (0.0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 1.5, 2.0]


def test_admission_enforces_capacity() -> None:
    m = InstanceMeter(capacity=10, compute_hint_us=1000, guard_s=0.1)
    admitted = [m.admit(0.01 * i, None) is None for i in range(15)]
    assert admitted == [True] * 10 + [False] * 5
    assert m.admit(1.005, None) is not None  # the first (t=0) left the window, but it may have reached the instance late
    assert m.admit(1.105, None) is None  # not later than the guard: its slot is free
    assert "capacity" in (m.admit(1.106, None) or "")


def test_an_answer_frees_the_slot_a_second_after_it() -> None:
    m = InstanceMeter(capacity=2, compute_hint_us=1000, guard_s=0.1)
    assert m.admit(0.0, None) is None
    first = m.take_hold()
    assert m.take_hold() is None  # taken once
    assert m.admit(0.5, None) is None
    m.done(0.01, 5000, load_at_arrival=0.0, hold=first)  # answered at 0.01: the instance counted it by then
    assert m.admit(1.0, None) is not None  # (0, 1]: the second one is held, and the first (0.01) too
    assert m.admit(1.011, None) is None  # the first freed its slot a second after its answer, not after the guard


def test_a_slow_answer_holds_no_longer_than_the_guard() -> None:
    m = InstanceMeter(capacity=1, compute_hint_us=1000, guard_s=0.1)
    assert m.admit(0.0, None) is None
    hold = m.take_hold()
    m.done(3.0, 3_000_000, load_at_arrival=0.0, hold=hold)  # a 3 s answer: counted by the instance within the guard
    assert m.admit(1.09, None) is not None
    assert m.admit(1.11, None) is None  # a slow instance keeps its capacity (not one request per answer time)


def test_the_guard_runs_from_the_write() -> None:
    m = InstanceMeter(capacity=1, compute_hint_us=1000, guard_s=0.1)
    assert m.admit(0.0, None) is None
    hold = m.take_hold()
    m.sent(hold, 0.5)  # queued half a second here before it went: the instance may read it up to 0.6
    assert m.admit(1.59, None) is not None
    assert m.admit(1.61, None) is None
    assert m.take_hold() is not None and m.take_hold() is None


def test_slot_holds_count_like_a_plain_list_through_compaction() -> None:
    rng = random.Random(7)
    holds = SlotHolds(guard_s=0.05)
    model: dict[int, float] = {}  # request -> until, recomputed by hand
    tickets = {}
    now = 0.0
    for k in range(6000):  # ~3000 a second: compaction (over 1024 ended entries) runs many times
        now += rng.uniform(0, 0.00066)
        tickets[k] = holds.add(now)
        model[k] = now + 0.05
        j = rng.randrange(max(0, k - 50), k + 1)  # a recent one is written, or answered
        if rng.random() < 0.5:
            holds.sent(tickets[j], now)
            model[j] = max(model[j], now + 0.05)
        elif now < model[j]:
            holds.answered(tickets[j], now)
            model[j] = now
        assert holds.held(now) == sum(1 for u in model.values() if u > now - 1.0)


def test_no_guard_is_counting_at_admission() -> None:
    m = InstanceMeter(capacity=10, compute_hint_us=1000, guard_s=0.0)
    assert all(m.admit(0.01 * i, None) is None for i in range(10))
    assert m.admit(0.999, None) is not None
    assert m.admit(1.0, None) is None  # the first (t=0) left the window


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 8), guard_ms=st.integers(0, 60),
       requests=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 900), st.integers(0, 60), st.integers(0, 400)),
                         max_size=120))
def test_no_instance_second_holds_more_than_capacity(capacity: int, guard_ms: int,
                                                     requests: list[tuple[int, int, int, int]]) -> None:
    """Requests arrive at the gateway (ms), are written to the instance any time in the second after
    (our queueing), read up to the guard after that, answered any time later: whatever the delays and
    their order, no sliding second of the instance's clock counts more than capacity of those admitted.
    Counting at admission alone fails this."""
    m = InstanceMeter(capacity=capacity, compute_hint_us=1000, guard_s=guard_ms / 1000)
    events = []  # (time, order at a tie, kind, request, its write, read and answer times)
    for k, (at, write_delay, read_delay, answer_delay) in enumerate(requests):
        write = at + write_delay
        read = write + min(read_delay, guard_ms)
        events.append((at / 1000, 0, "ask", k, write / 1000, read / 1000, (read + answer_delay) / 1000))
    reads: list[float] = []
    holds: dict[int, Hold | None] = {}
    while events:
        ev = min(events)
        events.remove(ev)
        now, _, kind, k, write, read, answer = ev
        if kind == "ask":
            if m.admit(now, None) is None:
                holds[k] = m.take_hold()
                reads.append(read)
                events += [(write, 1, "write", k, write, read, answer), (answer, 2, "answer", k, write, read, answer)]
        elif kind == "write":
            m.sent(holds[k], now)
        else:
            m.done(now, (answer - read) * 1e6, load_at_arrival=0.0, hold=holds[k])
    reads.sort()
    for i, r in enumerate(reads):  # the instance's window (r - 1, r]
        assert sum(1 for x in reads[: i + 1] if x > r - 1) <= capacity


def test_admission_deadline_and_slack() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=3000)
    assert "remaining" in m.admit(0.0, 2000, None)  # a 2 ms deadline cannot fit 3 ms
    assert m.admit(0.0, None, 3500) is None  # the bound leaves 3.5 ms: fine at low load
    for i in range(30):
        m.admit(0.001 * i, None)
    # At 32/50 the model gives 3000 * (1 + 2 * (0.64 - 0.5)) = 3840 us > 3500.
    assert "latency bound" in m.admit(0.05, None, 3500)


def test_bounded_demand_pushes_unbounded_aside() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=1000)
    assert all(m.admit(0.01 * i, None) is None for i in range(50))  # flexible traffic fills it
    assert all("capacity" in m.admit(0.6 + 0.001 * i, None, 5000) for i in range(10))  # bounded demand turned away
    # A second later the flexible traffic only gets what the bounded demand leaves.
    unbounded = [m.admit(1.5 + 0.001 * i, None, None) for i in range(50)]
    assert sum(1 for r in unbounded if r is None) == 40  # 50 - the 10 bounded ones asking
    assert "latency-bound" in [r for r in unbounded if r][0]
    assert m.admit(1.6, None, 5000) is None  # and the bounded request now gets in


def test_unbounded_capped_below_bounded_latency_ceiling() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=3000)
    assert m.load_limit(4000) == pytest.approx(50 * (0.5 + 1000 / 6000))  # ~33.3 req/s
    assert m.admit(0.0, None, 4000) is None
    got = sum(1 for i in range(60) if m.admit(0.001 * (i + 1), None, None) is None)
    assert got == 32  # 1 bounded + 32 unbounded = 33 <= 33.3


def test_bounded_demand_that_cannot_be_met_here_reserves_nothing() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=3000)
    for i in range(20):  # slack below the base compute: no load of this instance meets it
        m.admit(0.001 * i, None, 2500)
    assert m.bounded_load(0.1) == pytest.approx(20 / 50)  # still advertised as demand
    got = sum(1 for i in range(60) if m.admit(0.1 + 0.001 * i, None, None) is None)
    assert got == 30  # the 20 bounded got in (below half load), all the rest goes to flexible traffic


def _answer(m: InstanceMeter, at: float, us: float, party: object, n: int = 1, load: float = 0.0) -> None:
    for i in range(n):
        m.admit(at + 0.01 * i, None)
        m.done(at + 0.01 * i, us, load_at_arrival=load, party=party)


def test_one_slow_first_request_does_not_move_the_compute_estimate() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=1000)
    _answer(m, 0.0, 20_000, "a")  # a cold first request
    _answer(m, 0.0, 20_000, "b")
    assert m.base_us == 1000
    _answer(m, 0.2, 1700, "a", 5)  # measurements, once there are a few, win over the hint
    _answer(m, 0.2, 1700, "b", 5)
    assert m.base_us == 1700


def test_compute_is_a_robust_low_quantile() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=9999)
    for i in range(20):
        _answer(m, 0.0, 1000 + i, "a", load=0.2)
    _answer(m, 0.2, 2_000_000, "a", load=0.2)  # one very slow answer
    assert 1000 <= m.base_us <= 1020
    _answer(m, 0.3, 1500, "a", load=0.75)  # 1500 at 75 % load is a base of 1000
    assert m.base_us < 1020


def test_one_users_long_jobs_do_not_make_the_instance_slow_for_everyone() -> None:
    # One user sends 300 ms jobs as fast as they are answered; another's take 5 ms.
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    _answer(m, 0.0, 4800, "honest", 4)
    assert m.base_us == 4800
    _answer(m, 0.5, 300_000, "attacker", 200)
    assert m.base_us == 4800  # however many it sends
    _answer(m, 1.0, 300_000, "second attacker", 32)
    assert m.base_us == 4800  # the fastest user's low quarter
    m.expire(5.2)  # the honest user's samples are over 5 s old: the others' are all there is
    assert m.base_us == 300_000


def test_every_user_slow_makes_the_instance_slow() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    _answer(m, 0.0, 9000, "a", 3)
    assert m.base_us == 5000  # three samples say little
    _answer(m, 0.0, 9000, "a", 5)
    assert m.base_us == 9000  # one user alone: an app server may be every user's address
    _answer(m, 0.0, 8000, "b", 8)
    assert m.base_us == 8000


def test_users_from_many_addresses_cannot_push_out_the_fastest() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    _answer(m, 0.0, 4000, "honest", 8)
    for k in range(5 * MAX_PARTIES):
        _answer(m, 0.1 + k * 0.01, 300_000, f"attacker {k}", PARTY_SAMPLES)
        assert m.base_us == 4000
    assert len(m._parties) == MAX_PARTIES


def test_compute_samples_age_out_to_the_hint() -> None:
    # A slow spell makes the instance look slow; it then gets no latency-bound traffic and
    # so no samples: the old ones must stop counting, or it is shut out for good.
    m = InstanceMeter(capacity=50, compute_hint_us=1000)
    for i in range(20):
        _answer(m, i * 0.05, 6000, "a")
        _answer(m, i * 0.05, 6000, "b")
    assert m.base_us == 6000
    m.expire(3.0)
    assert m.base_us == 6000  # still recent
    _answer(m, 4.0, 1200, "a", 4)
    _answer(m, 4.0, 1300, "b", 4)
    m.expire(6.5)  # the slow ones are over 5 s old; the ones at 4.0 s remain
    assert m.base_us == 1200
    m.expire(9.5)
    assert m.base_us == 1000  # nothing measured for 5 s: the configured hint
    _answer(m, 10.0, 3000, "a", 1)
    assert m.base_us == 1000  # one sample says little


def test_an_instance_that_proves_slow_again_is_retried_ever_later() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=3000)

    def serve(at: float, us: float, n: int = REPROBE_SAMPLES) -> None:
        _answer(m, at, us, "a", n)
        _answer(m, at, us, "b", n)

    serve(0.0, 3400, 8)
    assert m.base_us == 3400
    t, ttl = 0.1, SAMPLE_TTL_S
    for _ in range(5):  # each retry finds it slow: the samples last twice as long each time
        m.expire(t + ttl - 0.2)
        assert m.base_us == 3400
        t += ttl + 0.1
        m.expire(t)
        assert m.base_us == 3000  # retried on the configured value ...
        serve(t, 3400)
        assert m.base_us == 3400  # ... found slow again
        ttl = min(MAX_SAMPLE_TTL_S, 2 * ttl)
        assert m.sample_ttl_s == ttl
    assert m.sample_ttl_s == MAX_SAMPLE_TTL_S
    t += ttl + 0.1
    m.expire(t)
    serve(t, 3000)  # the slowness has passed: back to the short memory
    assert m.sample_ttl_s == SAMPLE_TTL_S
    serve(t + 0.1, 3000, 40)
    m.expire(t + 10)  # ran out at the configured value: nothing to back off from
    serve(t + 10, 3400)
    assert m.sample_ttl_s == SAMPLE_TTL_S


def test_pacer_interval_threshold_refresh() -> None:
    p = LoadPacer(min_interval_s=0.2, load_threshold=0.05, refresh_s=5.0)
    assert p.should_advertise(0.0, 0.1, 0.0, 1000)
    p.advertised(0.0, 0.1, 0.0, 1000)
    assert not p.should_advertise(0.1, 0.9, 0.0, 1000)  # too soon
    assert not p.should_advertise(0.3, 0.13, 0.0, 1000)  # not material
    assert p.should_advertise(0.3, 0.16, 0.0, 1000)
    assert p.should_advertise(0.3, 0.1, 0.06, 1000)  # bounded demand moved
    assert p.should_advertise(0.3, 0.1, 0.0, 1200)  # compute moved 20 %
    assert not p.should_advertise(4.0, 0.12, 0.0, 1000)
    assert p.should_advertise(5.0, 0.12, 0.0, 1000)  # refresh of a small change


def test_estimate_adds_only_our_own_change() -> None:
    acct = SendAccount()
    key = ("/s", "g", "i")
    for i in range(20):  # we sent 20 in (0, 1]
        acct.sent(key, 0.05 * i + 0.01)
        acct.finished(key)
    # The flooded 0.4 was measured at t=1.0 and already holds our 20 (of 50 capacity).
    assert acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.0) == (pytest.approx(0.4), pytest.approx(0.1))
    for i in range(10):  # 10 more in (1.0, 1.5]
        acct.sent(key, 1.0 + 0.05 * (i + 1))
    load, bload = acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.5)
    # In the last second (0.5, 1.5] we sent 20; in (0, 1.0] we had sent 20: no change ...
    assert load == pytest.approx(0.4)
    load, _ = acct.estimate(key, 50, 0.4, 0.1, 0.5, 1.5)
    # ... but against a report from t=0.5 (10 of ours inside) we added 10: +0.2.
    assert load == pytest.approx(0.6)
    acct.heard(key, 0.9, 0.3, 1000, now=1.5)  # a piggy-backed report is fresher than the flood
    assert acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.5) == (pytest.approx(0.9), pytest.approx(0.3))


def test_the_other_workers_sends_count_as_our_own_do() -> None:
    """With workers, each one's estimate adds the others' sends (relayed by the control process
    every report interval) the way it adds its own: only their change since the measurement."""
    acct = SendAccount()
    key, quiet = ("/s", "g", "i"), ("/s", "g", "j")
    acct.siblings({key: 10, quiet: 3}, 0.75)  # the others sent 10 over their last second, as of 0.75
    # A measurement from 1.0 already holds those 10: nothing to add (as for our own sends).
    acct.siblings({key: 10, quiet: 3}, 1.0)
    assert acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.1) == (pytest.approx(0.4), pytest.approx(0.1))
    acct.siblings({key: 25}, 1.25)  # 15 more since; ``quiet`` went quiet (absent: 0)
    assert acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.3) == (pytest.approx(0.7), pytest.approx(0.4))
    assert acct.estimate(quiet, 50, 0.2, 0.0, 1.0, 1.3) == (pytest.approx(0.14), pytest.approx(0.0))
    for i in range(5):  # and ours on top
        acct.sent(key, 1.26 + 0.01 * i)
    assert acct.estimate(key, 50, 0.4, 0.1, 1.0, 1.3)[0] == pytest.approx(0.8)
    # Older than any sample: all of their current rate counts (as for ours beyond our memory).
    assert acct.estimate(key, 50, 0.0, 0.0, 0.5, 1.3)[0] == pytest.approx((25 + 5) / 50)
    assert acct.own_rates(1.3, 10) == {key: 5} and acct.own_rates(3.0, 10) == {}
    for t in (4.0, 4.25):  # long quiet: forgotten
        acct.siblings({}, t)
    assert quiet not in acct.sibling_sends


def _cand(name: str, total: int, price: float, fill: float) -> Candidate:
    return Candidate(("/s", "g" + name, name), 1, "g" + name, ("g" + name,), total, 0, price, 50, fill, fill)


def test_choose_takes_the_less_loaded_of_two_near_equal() -> None:
    rng = random.Random(7)
    a, b, c, far = _cand("a", 5000, 1, 0.2), _cand("b", 5200, 1, 0.6), _cand("c", 5100, 1, 0.4), _cand("far", 9000, 1, 0.0)
    picks = [choose([a, b, c, far], "latency", rng)[0].instance for _ in range(3000)]
    assert picks.count("far") == 0 and picks.count("b") == 0  # b loses every pair it is in
    # Power of two choices over {a, b, c}: a wins both pairs it is drawn in (2/3), c one (1/3).
    assert picks.count("a") / len(picks) == pytest.approx(2 / 3, abs=0.04)
    assert [c.instance for c in choose([a, b, far], "latency", rng, split=False)] == ["a", "b", "far"]
    full, fuller = _cand("full", 1000, 1, 1.0), _cand("fuller", 900, 1, 1.4)
    assert choose([full, a], "latency", rng)[-1] is full
    # Full ones last, the least oversubscribed first, whatever their rank.
    assert [c.instance for c in choose([fuller, full, a], "price", rng, split=False)] == ["a", "full", "fuller"]


def _simulate(accounting: bool, split: bool, seconds: float = 20.0) -> list[tuple[float, float]]:
    """Two ingresses, two equal instances, flooded load refreshed every 0.5 s (stale).

    Returns each instance's load per 1 s window; each ingress sends 40 req/s.
    """
    rng = random.Random(1)
    cap = 50.0
    names = ("x", "y")
    arrivals = {n: RateWindow() for n in names}
    accounts = [SendAccount(), SendAccount()]
    flooded = {n: (0.0, 0.0) for n in names}  # (load, measured at)
    per_window: list[tuple[float, float]] = []
    t, next_flood, next_window = 0.0, 0.5, 1.0
    while t < seconds:
        t += 0.0125  # each ingress sends every 25 ms, interleaved
        acct = accounts[int(t / 0.0125) % 2]
        cands = []
        for n in names:
            load = acct.estimate(n, cap, flooded[n][0], 0.0, flooded[n][1], t)[0] if accounting else flooded[n][0]
            cands.append(Candidate(("/s", n, n), 1, n, (n,), 5000, compute_estimate_us(1000, load), 1.0, cap, load, load))
        ranked = sorted(cands, key=lambda c: (c.total_us, c.key))
        pick = choose(ranked, "latency", rng, split=split)[0]
        acct.sent(pick.instance, t)
        acct.finished(pick.instance)
        arrivals[pick.instance].add(t)
        if t >= next_flood:
            flooded = {n: (arrivals[n].count(t) / cap, t) for n in names}
            next_flood += 0.5
        if t >= next_window:
            per_window.append(tuple(arrivals[n].count(t) / cap for n in names))
            next_window += 1.0
    return per_window[3:]


def test_stale_flooding_alone_herds_and_our_selection_does_not() -> None:
    swing = lambda ws: max(max(abs(a - 0.8), abs(b - 0.8)) for a, b in ws)  # noqa: E731
    naive = _simulate(accounting=False, split=False)  # "pick the best" on flooded state only
    ours = _simulate(accounting=True, split=True)
    assert swing(naive) > 0.5  # whole seconds with one instance over capacity and the other idle
    assert swing(ours) <= 0.2  # within 20 % of capacity of the fair share (40 of 50 each)


def test_a_refusal_holds_an_instance_full_for_flexible_requests_briefly() -> None:
    acct = SendAccount(max_keys=4)
    key = ("/s", "g", "i")
    assert not acct.holds_flexible(key, 0.0)
    acct.heard(key, 0.6, 0.9, 1000, now=1.0)  # room kept for latency-bound demand, not full
    acct.refused_flexible(key, 50, 1.0)
    assert acct.holds_flexible(key, 1.0) and acct.holds_flexible(key, 1.0 + REFUSAL_HOLD_S - 0.01)
    assert not acct.holds_flexible(key, 1.0 + REFUSAL_HOLD_S + 1e-6)  # the next request probes it again
    assert key not in acct.refusals
    # Refused at capacity: a slot frees as each request leaves the window, ~1/50 s apart.
    acct.heard(key, 1.0, 0.0, 1000, now=2.0)
    acct.refused_flexible(key, 50, 2.0)
    assert acct.holds_flexible(key, 2.01) and not acct.holds_flexible(key, 2.021)
    for i in range(10):  # bounded, like every table peers' traffic fills
        acct.refused_flexible(("/s", "g", f"i{i}"), 50, 3.0)
    assert len(acct.refusals) == 4


# ---------------------------------------------------------------- end to end: own time and correction


def test_stage_meter_is_a_median_that_ages_out_to_its_hint() -> None:
    m = StageMeter(hint_us=500)
    assert m.value_us(0.0) == 500
    for i, us in enumerate((900, 1000, 1100, 50_000)):  # one request stuck behind a burst is not the typical one
        m.add(0.1 * i, us)
    assert m.value_us(0.5) == 1000  # the median of 500 (the hint, one sample), 900, 1000, 1100, 50000
    m.add(0.6, -30)  # clock noise: counted as 0, never negative
    assert m.value_us(0.6) == 900
    assert m.value_us(5.55) == 0  # all but the one at 0.6 s are over 5 s old: the lower of it and the hint
    assert m.value_us(10.0) == 500


def test_own_times_keep_each_stage_apart() -> None:
    own = OwnTimes(hint_us=400)
    own.add(Stage.TRANSIT, 0.0, 250)
    own.add(Stage.TRANSIT, 0.0, 260)
    assert own.us(Stage.TRANSIT, 0.1) == 260 and own.us(Stage.EGRESS, 0.1) == 400


def test_correction_needs_more_than_one_slow_response() -> None:
    c = LatencyCorrection()
    assert c.value_us("s1", 0.0) == 0
    c.observe("s1", 0.0, 15_000, 5000)  # one slow response (a cold connection, a pause) corrects nothing
    assert c.value_us("s1", 0.1) == 0
    c.observe("s1", 0.1, 13_000, 5000)  # a second one is evidence
    assert c.value_us("s1", 0.1) == 8000


def test_correction_is_a_high_quantile_of_observed_minus_estimated() -> None:
    """An instance 2-3 ms slower than estimated, one response in ten 6 ms slower: the corrected
    estimate covers nine responses in ten, the outliers aside."""
    c = LatencyCorrection()
    for i in range(64):
        extra = 6000 if i % 10 == 0 else 2000 + (i % 10) * 100
        c.observe("s1", 1.0, 5000 + extra, 5000)
    assert c.value_us("s1", 1.0) == 2900  # the last 32: residuals 2100..2900, three of 6000: index 27 of 32
    c.observe("s1", 1.0, 4000, 5000)  # faster than estimated: a negative residual counts too
    assert c.value_us("s1", 1.0) == 2900
    strict = LatencyCorrection(quantile=1.0)  # latency_quantile = 1: the worst recent response
    for i in range(20):
        strict.observe("s1", 1.0, 5000 + (6000 if i % 10 == 0 else 2000), 5000)
    assert strict.value_us("s1", 1.0) == 6000


def test_correction_holds_then_fades_when_no_response_comes() -> None:
    """On a virtual clock: an instance the correction keeps out of a bound gets no traffic; its
    correction holds 1 s after the newest response, then fades to 0 at 5 s."""
    c = LatencyCorrection()
    for t in (0.0, 0.01, 0.02):
        c.observe("s1", t, 9000, 5000)
    assert c.value_us("s1", 1.0) == 4000
    assert c.value_us("s1", 3.02) == 2000  # halfway between 1 s and 5 s after the newest
    assert c.value_us("s1", 3.04) == 2000  # recomputed at most every 50 ms
    assert c.value_us("s1", 4.52) == 500
    assert c.value_us("s1", 5.03) == 0  # every residual over 5 s old: forgotten
    c.observe("s1", 6.0, 9000, 5000)  # one slow response after that is not evidence on its own
    assert c.value_us("s1", 6.0) == 0


def test_a_trickle_of_faster_answers_does_not_keep_the_correction_held() -> None:
    """A burst of slow responses, then one answer a second as estimated: those answers do not bear
    the correction out, so its hold runs from the burst and it fades (before, each answer held it in
    full again: the paper lab's s1 stayed 0.05 ms over u1's bound for seconds while answers trickled
    in). A late answer does re-arm it, as at first."""
    c = LatencyCorrection()
    for i in range(20):
        c.observe("s1", i * 0.01, 7000, 5000)
    assert c.value_us("s1", 0.5) == 2000
    for t in (1.0, 2.0, 3.0):
        c.observe("s1", t, 5000, 5000)
    assert c.value_us("s1", 3.19) == int(2000 * (5 - 3.19 + 0.19) / 4)  # faded from the burst's newest
    c.observe("s1", 3.5, 7000, 5000)  # late again: held in full from here
    assert c.value_us("s1", 4.4) == 2000


def test_correction_is_bounded_and_its_table_too() -> None:
    c = LatencyCorrection()
    for _ in range(32):
        c.observe("s1", 0.5, 10_000_000, 1000)
        c.observe("s2", 0.5, 0, 8000)
        if c.value_us("s2", 0.5) != -8000:  # faster than estimated takes more evidence: the prior's zeros count
            assert c.value_us("s2", 0.5) == 0
    assert c.value_us("s1", 0.5) == CORRECTION_MAX_US and c.value_us("s2", 0.5) == -8000
    small = LatencyCorrection(max_keys=2)
    for key in ("a", "b", "c"):
        small.observe(key, 0.0, 1000, 0)
        small.observe(key, 0.0, 1000, 0)
    assert small.value_us("a", 0.0) == 0 and small.value_us("c", 0.0) == 1000  # the oldest went


def test_cut_attempts_count_only_as_far_as_answered_ones_show() -> None:
    """One user's long jobs under a tight bound (cut each time) must not make the instance look slow
    to everyone: while others' requests are answered on time, cut residuals count at most as theirs;
    when every request is cut, they count in full if they are two users' (the instance slow for
    all), as 0 if they are one user's alone (its own jobs, or a user holding the instance out)."""
    attacked = LatencyCorrection()
    for i in range(10):
        attacked.observe("s1", 1.0 + i * 0.01, 5000, 5000)  # answered as estimated
        attacked.observe("s1", 1.0 + i * 0.01, 10_000, 5000, cut=True)  # cut at a 10 ms bound
    assert attacked.value_us("s1", 1.2) == 0
    slow = LatencyCorrection()
    for i in range(10):
        slow.observe("s1", 1.0 + i * 0.01, 9000, 5000)  # answered, 4 ms over the estimate
        slow.observe("s1", 1.0 + i * 0.01, 10_000, 5000, cut=True)
    assert slow.value_us("s1", 1.2) == 4000  # the cut ones as far as the answered show
    everyone = LatencyCorrection()
    for i in range(4):
        everyone.observe("s1", 1.0 + i * 0.01, 10_000, 5000, cut=True, party=f"192.0.2.{i % 2}")
    assert everyone.value_us("s1", 1.1) == 5000
    alone = LatencyCorrection()
    for i in range(40):  # one user's burst of long jobs on an instance nobody else uses now
        alone.observe("s1", 1.0 + i * 0.01, 10_000, 5000, cut=True, party="192.0.2.7")
    assert alone.value_us("s1", 1.5) == 0
    alone.observe("s1", 1.5, 10_000, 5000, cut=True, party="192.0.2.8")  # a second user's cut too: evidence
    assert alone.value_us("s1", 1.5) == 5000


def test_one_party_cuts_count_only_as_far_as_another_party_shows() -> None:
    """With nothing answered, one user's long jobs cut at a tight bound (700 ms over the estimate)
    beside one other user's request cut 8 ms over: the instance is slow for all by 8 ms, not 700
    (one cut of a second user, or of the attacker's second address, unlocked all of the first's)."""
    c = LatencyCorrection()
    for i in range(31):
        c.observe("s1", 1.0 + i * 0.01, 702_000, 2000, cut=True, party="192.0.2.7")
    c.observe("s1", 1.4, 10_000, 2000, cut=True, party="192.0.2.8")
    assert 0 < c.value_us("s1", 1.4) <= 8000



@given(st.lists(st.tuples(st.floats(0, 0.7), st.booleans(), st.floats(0, 2.0)), max_size=60))
def test_rate_window_change_is_the_difference_of_two_counts(steps) -> None:
    w, seen, now = RateWindow(window_s=1.0, keep_s=3.0), [], 0.0
    for dt, add, back in steps:
        now += dt
        if add:
            w.add(now)
            seen.append(now)
        at = now - back
        assert w.change(now, at) == (sum(1 for t in seen if now - 1.0 < t <= now)
                                     - sum(1 for t in seen if at - 1.0 < t <= at))


def test_one_user_alone_showing_the_instance_slow_is_probed_ever_later() -> None:
    # One user's long jobs, with no other user served: believed, but the configured value is shown
    # now and then, so that another user can come and show what the instance is for it.
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    t = 0.0

    def attack(until: float) -> None:  # ten long jobs a second, all answered
        nonlocal t
        while t < until:
            _answer(m, t, 300_000, "attacker")
            t += 0.1
            m.expire(t)

    attack(1.0)
    assert m.base_us == 300_000
    wait = SAMPLE_TTL_S
    for _ in range(3):  # nobody else comes: the wait doubles
        start = t
        attack(start + wait + 0.05)
        assert m.base_us == 5000  # the probe
        attack(start + wait + LONE_PROBE_S + 0.15)
        assert m.base_us == 300_000
        wait *= 2
        assert m.lone_ttl_s == wait
    attack(t + wait + 0.05)
    assert m.base_us == 5000
    _answer(m, t, 4800, "honest", PARTY_SAMPLES)  # another user comes in the probe ...
    m.expire(t)
    assert m.base_us == 4800 and m.lone_ttl_s == SAMPLE_TTL_S  # ... and shows the jobs were the attacker's
    attack(t + 60)
    assert m.base_us == 300_000  # once its samples are gone, the attacker is alone again


def test_a_slow_instance_with_one_user_stays_slow_but_for_the_probes() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    shown = []
    for k in range(600):  # a minute, ten requests a second, all 8 ms
        _answer(m, k * 0.1, 8000, "app server")
        m.expire(k * 0.1)
        shown.append(m.base_us)
    assert shown.count(5000) <= 8 * LONE_PROBE_S * 10  # probes at 5, 15, 35 s (plus the first samples)


def test_two_users_long_jobs_alone_are_probed_too() -> None:
    # Long jobs from two addresses, with no other user served: both users are counted, so there was
    # no lone user and no probe, and another user was shut out for as long as the jobs went on.
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    t = 0.0
    while t < SAMPLE_TTL_S + 0.5:
        _answer(m, t, 300_000, "attacker 1")
        _answer(m, t, 300_000, "attacker 2")
        t += 0.1
        m.expire(t)
    assert m.base_us == 5000  # the probe: another user can come in
    _answer(m, t, 4800, "honest", PARTY_SAMPLES)
    m.expire(t)
    assert m.base_us == 4800


def test_a_user_asking_once_a_second_is_let_in_by_the_probe() -> None:
    # A user asking once a second has 2 samples in the probe's 2 s, not the 4 that count: the probe
    # ended, the instance was out of its bound again, and its samples aged out unused, each probe.
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    t, shown = 0.0, []
    while t < 30:
        _answer(m, t, 300_000, "attacker")
        if m.base_us < 150_000 and abs(t - round(t)) < 0.05:  # in its bound: it asks, once a second
            _answer(m, t, 1000, "honest")
        t += 0.1
        m.expire(t)
        shown.append(m.base_us)
    assert shown[-100:] == [1000] * 100  # counted, after 4 s in the probe: its own samples keep it in


def test_a_newcomer_showing_the_instance_faster_is_not_pushed_out_by_many_addresses() -> None:
    # The slow users fill every place; a newcomer took the place of the slowest, and was then the one
    # not yet counted that each next address pushed out: it never reached the 4 samples that count.
    m = InstanceMeter(capacity=50, compute_hint_us=5000)
    for k in range(MAX_PARTIES - 1):
        _answer(m, 0.0, 300_000, f"attacker {k}", PARTY_SAMPLES)
    for i in range(PARTY_SAMPLES):
        _answer(m, 0.1 + i * 0.1, 1000, "honest")
        for k in range(3):  # new addresses between each of its requests
            _answer(m, 0.1 + i * 0.1 + 0.01 * k, 300_000, f"churn {i} {k}")
    assert "honest" in m._parties and m.base_us == 1000 and len(m._parties) == MAX_PARTIES
    assert m._ranks.keys() == m._parties.keys()  # bounded with them
    m.expire(SAMPLE_TTL_S + 0.05)  # the first users' samples age out: they are forgotten, ranks too
    assert m._ranks.keys() == m._parties.keys() and "honest" in m._ranks and not any("attacker" in p for p in m._ranks)


def test_a_reload_shows_the_new_configured_compute_at_once() -> None:
    m = InstanceMeter(capacity=50, compute_hint_us=300_000)
    m.set_hint(1000)  # nothing measured (the instance was out of every tight bound): no sample will come
    assert m.base_us == 1000
    _answer(m, 0.0, 2000, "a", PARTY_SAMPLES)
    m.set_hint(500)
    assert m.base_us == 2000  # measured wins over configured, as before


@given(st.lists(st.tuples(st.floats(0, 20), st.floats(-100, 3000, allow_nan=False) | st.just(math.inf)), max_size=80),
       st.integers(1, 40), st.integers(0, 1000))
def test_stage_meter_reads_the_median_a_sort_of_its_window_gives(adds, samples: int, hint: int) -> None:
    """The kept order gives what sorting the window (the hint among it until full) gives, after every
    add and every read, samples aging out included."""
    m = StageMeter(hint_us=hint, samples=samples, ttl_s=5.0)
    window: list[tuple[float, int]] = []
    now = 0.0
    for step, own in adds:
        now += step / 10
        m.add(now, own)
        if math.isfinite(own):
            window = [*window, (now, max(0, int(own)))][-samples:]
        window = [w for w in window if not w[0] < now - 5.0]
        values = sorted([v for _, v in window] + ([hint] if len(window) < samples else []))
        assert m.value_us(now) == values[int(0.5 * (len(values) - 1))]
