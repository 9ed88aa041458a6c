"""Control-plane scale by simulation: the gateway cores of hundreds to thousands of gateways.

    python bench/scale_sim.py [--cases 100:random:100,300:scale-free:1000,...] [--out bench/results]

Every gateway is cpnd's own ``gateway.Gateway`` core, the one the daemon runs, minus its sockets
and trio: it dials its peers (the greater id first), resolves collisions, runs a ``Session`` per
link (the handshake with real keys, encrypted records, keepalives, the FSM, LIMITS and the pace
of route entries both ways), its ``Rib`` with an ``AdjRibOut`` per peer (pacing, withholding
beyond the peer's route limit, End-of-RIB), its 50 ms load poll with ``LoadPacer`` and graceful
restart as configured, with cpnd's default pace (``route_changes_per_s``) and a route limit, and
so a burst, of 1,000,000 (an operator who runs 30,000 routes raises ``max_routes_per_peer``).
``cpnd.vnet`` is the simulation's shell: a virtual clock and an event heap deliver each link's
bytes after its one-way delay (links of 1-10 ms RTT) and fire each core's timer when it falls
due; no wall-clock time passes and the route-work budget (a share of the CPU) is not modelled.
For each case (gateways : topology : routes) it measures

  * session set-up: virtual time until every session is established;
  * convergence: every origin announces its instances at once (a reload that adds them); virtual
    time until the last Loc-RIB change, with every gateway holding a best path to every route;
    messages and bytes sent per gateway meanwhile; CPU seconds of the simulation;
    memory per path held (RSS growth over all Adj-RIB-In and Loc-RIB entries);
  * hub failure: the best-connected gateway dies (its links break); virtual time until
    the last change, messages per gateway, and path exploration (best-path changes per
    affected route per surviving gateway; routes cut off from a gateway count as withdrawn);
  * load churn: 5 instances' loads random-walk for 5 s (virtual); UPDATE messages
    and route entries per gateway per second with cpnd's pacing (200 ms minimum interval,
    5 % threshold) and without it (every 50 ms check that moved advertised); the per-peer
    minimum advertisement interval (100 ms) bounds the messages either way.

Results go to bench/results/scale_sim.json and scale_sim.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.config import GatewayConfig  # noqa: E402
from cpnd.crypto import generate_key  # noqa: E402
from cpnd.gateway import Gateway  # noqa: E402
from cpnd.load import LoadPacer  # noqa: E402
from cpnd.rib import Key  # noqa: E402
from cpnd.vnet import Instances, Net, config_for, established  # noqa: E402
from cpnd.wire import SharedTable, use_shared_table  # noqa: E402

ROUTE_LIMIT = 1_000_000  # max_routes_per_peer here, and so the burst (route_changes_burst's default)
ROUTE_RATE = attrs.fields(GatewayConfig).route_changes_per_s.default  # cpnd's default pace
SERVICES = 10
CHURN_S = 5.0
CHURN_INSTANCES = 5  # instances whose load moves all the time (the rest hold still)
COMPUTE_US = 1000.0  # every instance's compute latency (1 ms), as its meter reads it


def ring_of_rings(n: int, rng: random.Random) -> nx.Graph:
    """Rings of ~10 gateways, their first gateways joined in a ring of their own, plus a few chords."""
    size = 10
    g = nx.Graph()
    heads = []
    for start in range(0, n, size):
        members = list(range(start, min(n, start + size)))
        heads.append(members[0])
        nx.add_cycle(g, members) if len(members) > 2 else g.add_nodes_from(members)
    nx.add_cycle(g, heads)
    for _ in range(max(1, n // 50)):
        a, b = rng.sample(heads, 2)
        g.add_edge(a, b)
    return g


def topology(kind: str, n: int, seed: int) -> nx.Graph:
    rng = random.Random(seed)
    if kind == "random":
        # A random spanning tree (each gateway joins a random earlier one), then random extra
        # links up to 1.5 n: connected, mean degree 3. (A plain G(n, m) that sparse is almost
        # never connected at these sizes.)
        g = nx.Graph()
        g.add_node(0)
        for v in range(1, n):
            g.add_edge(v, rng.randrange(v))
        while g.number_of_edges() < int(1.5 * n):
            a, b = rng.sample(range(n), 2)
            g.add_edge(a, b)
    elif kind == "scale-free":
        g = nx.barabasi_albert_graph(n, 2, seed=seed)
    elif kind == "ring-of-rings":
        g = ring_of_rings(n, rng)
    else:
        raise ValueError(kind)
    g = nx.relabel_nodes(g, {v: f"g{v}" for v in g})
    for u, v in g.edges:
        g[u][v]["rtt"] = rng.uniform(0.001, 0.010)
    return g


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sim:
    """One core per gateway, on one virtual network; the scenario steps and what they count."""

    def __init__(self, g: nx.Graph, seed: int, *, hold_ms: int = 3000) -> None:
        self.g = g
        keys = {n: generate_key() for n in g}
        # Each gateway's own table of shared names, paths and keys (cpnd has one per process):
        # sharing across simulated gateways would understate each one's memory.
        self.shared = {n: SharedTable() for n in g}
        self.net = Net(enter=lambda gid: use_shared_table(self.shared[gid]))
        for u, v in g.edges:
            self.net.delays[frozenset((u, v))] = g[u][v]["rtt"] / 2
        self.sources = {n: Instances() for n in g}
        self.configs = {n: config_for(n, keys[n], {p: keys[p].public_key() for p in g[n]}, hold_time_ms=hold_ms,
                                      max_routes_per_peer=ROUTE_LIMIT) for n in g}
        self.cores: dict[str, Gateway] = {}
        self.last_change = 0.0
        self.loc_changes: dict[Key, int] = {}
        for i, n in enumerate(sorted(g)):
            use_shared_table(self.shared[n])
            core = Gateway(self.configs[n], self.sources[n], 0.0, seq=1, rng=random.Random(seed * 100_003 + i),
                           cpu_clock=lambda: 0.0)
            core.observe = self._observe
            self.cores[n] = core
            self.net.add(core)

    def _observe(self, keys: set[Key], now: float) -> None:
        self.last_change = now
        for k in keys:
            self.loc_changes[k] = self.loc_changes.get(k, 0) + 1

    @property
    def now(self) -> float:
        return self.net.now

    def run_until(self, t: float) -> None:
        self.net.run_until(t)

    def run_until_quiet(self, quiet: float = 2.0, limit: float = 600.0) -> float:
        """Run until no Loc-RIB changed for ``quiet`` s (virtual); the time of the last change."""
        start = self.now
        while self.now - start < limit:
            self.run_until(self.now + 0.25)
            if self.now - self.last_change >= quiet:
                return self.last_change
        raise RuntimeError("no convergence within the limit")

    # ---- what the cores counted

    def established(self) -> bool:
        return established(self.cores.values())

    def messages(self) -> tuple[int, int]:
        links = self.net.all_links
        return sum(c.session.stats["msgs_out"] for c in links), sum(c.session.stats["bytes_out"] for c in links)

    def updates(self) -> int:
        """UPDATE messages sent, End-of-RIB included (one per session that came up)."""
        return (sum(c.stats["updates_out"] for c in self.cores.values())
                + sum(1 for c in self.net.all_links if c.session.established_at is not None and not c.end_of_rib_pending))

    def entries(self) -> int:
        """Route entries (advertised or withdrawn) taken in, over every UPDATE."""
        return sum(c.stats["route_entries_in"] for c in self.cores.values())

    def live(self) -> list[Gateway]:
        return [c for n, c in self.cores.items() if n not in self.net.dead]

    def paths_held(self) -> tuple[int, int]:
        return sum(c.paths for c in self.live()), sum(len(c.rib) for c in self.live())

    def converged(self, routes: int | None = None) -> bool:
        """Every live gateway holds exactly the routes whose origin it can still reach (all of them by default)."""
        live = self.g.subgraph(n for n in self.cores if n not in self.net.dead)
        for comp in nx.connected_components(live):
            want = sum(len(self.cores[n].rib.local) for n in comp)
            if any(len(self.cores[n].rib) != want for n in comp):
                return False
        return routes is None or sum(len(c.rib.local) for c in self.cores.values()) == routes

    # ---- scenario steps

    def announce(self, routes: int, seed: int) -> None:
        """``routes`` instances spread over the gateways, of SERVICES services, added at once by a reload."""
        rng = random.Random(seed)
        names = sorted(self.cores)
        services: dict[str, dict[str, list[str]]] = {n: {} for n in names}
        for i in range(routes):
            n = names[i % len(names)] if routes >= len(names) else rng.choice(names)
            services[n].setdefault(f"/svc{i % SERVICES}", []).append(f"i{i}")
        for n in names:
            if not services[n]:
                continue
            old = self.configs[n]
            new = config_for(n, old.key, {p.id: p.public_key for p in old.peers}, services=services[n],
                             hold_time_ms=old.gateway.hold_time_ms, max_routes_per_peer=ROUTE_LIMIT)
            self.sources[n].values = {iid: (0.0, 0.0, COMPUTE_US) for iids in services[n].values() for iid in iids}
            use_shared_table(self.shared[n])
            self.cores[n].reload(new, self.now)
            self.net.pump(n)

    def kill(self, gid: str) -> None:
        """The gateway dies: its links break (its neighbours see the connection go)."""
        self.net.kill(gid)

    def churn(self, seconds: float, paced: bool, seed: int, instances: int) -> None:
        """``instances`` instances' loads random-walk, read by their cores' own load poll (paced by
        cpnd's LoadPacer, or advertised whenever they moved)."""
        rng = random.Random(seed)
        walks = {}  # one random walk per instance: the order the cores poll in changes nothing
        live = [(n, iid) for n, c in self.cores.items() if n not in self.net.dead for iid in self.sources[n].values]
        churning = set(rng.sample(live, min(instances, len(live))))
        for n, source in self.sources.items():
            mine = {iid for (m, iid) in churning if m == n}
            if not mine:
                source.walk = None
                continue
            if not paced:  # every poll's move is news
                for iid in mine:
                    self.cores[n].own.pacers[iid] = LoadPacer(min_interval_s=0.0, load_threshold=1e-9)

            def walk(iid: str, now: float, source: Instances = source, mine: set[str] = mine) -> tuple[float, float, float] | None:
                if iid not in mine:
                    return None
                step = walks.setdefault(iid, random.Random(f"{seed}:{iid}")).uniform(-0.05, 0.05)
                load = min(1.0, max(0.0, source.values[iid][0] + step))
                return (round(load, 3), 0.0, COMPUTE_US)

            source.walk = walk
        self.run_until(self.now + seconds)
        for source in self.sources.values():
            source.walk = None


def run_case(n: int, kind: str, routes: int, seed: int) -> dict[str, Any]:
    g = topology(kind, n, seed)
    cpu0 = time.process_time()
    rss0 = rss_kib()
    sim = Sim(g, seed)
    while not sim.established():
        sim.run_until(sim.now + 0.1)
        if sim.now > 60:
            raise RuntimeError("sessions never came up")
    setup_s = sim.now
    sim.run_until(sim.now + 1.0)  # past the start-up keepalives
    rss1 = rss_kib()
    msgs0, bytes0 = sim.messages()
    updates0 = sim.updates()
    t0 = sim.now
    sim.announce(routes, seed)
    done = sim.run_until_quiet()
    if not sim.converged(routes):
        raise RuntimeError("quiet but not converged")
    conv_s = done - t0
    msgs1, bytes1 = sim.messages()
    updates_at_convergence = sim.updates()
    rss2 = rss_kib()
    held, loc = sim.paths_held()
    cpu_conv = time.process_time() - cpu0
    # Hub failure.
    hub = max(g.degree, key=lambda d: d[1])[0]
    hub_routes = len(sim.cores[hub].rib.local)
    sim.loc_changes.clear()
    t1 = sim.now
    sim.kill(hub)
    done = sim.run_until_quiet()
    if not sim.converged():
        raise RuntimeError("survivors did not converge after the hub failure")
    msgs2, bytes2 = sim.messages()
    # Best-path changes per route per surviving gateway: 1 is a single switch, more is path exploration.
    exploration = sum(sim.loc_changes.values()) / max(1, len(sim.loc_changes)) / (n - 1)
    affected = len(sim.loc_changes)
    # Load churn, paced as cpnd does, then unpaced.
    churn = {}
    for paced in (True, False):
        u0, e0 = sim.updates(), sim.entries()
        sim.churn(CHURN_S, paced, seed, CHURN_INSTANCES)
        churn["paced" if paced else "unpaced"] = {"updates": round((sim.updates() - u0) / (n - 1) / CHURN_S, 2),
                                                   "routes": round((sim.entries() - e0) / (n - 1) / CHURN_S, 2)}
        sim.run_until_quiet()
    return {
        "gateways": n, "topology": kind, "links": g.number_of_edges(), "routes": routes,
        "setup_s": round(setup_s, 3), "converge_s": round(conv_s, 3),
        "msgs_per_gateway": round((msgs1 - msgs0) / n, 1), "updates_per_gateway": round((updates_at_convergence - updates0) / n, 1),
        "kib_per_gateway": round((bytes1 - bytes0) / n / 1024, 1),
        "paths_held": held, "loc_entries": loc,
        "bytes_per_path": round((rss2 - rss1) * 1024 / max(1, held), 1),
        "bytes_per_loc_entry": round((rss2 - rss1) * 1024 / max(1, loc), 1),
        "rss_sessions_mib": round((rss1 - rss0) / 1024, 1),
        "cpu_s": round(cpu_conv, 2),
        "hub": hub, "hub_degree": g.degree[hub], "hub_routes": hub_routes,
        "hub_stable_s": round(done - t1, 3), "hub_msgs_per_gateway": round((msgs2 - msgs1) / (n - 1), 1),
        "hub_exploration": round(exploration, 2), "hub_affected_routes": affected,
        "churn_update_msgs_per_gateway_s": churn,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    metrics = [("converge_s", "convergence s (virtual)"), ("msgs_per_gateway", "messages per gateway"),
               ("bytes_per_path", "bytes of memory per path held"), ("hub_stable_s", "hub failure: s to stable")]
    # The size series: 1,000 / 300 / 100 routes at 100 / 300 / 1,000 gateways (the route sweep is in the table).
    series = [r for r in rows if (r["gateways"], r["routes"]) in SIZE_SERIES]
    for ax, (key, label) in zip(axes, metrics):
        for kind, group in itertools.groupby(sorted(series, key=lambda r: (r["topology"], r["gateways"])),
                                             key=lambda r: r["topology"]):
            group = list(group)
            ax.plot([r["gateways"] for r in group], [r[key] for r in group], marker="o", label=kind)
        ax.set_xlabel("gateways (1000 / 300 / 100 routes)")
        ax.set_title(label)
        ax.set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SIZE_SERIES = {(100, 1000), (300, 300), (1000, 100)}
DEFAULT_CASES = ("100:random:10,100:random:1000,100:scale-free:1000,100:ring-of-rings:1000,"
                 "300:random:300,300:scale-free:300,300:ring-of-rings:300,"
                 "1000:random:100,1000:scale-free:100,1000:ring-of-rings:100,100:random:10000,100:random:30000")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated GATEWAYS:TOPOLOGY:ROUTES")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process, print its row
    args = ap.parse_args(argv)
    if args.one:
        n, kind, routes = args.one.split(":")
        print(json.dumps(run_case(int(n), kind, int(routes), args.seed)))
        return 0
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.cases.split(","):
        # Each case in a fresh process: memory per path is read from RSS growth, which a heap
        # left over from an earlier case would hide.
        out = subprocess.run([sys.executable, __file__, "--one", spec, "--seed", str(args.seed)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Written after every case: the big ones take minutes, and what is done is kept.
        (args.out / "scale_sim.json").write_text(json.dumps({"rows": rows, "seed": args.seed, "command": " ".join(sys.argv)}, indent=1) + "\n")
    plot(rows, args.out / "scale_sim.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
