"""One address flooding abandoned requests beside an honest bounded user, on the paper lab.

    python bench/abandon_flood.py [--requests 3000] [--per-ip-rate 0] [--json]

Starts the paper lab (``cpnd lab``; with ``--per-ip-rate N``, every gateway with
``max_requests_per_ip_per_s = N`` and a burst of 2N). u1 (127.0.0.2) sends 30 requests with
``CPN-Max-Latency: 10ms`` and ``CPN-Prefer: price`` to gw1, one at a time; then a flood from
127.0.0.3 sends ``--requests`` ``POST /yolo?delay=3`` with a 1 h bound, each on its own connection
closed 2 ms after sending (abandoned), while u1 asks every 20 ms (at most 200 requests); 4 s after
the flood, u1 sends 30 more. Prints u1's statuses in each phase, the gateways' CPU during the flood,
gw1's and gw3's counters, gw1's estimate of s1 and gw3's meter of s1 twice a second, and the most
frequent error details. Run on two trees in alternation to compare them (the lab runs the code of
the current directory's ``cpnd``).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import re
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cpnd.control import request
from cpnd.lab import paper_topology
from cut import start_lab, stop_lab  # bench/cut.py (this script's directory is on the path)

U1 = "CPN-Max-Latency: 10ms\r\nCPN-Prefer: price\r\n"
FLOOD = "CPN-Max-Latency: 3600000ms\r\n"


def topology_file(path: Path, per_ip_rate: float) -> None:
    """The paper lab as a topology file, with the per-address request rate on every gateway."""
    t = paper_topology()
    out = ["[gateway]", f"max_requests_per_ip_per_s = {per_ip_rate:g}", f"max_requests_per_ip_burst = {max(1, int(2 * per_ip_rate))}", ""]
    out += [f'[[gateways]]\nid = "{g}"\n' for g in t.gateways]
    out += [f'[[links]]\na = "{ln.a}"\nb = "{ln.b}"\nrtt_ms = {ln.rtt_ms}\n' for ln in t.links]
    out += [f'[[instances]]\nid = "{i.id}"\ngateway = "{i.gateway}"\nservice = "{i.service}"\ncapacity = {i.capacity}\n'
            f"price = {i.price}\ncompute_latency_ms = {i.compute_latency_ms}\n" for i in t.instances]
    path.write_text("\n".join(out))


def pid_of(workdir: str, gw: str) -> int | None:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline").read()
            except OSError:
                continue
            if workdir in cmd and f"{gw}.toml" in cmd:
                return int(p)
    return None


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(host: str, port: int, headers: str, path: str, source: str, details: list[tuple[int, str]],
        abandon_s: float | None = None) -> tuple[str, float] | None:
    """One request on its own connection: (status, ms to the response head); None if abandoned."""
    try:
        s = socket.create_connection((host, port), source_address=(source, 0), timeout=10)
    except OSError as exc:
        return type(exc).__name__, 0.0
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        try:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: gw1\r\n{headers}Content-Length: 1\r\n\r\nx".encode())
            if abandon_s is not None:
                time.sleep(abandon_s)  # the user's wait before it hangs up (bounded: 2 ms)
                return None
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return "closed", 0.0
                buf += chunk
        except OSError as exc:
            return type(exc).__name__, 0.0
        took = (time.perf_counter() - t0) * 1000
        status = buf.split()[1].decode()
        if status != "200":
            rest = buf.partition(b"\r\n\r\n")[2]
            s.settimeout(1)
            try:
                while b'"detail"' not in rest or not rest.rstrip().endswith(b"}"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
            except OSError:
                pass
            m = re.search(rb'"detail": "([^"]{0,200})', rest)
            details.append((int(status), m.group(1).decode() if m else rest[:100].decode(errors="replace")))
        return status, took


def flood(host: str, port: int, n: int) -> None:
    for _ in range(n):
        one(host, port, FLOOD, "/yolo?delay=3", "127.0.0.3", [], abandon_s=0.002)


def sample(workdir: str, stop: threading.Event, rows: list[object]) -> None:
    """gw1's estimate of s1 and gw3's meter of s1, twice a second."""
    while not stop.is_set():
        try:
            est = next(r["estimate"] for r in request(f"{workdir}/gw1.sock", "show-routes", service="/yolo")
                       if r.get("best") and r["instance"] == "s1")
            s1 = next(i for i in request(f"{workdir}/gw3.sock", "show-services") if i["instance"] == "s1")
            rows.append({"gw1_total_ms": est["bounded_total_ms"], "gw1_compute_ms": est["bounded_compute_ms"],
                         "gw1_gateways_ms": est["gateways_ms"], "gw1_correction_ms": est["correction_ms"],
                         "gw1_load": est["load"], "gw3_load": s1["load"], "gw3_bounded_load": s1["bounded_load"],
                         "gw3_compute_ms": s1["compute_latency_ms"], "gw3_refused": s1["refused"]})
        except Exception as exc:  # a control query cut short under load: noted, the run goes on
            rows.append(repr(exc))
        stop.wait(0.5)


def summary(results: list[tuple[str, float] | None]) -> dict[str, object]:
    done = [r for r in results if r is not None]
    ok = sorted(t for st, t in done if st == "200")
    return {"n": len(done), "served": len(ok), "statuses": dict(collections.Counter(st for st, _ in done)),
            "p50_ms": round(statistics.median(ok), 2) if ok else None, "max_ms": round(ok[-1], 2) if ok else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="the flood's requests (default 3000)")
    ap.add_argument("--per-ip-rate", type=float, default=0.0, help="max_requests_per_ip_per_s on every gateway (default 0: off)")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds after ready before u1 starts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    details: list[tuple[int, str]] = []
    with tempfile.TemporaryDirectory() as workdir:
        scenario = "paper"
        if args.per_ip_rate:
            scenario = f"{workdir}/paper.toml"
            topology_file(Path(scenario), args.per_ip_rate)
        proc, http = start_lab(workdir, scenario)
        try:
            time.sleep(args.settle)  # the RTT filters settle after the start-up burst (not synchronisation)
            host, port = http.rsplit(":", 1)
            pids = {gw: pid_of(workdir, gw) for gw in ("gw1", "gw3")}
            before = [one(host, int(port), U1, "/yolo", "127.0.0.2", details) for _ in range(30)]
            stats0 = {gw: request(f"{workdir}/{gw}.sock", "stats")["http"] for gw in pids}
            cpu0 = {gw: cpu_s(pid) for gw, pid in pids.items() if pid}
            flooder = multiprocessing.Process(target=flood, args=(host, int(port), args.requests))
            t0 = time.monotonic()
            flooder.start()
            stop, rows = threading.Event(), []
            sampler = threading.Thread(target=sample, args=(workdir, stop, rows))
            sampler.start()
            during = []
            while flooder.is_alive() and len(during) < 200:
                during.append(one(host, int(port), U1, "/yolo", "127.0.0.2", details))
                time.sleep(0.02)
            stop.set()
            sampler.join()
            flooder.join()
            flood_s = time.monotonic() - t0
            cpu = {gw: round(cpu_s(pid) - cpu0[gw], 2) for gw, pid in pids.items() if pid}
            stats = {gw: {k: v - stats0[gw].get(k, 0) for k, v in request(f"{workdir}/{gw}.sock", "stats")["http"].items()
                          if isinstance(v, (int, float)) and v != stats0[gw].get(k, 0)} for gw in pids}
            time.sleep(4)  # after the flood (bounded)
            after = [one(host, int(port), U1, "/yolo", "127.0.0.2", details) for _ in range(30)]
        finally:
            stop_lab(proc)
    out = {"per_ip_rate": args.per_ip_rate, "flood_requests": args.requests, "flood_s": round(flood_s, 2),
           "u1": {"before": summary(before), "during": summary(during), "after": summary(after)},
           "cpu_s": cpu, "stats": stats, "samples": rows,
           "details": collections.Counter(f"{st} {d}" for st, d in details).most_common(6)}
    if args.json:
        print(json.dumps(out))
        return
    for phase, s in out["u1"].items():
        print(f"u1 {phase}: {s['served']}/{s['n']} served, p50 {s['p50_ms']} ms, statuses {s['statuses']}")
    print(f"flood: {args.requests} in {flood_s:.1f} s; CPU s during it: {cpu}")
    for gw, st in stats.items():
        print(f"{gw} counters: {st}")
    for row in rows:
        print("  ", row)
    for d, n in out["details"]:
        print(f"   {n} x {d}")


if __name__ == "__main__":
    main()
