"""The paper's experiment, for real on loopback: per-request vs anycast (per-connection) vs DNS-TTL.

    python bench/paper.py [--modes per-request,per-connection,dns-ttl] [--rates 1,10,...,120]
                          [--step 4] [--warmup 1] [--prewarm 3] [--set KEY=VALUE ...]
                          [--records FILE] [--out bench/results]

`cpnd lab paper` per mode (GW1..GW7, the RTT table as emulated links, simulated
s1..s5 with capacity 50 req/s, prices 2,1,2,1,2, compute 1,3,1,3,1 ms growing to
double at full load, refusing beyond capacity). User u1 sends to gw1 with
`CPN-Max-Latency: 10ms` and `CPN-Prefer: price`; u2 to gw2 with `CPN-Prefer: latency`.
Both sweep the same offered rate, step by step, open-loop over long-lived
keep-alive connections opened at the start (as the paper's users do), after a few seconds
at a low rate that no step counts (a fresh gateway's first requests are slow: connections,
pools, first-use code paths; an end-to-end estimate rightly keeps u1 off an instance that
was just slow, and a sweep should not measure that start-up). Per step:
served rate per user, u1's latency as its client observes it (p50/p99/max, from each
request's scheduled send time to its response head) beside network + compute (the
emulated RTT of the path plus the compute time the instance reports) and the gateways'
share (the difference), per-instance load, and the optimum: the most requests that can
be served with u1 within its bound, from the instance model and the measured path
latencies, by exhaustive search over which instances u1 may use and a max-flow for
each choice; and the same under end-to-end accounting (the model plus the gateways' own
processing gw1 measures per instance); and the same again with the floor path's added time (its
FLOOR_QUANTILE, below) in every path: what any pair of trio + h11 gateways could serve on this machine
at this moment. CPN-Max-Latency is end to end (DESIGN.md 6): a
200 that u1's client sees later than 10 ms (plus CLIENT_ALLOWANCE_MS for this Python
client on the same box) is counted late, a failure, not served, in every mode; gw1's own
count of responses later than the bound (measured at the ingress) is reported beside it, and
its count of requests it answered 504 at the bound instead of late (per-request mode).
Beside u1, in the same run (at u1's rate up to 10 req/s: a probe, not a third user loading the
machine), a "floor" client sends the same request through the floor of our own stack on u1's usual path (FloorPath: two trio + h11 proxies with
gw1-gw3's emulated link between them, an instance with s1's compute): what any trio + h11 pair
of gateways would add on this machine at this load.
Writes paper.json, paper.csv and figures 10(a), 10(b), 11(a), 11(b) as PNG under --out.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import json
import os
import signal
import sys
import statistics
import subprocess
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import attrs
import networkx as nx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.aio import sleep_until_precisely  # noqa: E402
from cpnd.lab import PAPER_COMPUTE_MS, PAPER_RTT, InstanceProcs, Lab, paper_topology, write_lab  # noqa: E402
from httpclient import KeepAlive  # noqa: E402

INSTANCES = [f"s{i}" for i in range(1, 6)]
ORIGIN = {f"s{i}": f"gw{i + 2}" for i in range(1, 6)}
CAPACITY = 50.0
BOUND_MS = 10.0
USERS = {
    "u1": ("gw1", {"CPN-Max-Latency": "10ms", "CPN-Prefer": "price"}),
    "u2": ("gw2", {"CPN-Prefer": "latency"}),
}
PREWARM_RATE = 5.0  # req/s per user before the sweep (--prewarm): connections, pools and first-use code paths warm
CLIENT_ALLOWANCE_MS = 1.0  # a Python client on the same box: its own share of what it observes
CONNS_PER_USER = 8
SAMPLE_EVERY_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REQUEST_TIMEOUT_S = 5.0
ROUTING_COUNTERS = ("route_entries_in", "route_entries_old_seq", "route_in_cpu_us", "route_out_cpu_us", "rib_changes", "updates_out")
# The floor of our own stack on u1's usual path (gw1 -> gw3 -> s1): two bench/floor_proxy.py
# (trio + h11, parse and re-serialise only) with gw1-gw3's emulated link between them, in front
# of an instance of its own with s1's compute; "floor" sends what u1 sends, at u1's rate up to
# FLOOR_MAX_RATE: a probe of what the stack costs at the machine's load, not a third user adding to it.
FLOOR_RTT_MS = PAPER_RTT["gw1"]["gw3"]
FLOOR_MAX_RATE = 10.0
FLOOR_COMPUTE_MS = PAPER_COMPUTE_MS[0]
FLOOR_QUANTILE = 0.9  # of the floor path's added time, for the optimum at the floor (a bound kept for most requests)


# ---------------------------------------------------------------- the optimum


def u1_limit(rtt_ms: float, comp_ms: float) -> float:
    """Most load (req/s) an instance may carry while u1's requests there stay within the bound."""
    if rtt_ms + comp_ms > BOUND_MS:
        return -1.0
    if rtt_ms + 2 * comp_ms <= BOUND_MS:
        return CAPACITY
    return (0.5 + (BOUND_MS - rtt_ms - comp_ms) / (2 * comp_ms)) * CAPACITY


