"""What planning one request costs the ingress, by the number of instances of its service (in-process).

    python bench/plan_cost.py [--instances 5,20,50] [--requests 5000]

gw1's own planner on a RIB of N instances of /yolo behind N peers (path 5 ms + 0.5 ms per peer, as
the paper lab's are 5-11 ms; compute 1-3 ms; prices 1-3), with the ingress's real estimate
(select.ingress_view: its send account, its correction, its own gateway time). One request is
``Planner.plan`` + ``Plan.next`` + what its answer teaches (``Planner.observed``), for
``CPN-Max-Latency: 10ms`` and ``CPN-Prefer: price`` (u1's). Printed per request: bytecodes executed
(exact: a ``sys.settrace`` opcode count) and µs (timeit, best of 7; this machine's speed).
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h11  # noqa: E402

from cpnd.load import LatencyCorrection, OwnTimes, SendAccount  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.planner import Attempt, Planner  # noqa: E402
from cpnd.rib import Rib  # noqa: E402
from cpnd.selection import ingress_view  # noqa: E402
from cpnd.wire import RouteAdv, Update  # noqa: E402

HEADERS = [(b"host", b"x"), (b"user-agent", b"python-httpx/0.27"), (b"accept", b"*/*"),
           (b"cpn-max-latency", b"10ms"), (b"cpn-prefer", b"price")]


def one_request(n: int) -> Any:
    """A callable that plans one request (a new clock reading each call) on a RIB of ``n`` instances."""
    label = service_label("/yolo")
    rib = Rib("gw1")
    for k in range(n):
        peer = f"gw{k + 3}"
        rib.set_link_cost(peer, 5000 + 500 * k)
        rib.apply_update(peer, Update((RouteAdv("/yolo", f"s{k + 1}", peer, 1, label, (peer,), 0, 50.0, 0.0,
                                                1.0 + k % 3, 1000 + 500 * (k % 5), gateway_us=300),)), 0)
    account, own, corr = SendAccount(), OwnTimes(), LatencyCorrection()
    planner = Planner(rib, lambda key, best, now: ingress_view(rib, key, best, now, own=own, account=account,
                                                              correction=corr),
                      account, own, corr, rng=random.Random(1))
    headers = h11.Request(method=b"GET", target=b"/yolo", headers=HEADERS).headers
    clock = [1000.0]

    def run() -> None:
        clock[0] += 0.01
        now = clock[0]
        plan = planner.plan(b"GET", b"/yolo", headers, {}, now, now)
        cand = plan.next(now)
        assert cand is not None
        account.sent(cand.key, now)
        attempt = Attempt(bound_at=plan.bound_at)
        attempt.whole, attempt.sent_at, attempt.instance_s = True, now, 0.001
        attempt.upstream_head_at, attempt.head_at = now + 0.008, now + 0.0085
        account.finished(cand.key)
        planner.observed(plan, cand, attempt, now, now + 0.0085)

    return run


def bytecodes(run: Any, requests: int) -> float:
    count = [0]

    def tracer(frame: Any, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(requests):
            run()
    finally:
        sys.settrace(None)
    return count[0] / requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", default="5,20,50")
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    print("| instances | bytecodes a request | µs a request |")
    print("|---|---|---|")
    for n in (int(x) for x in args.instances.split(",")):
        run = one_request(n)
        for _ in range(1000):  # warm: windows and tables at their steady size
            run()
        us = min(timeit.repeat(run, number=args.requests, repeat=7)) / args.requests * 1e6
        print(f"| {n} | {bytecodes(run, 200):,.0f} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
