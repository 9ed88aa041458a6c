"""Each user's fair share of an instance once it fills (sans-IO, virtual clock)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import httpx
from hypothesis import given
from hypothesis import strategies as st

from cpnd import fairshare
from cpnd.fairshare import FULL, MAX_EVENTS, Shares, _Window
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab


def _run(shares: Shares, capacity: float, offered: dict[str, int], seconds: int, job_s: float = 0.0) -> dict[str, int]:
    """Each party offers its rate (req/s, evenly spaced); an admitted request takes ``job_s`` and is
    held a second after (as the egress counts it). Admitted per party a second, over the run's last 3 s."""
    running: list[tuple[float, str]] = []  # (when it ends, party)
    held: list[float] = []  # when each admitted request stops counting
    got = {p: 0 for p in offered}
    events = sorted((k / rate, p) for p, rate in offered.items() for k in range(rate * seconds))
    for t, party in events:
        for end, who in [r for r in running if r[0] <= t]:
            running.remove((end, who))
            shares.ended(who, end)
        held = [h for h in held if h > t]
        if len(held) + 1 > capacity:  # the instance's own bound (load.InstanceMeter)
            shares.refuse(party, len(held), capacity, t)  # it asked
            continue
        if shares.refuse(party, len(held), capacity, t) is None:
            shares.admitted(party)
            running.append((t + job_s, party))
            held.append(t + job_s + 1.0)
            if t >= seconds - 3:
                got[party] += 1
    return {p: n / 3 for p, n in got.items()}


def test_below_the_mark_whoever_asks_gets_in() -> None:
    s = Shares()
    for i in range(int(FULL * 50) - 1):
        assert s.refuse("10.0.0.1", i, 50, i * 0.001) is None
        s.admitted("10.0.0.1")


def test_one_user_flooding_cannot_take_what_another_needs() -> None:
    """One user offers 130 req/s, another 10, to an instance of 50/s: the second gets all of its 10."""
    for job_s in (0.0, 0.3):
        got = _run(Shares(), 50, {"attacker": 130, "honest": 10}, 8, job_s)
        assert got["honest"] == 10 and got["attacker"] >= 10, (job_s, got)
    # Jobs of 2 s hold a slot 3 s: 50 slots serve 16.7 a second, and each user's share, 25 slots,
    # 8.3 a second. The honest user gets that share, where alone the flood had all.
    got = _run(Shares(), 50, {"attacker": 130, "honest": 10}, 12, 2.0)
    assert got["honest"] >= 7 and got["attacker"] >= 7, got
    for job_s in (0.0, 0.3, 2.0):  # alone, a user may have all of it
        alone = _run(Shares(), 50, {"attacker": 130}, 8, job_s)
        assert alone["attacker"] >= 50 / (1 + job_s) - 2, (job_s, alone)


def test_the_share_is_said_and_counts_this_user_too() -> None:
    s = Shares()
    for _ in range(45):
        s.admitted("a")
    assert s.refuse("a", 45, 50, 0.5) is None  # alone: all of it is a's share
    assert s.refuse("b", 45, 50, 0.5) is None  # a newcomer, counted among the users: 25 of 50
    s.admitted("b")
    why = s.refuse("a", 46, 50, 0.5)
    assert why is not None and "holds 45 of its capacity" in why and "share 25 among 2 users" in why
    for _ in range(45):
        s.ended("a", 0.6)  # answered: still held for a second ...
    assert s.held("a") == 45 and s.refuse("a", 46, 50, 0.7) is not None
    assert s.refuse("a", 46, 50, 1.65) is None and s.held("a") == 0  # ... then no more
    s.ended("nobody", 1.7)  # an end with no admission (a reload between): nothing breaks
    assert s.held("nobody") == 1


def test_a_bounded_users_share_is_split_among_bounded_users_alone() -> None:
    """A flexible user asking a full instance while the meter refuses flexible requests for the bounded
    ones' latency does not halve the share of the bounded user that holds it: that half would go unused.
    Where flexible requests are not refused so (``bounded_only`` false: a bound any instance meets),
    a bound is no claim on their part."""
    s = Shares()
    for _ in range(45):
        s.admitted("u1")
    assert s.refuse("u2", 45, 50, 0.5) is None  # flexible, holds nothing: counted among all users
    assert s.users(0.5) == 1  # (u2 alone so far)
    assert s.refuse("u1", 45, 50, 0.6, bounded=True, bounded_only=True) is None  # u1 alone bounded: all 50
    assert s.users(0.6) == 2
    why = s.refuse("u1", 45, 50, 0.6, bounded=True)  # flexible requests not shut out: split with u2, 25 each
    assert why is not None and "share 25 among 2 users" in why
    why = s.refuse("u1", 45, 50, 0.6)  # the same request without a bound: the same
    assert why is not None and "share 25 among 2 users" in why
    # A second bounded user does split it: each holds its share of the bounded demand's room.
    assert s.refuse("u3", 45, 50, 0.7, bounded=True) is None
    why = s.refuse("u1", 46, 50, 0.7, bounded=True, bounded_only=True)
    assert why is not None and "share 25 among 2 users" in why