def optimum(d1: float, d2: float, rtt1: dict[str, float], comp: dict[str, float] | None = None) -> float:
    """Max served with u1 within its bound: every subset u1 may use, each solved as a max-flow.

    ``comp``: base compute latencies (ms) instead of the model's (e.g. those measured).
    """
    comp = comp or dict(zip(INSTANCES, PAPER_COMPUTE_MS))
    usable = [s for s in INSTANCES if u1_limit(rtt1[s], comp[s]) >= 0]
    best = 0.0
    for k in range(len(usable) + 1):
        for subset in itertools.combinations(usable, k):
            g = nx.DiGraph()
            g.add_edge("src", "u1", capacity=d1)
            g.add_edge("src", "u2", capacity=d2)
            for s in INSTANCES:
                cap = min(CAPACITY, u1_limit(rtt1[s], comp[s])) if s in subset else CAPACITY
                g.add_edge(s, "sink", capacity=cap)
                g.add_edge("u2", s, capacity=CAPACITY)
                if s in subset:
                    g.add_edge("u1", s, capacity=CAPACITY)
            best = max(best, nx.maximum_flow_value(g, "src", "sink"))
    return best


# ---------------------------------------------------------------- load generation


async def run_user(name: str, hostport: str, headers: dict[str, str], plan: list[tuple[int, float, float]],
                   records: list[dict[str, Any]]) -> None:
    host, port = hostport.rsplit(":", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = f"POST /yolo HTTP/1.1\r\nHost: {hostport}\r\n{extra}Content-Length: 5\r\n\r\nimage".encode()
    send, recv = trio.open_memory_channel[tuple[int, float]](100_000)

    async def schedule() -> None:
        async with send:
            for step, at, _ in plan:
                await send.send((step, at))

    async def worker() -> None:
        conn = KeepAlive(host, int(port))
        async for step, at in recv:
            # trio's own sleep wakes up to 1 ms late (epoll's millisecond timeout): the client's lag,
            # not the system's, though it counts in the latency (measured from ``at``, open loop).
            await sleep_until_precisely(at)
            rec: dict[str, Any] = {"user": name, "step": step, "at": at, "status": 0, "instance": None,
                                   "send_lag_ms": (trio.current_time() - at) * 1000}
            try:
                status, h, body = await conn.request(req, REQUEST_TIMEOUT_S)
                rec["status"] = status
                rec["instance"] = h.get("cpn-instance")
                if status == 200:
                    rec["compute_ms"] = json.loads(body)["compute_ms"]
                else:
                    err = json.loads(body)
                    rec["error"], rec["detail"] = err.get("error", "?"), err.get("detail", "")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ConnectionError, ValueError):
                pass
            rec["latency_ms"] = (trio.current_time() - at) * 1000
            records.append(rec)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(schedule)
        for _ in range(CONNS_PER_USER):
            nursery.start_soon(worker)


def run_clients(jobs: dict[str, tuple[str, dict[str, str]]], plans: dict[str, list[tuple[int, float, float]]],
                start: float) -> list[dict[str, Any]]:
    """Every user's load from a process of its own (``--client``), as users are: one user's
    responses, or this process's sampling, never delay another's. ``start``: time.monotonic() of
    the plan's 0; the records' ``at`` count from it."""
    procs = {}
    try:
        for name, (hostport, headers) in jobs.items():
            procs[name] = subprocess.Popen([sys.executable, __file__, "--client"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            job = {"name": name, "hostport": hostport, "headers": headers, "plan": plans[name], "start": start}
            assert procs[name].stdin is not None
            procs[name].stdin.write(json.dumps(job))
            procs[name].stdin.close()
        records = []
        for name, proc in procs.items():
            assert proc.stdout is not None
            out = proc.stdout.read()  # the others wait meanwhile, blocked on a full pipe at worst
            if proc.wait():
                raise RuntimeError(f"the load of {name} failed (exit {proc.returncode})")
            records += [json.loads(line) for line in out.splitlines() if line]
        return records
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def client_main() -> int:
    """``--client``: one user's load (a JSON job on stdin), its records as JSON lines on stdout."""
    job = json.loads(sys.stdin.read())
    records: list[dict[str, Any]] = []

    async def main() -> None:
        base = trio.current_time() + (job["start"] - time.monotonic())  # the plan's 0 on trio's clock
        plan = [(step, base + at, rate) for step, at, rate in job["plan"]]
        await run_user(job["name"], job["hostport"], job["headers"], plan, records)
        for r in records:
            r["at"] -= base

    trio.run(main)
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in records))
    return 0


