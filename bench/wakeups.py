"""What a process wake-up costs on this machine: the floor under every gateway's latency at low rates.

    python bench/wakeups.py [--requests 200] [--gaps 0,0.001,0.01,0.05]

Two plain Python processes over loopback TCP (a blocking echo server and client, no trio, no
HTTP): the round trip back to back and after an idle gap, and the same small piece of Python
work (a dict of 800 entries, dumped to JSON) timed inside the server warm and after the gap.
A request crossing two gateways, an instance and the client wakes ~7 processes in turn; at a
low request rate each of them pays what the gap rows show, whatever the gateways do.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import time


def _work() -> None:
    json.dumps({str(i): i * 2 for i in range(800)})


def _serve(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        t = time.perf_counter()
        _work() if data == b"w" else None
        conn.sendall(str(int((time.perf_counter() - t) * 1e6)).encode())


def measure(requests: int, gaps: list[float]) -> list[dict[str, float]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    proc = multiprocessing.Process(target=_serve, args=(srv,), daemon=True)
    proc.start()
    rows = []
    try:
        cli = socket.create_connection(srv.getsockname())
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for gap in gaps:
            echo, rtt_w, work = [], [], []
            for _ in range(requests):
                for kind, out in ((b"e", echo), (b"w", rtt_w)):
                    t = time.perf_counter()
                    cli.sendall(kind)
                    took = int(cli.recv(64))
                    out.append((time.perf_counter() - t) * 1e6)
                    if kind == b"w":
                        work.append(took)
                    time.sleep(gap)
            rows.append({"gap_ms": gap * 1000, "echo_rtt_us_p50": round(statistics.median(echo)),
                         "work_us_p50": round(statistics.median(work)), "work_rtt_us_p50": round(statistics.median(rtt_w))})
        cli.close()
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
        srv.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--gaps", default="0,0.001,0.01,0.05", help="idle seconds before each request")
    args = ap.parse_args()
    rows = measure(args.requests, [float(g) for g in args.gaps.split(",")])
    print("| idle gap before it | echo round trip p50 µs | the same Python work p50 µs | its round trip p50 µs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['gap_ms']:g} ms | {r['echo_rtt_us_p50']} | {r['work_us_p50']} | {r['work_rtt_us_p50']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
