"""Control-plane benchmark: real cpnd processes converging, and codec throughput.

    python bench/control_plane.py [--sizes 5,10,20] [--repeats 3] [--out bench/results]

For each size N it starts N real gateways on loopback over a random connected
topology (average degree ~3, emulated RTTs 1-5 ms, one instance per gateway) and
measures, as medians over the repeats:
  * convergence: from launching the processes until every RIB holds a best route to
    every instance (includes Python start-up), and from the first session coming up;
  * messages and bytes sent by all gateways until then;
  * failure: kill one transit gateway (the highest-degree one) and time until every
    survivor has withdrawn its instance and re-routed around it.
It then measures the sans-IO codec in-process (messages/s, one core).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.crypto import RecordLayer  # noqa: E402
from cpnd.lab import Instance, Lab, Link, Topology, write_lab  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.wire import (  # noqa: E402
    ContentType,
    Keepalive,
    RouteAdv,
    Update,
    decode_message,
    encode_message,
)

OPTS = {"hold_time_ms": 3000, "min_adv_interval_ms": 100}


def topology(n: int, seed: int) -> tuple[Topology, nx.Graph]:
    rng = random.Random(seed)
    while True:
        g = nx.gnm_random_graph(n, max(n - 1, int(1.5 * n)), seed=rng.randrange(2**31))
        if nx.is_connected(g):
            break
    g = nx.relabel_nodes(g, {i: f"g{i:03d}" for i in g})
    links = tuple(Link(u, v, float(rng.randint(1, 5))) for u, v in g.edges)
    insts = tuple(Instance(f"s{i}", gw, "/svc", 50, 1, 1) for i, gw in enumerate(sorted(g)))
    return Topology(tuple(sorted(g)), links, insts, dict(OPTS)), g


def totals(lab: Lab) -> tuple[int, int, int]:
    msgs = byts = updates = 0
    for gw in lab.procs:
        for p in lab.query(gw, "show-peers"):
            msgs += p["msgs_out"]
            byts += p["bytes_out"]
        updates += lab.query(gw, "status")["stats"].get("updates_out", 0)
    return msgs, byts, updates


def run_once(n: int, seed: int) -> dict:
    topo, g = topology(n, seed)
    with tempfile.TemporaryDirectory(prefix="cpn-bench-") as tmp:
        specs = write_lab(topo, Path(tmp))
        lab = Lab(specs, log_level="warning")
        with lab:
            t0 = time.monotonic()
            lab.start_all()
            first_up = None

            def any_up() -> bool:
                return any(p["state"] == "established" for gw in lab.procs for p in lab.query(gw, "show-peers"))

            lab.wait_for(any_up, 120, "a first session")
            first_up = time.monotonic()
            lab.wait_for(lambda: lab.converged(topo), 300, "convergence")
            t_conv = time.monotonic()
            msgs, byts, updates = totals(lab)
            # Fail the best-connected gateway and wait for every survivor to re-route.
            victim = max(g.degree, key=lambda kv: (kv[1], kv[0]))[0]
            survivors = g.copy()
            survivors.remove_node(victim)
            lab.procs[victim].kill()
            lab.procs.pop(victim).wait()
            t_kill = time.monotonic()
            reachable = {gw: set(nx.node_connected_component(survivors, gw)) for gw in survivors}

            def healed() -> bool:
                for gw in survivors:
                    have = {(r["origin"]) for r in lab.routes(gw) if r["best"]}
                    if have != reachable[gw] or any(victim in r["path"] for r in lab.routes(gw) if r["best"]):
                        return False
                return True

            lab.wait_for(healed, 120, "healing")
            t_heal = time.monotonic()
    return {
        "gateways": n, "links": g.number_of_edges(), "routes_per_gateway": n,
        "launch_to_converged_s": round(t_conv - t0, 3),
        "first_session_to_converged_s": round(t_conv - first_up, 3),
        "messages": msgs, "bytes": byts, "updates": updates,
        "messages_per_gateway": round(msgs / n, 1),
        "kill_to_healed_s": round(t_heal - t_kill, 3),
        "killed_degree": g.degree[victim],
    }


def codec_bench(seconds: float = 1.0) -> dict:
    label = service_label("/svc")
    routes = tuple(RouteAdv("/svc", f"s{i}", "g1", 1_700_000_000_000_000 + i, label, ("g2", "g1"), 4000, 50.0, 0.3, 1.0, 3000)
                   for i in range(50))
    cases = {
        "keepalive": Keepalive(123456789, 123456000, 250),
        "update_1_route": Update(routes[:1]),
        "update_50_routes": Update(routes),
    }
    rec = RecordLayer(b"k" * 32, b"k" * 32)
    out = {}
    for name, msg in cases.items():
        body = encode_message(msg)
        for op, fn in (("encode", lambda m=msg: encode_message(m)), ("decode", lambda b=body: decode_message(b))):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(100):
                    fn()
                n += 100
            out[f"{name}_{op}_per_s"] = round(n / (time.perf_counter() - t0))
        out[f"{name}_bytes"] = len(body)
    body = encode_message(cases["update_1_route"])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            rec.seal(ContentType.CONTROL, body)
        n += 100
    out["record_seal_1_route_per_s"] = round(n / (time.perf_counter() - t0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for n in sizes:
        runs = [run_once(n, seed=1000 * n + r) for r in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["repeats"] = args.repeats
        results.append(med)
        print(json.dumps(med), flush=True)
    codec = codec_bench()
    print(json.dumps(codec), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_plane.json").write_text(json.dumps({"sizes": results, "codec": codec,
                                                         "command": " ".join(sys.argv)}, indent=1) + "\n")
    print("\n| gateways | links | launch->converged s | 1st session->converged s | msgs/gateway | kill->healed s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['gateways']} | {r['links']} | {r['launch_to_converged_s']} | {r['first_session_to_converged_s']} | "
              f"{r['messages_per_gateway']} | {r['kill_to_healed_s']} |")
    print("\n| codec (one core) | msgs/s |\n|---|---|")
    for k, v in codec.items():
        if k.endswith("_per_s"):
            print(f"| {k[:-6]} | {v:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