def make_plan(rates: list[float], step_s: float, t0: float, prewarm_s: float = 0.0,
              phase: float = 0.0) -> list[tuple[int, float, float]]:
    """(step, when, rate) of every request; ``prewarm_s`` of PREWARM_RATE first, as step -1 (never counted).
    ``phase`` (a fraction of the period) sets users apart: independent users do not send in lockstep."""
    plan = [(-1, t0 + (k + phase) / PREWARM_RATE, PREWARM_RATE) for k in range(int(prewarm_s * PREWARM_RATE))]
    t0 += prewarm_s
    for i, rate in enumerate(rates):
        start = t0 + i * step_s
        n = max(1, int(rate * step_s))
        plan += [(i, start + (k + phase) / rate, rate) for k in range(n)]
    return plan


class FloorPath:
    """The instance and the two floor proxies of the floor path; every process reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def _start(self, cmd: list[str]) -> str:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError(f"{cmd[1:3]} did not start")
        return line.split()[-1].rsplit(":", 1)[-1] if ":" in line else line.strip()

    def __enter__(self) -> str:
        """Start it; the address its client sends to."""
        try:
            inst = self._start([sys.executable, "-m", "cpnd.simulate", "--id", "f1", "--compute-ms",
                                str(FLOOR_COMPUTE_MS), "--capacity", "1e9"])
            proxy = str(Path(__file__).resolve().parent / "floor_proxy.py")
            half = str(FLOOR_RTT_MS / 2)
            far = self._start([sys.executable, proxy, "0", inst, half, "0"])  # gw3's place
            near = self._start([sys.executable, proxy, "0", far, "0", half])  # gw1's place
        except BaseException:
            self.__exit__()
            raise
        return f"127.0.0.1:{near}"

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def run_mode(mode: str, rates: list[float], step_s: float, warmup_s: float, prewarm_s: float = 0.0,
             keep: list[dict[str, Any]] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One sweep in ``mode``; every request's record is also appended to ``keep`` when given;
    ``options``: [gateway] keys for every gateway (``--set``)."""
    topo = paper_topology()
    topo = attrs.evolve(topo, gateway_options={**topo.gateway_options, **(options or {})})
    insts = InstanceProcs()
    with tempfile.TemporaryDirectory(prefix=f"cpn-paper-{mode}-") as tmp:
        try:
            urls = insts.start_topology(topo)
            specs = write_lab(topo, Path(tmp), selection=mode, instance_url=urls)
            path = FloorPath()
            with Lab(specs, log_level="warning") as lab, path as floor:
                lab.start_all()
                lab.wait_for(lambda: lab.converged(topo), 60, "convergence")
                time.sleep(3.0)  # let the min-RTT filters see a few quiet probes after start-up
                rtt = {u: {r["instance"]: r["path_latency_ms"] for r in lab.routes(gw) if r["best"]}
                       for u, (gw, _) in USERS.items()}
                samples: list[dict[str, Any]] = []
                done = threading.Event()
                start = time.monotonic() + 1.5  # the client processes start meanwhile

                def sample() -> None:
                    # What the gateways measure while the load runs: gw1's path latencies and
                    # each instance's base compute latency at its own gateway.
                    while not done.wait(SAMPLE_EVERY_S):
                        try:
                            comp = {i["instance"]: i["compute_latency_ms"] for gw in ORIGIN.values()
                                    for i in lab.query(gw, "show-services")}
                            best = [r for r in lab.routes("gw1") if r["best"]]
                            gw1_stats = lab.query("gw1", "stats")
                            http, routing = gw1_stats["http"], gw1_stats["gateway"]
                        except (OSError, ValueError, KeyError):
                            continue
                        samples.append({"at": time.monotonic() - start, "compute_ms": comp,
                                        # CPU of every gateway and of the instances' process so far (s)
                                        "cpu_s": {**{gw: cpu_s(p.pid) for gw, p in lab.procs.items()},
                                                  "instances": sum(cpu_s(p.pid) for p in {id(p): p for p in
                                                                   insts.procs.values()}.values()),
                                                  "floor_far": cpu_s(path.procs[1].pid), "floor_near": cpu_s(path.procs[2].pid)},
                                        "path_ms": {r["instance"]: r["path_latency_ms"] for r in best},
                                        # gw1's estimate: the gateways' own processing per request on the way
                                        # to each instance (gw1's and the path's), and its total
                                        "gateways_ms": {r["instance"]: r["estimate"]["gateways_ms"] for r in best},
                                        "estimate_ms": {r["instance"]: r["estimate"]["bounded_total_ms"] for r in best},
                                        "estimates": {r["instance"]: r["estimate"] for r in best},  # its parts, for --records
                                        "late": http.get("late", 0), "bound_cut": http.get("bound_cut", 0),
                                        "bound_probes": http.get("bound_probes", 0),
                                        # gw1's routing work: route entries received (each one instance's
                                        # advertisement as one peer passed it on), those with nothing newer
                                        # than it held (a copy by another path), and the CPU they took
                                        **{k: routing.get(k, 0) for k in ROUTING_COUNTERS}})

                jobs = {u: (specs[gw].http, headers) for u, (gw, headers) in USERS.items()} | {"floor": (floor, {})}
                plans = {u: make_plan(rates if u != "floor" else [min(r, FLOOR_MAX_RATE) for r in rates], step_s, 0.0,
                                      prewarm_s, phase=i / len(jobs)) for i, u in enumerate(jobs)}
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    records = run_clients(jobs, plans, start)
                finally:
                    done.set()
                    sampler.join()
                stats = {gw: lab.query(gw, "status") for gw in ("gw1", "gw2")}
                # The origins' re-advertisements over the whole run, by what moved (load, bload, compute, refresh)
                stats["origins"] = {gw: {k: v for k, v in lab.query(gw, "stats")["gateway"].items() if k.startswith("load_")}
                                    for gw in ORIGIN.values()}
        finally:
            insts.stop_all()
    if keep is not None:
        keep += [{"mode": mode, **r} for r in records] + [{"mode": mode, "sample": x} for x in samples]
    return summarise(mode, rates, step_s, warmup_s, records, rtt, stats, samples, prewarm_s)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_ms(samples: list[dict[str, Any]], lo: float, hi: float) -> dict[str, float] | None:
    """CPU ms of each process sampled (gateways, the instances, the floor path's proxies) over [lo, hi),
    from the samples nearest its ends scaled to the whole window: where the machine's time went."""
    window = [x for x in samples if lo <= x["at"] < hi and "cpu_s" in x]
    if len(window) < 2:
        return None
    first, last = window[0]["cpu_s"], window[-1]["cpu_s"]
    scale = (hi - lo) / (window[-1]["at"] - window[0]["at"]) * 1000
    return {k: (last[k] - first[k]) * scale for k in last if k in first}