def test_a_flexible_user_that_yields_takes_no_part_of_a_bounded_users_share() -> None:
    """A flexible user whose ingress had room for it elsewhere (EXT_FLAG_YIELDS) in each of its asks of
    the last second is not counted in a bounded request's share; one ask without yielding counts it again
    for a second. Flexible requests' shares count it either way."""
    s = Shares()
    for _ in range(45):
        s.admitted("u1")
    assert s.refuse("u2", 45, 50, 0.5, yields=True) is None  # flexible, yielding: counted among all users
    assert s.refuse("u1", 45, 50, 0.6, bounded=True) is None  # ... but not in u1's bounded share: all 50
    why = s.refuse("u1", 45, 50, 0.6)  # u1 without a bound: split with u2
    assert why is not None and "share 25 among 2 users" in why
    assert s.refuse("u2", 45, 50, 0.7) is None  # u2 asks once without yielding (no room elsewhere now)
    why = s.refuse("u1", 45, 50, 0.8, bounded=True)
    assert why is not None and "share 25 among 2 users" in why
    assert s.refuse("u2", 45, 50, 1.72, yields=True) is None
    assert s.refuse("u1", 45, 50, 1.75, bounded=True) is None  # in the second to 1.75 u2 only yielded: all 50
    for _ in range(5):
        s.admitted("u1")
    why = s.refuse("u1", 50, 50, 1.8, bounded=True)  # the share never exceeds the capacity
    assert why is not None and "share 50 among 1 users" in why


def test_what_a_user_had_leaves_after_a_second() -> None:
    s = Shares()
    assert s.refuse("a", 10, 50, 0.0) is None and s.users(0.0) == 0  # far from full: nobody is counted
    for i in range(40):
        assert s.refuse("a", 45, 50, i * 0.01) is None  # full: a is counted (and alone, all is its share)
        s.admitted("a")
    assert s.users(0.4) == 1
    assert s.refuse("b", 45, 50, 2.0) is None and s.users(2.0) == 1  # a's asks left the window: b alone


@given(st.lists(st.tuples(st.floats(0, 0.01), st.sampled_from("abcdefgh")), max_size=300))
def test_counts_are_bounded_and_exact(steps) -> None:
    s = Shares()
    t = 0.0
    log: list[tuple[float, str]] = []
    for dt, party in steps:
        t += dt
        if s.refuse(party, 900, 1000, t) is None:  # full: every ask counts its user
            s.admitted(party)
        log.append((t, party))
    live = [p for at, p in log if at > t - 1.0][-MAX_EVENTS:]
    assert s.users(t) == len(set(live))


@given(st.lists(st.tuples(st.floats(-0.2, 0.6), st.sampled_from("abc")), max_size=80), st.sampled_from([3, 8, MAX_EVENTS]))
def test_a_window_adds_as_a_full_trim_would(steps, bound) -> None:
    """``_Window.add`` (one leaving taken in place) against the former add (a trim whenever the oldest
    has left or the bound is passed), on the same events: the same events and counts after each, with
    the clock stuttering back now and then and the bound small enough to bite."""
    with mock.patch.object(fairshare, "MAX_EVENTS", bound):
        w, events, count, now = _Window(), collections.deque(), collections.Counter(), 10.0
        for dt, party in steps:
            now += dt
            w.add(party, now)
            events.append((now, party))
            count[party] += 1
            if len(events) > bound or events[0][0] <= now - 1.0:
                while events and (events[0][0] <= now - 1.0 or len(events) > bound):
                    _, p = events.popleft()
                    count[p] -= 1
                    if not count[p]:
                        del count[p]
            assert list(w._events) == list(events) and w.count == count


# ---------------------------------------------------------------- real processes


@contextlib.contextmanager
def one_gateway(tmp_path, capacity: float) -> Iterator[tuple[Lab, str]]:
    """One gateway, a, with a local instance l1 (1 ms) of ``capacity``: the lab and its users' base URL."""
    with InstanceProcs() as insts:
        insts.start("l1", compute_ms=1)
        topo = Topology(("a",), (), (Instance("l1", "a", "/local", capacity=capacity, compute_latency_ms=1),),
                        {"health_interval_ms": 0})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: any(r["best"] for r in lab.routes("a")), 30, "l1's route")
            yield lab, f"http://{specs['a'].http}"


