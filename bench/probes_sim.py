"""The ingress's probes (protocol-spec/selection.md, "Probes") in a simulation on a virtual clock:
the real Planner and LatencyCorrection, one instance 2 ms away estimated at 8 ms, users at 100
requests a second with a 10 ms bound, and an instance time drawn at random per request.

    python bench/probes_sim.py [--seeds 1,2,3]

* *stationary*: the instance takes 0-4 ms over its estimate (uniform), so it meets the bound about
  half the time: what a user gets with probes and without (probes off), over 20 s; with a second
  user A whose bound sits just under the instance's corrected total (11.6 / 11 ms) beside it.
* *burst*: 0-1 ms over, but 4-6 ms over from 2 s to 3 s: how soon after the burst the 10 ms user
  is served again, with probes and without.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.errors import HttpError  # noqa: E402
from cpnd.load import LatencyCorrection, OwnTimes, SendAccount  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.planner import Attempt, Planner  # noqa: E402
from cpnd.rib import Rib  # noqa: E402
from cpnd.selection import flooded_view  # noqa: E402
from cpnd.wire import RouteAdv, Update  # noqa: E402

ESTIMATE_S = 0.008


def planner(probes: bool) -> Planner:
    """gw1 with one instance of /yolo at gw2 (2 ms away, 6 ms of compute), its estimate corrected as the daemon's is."""
    rib = Rib("gw1")
    rib.set_link_cost("gw2", 2000)
    rib.apply_update("gw2", Update((RouteAdv("/yolo", "a", "gw2", 1, service_label("/yolo"), ("gw2",), 0, 50.0, 0.0,
                                             1.0, 6000, gateway_us=0),)), 0)
    corr = LatencyCorrection()
    if not probes:
        corr.probe_due = lambda key, now: False  # type: ignore[method-assign]
    return Planner(rib, lambda key, best, now: attrs.evolve(flooded_view(rib, best), correction_us=corr.value_us(key, now)),
                   SendAccount(), OwnTimes(), corr, rng=random.Random(1))


def headers(bound_ms: float) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"cpn-max-latency", f"{bound_ms}ms".encode())]


def run(requests: list[tuple[float, str, float]], over: Any, probes: bool, rng: random.Random) -> dict[str, dict[str, Any]]:
    """Send ``requests`` (time, user, bound ms); each takes the estimate plus ``over(t, rng)`` s, cut at its bound."""
    p = planner(probes)
    events: list[tuple[float, int, str, Any]] = [(t, i, "req", (user, b)) for i, (t, user, b) in enumerate(requests)]
    heapq.heapify(events)
    seq = len(events)
    out: dict[str, dict[str, Any]] = {}
    while events:
        t, _, kind, data = heapq.heappop(events)
        if kind == "req":
            user, bound_ms = data
            st = out.setdefault(user, dict(served=0, cut=0, no_instance=0, probes=0, served_at=[]))
            try:
                plan = p.plan(b"GET", b"/yolo", headers(bound_ms), {}, t, t)
            except HttpError:
                st["no_instance"] += 1
                continue
            cand = plan.next(t)
            assert cand is not None
            st["probes"] += cand.probe
            took = ESTIMATE_S + over(t, rng)
            seq += 1
            if took > bound_ms / 1000 * 0.999:
                heapq.heappush(events, (t + bound_ms / 1000, seq, "cut", (user, plan, cand, t)))
            else:
                heapq.heappush(events, (t + took, seq, "ans", (user, plan, cand, t)))
        elif kind == "ans":
            user, plan, cand, t0 = data
            p.observed(plan, cand, Attempt(head_at=t, whole=True), t0, t)
            out[user]["served"] += 1
            out[user]["served_at"].append(t0)
        else:
            user, plan, cand, t0 = data
            p.missed(cand, Attempt(whole=True), t0, t, "192.0.2.1" if user == "V" else "192.0.2.2")
            out[user]["cut"] += 1
    return out


def stationary(seed: int, probes: bool, a_bound_ms: float | None) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    reqs = [(i / 100 + rng.random() / 100, "V", 10.0) for i in range(2000)]
    if a_bound_ms is not None:
        reqs += [(i / 100 + rng.random() / 100, "A", a_bound_ms) for i in range(2000)]
    out = run(reqs, lambda t, r: r.uniform(0, 0.004), probes, rng)
    for st in out.values():
        del st["served_at"]
    return out


def burst(seed: int, probes: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    reqs = [(i / 100 + rng.random() / 100, "V", 10.0) for i in range(800)]
    reqs += [(i / 100 + rng.random() / 100, "W", 20.0) for i in range(200, 300)]  # a looser bound, in the burst only
    out = run(reqs, lambda t, r: r.uniform(0.004, 0.006) if 2.0 <= t < 3.0 else r.uniform(0, 0.001), probes, rng)
    after = [t for t in out["V"]["served_at"] if t >= 3.0]
    return {"back_after_burst_s": round(min(after) - 3.0, 3) if after else None, "served_after": len(after)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for probes in (False, True):
        name = "probes" if probes else "no probes"
        for a in (None, 11.6, 11.0):
            for seed in seeds:
                print(f"stationary, {name}, A's bound {a}, seed {seed}:", stationary(seed, probes, a))
        print(f"burst, {name}:", [burst(seed, probes) for seed in seeds])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