def cpu_per_request(used: dict[str, float] | None, requests: int, floor_requests: int) -> dict[str, float] | None:
    """CPU ms a request: every gateway's and the instances' over u1's and u2's requests; gw1's over u1's
    alone (its ingress) beside the floor path's near proxy (in gw1's place) over the floor's requests."""
    if not used or not requests:
        return None
    out = {k: round(v / requests, 3) for k, v in used.items() if not k.startswith("floor")}
    out["gateways"] = round(sum(v for k, v in out.items() if k != "instances"), 3)
    if floor_requests and "floor_near" in used:
        out["floor_near"] = round(used["floor_near"] / floor_requests, 3)
        out["floor_far"] = round(used["floor_far"] / floor_requests, 3)
    return out


def measured_view(samples: list[dict[str, Any]], lo: float, hi: float) -> tuple[dict[str, float], dict[str, float]] | None:
    """Medians of gw1's path latencies and the instances' base compute sampled in [lo, hi)."""
    window = [x for x in samples if lo <= x["at"] < hi]
    if not window:
        return None
    path = {s: statistics.median(x["path_ms"][s] for x in window if s in x["path_ms"]) for s in INSTANCES
            if any(s in x["path_ms"] for x in window)}
    comp = {s: statistics.median(x["compute_ms"][s] for x in window if s in x["compute_ms"]) for s in INSTANCES
            if any(s in x["compute_ms"] for x in window)}
    return (path, comp) if len(path) == len(comp) == len(INSTANCES) else None


def gateways_view(samples: list[dict[str, Any]], lo: float, hi: float) -> dict[str, float] | None:
    """Medians of gw1's estimate of the gateways' own processing per instance sampled in [lo, hi)."""
    window = [x for x in samples if lo <= x["at"] < hi and x.get("gateways_ms")]
    if not window:
        return None
    out = {s: statistics.median(x["gateways_ms"][s] for x in window if s in x["gateways_ms"]) for s in INSTANCES
           if any(s in x["gateways_ms"] for x in window)}
    return out if len(out) == len(INSTANCES) else None


def ingress_late(samples: list[dict[str, Any]], lo: float, hi: float, key: str = "late") -> int | None:
    """gw1's count between lo and hi of responses later than their bound (measured at the ingress),
    or (``bound_cut``) of requests it answered 504 at their bound instead, or (``bound_probes``) of
    requests it sent as probes (to an instance its correction alone held out of their bound)."""
    before = [x[key] for x in samples if x["at"] < lo and key in x]
    until = [x[key] for x in samples if x["at"] < hi and key in x]
    return until[-1] - before[-1] if before and until else None


def per_s(samples: list[dict[str, Any]], lo: float, hi: float, key: str) -> float | None:
    """A counter's rate over [lo, hi), between the samples nearest its ends."""
    window = [x for x in samples if lo <= x["at"] < hi and key in x]
    if len(window) < 2 or window[-1]["at"] <= window[0]["at"]:
        return None
    return round((window[-1][key] - window[0][key]) / (window[-1]["at"] - window[0]["at"]), 1)