def _served_beside_a_flood(flood_url: str, url: str, address: str = "127.0.0.1") -> None:
    """16 connections send long jobs (0.3 s) to ``flood_url`` until the instance (20 req/s) is full;
    then a user at ``address`` asks ``url`` 4 times a second: from 1.5 s on, each of its requests
    must be served (its first may find every slot held: a slot is held a second after its answer,
    and admission cannot take one back), and the flood still refused."""
    stop = threading.Event()
    flood: list[int] = []

    def flooder() -> None:
        with httpx.Client(base_url=flood_url, timeout=10) as c:
            while not stop.is_set():
                flood.append(c.get("/local?delay=0.3").status_code)

    threads = [threading.Thread(target=flooder) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while flood.count(503) < 20 and time.monotonic() < deadline:  # the instance is full: the flood is refused
            time.sleep(0.05)
        assert flood.count(503) >= 20, flood[-20:]
        with httpx.Client(base_url=url, timeout=10, transport=httpx.HTTPTransport(local_address=address)) as c:
            got = []
            t0 = time.monotonic()
            for _ in range(16):
                got.append((time.monotonic() - t0, c.get("/local")))
                time.sleep(0.25)
        late = [r for at, r in got if at >= 1.5]
        assert len(late) >= 8 and {r.status_code for r in late} == {200}, [(at, r.text) for at, r in got]
        assert 503 in flood[-40:]  # the flood was still on, and still refused
    finally:
        stop.set()
        for t in threads:
            t.join(15)


def test_a_flooding_user_leaves_another_its_share(tmp_path) -> None:
    """One gateway with an instance of 20 req/s. One user (127.0.0.1) keeps 16 connections busy with
    long jobs (0.3 s), far over the capacity; another (127.0.0.2) then sends 4 requests a second:
    the flood is held to its share while the instance is full."""
    with one_gateway(tmp_path, 20) as (_, url):
        _served_beside_a_flood(url, url, "127.0.0.2")


def test_a_user_holding_nothing_is_never_over_its_share() -> None:
    """Shares below one request (capacity 1 and two users, or 20 users of 10) refused even users
    holding nothing: every request, whoever asked, while the others kept asking."""
    s = Shares()
    assert s.refuse("a", 0, 1, 0.0) is None
    assert s.refuse("b", 0, 1, 0.1) is None  # share 0.5: b holds none of it yet
    s.admitted("b")
    assert s.refuse("a", 1, 1, 0.2) is None  # a holds nothing either (the instance's bound refuses it)
    assert s.refuse("b", 1, 1, 0.3) is not None  # b holds its share
    for i in range(20):
        s.refuse(f"10.0.0.{i}", 9, 10, 0.4)
    assert s.refuse("c", 9, 10, 0.5) is None  # share 0.48: the last slot is still someone's


def test_a_user_asking_again_and_again_cannot_close_a_small_instance(tmp_path) -> None:
    """An instance of capacity 1 (every request past 80 % of it) and two users: one (127.0.0.2)
    asks every 0.3 s, the other (127.0.0.3) every 0.25 s for 4 s. A user that holds nothing is
    never over its share: the instance serves one of them whenever its slot is free (a slot is held
    a second after its answer). With shares of 0.5 a request, the asks alone refused every request
    of both ("holds 0 of its capacity, share 0.5")."""
    stop = threading.Event()
    other: list[httpx.Response] = []

    def asker(url: str) -> None:
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=url, timeout=10, transport=transport) as c:
            while not stop.is_set():
                other.append(c.get("/local"))
                stop.wait(0.3)

    with one_gateway(tmp_path, 1) as (_, url):
        thread = threading.Thread(target=asker, args=(url,))
        try:
            thread.start()
            transport = httpx.HTTPTransport(local_address="127.0.0.3")
            with httpx.Client(base_url=url, timeout=10, transport=transport) as c:
                deadline = time.monotonic() + 10
                while not other and time.monotonic() < deadline:
                    time.sleep(0.01)
                got = []
                for _ in range(16):
                    got.append(c.get("/local"))
                    time.sleep(0.25)
        finally:
            stop.set()
            thread.join(15)
    both = got + other
    assert len(other) >= 4
    assert not [r.text for r in both if "holds 0 of its capacity" in r.text]
    assert sum(r.status_code == 200 for r in both) >= 2, [r.text for r in both]


