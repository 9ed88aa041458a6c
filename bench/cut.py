"""When a request cut at its latency bound gets its 504, by the client's clock, beside a 200 on the same path.

    python bench/cut.py [--requests 40] [--bound-ms 10]

Starts ``cpnd lab paper`` and sends u1's requests (gw1, ``CPN-Max-Latency``, ``CPN-Prefer: price``)
one at a time, each on a fresh kept-alive connection warmed by one request: in turn one that s1
answers 50 ms late (``?delay=0.05``: cut at the bound, 504) and a plain one (200, or 503/504 while
gw1's correction keeps s1 out after the cuts). The bound runs from the ingress reading the request
head to the response head leaving it (DESIGN.md section 6); the client's clock adds its own send
and read (~0.3 ms here). Run it on two trees in alternation to compare them.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpclient import exchange  # noqa: E402


def start_lab(workdir: str, scenario: str = "paper") -> tuple[subprocess.Popen[str], str]:
    """``cpnd lab SCENARIO`` in ``workdir``, ready: the process and gw1's http address."""
    proc = subprocess.Popen([sys.executable, "-m", "cpnd", "lab", scenario, "--dir", workdir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    http = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = (proc.stdout.readline() if proc.stdout else "").strip()
        if not line or line == "ready":
            break
        if line.startswith("gw1 "):
            http = line.split("http=")[1].split()[0]
    if line != "ready" or not http:
        proc.kill()
        raise SystemExit(f"the lab did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, http


def stop_lab(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C to the lab (it stops every gateway), killed if it has not ended within 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(target: str, bound_ms: float) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: gw1\r\nCPN-Max-Latency: {bound_ms:g}ms\r\nCPN-Prefer: price\r\n"
            "Content-Length: 5\r\n\r\nimage").encode()


async def run(http: str, requests: int, bound_ms: float) -> dict[str, list[tuple[int, float]]]:
    """Each request on a fresh connection warmed by one: (status, the client's time to the whole
    response, ms; a small JSON body comes in the head's read)."""
    host, port = http.rsplit(":", 1)
    out: dict[str, list[tuple[int, float]]] = {"cut": [], "plain": []}
    for _ in range(requests):
        for kind, target in (("cut", "/yolo?delay=0.05"), ("plain", "/yolo")):
            stream = await trio.open_tcp_stream(host, int(port))  # TCP_NODELAY, as trio sets it
            async with stream:
                with trio.fail_after(10):
                    await exchange(stream, request("/yolo", bound_ms))  # warm the connection
                    await trio.sleep(0.06)  # bounded: 2 x requests pauses
                    t0 = trio.current_time()
                    status, _, _ = await exchange(stream, request(target, bound_ms))
                out[kind].append((status, (trio.current_time() - t0) * 1000))
            await trio.sleep(0.06)
    return out


def summary(out: dict[str, list[tuple[int, float]]], bound_ms: float) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind, results in out.items():
        by: dict[int, list[float]] = {}
        for status, took in results:
            by.setdefault(status, []).append(took)
        table[kind] = {str(st): {"n": len(ts), "p50_ms": round(statistics.median(ts), 2), "max_ms": round(max(ts), 2),
                                 "over_bound": sum(t > bound_ms for t in ts)} for st, ts in sorted(by.items())}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40, help="cut and plain requests each (default 40)")
    ap.add_argument("--bound-ms", type=float, default=10.0, help="u1's CPN-Max-Latency (default 10)")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds after ready before the first request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        proc, http = start_lab(workdir)
        try:
            time.sleep(args.settle)  # the RTT filters settle after the start-up burst (not synchronisation)
            table = summary(trio.run(run, http, args.requests, args.bound_ms), args.bound_ms)
        finally:
            stop_lab(proc)
    for kind, rows in table.items():
        print(kind, "  ".join(f"{st}: n={r['n']} p50={r['p50_ms']} max={r['max_ms']} over {args.bound_ms:g} ms: {r['over_bound']}"
                               for st, r in rows.items()))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