def summarise(mode: str, rates: list[float], step_s: float, warmup_s: float, records: list[dict[str, Any]],
              rtt: dict[str, dict[str, float]], stats: dict[str, Any],
              samples: list[dict[str, Any]] | None = None, prewarm_s: float = 0.0) -> dict[str, Any]:
    t_first = min(r["at"] for r in records if r["step"] >= 0)
    steps = []
    for i, rate in enumerate(rates):
        lo = t_first + i * step_s + warmup_s
        hi = t_first + (i + 1) * step_s
        window = [r for r in records if r["step"] == i and lo <= r["at"] < hi]
        span = hi - lo
        row: dict[str, Any] = {"mode": mode, "offered_per_user": rate}
        for u in USERS:
            mine = [r for r in window if r["user"] == u]
            ok = [r for r in mine if r["status"] == 200 and not late(r)]
            row[f"{u}_served"] = round(len(ok) / span, 2)
            row[f"{u}_late"] = round(sum(1 for r in mine if r["status"] == 200 and late(r)) / span, 2)
            row[f"{u}_errors"] = round(sum(1 for r in mine if r["status"] != 200) / span, 2)
        u1 = [r for r in window if r["user"] == "u1" and r["status"] == 200]
        # Network + compute as the paper counts it: the path's emulated RTT plus the instance's compute.
        netcomp = [PAPER_RTT["gw1"][ORIGIN[r["instance"]]] + r["compute_ms"] for r in u1]
        e2e = [r["latency_ms"] for r in u1]  # what u1's client observed, late ones included
        row["u1_max_net_compute_ms"] = round(max(netcomp), 3) if netcomp else None
        row["u1_p99_net_compute_ms"] = round(_pct(netcomp, 99), 3) if netcomp else None
        row["u1_p50_net_compute_ms"] = round(_pct(netcomp, 50), 3) if netcomp else None
        row["u1_p50_e2e_ms"] = round(_pct(e2e, 50), 3) if e2e else None
        row["u1_p99_e2e_ms"] = round(_pct(e2e, 99), 3) if e2e else None
        row["u1_max_e2e_ms"] = round(max(e2e), 3) if e2e else None
        # u1's 504s (cut at the bound) by its client's clock: the bound holds for them too.
        cut = [r["latency_ms"] for r in window if r["user"] == "u1" and r["status"] == 504]
        row["u1_504_p50_ms"] = round(_pct(cut, 50), 3) if cut else None
        row["u1_504_max_ms"] = round(max(cut), 3) if cut else None
        # The gateways' share (with the client's own): what the client saw beyond network + compute.
        over = [e - n for e, n in zip(e2e, netcomp)]
        row["u1_overhead_p50_ms"] = round(_pct(over, 50), 3) if over else None
        row["u1_overhead_p99_ms"] = round(_pct(over, 99), 3) if over else None
        # The floor path beside it (FloorPath): what trio + h11 alone cost on u1's usual path here.
        fl = [r["latency_ms"] for r in window if r["user"] == "floor" and r["status"] == 200]
        row["floor_p50_e2e_ms"] = round(_pct(fl, 50), 3) if fl else None
        row["floor_p99_e2e_ms"] = round(_pct(fl, 99), 3) if fl else None
        row["floor_overhead_p50_ms"] = round(_pct(fl, 50) - FLOOR_RTT_MS - FLOOR_COMPUTE_MS, 3) if fl else None
        # How often the floor of our stack kept u1's bound by the same client clock at this moment: on a
        # busy machine no pair of trio + h11 gateways can, and a run's u1 figures read against this.
        floor_asked = [r for r in window if r["user"] == "floor"]
        row["floor_within_bound"] = (round(sum(1 for r in floor_asked if r["status"] == 200
                                               and r["latency_ms"] <= BOUND_MS + CLIENT_ALLOWANCE_MS) / len(floor_asked), 3)
                                     if floor_asked else None)
        if fl and over:
            row["u1_over_floor_overhead_p50"] = round(_pct(over, 50) / max(row["floor_overhead_p50_ms"], 0.001), 2)
        lag = [r["send_lag_ms"] for r in window if r["user"] == "u1" and "send_lag_ms" in r]
        row["u1_client_send_lag_p99_ms"] = round(_pct(lag, 99), 3) if lag else None  # in the e2e figures
        # The samples' clock starts with the prewarm: the step's window is that much later on it.
        at_lo, at_hi = prewarm_s + i * step_s + warmup_s, prewarm_s + (i + 1) * step_s
        row["u1_late_at_ingress"] = ingress_late(samples or [], at_lo, at_hi)
        row["u1_cut_at_bound"] = ingress_late(samples or [], at_lo, at_hi, "bound_cut")
        row["u1_probes"] = ingress_late(samples or [], at_lo, at_hi, "bound_probes")  # sent where the correction held it out
        for k in ROUTING_COUNTERS:  # gw1's, per second of the step
            row[f"gw1_{k}_per_s"] = per_s(samples or [], at_lo, at_hi, k)
        used = cpu_ms(samples or [], at_lo, at_hi)
        row["cpu_ms_per_request"] = cpu_per_request(used, sum(1 for r in window if r["user"] in USERS),
                                                     sum(1 for r in window if r["user"] == "floor"))
        u1_asked = sum(1 for r in window if r["user"] == "u1")
        if used and u1_asked and "gw1" in used:  # gw1 is u1's ingress and nothing else's
            row["gw1_cpu_ms_per_u1_request"] = round(used["gw1"] / u1_asked, 3)
        for s in INSTANCES:
            row[f"{s}_load"] = round(sum(1 for r in window if r["status"] == 200 and r["instance"] == s) / span, 2)
            row[f"{s}_u1"] = round(sum(1 for r in u1 if r["instance"] == s) / span, 2)
        # Oscillation at steady offered load: each instance's served requests per whole second of
        # the step, the spread (max - min) as a share of capacity; the worst instance.
        secs = int(span)
        if secs >= 2:
            spread = []
            row["per_second"] = {}
            for s in INSTANCES:
                per = {u: [sum(1 for r in window if r["status"] == 200 and r["instance"] == s and r["user"] == u
                               and lo + k <= r["at"] < lo + k + 1) for k in range(secs)] for u in USERS}
                total = [sum(n) for n in zip(*per.values())]
                row["per_second"][s] = per  # served per whole second, by user: where a swing comes from
                spread.append((max(total) - min(total)) / CAPACITY)
            row["load_swing"] = round(max(spread), 3)
        row["served"] = round(row["u1_served"] + row["u2_served"], 2)
        for u in ("u1", "u2"):  # what the failures were, per second
            kinds = collections.Counter(r.get("error", f"status {r['status']}") for r in window if r["user"] == u and r["status"] != 200)
            row[f"{u}_error_kinds"] = {k: round(v / span, 2) for k, v in kinds.items()}
        # u1's losses by where they came from (the errors' details, and late 200s), per second:
        # which part of the system the step's shortfall against the optimum is in.
        causes = collections.Counter(failure_cause(r) for r in window if r["user"] == "u1" and (r["status"] != 200 or late(r)))
        row["u1_failure_causes"] = {k: round(v / span, 2) for k, v in causes.most_common()}
        row["optimum"] = round(optimum(rate, rate, rtt["u1"]), 2)
        row["served_over_optimum"] = round(row["served"] / row["optimum"], 3) if row["optimum"] else None
        # The same optimum with the floor of our stack in every path: what the floor path's two trio + h11
        # proxies added at this moment (by the same client clock, FLOOR_QUANTILE of it, less this
        # client's allowance), added to each instance's path: the most any pair of such gateways could
        # serve with u1 within its bound, as the client sees it, on this machine now.
        if fl:
            added = sorted(r["latency_ms"] - FLOOR_RTT_MS - r.get("compute_ms", FLOOR_COMPUTE_MS)
                           for r in window if r["user"] == "floor" and r["status"] == 200)
            q = added[int(FLOOR_QUANTILE * (len(added) - 1))]
            row["floor_added_q_ms"] = round(q, 3)
            row["optimum_floor"] = round(optimum(rate, rate, {s: rtt["u1"][s] + max(0.0, q - CLIENT_ALLOWANCE_MS)
                                                              for s in INSTANCES}), 2)
            row["served_over_optimum_floor"] = (round(row["served"] / row["optimum_floor"], 3)
                                                if row["optimum_floor"] else None)
        # The same optimum from what the gateways measured during this step (path latencies
        # and compute, both inflated when the machine is busy): what any scheduler acting on
        # these measurements could reach. Separates the machine from the algorithm.
        gws = gateways_view(samples or [], at_lo, at_hi)
        if gws is not None:
            # End to end: the model's network and compute plus each gateway's own processing as gw1
            # measured it on the way to each instance (the paper's model counts no gateway time).
            row["measured_gateways_ms"] = gws
            row["optimum_e2e"] = round(optimum(rate, rate, {s: rtt["u1"][s] + gws[s] for s in INSTANCES}), 2)
            row["served_over_optimum_e2e"] = round(row["served"] / row["optimum_e2e"], 3) if row["optimum_e2e"] else None
        view = measured_view(samples or [], at_lo, at_hi)
        if view is not None:
            row["measured_path_ms"], row["measured_compute_ms"] = view
            row["optimum_measured"] = round(optimum(rate, rate, view[0], view[1]), 2)
            row["served_over_optimum_measured"] = round(row["served"] / row["optimum_measured"], 3) if row["optimum_measured"] else None
        steps.append(row)
    return {"mode": mode, "steps": steps, "measured_path_latency_ms": rtt, "gateway_stats": stats}


