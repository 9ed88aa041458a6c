"""Failure recovery under load: a transit gateway dies while a user sends 200 req/s.

    python bench/failover.py [--repeats 3] [--rate 200] [--hold-ms 300] [--out bench/results]

Real processes: ingress a, transits b (the short way, 2 + 2 ms) and d (the long way,
5 + 5 ms), egress c with a simulated instance. Gateways run a fast keepalive profile
(``hold_time_ms`` = --hold-ms, keepalives every third of it). A user sends GET and POST
at --rate over keep-alive connections to a. Two faults, each --repeats times:

  kill    SIGKILL b: its connections break, peers see it at once;
  freeze  SIGSTOP b: its sockets stay open and silent; only the hold timer finds it.

For each: detection (fault -> a's session with b not established), healed (fault -> a's
best route to the instance goes via d), and what happened to the requests sent from
1 s before the fault to 3 s after it: served, failed with an explicit error, lost
(target: 0), and the worst latency. b is restarted between repeats.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.control import ControlError  # noqa: E402
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab  # noqa: E402
from httpclient import KeepAlive, classify  # noqa: E402

WINDOW_BEFORE_S = 1.0
WINDOW_AFTER_S = 3.0


def topology(hold_ms: int) -> Topology:
    return Topology(("a", "b", "c", "d"), (Link("a", "b", 2), Link("b", "c", 2), Link("a", "d", 5), Link("d", "c", 5)),
                    (Instance("s", "c", "/svc", 1e6, 1.0, 0.0),),
                    {"hold_time_ms": hold_ms, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100,
                     "connect_retry_max_ms": 500})


def best_path(lab: Lab) -> list[str] | None:
    try:
        return next((r["path"] for r in lab.routes("a") if r["best"]), None)
    except (ControlError, OSError):
        return None


def b_down_at_a(lab: Lab) -> bool:
    try:
        return {p["id"]: p["state"] for p in lab.query("a", "show-peers")}["b"] != "established"
    except (ControlError, OSError):
        return False


async def load(http: str, rate: float, seconds: float, out: list[dict[str, Any]]) -> None:
    """Open-loop GET/POST at ``rate`` over 8 keep-alive connections; one record per request."""
    host, port = http.rsplit(":", 1)
    n = int(rate * seconds)
    send, recv = trio.open_memory_channel[tuple[int, float]](n)
    t0 = trio.current_time() + 0.1
    for i in range(n):
        send.send_nowait((i, t0 + i / rate))
    send.close()

    async def worker() -> None:
        conn = KeepAlive(host, int(port))
        async for i, at in recv:
            await trio.sleep_until(at)
            method = "GET" if i % 2 else "POST"
            req = (f"{method} /svc HTTP/1.1\r\nHost: x\r\n" + ("Content-Length: 5\r\n\r\nhello" if method == "POST" else "\r\n")).encode()
            rec: dict[str, Any] = {"at": time.monotonic() - (trio.current_time() - at), "method": method}
            try:
                rec["outcome"], rec["what"] = classify(*await conn.request(req, 10))
            except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as exc:
                rec["outcome"], rec["what"] = "lost", f"{type(exc).__name__}: {exc}"
            rec["ms"] = (trio.current_time() - at) * 1000
            out.append(rec)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(worker)


def one_run(lab: Lab, fault: str, rate: float) -> dict[str, Any]:
    lab.wait_for(lambda: best_path(lab) == ["b", "c"], 30, "a to route via b")
    records: list[dict[str, Any]] = []
    result: dict[str, Any] = {"fault": fault}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load, lab.specs["a"].http, rate, WINDOW_BEFORE_S + WINDOW_AFTER_S + 1.0, records)
            await trio.sleep(WINDOW_BEFORE_S + 0.1)
            t_fault = time.monotonic()
            proc = lab.procs["b"]
            proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            result["t_fault"] = t_fault

            def watch() -> None:
                detected = healed = None
                while time.monotonic() - t_fault < WINDOW_AFTER_S + 2 and (detected is None or healed is None):
                    now = time.monotonic()
                    if detected is None and b_down_at_a(lab):
                        detected = now - t_fault
                    if healed is None and best_path(lab) == ["d", "c"]:
                        healed = now - t_fault
                    time.sleep(0.005)
                result["detected_s"], result["healed_s"] = detected, healed

            await trio.to_thread.run_sync(watch)

    trio.run(main)
    t_fault = result.pop("t_fault")
    window = [r for r in records if t_fault - WINDOW_BEFORE_S <= r["at"] <= t_fault + WINDOW_AFTER_S]
    for outcome in ("served", "failed_explicit", "lost"):
        result[outcome] = sum(r["outcome"] == outcome for r in window)
    result["errors"] = sorted({r["what"] for r in window if r["outcome"] != "served"})[:5]
    result["max_ms"] = round(max((r["ms"] for r in window), default=0), 1)
    result["sent"] = len(window)
    # Bring b back for the next run.
    proc = lab.procs.pop("b")
    proc.kill()
    proc.wait()
    lab.start("b")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--hold-ms", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    topo = topology(args.hold_ms)
    insts = InstanceProcs()
    runs = []
    try:
        port = insts.start("s", compute_ms=1.0)
        with tempfile.TemporaryDirectory(prefix="cpn-failover-") as tmp:
            specs = write_lab(topo, Path(tmp), instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
            with Lab(specs, log_level="warning") as lab:
                lab.start_all()
                lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
                for rep in range(args.repeats):
                    for fault in ("kill", "freeze"):
                        r = one_run(lab, fault, args.rate)
                        r["repeat"] = rep
                        runs.append(r)
                        print(json.dumps(r), flush=True)
    finally:
        insts.stop_all()
    summary = {}
    for fault in ("kill", "freeze"):
        rs = [r for r in runs if r["fault"] == fault]
        summary[fault] = {
            "detected_s_median": statistics.median(r["detected_s"] for r in rs if r["detected_s"] is not None),
            "healed_s_median": statistics.median(r["healed_s"] for r in rs if r["healed_s"] is not None),
            "sent": sum(r["sent"] for r in rs), "served": sum(r["served"] for r in rs),
            "failed_explicit": sum(r["failed_explicit"] for r in rs), "lost": sum(r["lost"] for r in rs),
            "max_ms": max(r["max_ms"] for r in rs),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failover.json").write_text(json.dumps({"runs": runs, "summary": summary, "rate": args.rate,
                                                        "hold_ms": args.hold_ms, "command": " ".join(sys.argv)}, indent=1) + "\n")
    print("\n| fault | detected (median) | healed (median) | sent in window | served | explicit errors | lost | worst ms |")
    print("|---|---|---|---|---|---|---|---|")
    for fault, s in summary.items():
        print(f"| {fault} | {s['detected_s_median']:.3f} s | {s['healed_s_median']:.3f} s | {s['sent']} | {s['served']} | "
              f"{s['failed_explicit']} | {s['lost']} | {s['max_ms']} |")
    return 0 if all(s["lost"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
