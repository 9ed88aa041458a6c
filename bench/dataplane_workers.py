"""``[gateway] workers``: saturation of one gateway serving a local instance with 1 and with 2 workers.

    python bench/dataplane.py --workers [--repeats 5] [--seconds 4]

Two gateways side by side (``workers = 1``: the gateway's own process serves users; ``workers = 2``:
two worker processes), each with the same nginx instance (a fixed JSON body) as its only instance
(capacity 1e6: admission never refuses). Every round runs wrk (1 thread, 16 keep-alive connections,
so the kernel gives each worker some) against each in turn, the order alternating, so both see the
same machine; the ratio is taken per round and its median reported with the machine's load, since
the box is shared. The control process's CPU during the 2-worker runs is what would not scale with
more cores (everything else is per worker).

One hop (``--workers`` too): an ingress gateway peered with an egress gateway in front of the same
nginx, both with ``workers = 1`` or both with ``workers = 2`` (each worker of the ingress on its own
data channel to the egress; the egress's control process hands each stream to one of its workers),
rounds alternating the same way. On this 2-core box that is five processes (four with 2 workers: six)
and wrk on two cores: the figure says what the box gives, not what the design would on more cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from cpnd.lab import Instance, Lab, Link, Topology, write_lab

CONNECTIONS = 16


def wrk_rps(wrk: str, url: str, seconds: float) -> float:
    out = subprocess.run([wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", url], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx and int(non2xx.group(1)) > 0:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} errors on {url}")
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    return float(m.group(1)) if m else 0.0


def run(args: argparse.Namespace, nginx: str | None, wrk: str | None, out: Path) -> int:
    from dataplane import cpu_seconds, machine_load, start_peer

    if nginx is None or wrk is None:
        print("the workers rows need nginx and wrk", file=sys.stderr)
        return 1
    load_before = machine_load()
    rps: dict[int, list[float]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cpn-dp-workers-")))
        inst, port = start_peer("instance", nginx, tmp, 0)
        stack.callback(lambda: (inst.kill(), inst.wait()))
        urls, control, single = {}, 0, 0
        for n in (1, 2):
            topo = Topology((f"w{n}",), (), (Instance("s1", f"w{n}", "/svc", 1e6, 1, 0),),
                            {"log_level": "warning", "workers": n, "health_interval_ms": 0})
            specs = write_lab(topo, tmp / f"w{n}", instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
            lab = stack.enter_context(Lab(specs, log_level="warning"))
            lab.start_all()
            lab.wait_for(lambda lab=lab, n=n: len([w for w in lab.query(f"w{n}", "status")["workers"]
                                                   if w["report_age_ms"] is not None]) == n, 30, "workers up")
            urls[n] = f"http://{specs[f'w{n}'].http}/svc"
            control = lab.procs[f"w{n}"].pid  # the 2-worker gateway's control process: what all workers share
            single = single or control  # the 1-worker gateway: one process does it all
            workers = [w["pid"] for w in lab.query(f"w{n}", "status")["workers"]]
            wrk_rps(wrk, urls[n], 1.0)  # warm: pools, caches
        shared = worker_cpu = single_cpu = 0.0
        ages: list[float] = []  # how old the control's view of each worker is, sampled during the 2-worker runs
        for r in range(args.repeats):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                before = cpu_seconds(control), sum(cpu_seconds(p) for p in workers), cpu_seconds(single)
                stop = threading.Event()
                sampler = threading.Thread(target=_sample_ages, args=(lab, stop, ages)) if n == 2 else None
                if sampler is not None:
                    sampler.start()
                rps[n].append(wrk_rps(wrk, urls[n], args.seconds))
                if sampler is not None:
                    stop.set()
                    sampler.join()
                if n == 2:
                    shared += cpu_seconds(control) - before[0]
                    worker_cpu += sum(cpu_seconds(p) for p in workers) - before[1]
                else:
                    single_cpu += cpu_seconds(single) - before[2]
        served = sum(rps[2]) * args.seconds
        served_1 = sum(rps[1]) * args.seconds
        hop = _one_hop(args, stack, tmp, port, wrk)
    ratios = [b / a for a, b in zip(rps[1], rps[2]) if a]
    doc: dict[str, Any] = {"rps_1_worker": rps[1], "rps_2_workers": rps[2], "ratios": ratios,
                           "median_ratio": statistics.median(ratios) if ratios else None,
                           "load_before": load_before, "load_after": machine_load(), "command": " ".join(sys.argv),
                           "connections": CONNECTIONS, "seconds": args.seconds,
                           "report_age_ms": {"p50": statistics.median(ages), "max": max(ages), "samples": len(ages)}
                           if ages else None,
                           "control_cpu_us_per_request": shared / served * 1e6, "worker_cpu_us_per_request": worker_cpu / served * 1e6,
                           "cpu_us_per_request_1_worker": single_cpu / served_1 * 1e6 if served_1 else None}
    doc["one_hop"] = hop
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane_workers.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{load_before} at the start, {doc['load_after']} at the end")
    print(f"local, wrk -t1 -c{CONNECTIONS} {args.seconds:g} s x {args.repeats} rounds (order alternating):")
    print(f"  workers = 1: {statistics.median(rps[1]):8.0f} req/s (median; rounds {', '.join(f'{x:.0f}' for x in rps[1])})")
    print(f"  workers = 2: {statistics.median(rps[2]):8.0f} req/s (median; rounds {', '.join(f'{x:.0f}' for x in rps[2])})")
    if ratios:
        print(f"  2 / 1: {doc['median_ratio']:.2f}x (median of the per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"  CPU per request: workers = 1: {doc['cpu_us_per_request_1_worker']:.0f} us in the gateway; workers = 2: "
          f"{doc['worker_cpu_us_per_request']:.0f} us in the workers, "
          f"{doc['control_cpu_us_per_request']:.1f} us in the control process (the part all workers share)")
    hr = hop["ratios"]
    print(f"one hop, both gateways with the same workers, wrk -t1 -c{CONNECTIONS} {args.seconds:g} s x {args.repeats} rounds:")
    for n in (1, 2):
        print(f"  workers = {n}: {statistics.median(hop[f'rps_{n}']):8.0f} req/s (median; rounds "
              f"{', '.join(f'{x:.0f}' for x in hop[f'rps_{n}'])})")
    if hr:
        print(f"  2 / 1: {statistics.median(hr):.2f}x (median of the per-round ratios {', '.join(f'{x:.2f}' for x in hr)})")
    print(f"  CPU per request: workers = 1: {hop['cpu_us_per_request_1_worker']:.0f} us in the two gateways; workers = 2: "
          f"{hop['worker_cpu_us_per_request']:.0f} us in the four workers, {hop['control_cpu_us_per_request']:.0f} us in the "
          f"two control processes; {hop['data_channel_share']:.1%} of the ingress workers' attempts on their data channels")
    if ages:
        print(f"  the control's view of a worker under load: {statistics.median(ages):.0f} ms old at the median, "
              f"{max(ages):.0f} ms at most ({len(ages)} samples of show status' report_age_ms)")
    return 0


def _one_hop(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path, port: int, wrk: str) -> dict[str, Any]:
    """Ingress -> egress -> nginx with workers = 1 and 2 on both gateways, rounds alternating."""
    from dataplane import cpu_seconds

    urls, labs, controls, workers = {}, {}, {}, {}
    for n in (1, 2):
        ing, eg = f"h{n}i", f"h{n}e"
        topo = Topology((ing, eg), (Link(ing, eg),), (Instance("s1", eg, "/svc", 1e6, 1, 0),),
                        {"log_level": "warning", "workers": n, "health_interval_ms": 0})
        specs = write_lab(topo, tmp / f"h{n}", instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
        lab = labs[n] = stack.enter_context(Lab(specs, log_level="warning"))
        lab.start_all()
        lab.wait_for(lambda lab=lab, topo=topo: lab.converged(topo), 30, "convergence")
        for gw in (ing, eg):
            lab.wait_for(lambda lab=lab, gw=gw, n=n: len([w for w in lab.query(gw, "status")["workers"]
                                                          if w["report_age_ms"] is not None]) == n, 30, "workers up")
        if n == 2:
            lab.wait_for(lambda lab=lab: lab.query(ing, "status")["http"].get("data_channels_up", 0) >= 2, 30,
                         "the ingress workers' data channels")
        urls[n] = f"http://{specs[ing].http}/svc"
        controls[n] = [lab.procs[gw].pid for gw in (ing, eg)]
        workers[n] = [w["pid"] for gw in (ing, eg) for w in lab.query(gw, "status")["workers"]]
        wrk_rps(wrk, urls[n], 1.0)
    rps: dict[int, list[float]] = {1: [], 2: []}
    cpu = {n: [0.0, 0.0] for n in (1, 2)}  # (control processes, workers) CPU seconds over the rounds
    for r in range(args.repeats):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            before = sum(cpu_seconds(p) for p in controls[n]), sum(cpu_seconds(p) for p in workers[n])
            rps[n].append(wrk_rps(wrk, urls[n], args.seconds))
            cpu[n][0] += sum(cpu_seconds(p) for p in controls[n]) - before[0]
            cpu[n][1] += sum(cpu_seconds(p) for p in workers[n]) - before[1]
    http = labs[2].query("h2i", "status")["http"]
    direct, relayed = http.get("streams_on_data_channels", 0), http.get("streams_via_control", 0)
    per = {n: 1e6 / (sum(rps[n]) * args.seconds) for n in (1, 2)}
    # With workers = 1 the gateway's own process is the "worker" (controls and workers are the same pids).
    return {"rps_1": rps[1], "rps_2": rps[2], "ratios": [b / a for a, b in zip(rps[1], rps[2]) if a],
            "data_channel_share": direct / max(1, direct + relayed),
            "cpu_us_per_request_1_worker": cpu[1][0] * per[1],
            "control_cpu_us_per_request": cpu[2][0] * per[2], "worker_cpu_us_per_request": cpu[2][1] * per[2]}


def _sample_ages(lab: Lab, stop: threading.Event, out: list[float]) -> None:
    while not stop.wait(0.05):
        out += [w["report_age_ms"] for w in lab.query("w2", "status")["workers"] if w["report_age_ms"] is not None]