FAILURE_CAUSES = (  # (what the detail says, the cause's name), first match wins (cpnd's error details)
    ("the latency bound leaves", "egress: compute over the slack the bound leaves"),
    ("exceeds the remaining", "egress: compute over the remaining deadline"),
    ("over its fair share", "egress: full (fair share)"),
    ("at capacity", "egress: full (capacity)"),
    ("keeping capacity", "egress: kept for bound requests"),
    ("meets the request's constraints", "ingress: no estimate within the bound"),
    ("no response head by then", "ingress: cut at the bound"),
    ("after the request's latency bound", "ingress: head came after the bound"),
    ("not whole by the request's latency bound", "ingress: body not whole by the bound"),
)


def failure_cause(r: dict[str, Any]) -> str:
    """Where one of u1's failures came from: a late 200, else the first FAILURE_CAUSES its detail names."""
    if r["status"] == 200:
        return "late 200 (client)"
    detail = r.get("detail", "")
    for text, name in FAILURE_CAUSES:
        if text in detail:
            return name
    return f"{r['status']} {r.get('error', 'no answer')}"


def late(r: dict[str, Any]) -> bool:
    """A u1 answer its client saw after u1's bound (and this client's own allowance): a failure."""
    return r["user"] == "u1" and r["latency_ms"] > BOUND_MS + CLIENT_ALLOWANCE_MS


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


