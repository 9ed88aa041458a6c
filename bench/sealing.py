"""What end-to-end sealing costs on the data plane: the same paths, sealed and not, side by side.

    python bench/sealing.py [--rounds 5] [--requests 200] [--upload-mb 4] [--json]

Real gateways on loopback (no emulated delay), one simulated instance behind ``c``. Four
ingresses reach it: ``s1`` and ``p1`` over one hop (directly to c), ``s2`` and ``p2`` over two
(through the transit ``b``). The ``s`` ingresses seal (``seal_streams = true``, the default),
the ``p`` ones do not (``false``); everything else is the same, so each pair differs only by
sealing. Each round sends, path after path (the order rotated), ``--requests`` sequential GETs
over one keep-alive connection (p50/p99 ms), then one POST of ``--upload-mb`` MB (MB/s, the
instance reads the whole body). Reported: medians over the rounds, and sealed minus plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab  # noqa: E402

PATHS = {"1 hop sealed": "s1", "1 hop plain": "p1", "2 hops sealed": "s2", "2 hops plain": "p2"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--upload-mb", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    insts = InstanceProcs()
    try:
        url = f"http://127.0.0.1:{insts.start('i1')}/"
        links = (Link("s1", "c"), Link("p1", "c"), Link("s2", "b"), Link("p2", "b"), Link("b", "c"))
        topo = Topology(("s1", "p1", "s2", "p2", "b", "c"), links, (Instance("i1", "c", "/svc", 1e9, 1, 0),),
                        {"max_body_bytes": 1 << 30})
        with tempfile.TemporaryDirectory(prefix="cpn-seal-") as tmp:
            specs = write_lab(topo, Path(tmp), instance_url=lambda i: url)
            for gw in ("p1", "p2"):
                text = specs[gw].config.read_text()
                specs[gw].config.write_text(text.replace("[gateway]\n", "[gateway]\nseal_streams = false\n", 1))
            with Lab(specs, log_level="warning") as lab:
                lab.start_all()
                lab.wait_for(lambda: lab.converged(topo), 60, "convergence")
                rows: dict[str, dict[str, list[float]]] = {p: {"p50": [], "p99": [], "mb_s": []} for p in PATHS}
                body = b"x" * int(args.upload_mb * 1e6)
                clients = {p: httpx.Client(timeout=60) for p in PATHS}
                for p, gw in PATHS.items():  # warm up: connections, first-request paths
                    for _ in range(20):
                        clients[p].get(f"http://{specs[gw].http}/svc").raise_for_status()
                order = list(PATHS)
                for rnd in range(args.rounds):
                    for p in order[rnd % len(order):] + order[:rnd % len(order)]:
                        gw, c = PATHS[p], clients[p]
                        lat = []
                        for _ in range(args.requests):
                            t0 = time.perf_counter()
                            c.get(f"http://{specs[gw].http}/svc").raise_for_status()
                            lat.append((time.perf_counter() - t0) * 1000)
                        rows[p]["p50"].append(pct(lat, 0.5))
                        rows[p]["p99"].append(pct(lat, 0.99))
                        t0 = time.perf_counter()
                        c.post(f"http://{specs[gw].http}/svc", content=body).raise_for_status()
                        rows[p]["mb_s"].append(len(body) / 1e6 / (time.perf_counter() - t0))
                sealed = {gw: lab.query(gw, "stats")["gateway"].get("sealed_streams_out", 0) for gw in PATHS.values()}
                for c in clients.values():
                    c.close()
    finally:
        insts.stop_all()
    med = {p: {k: round(statistics.median(v), 3) for k, v in r.items()} for p, r in rows.items()}
    out = {"paths": med, "sealed_streams_out": sealed, "command": " ".join(sys.argv)}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print("| path | p50 ms | p99 ms | upload MB/s |\n|---|---|---|---|")
    for p, r in med.items():
        print(f"| {p} | {r['p50']} | {r['p99']} | {r['mb_s']} |")
    for hops in ("1 hop", "2 hops"):
        s, q = med[f"{hops} sealed"], med[f"{hops} plain"]
        print(f"{hops}: sealing adds {s['p50'] - q['p50']:+.3f} ms at p50, {s['p99'] - q['p99']:+.3f} ms at p99; "
              f"upload {s['mb_s'] / q['mb_s']:.2f}x the plain rate")
    print(f"sealed streams opened per ingress: {sealed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
