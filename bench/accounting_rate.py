"""Does the per-request accounting grow with the request rate? Exact bytecodes a request, in-process.

    python bench/accounting_rate.py [--rates 40,400,2000,5000] [--requests 2000]

The calls a local request makes into the sans-IO accounting (cpnd/load.py, cpnd/fairshare.py): the
ingress's view of the instance (load, bounded load), the egress's fair share and admission
(InstanceMeter.admit, its SlotHolds hold sent and answered), the send account, the instance meter's
sample, the gateway's own time (StageMeter) and the latency correction, on a virtual clock at each
rate. The windows hold a second of events, so at 2,000 req/s they hold 2,000: a trim, sort or search
over them would show here as bytecodes growing with the rate (exact: a ``sys.settrace`` opcode count,
after a warm-up of three seconds of virtual time, so the windows are full); the C work they call
(searches, compactions) shows in the µs a request (untraced, best of 3 runs; this machine's speed).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.fairshare import Shares  # noqa: E402
from cpnd.load import InstanceMeter, LatencyCorrection, OwnTimes, SendAccount, Stage  # noqa: E402


def per_request(rate: float, requests: int, trace: bool = True) -> tuple[float, collections.Counter[str]]:
    """Bytecodes a request (and by function, in all) of ``requests`` at ``rate`` after 3 s of them;
    untraced, the seconds a request instead."""
    meter, shares, own = InstanceMeter(1e6, 1000), Shares(), OwnTimes()
    corr, account = LatencyCorrection(), SendAccount()
    ops: collections.Counter[str] = collections.Counter()

    def local(frame: Any, event: str, arg: object) -> Any:
        if event == "opcode":
            ops[frame.f_code.co_qualname] += 1
        return local

    def hook(frame: Any, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        return local

    party, key = "127.0.0.1", ("svc", "s1")
    warm = int(3 * rate)
    for i in range(warm + requests):
        if i == warm:
            if trace:
                sys.settrace(hook)
            t0 = time.perf_counter()
        now = i / rate
        meter.load(now), meter.bounded_load(now)
        if shares.refuse(party, meter.holds.held(now), meter.capacity, now) or meter.admit(now, None):
            raise RuntimeError("refused: the instance's capacity is far above any rate here")
        shares.admitted(party)
        hold = meter.take_hold()
        account.sent(key, now)
        load = meter.load(now)
        meter.sent(hold, now + 20e-6)
        end = now + 300e-6
        meter.done(end, 100.0, load, hold, party)
        shares.ended(party, end)
        own.add(Stage.LOCAL, end, 300.0)
        own.us(Stage.LOCAL, end)
        corr.observe(key, end, 300.0, 250.0)
        corr.value_us(key, end)
    sys.settrace(None)
    if not trace:
        return (time.perf_counter() - t0) / requests, ops
    return sum(ops.values()) / requests, ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="40,400,2000,5000")
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    for rate in (float(r) for r in args.rates.split(",")):
        per, ops = per_request(rate, args.requests)
        us = min(per_request(rate, args.requests, trace=False)[0] for _ in range(3)) * 1e6
        print(f"{rate:6g} req/s: {per:7.1f} bytecodes, {us:5.1f} µs a request; the most: "
              + ", ".join(f"{f} {n / args.requests:.0f}" for f, n in ops.most_common(6)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