# ---------------------------------------------------------------- plots


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = {"per-request": "per-request (cpn)", "per-connection": "anycast (per-connection)", "dns-ttl": "DNS-TTL"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        xs = [s["offered_per_user"] for s in res["steps"]]
        ax.plot(xs, [s["served"] for s in res["steps"]], marker="o", label=label.get(res["mode"], res["mode"]))
    xs = [s["offered_per_user"] for s in results[0]["steps"]]
    ax.plot(xs, [s["optimum"] for s in results[0]["steps"]], "k--", label="optimum (u1 within 10 ms)")
    ax.plot(xs, [2 * x for x in xs], ":", color="grey", label="offered (u1 + u2)")
    ax.set(xlabel="offered load per user (req/s)", ylabel="served (req/s, both users)", title="Fig. 10(a): served rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig10a_served.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, res in enumerate(results):
        color = f"C{k}"
        name = label.get(res["mode"], res["mode"])
        for key, style, what in (("u1_p99_e2e_ms", "-", "p99"), ("u1_max_e2e_ms", "--", "max")):
            pts = [(s["offered_per_user"], s[key]) for s in res["steps"] if s.get(key)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o" if what == "p99" else ".",
                    label=f"{name}, {what}")
    ax.axhline(BOUND_MS, color="red", linestyle="--", label="u1 bound (10 ms)")
    ax.axhline(BOUND_MS + CLIENT_ALLOWANCE_MS, color="red", linestyle=":", label="bound + Python client (11 ms)")
    ax.set(xlabel="offered load per user (req/s)", ylabel="u1 latency its client observed (ms)",
           title="Fig. 10(b): u1 latency, end to end")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig10b_u1_latency.png", dpi=110)
    plt.close(fig)

    by_mode = {r["mode"]: r for r in results}
    for fig_name, mode in (("fig11a", "per-connection"), ("fig11b", "per-request")):
        if mode not in by_mode:
            continue
        res = by_mode[mode]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [s["offered_per_user"] for s in res["steps"]]
        for s in INSTANCES:
            ax.plot(xs, [st[f"{s}_load"] for st in res["steps"]], marker=".", label=s)
        ax.axhline(CAPACITY, color="grey", linestyle=":", label="capacity")
        ax.set(xlabel="offered load per user (req/s)", ylabel="served by instance (req/s)",
               title=f"Fig. 11{fig_name[-1]}: per-instance load, {label.get(mode, mode)}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{fig_name}_{mode}_instances.png", dpi=110)
        plt.close(fig)


def main() -> int:
    if sys.argv[1:] == ["--client"]:
        return client_main()
    # A SIGTERM (a timeout, a killed A/B script) unwinds as Ctrl-C does, through every ``finally`` that
    # reaps the lab, the floor path and the clients: killed outright, the floor proxies lived on.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="per-request,per-connection,dns-ttl")
    ap.add_argument("--rates", default="1,10,20,30,40,50,60,70,80,90,100,110,120")
    ap.add_argument("--step", type=float, default=4.0, help="seconds per step")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds at the start of each step left out")
    ap.add_argument("--records", help="also write every request's record here (JSON lines), and gw1's samples "
                    "(every 0.5 s: each instance's estimate in parts), to see where time went")
    ap.add_argument("--prewarm", type=float, default=3.0,
                    help=f"seconds of both users at {PREWARM_RATE:g} req/s before the sweep, never counted")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a [gateway] key for every gateway, as TOML (e.g. latency_quantile=0.75); repeatable")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    try:
        options = tomllib.loads("\n".join(args.set))
    except tomllib.TOMLDecodeError as exc:
        ap.error(f"--set: {exc}")
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    keep: list[dict[str, Any]] | None = [] if args.records else None
    for mode in args.modes.split(","):
        res = run_mode(mode, rates, args.step, args.warmup, args.prewarm, keep, options)
        results.append(res)
        for s in res["steps"]:
            print(json.dumps({k: s.get(k) for k in ("mode", "offered_per_user", "u1_served", "u1_late", "u1_late_at_ingress", "u1_cut_at_bound", "u1_probes",
                                                 "u2_served", "served", "optimum", "served_over_optimum", "optimum_e2e",
                                                 "optimum_measured", "optimum_floor", "u1_p50_e2e_ms", "u1_p99_e2e_ms", "u1_max_e2e_ms",
                                                 "u1_max_net_compute_ms", "u1_overhead_p50_ms", "s1_load", "s2_load",
                                                 "s3_load", "s4_load", "s5_load", "floor_p50_e2e_ms", "floor_p99_e2e_ms",
                                                 "floor_within_bound", "u1_over_floor_overhead_p50", "u1_failure_causes")}), flush=True)
    (out / "paper.json").write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    with open(out / "paper.csv", "w", newline="") as f:
        rows = [s for r in results for s in r["steps"]]
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if args.records and keep is not None:
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in keep))
    plot(results, out)
    print(markdown(results))
    print(f"\nwrote {out}/paper.json, paper.csv and the figures")
    return 0


