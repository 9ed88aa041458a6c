"""The gRPC rows of bench/dataplane.py (``--grpc``): unary calls through cpnd beside direct calls.

    python bench/dataplane.py --grpc [--repeats 3] [--seconds 4] [--idle-rounds 5] [--idle-requests 400]

A grpcio server (its own process, generic handler over raw bytes, echoing a 100-byte message)
behind gateway c of a - b - c on loopback; a grpcio client (sync, one channel per path):
  direct    client -> instance
  local     client -> c (HTTP/2 in, h2c to the ``http2 = true`` instance)
  1 hop     client -> b -> tunnel -> c -> instance
  2 hops    client -> a -> b -> c -> instance
Measured: one call at a time (p50/p99 per round, medians over the rounds, the paths in
rotated order each round) and calls/s with 16 in flight on one channel (futures) for
``--seconds``, medians over the repeats; each cpnd path against direct as a ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.lab import Instance, Lab, Link, Topology, write_lab  # noqa: E402

PATHS = ("direct", "local", "1 hop", "2 hops")
SERVICE = "/bench.Echo"
MESSAGE = b"x" * 100
IN_FLIGHT = 16


def serve() -> None:
    """The instance: ``--serve`` runs it in its own process; prints its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE.lstrip("/"), {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def sequential(channel: grpc.Channel, n: int) -> list[float]:
    call = channel.unary_unary(f"{SERVICE}/Echo")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(MESSAGE, timeout=10)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def throughput(channel: grpc.Channel, seconds: float) -> float:
    """Calls/s with IN_FLIGHT outstanding on one channel."""
    call = channel.unary_unary(f"{SERVICE}/Echo")
    done = 0
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    finished = threading.Event()
    running = [0]

    def again(_f: Any = None) -> None:
        nonlocal done
        with lock:
            if _f is not None:
                done += 1
                running[0] -= 1
            if time.perf_counter() >= stop_at:
                if running[0] == 0:
                    finished.set()
                return
            running[0] += 1
        call.future(MESSAGE, timeout=10).add_done_callback(again)

    t0 = time.perf_counter()
    for _ in range(IN_FLIGHT):
        again()
    finished.wait(seconds + 30)
    return done / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run(args: argparse.Namespace) -> int:
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    lab = None
    channels: dict[str, grpc.Channel] = {}
    try:
        line = server.stdout.readline() if server.stdout else ""
        assert line.startswith("listening "), line
        instance = line.split()[1]
        topo = Topology(("a", "b", "c"), (Link("a", "b"), Link("b", "c")), (Instance("e1", "c", SERVICE, 1e9, 1, 0),),
                        {"health_interval_ms": 0})
        specs = write_lab(topo, Path(tempfile.mkdtemp(prefix="cpn-grpc-bench-")),
                          instance_url=lambda i: f"http://{instance}{SERVICE}")
        text = specs["c"].config.read_text()
        specs["c"].config.write_text(text.replace("\ncompute_latency_ms = 0\n", "\ncompute_latency_ms = 0\nhttp2 = true\n"))
        lab = Lab(specs, log_level="warning")
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        addrs = {"direct": instance, "local": specs["c"].http, "1 hop": specs["b"].http, "2 hops": specs["a"].http}
        channels = {p: grpc.insecure_channel(a) for p, a in addrs.items()}
        for ch in channels.values():
            sequential(ch, 50)  # connections up, caches warm
        idle: dict[str, dict[str, list[float]]] = {p: {"p50": [], "p99": []} for p in PATHS}
        for r in range(args.idle_rounds):
            for p in PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]:
                xs = sequential(channels[p], args.idle_requests)
                idle[p]["p50"].append(pct(xs, 50))
                idle[p]["p99"].append(pct(xs, 99))
        rps: dict[str, list[float]] = {p: [] for p in PATHS}
        for _ in range(args.repeats):
            for p in PATHS:
                rps[p].append(throughput(channels[p], args.seconds))
    finally:
        for ch in channels.values():
            ch.close()
        if lab is not None:
            lab.stop_all()
        server.terminate()
        server.wait(10)
    rows = []
    for p in PATHS:
        row = {"path": p, "calls_per_s": statistics.median(rps[p]), "idle_p50_ms": statistics.median(idle[p]["p50"]),
               "idle_p99_ms": statistics.median(idle[p]["p99"])}
        row["vs_direct_rps"] = row["calls_per_s"] / statistics.median(rps["direct"])
        row["added_p50_ms"] = row["idle_p50_ms"] - statistics.median(idle["direct"]["p50"])
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane_grpc.json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv), "repeats": args.repeats,
                                                          "seconds": args.seconds, "idle_rounds": args.idle_rounds,
                                                          "idle_requests": args.idle_requests, "in_flight": IN_FLIGHT},
                                                         indent=1) + "\n")
    print(f"gRPC unary, {len(MESSAGE)}-byte message: calls/s with {IN_FLIGHT} in flight (median of {args.repeats}), "
          f"one call at a time p50/p99 (median of {args.idle_rounds} rounds x {args.idle_requests})")
    print(f"{'path':8} {'calls/s':>9} {'x direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8}")
    for r in rows:
        print(f"{r['path']:8} {r['calls_per_s']:9.0f} {r['vs_direct_rps']:9.2f} {r['idle_p50_ms']:8.3f} "
              f"{r['idle_p99_ms']:8.3f} {r['added_p50_ms']:8.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--seconds", type=float, default=4.0)
        ap.add_argument("--idle-rounds", type=int, default=5)
        ap.add_argument("--idle-requests", type=int, default=400)
        ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
        sys.exit(run(ap.parse_args()))
