"""Synthetic host noise for A/B runs of the other benches: other tenants' bursts, reproducibly.

    python bench/noise.py BURST_S PERIOD_S DURATION_S [--spinners 2]

Each spinner process busy-loops a core for BURST_S, then sleeps about PERIOD_S - BURST_S (+-0.5 s,
seeded), from a random phase, until DURATION_S have passed. Start it beside a bench (in the
background) and run the trees to compare in alternation while it runs: each sees the same noise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time


def spin(seed: int, burst_s: float, period_s: float, duration_s: float) -> None:
    rng = random.Random(seed)
    end = time.monotonic() + duration_s
    time.sleep(rng.random() * period_s)
    while time.monotonic() < end:
        until = time.monotonic() + burst_s
        while time.monotonic() < until:
            pass
        time.sleep(max(0.0, period_s - burst_s + rng.uniform(-0.5, 0.5)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("burst_s", type=float)
    ap.add_argument("period_s", type=float)
    ap.add_argument("duration_s", type=float)
    ap.add_argument("--spinners", type=int, default=2)
    args = ap.parse_args()
    procs = [multiprocessing.Process(target=spin, args=(i, args.burst_s, args.period_s, args.duration_s))
             for i in range(args.spinners)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