def markdown(results: list[dict[str, Any]]) -> str:
    """Served rate (and its ratio to the model's optimum and to the optimum from the gateways'
    measurements) and u1's worst latency, per mode and step; then u1's latency end to end."""
    modes = [r["mode"] for r in results]
    head = ("| offered per user | optimum (model) | " +
            " | ".join(f"{m}: served (ratio) | optimum from its measurements (ratio) | u1 max ms" for m in modes) + " |")
    lines = [head, "|" + "---|" * (2 + 3 * len(modes))]
    for i, step in enumerate(results[0]["steps"]):
        cells = [f"{step['offered_per_user']:g}", f"{step['optimum']:.1f}"]
        for r in results:
            s = r["steps"][i]
            om = s.get("optimum_measured")
            cells += [f"{s['served']:.1f} ({s['served_over_optimum']:.3f})",
                      f"{om:.1f} ({s['served_over_optimum_measured']:.3f})" if om else "-",
                      f"{s['u1_max_net_compute_ms'] or '-'}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", e2e_markdown(results)]
    return "\n".join(lines)


def e2e_markdown(results: list[dict[str, Any]]) -> str:
    """Per mode and step: u1 and u2 served (late 200s are failures), u1 late by its client and at gw1,
    u1's client-observed p50/p99/max beside network + compute and the gateways' share, and served
    over the optimum under end-to-end accounting; the floor path's p50 / p99 and the gateways' share
    over the floor's (FloorPath)."""
    head = ("| mode | offered per user | u1 served | u1 late (client / at gw1) / 504 at the bound | u2 served | u1 client p50 / p99 / max ms "
            "| u1 network + compute p50 / max ms | gateways' share p50 / p99 ms | floor path p50 / p99 ms / within u1's bound "
            "| share / floor's p50 | optimum e2e (ratio) | optimum at the floor (ratio) | u1 504 client p50 / max ms "
            "| CPU ms a request: all gateways / instances | CPU ms: gw1 a u1 request / floor's near proxy a request |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        for s in r["steps"]:
            def f(k: str) -> str:
                v = s.get(k)
                return "-" if v is None else f"{v:g}"
            oe = s.get("optimum_e2e")
            lines.append(f"| {r['mode']} | {s['offered_per_user']:g} | {s['u1_served']:g} | {s['u1_late']:g} / "
                         f"{f('u1_late_at_ingress')} / {f('u1_cut_at_bound')} | {s['u2_served']:g} | {f('u1_p50_e2e_ms')} / {f('u1_p99_e2e_ms')} / "
                         f"{f('u1_max_e2e_ms')} | {f('u1_p50_net_compute_ms')} / {f('u1_max_net_compute_ms')} | "
                         f"{f('u1_overhead_p50_ms')} / {f('u1_overhead_p99_ms')} | "
                         f"{f('floor_p50_e2e_ms')} / {f('floor_p99_e2e_ms')} / {f('floor_within_bound')} | {f('u1_over_floor_overhead_p50')} | "
                         + (f"{oe:.1f} ({s['served_over_optimum_e2e']:.3f})" if oe else "-")
                         + (f" | {of:.1f} ({s['served_over_optimum_floor']:.3f})" if (of := s.get("optimum_floor")) else " | -")
                         + f" | {f('u1_504_p50_ms')} / {f('u1_504_max_ms')} | {_cpu(s)} |")
    return "\n".join(lines)


def _cpu(s: dict[str, Any]) -> str:
    c = s.get("cpu_ms_per_request")
    if not c:
        return "-"
    gw1 = s.get("gw1_cpu_ms_per_u1_request")
    return (f"{c['gateways']:g} / {c.get('instances', 0):g} | "
            + (f"{gw1:g} / {c['floor_near']:g}" if gw1 is not None and "floor_near" in c else "-"))


if __name__ == "__main__":
    raise SystemExit(main())
