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
It then measures the sans-IO codec in-process (messages/s, one core), and the receive path of
origin validation (``origin_bench``): Ed25519 signs and verifies per second, and UPDATEs of 50
routes decoded and applied to a RIB per second without validation, signed and verified (every
route a new signature, as under load churn), and signed but already verified (the same
signatures from a second peer: cache hits).
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

import attrs
import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.crypto import RecordLayer  # noqa: E402
from cpnd.lab import Instance, Lab, Link, Topology, write_lab  # noqa: E402
from cpnd.crypto import generate_key  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.origin import Signer, Trust, issue, origin_message  # noqa: E402
from cpnd.rib import Rib  # noqa: E402
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


def run_once(n: int, seed: int, trust: bool = True) -> dict:
    topo, g = topology(n, seed)
    with tempfile.TemporaryDirectory(prefix="cpn-bench-") as tmp:
        specs = write_lab(topo, Path(tmp), trust=trust)
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
        "trust": trust,
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


def _rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def origin_bench(seconds: float = 1.0) -> dict:
    """Signatures and the receive path (decode + validate + apply) of 50-route UPDATEs, per second."""
    label = service_label("/svc")
    domain, origin = generate_key(), generate_key()
    cert = issue(domain, origin.public_key().public_bytes_raw(), ["/svc"], int(time.time()) + 86400, "g1")
    signer = Signer("g1", origin, cert)
    adj = signer.adjacency("g2")
    out: dict = {}
    adv = RouteAdv("/svc", "s0", "g1", 1, label, ("g1",), 0, 50.0, 0.3, 1.0, 3000)
    msg = origin_message(adv)
    sig = origin.sign(msg)
    pub = origin.public_key()
    out["ed25519_sign_per_s"] = round(_rate(lambda: origin.sign(msg), seconds))
    out["ed25519_verify_per_s"] = round(_rate(lambda: pub.verify(sig, msg), seconds))
    batch = [0]

    def bodies(signed: bool) -> list[bytes]:
        batch[0] += 1  # fresh seqs each time: every signature new, as under churn
        routes = [RouteAdv("/svc", f"s{i}", "g1", batch[0] * 100 + i, label, ("g1",), 0, 50.0, 0.3, 1.0, 3000)
                  for i in range(50)]
        if signed:
            # The certificate travels once per session (routing.md): here with the first route of each UPDATE.
            routes = [attrs.evolve(signer.sign(r), oadj=adj, path=("g2", "g1"), latency_us=4000,
                                   cert=cert.encode() if i == 0 else None) for i, r in enumerate(routes)]
        else:
            routes = [attrs.evolve(r, path=("g2", "g1"), latency_us=4000) for r in routes]
        return [encode_message(Update(tuple(routes)))]

    def receive(trust: bool, signed: bool, fresh: bool) -> float:
        rib = Rib("g3")
        if trust:
            rib.trust = Trust("g3", {"g2": generate_key().public_key().public_bytes_raw()},
                              [domain.public_key().public_bytes_raw()])
            rib.trust.signing_peers.add("g2")
        pool = [bodies(signed)[0] for _ in range(20)]  # made before the clock runs (signing is the origin's cost)
        i = [0]

        def one() -> None:
            body = pool[i[0] % len(pool)] if not fresh else pool[i[0]] if i[0] < len(pool) else pool[-1]
            i[0] += 1
            if fresh and i[0] > len(pool):
                pool.append(bodies(signed)[0])  # beyond the pool: sign more (not timed separately; rare)
            rib.apply_update("g2", decode_message(body), 0.0)  # type: ignore[arg-type]

        if fresh:  # every UPDATE new signatures: time exactly the pool, built beforehand
            pool = [bodies(signed)[0] for _ in range(200)]
            t0 = time.perf_counter()
            for body in pool:
                rib.apply_update("g2", decode_message(body), 0.0)  # type: ignore[arg-type]
            return len(pool) / (time.perf_counter() - t0)
        return _rate(one, seconds)

    out["update_50_apply_per_s"] = round(receive(False, False, False))
    out["update_50_signed_apply_no_validation_per_s"] = round(receive(False, True, False))
    out["update_50_signed_verified_new_per_s"] = round(receive(True, True, True))
    out["update_50_signed_verified_cached_per_s"] = round(receive(True, True, False))
    unsigned, signed = bodies(False)[0], bodies(True)[0]
    out["update_50_bytes"], out["update_50_signed_bytes"] = len(unsigned), len(signed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--trust", choices=("on", "off", "both"), default="on",
                    help="the lab's domain key and certificates, so every route is signed and verified (the "
                         "default, as `cpnd lab`); off: no trust anchors, routes signed but unverifiable; both: each size twice")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for n in sizes:
        for trust in ((False, True) if args.trust == "both" else (args.trust == "on",)):
            runs = [run_once(n, seed=1000 * n + r, trust=trust) for r in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med["repeats"] = args.repeats
            results.append(med)
            print(json.dumps(med), flush=True)
    codec = codec_bench()
    codec.update(origin_bench())
    print(json.dumps(codec), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_plane.json").write_text(json.dumps({"sizes": results, "codec": codec,
                                                         "command": " ".join(sys.argv)}, indent=1) + "\n")
    print("\n| gateways | links | trust | launch->converged s | 1st session->converged s | msgs/gateway | kill->healed s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['gateways']} | {r['links']} | {'on' if r['trust'] else 'off'} | {r['launch_to_converged_s']} | "
              f"{r['first_session_to_converged_s']} | {r['messages_per_gateway']} | {r['kill_to_healed_s']} |")
    print("\n| codec (one core) | msgs/s |\n|---|---|")
    for k, v in codec.items():
        if k.endswith("_per_s"):
            print(f"| {k[:-6]} | {v:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