def test_a_user_behind_another_ingress_is_not_the_same_user(tmp_path) -> None:
    """Two ingresses, a and b, with their own users, both at 127.0.0.1 (the same private address at
    two sites, or one that a hostile ingress claims for its own users), and c's instance of 20 req/s.
    A flood of long jobs through b must not use up the share of the user through a: c counts a
    tunnelled user within the peer it came from (before, the two were one party, and a's user was
    refused with the flood)."""
    with InstanceProcs() as insts:
        insts.start("l1", compute_ms=1)
        topo = Topology(("a", "b", "c"), (Link("a", "c", 1), Link("b", "c", 1)),
                        (Instance("l1", "c", "/local", capacity=20, compute_latency_ms=1),), {"health_interval_ms": 0})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        with Lab(specs) as lab:
            lab.start_all()
            for gw in ("a", "b"):
                lab.wait_for(lambda: any(r["best"] for r in lab.routes(gw)), 30, f"l1's route at {gw}")
            _served_beside_a_flood(f"http://{specs['b'].http}", f"http://{specs['a'].http}")


def _admitting(offers: dict[str, tuple[float, int | None]], seconds: float = 20.0, job_s: float = 0.1,
               capacity: float = 50.0, compute_us: int = 20_000, yielding: frozenset[str] = frozenset()) -> dict[str, float]:
    """Requests admitted a second (over the last 15) by ``Egress.admit`` itself (the share, then the
    meter), on a virtual clock: ``offers`` is party -> (requests a second, slack µs or None: flexible);
    each admitted request takes ``job_s`` and ends as the egress ends it; ``yielding``: parties whose
    requests carry EXT_FLAG_YIELDS."""
    import heapq
    from types import SimpleNamespace

    from cpnd.egress import Egress
    from cpnd.load import InstanceMeter
    from cpnd.tunnel import NO_BUDGET

    inst = SimpleNamespace(id="s1", capacity=capacity, max_inflight=10_000)
    meter = InstanceMeter(capacity, compute_us)
    egress = SimpleNamespace(meters={"s1": meter}, shares={"s1": Shares()},
                             p=SimpleNamespace(stats=collections.Counter()))
    shares = egress.shares["s1"]
    events: list[tuple[float, int, str, Any]] = []
    for i, party in enumerate(offers):
        heapq.heappush(events, (i * 1e-4, i, party, None))
    got = collections.Counter()
    n = len(offers)
    while events:
        t, _, party, ended = heapq.heappop(events)
        if t > seconds:
            break
        if ended is not None:
            hold, load = ended
            meter.done(t, job_s * 1e6, load, hold, party)
            shares.ended(party, t)
            continue
        rate, slack = offers[party]
        heapq.heappush(events, (t + 1 / rate, n, party, None))
        n += 1
        budget = NO_BUDGET if slack is None else 10 * slack
        if Egress.admit(egress, inst, budget, NO_BUDGET if slack is None else slack, party, t, party in yielding) is None:
            hold, load = meter.take_admitted(t)
            meter.sent(hold, t)
            got[party] += t >= seconds - 15
            heapq.heappush(events, (t + job_s, n, party, (hold, load)))
            n += 1
    return {p: got[p] / 15 for p in offers}


def test_a_bound_any_request_can_claim_takes_no_flexible_users_share() -> None:
    """A user adding a bound it does not need (an hour, or one the instance meets at any load) to
    requests sent as fast as they are admitted takes no flexible user's share: its requests hold up no
    one's latency, so flexible users count among those a full instance is split by (it took 43.5 of 50
    a second, the honest user 1.7 of the 40 it asked; with 120 ms, 45.7 and 0.9). Each has about half,
    as without the bound."""
    for hog in (3_600_000_000, 120_000, None):
        got = _admitting({"hog": (200.0, hog), "honest": (40.0, None)})
        assert got["honest"] >= 20 and got["hog"] <= 25, (hog, got)


def test_a_bounded_user_gets_the_room_a_flexible_user_with_room_elsewhere_yields() -> None:
    """The paper's s3 at 100 req/s a user: u1's bound (2.5 ms of compute left, base 1 ms) is met only at
    s1 and s3, u2's overflow (flexible) prefers s3 but has room at s2 and s4. Counted in u1's share, u2 held
    u1 to 25 of the 38 a second it asked; yielding, u2 leaves u1 what it asks, and gets what is left. A
    flexible user with nowhere else to go (not yielding) keeps its share beside a bound any instance meets."""
    offers = {"u1": (38.0, 2_500), "u2": (30.0, None)}
    held = _admitting(offers, job_s=0.002, compute_us=1_000)
    assert held["u1"] <= 26 and held["u2"] >= 20, held  # (before: fair shares alone)
    got = _admitting(offers, job_s=0.002, compute_us=1_000, yielding=frozenset({"u2"}))
    assert got["u1"] >= 35 and got["u1"] + got["u2"] >= 47, got
    hog = _admitting({"hog": (200.0, 3_600_000_000), "honest": (40.0, None)}, yielding=frozenset({"hog"}))
    assert hog["honest"] >= 20 and hog["hog"] <= 25, hog  # the flag is the flexible user's own: a bound cannot claim it
