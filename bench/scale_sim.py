"""Control-plane scale by simulation: the real sans-IO cores of hundreds to thousands of gateways.

    python bench/scale_sim.py [--cases 100:random:100,300:scale-free:1000,...] [--out bench/results]

Every gateway is the real thing minus its sockets and trio: a ``Session`` per link (the
handshake with real keys, encrypted records, keepalives, the FSM, LIMITS and the pace of
route entries both ways), a ``Rib`` with its ``AdjRibOut`` pacing (and withholding beyond
the peer's route limit), and ``LoadPacer`` for load churn, wired as cpnd's daemon wires
them, with cpnd's default pace (``route_changes_per_s``) and a route limit, and so a burst,
of 1,000,000 (an operator who runs 30,000 routes raises ``max_routes_per_peer``). The
daemon's event-loop scheduling (UPDATEs taken in slices, route work at most half the CPU)
costs no virtual time and is not modelled. A virtual clock and an event heap deliver each link's bytes after its one-way
delay (links of 1-10 ms RTT) and fire each session's timers when they fall due; no
wall-clock time passes. For each case (gateways : topology : routes) it measures

  * session set-up: virtual time until every session is established;
  * convergence: every origin announces its instances at once; virtual time until the
    last Loc-RIB change, with every gateway holding a best path to every route;
    messages and bytes sent per gateway meanwhile; CPU seconds of the simulation;
    memory per path held (RSS growth over all Adj-RIB-In and Loc-RIB entries);
  * hub failure: the best-connected gateway dies (its links break); virtual time until
    the last change, messages per gateway, and path exploration (best-path changes per
    affected route per surviving gateway; routes cut off from a gateway count as withdrawn);
  * load churn: 5 instances' loads random-walk for 5 s (virtual); UPDATE messages
    and route entries per gateway per second with cpnd's pacing (200 ms minimum interval,
    5 % threshold) and without it (every 50 ms check advertised); the per-peer minimum
    advertisement interval (100 ms) bounds the messages either way.

With ``--trust on`` (or ``both``: each case twice) every gateway signs its own routes and
validates every route it receives, as cpnd does with a domain key (one certificate per gateway
naming every service): the row then counts the origin signatures made and verified (cache
misses) per gateway, at convergence and per second of load churn, and ``cpu_s`` shows their cost.

Results go to bench/results/scale_sim.json and scale_sim.png.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.config import GatewayConfig  # noqa: E402
from cpnd.crypto import Role, generate_key  # noqa: E402
from cpnd.load import LoadPacer  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.origin import Signer, Trust, issue  # noqa: E402
from cpnd.rib import AdjRibOut, Key, Rib, link_cost_after  # noqa: E402
from cpnd.session import Closed, Established, RttMeasured, Session, SessionConfig, State, UpdateReceived  # noqa: E402
from cpnd.wire import ORIGIN_SIG_CAP, Limits, RouteAdv, SharedTable, use_shared_table  # noqa: E402

MIN_ADV_INTERVAL_S = 0.1  # cpnd's default
ROUTE_LIMIT = 1_000_000  # max_routes_per_peer here, and so the burst (route_changes_burst's default)
ROUTE_RATE = attrs.fields(GatewayConfig).route_changes_per_s.default  # cpnd's default pace
FLUSH_SLICE = 128  # as cpnd's Connection: a flush step waits for a batch of the peer's pace
LOAD_CHECK_S = 0.05  # how often an origin looks at its instances' load (cpnd's _load_loop)
SERVICES = 10
CHURN_S = 5.0
CHURN_INSTANCES = 5  # instances whose load moves all the time (the rest hold still)


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


class Conn:
    """One side of one link: a session, what the peer was told, and its pending timers."""

    def __init__(self, node: Node, peer: str, session: Session, delay: float) -> None:
        self.node, self.peer, self.session, self.delay = node, peer, session, delay
        self.other: Conn | None = None
        self.adj_out: AdjRibOut | None = None
        self.timer_at: float | None = None
        self.flush_at: float | None = None
        self.end_of_rib_pending = False


class Node:
    def __init__(self, gid: str) -> None:
        self.id = gid
        self.rib = Rib(gid, max_routes_per_peer=ROUTE_LIMIT)
        self.conns: dict[str, Conn] = {}
        self.alive = True
        self.seq = 1
        self.local: dict[str, RouteAdv] = {}
        self.pacers: dict[str, LoadPacer] = {}
        self.loads: dict[str, float] = {}
        # This gateway's own table of shared names, paths and keys (cpnd has one per process):
        # sharing across simulated gateways would understate each one's memory.
        self.shared = SharedTable()


class Sim:
    def __init__(self, g: nx.Graph, *, hold_ms: int = 3000, trust: bool = False) -> None:
        self.g = g
        self.now = 0.0
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.order = itertools.count()
        self.nodes = {n: Node(n) for n in g}
        self.keys = {n: generate_key() for n in g}
        self.last_change = 0.0
        self.loc_changes: dict[Key, int] = {}
        self.updates = 0  # UPDATE messages sent, End-of-RIB included
        self.updates_at_convergence = 0
        self.entries = 0  # routes advertised or withdrawn, over all UPDATEs
        if trust:  # origin validation as the lab sets it up: one domain key certifies every gateway
            domain = generate_key()
            anchor = domain.public_key().public_bytes_raw()
            for n, node in self.nodes.items():
                raw = self.keys[n].public_key().public_bytes_raw()
                cert = issue(domain, raw, [f"/svc{i}" for i in range(SERVICES)], int(time.time()) + 86400, n)
                node.rib.signer = Signer(n, self.keys[n], cert)
                node.rib.trust = Trust(n, {m: self.keys[m].public_key().public_bytes_raw() for m in g[n]}, [anchor], cert)
        cfg = SessionConfig(hold_ms=hold_ms, limits=Limits(ROUTE_LIMIT, ROUTE_RATE, ROUTE_LIMIT))
        for u, v in g.edges:
            a, b = sorted((u, v))
            delay = g[u][v]["rtt"] / 2
            sa = Session(Role.INITIATOR, a, self.keys[a], {b: self.keys[b].public_key()}, 0.0, expected_peer=b, config=cfg)
            sb = Session(Role.RESPONDER, b, self.keys[b], {a: self.keys[a].public_key()}, 0.0, config=cfg)
            ca, cb = Conn(self.nodes[a], b, sa, delay), Conn(self.nodes[b], a, sb, delay)
            ca.other, cb.other = cb, ca
            self.nodes[a].conns[b] = ca
            self.nodes[b].conns[a] = cb
        for node in self.nodes.values():
            for conn in node.conns.values():
                self.process(conn)

    # ---- the event loop

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.order), fn, args))

    def run_until(self, t: float) -> None:
        while self.heap and self.heap[0][0] <= t:
            when, _, fn, args = heapq.heappop(self.heap)
            self.now = when
            fn(*args)
        self.now = max(self.now, t)

    def run_until_quiet(self, quiet: float = 2.0, limit: float = 600.0) -> float:
        """Run until no Loc-RIB changed for ``quiet`` s (virtual); the time of the last change."""
        start = self.now
        while self.now - start < limit:
            self.run_until(self.now + 0.25)
            if self.now - self.last_change >= quiet:
                return self.last_change
        raise RuntimeError("no convergence within the limit")

    # ---- the daemon's wiring, as in cpnd/daemon.py

    def process(self, conn: Conn) -> None:
        node = conn.node
        if not node.alive:
            return
        s = conn.session
        while (ev := s.next_event()) is not None:
            if isinstance(ev, Established):
                if s.min_rtt is not None:
                    node.rib.set_link_cost(conn.peer, link_cost_after(None, s.min_rtt) or 1)
                signer = node.rib.signer if ORIGIN_SIG_CAP in s.agreed_caps else None
                if node.rib.trust is not None and signer is not None:
                    node.rib.trust.signing_peers.add(conn.peer)
                conn.adj_out = AdjRibOut(conn.peer, MIN_ADV_INTERVAL_S, max_routes=s.export_limit,
                                         sig_ok=signer is not None,
                                         adjacency=signer.adjacency(conn.peer) if signer is not None else None)
                conn.adj_out.mark_all(node.rib)
                conn.end_of_rib_pending = True
                self.schedule_flush(conn)
            elif isinstance(ev, RttMeasured):
                cost = link_cost_after(node.rib.link_cost_us.get(conn.peer), ev.min_rtt) if conn.adj_out else None
                if cost is not None:
                    self.propagate(node, node.rib.set_link_cost(conn.peer, cost))
            elif isinstance(ev, UpdateReceived):
                u = ev.update
                self.propagate(node, node.rib.end_of_rib(conn.peer) if not u.adv and not u.wd
                               else node.rib.apply_update(conn.peer, u, self.now))
            elif isinstance(ev, Closed):
                conn.adj_out = None
                self.propagate(node, node.rib.peer_down(conn.peer))
        data = s.data_to_send()
        if data and conn.other is not None:
            self.at(self.now + conn.delay, self.deliver, conn.other, data)
        # A timer, or the peer's pace letting its held-back UPDATEs through.
        t = min((d for d in (s.get_timer(), s.resume_at()) if d is not None), default=None)
        if t is not None and (conn.timer_at is None or t < conn.timer_at):
            conn.timer_at = t
            self.at(t, self.fire_timer, conn, t)

    def deliver(self, conn: Conn, data: bytes) -> None:
        use_shared_table(conn.node.shared)
        if conn.node.alive and conn.session.state is not State.CLOSED:
            conn.session.receive_data(data, self.now)
            self.process(conn)

    def fire_timer(self, conn: Conn, t: float) -> None:
        if conn.timer_at != t or not conn.node.alive:
            return
        conn.timer_at = None
        use_shared_table(conn.node.shared)
        conn.session.handle_timer(self.now)
        self.process(conn)

    def propagate(self, node: Node, keys: set[Key]) -> None:
        if not keys:
            return
        self.last_change = self.now
        for k in keys:
            self.loc_changes[k] = self.loc_changes.get(k, 0) + 1
        for conn in node.conns.values():
            if conn.adj_out is not None:
                conn.adj_out.mark(keys)
                self.schedule_flush(conn)

    def flush_due(self, conn: Conn) -> float | None:
        """When the next flush may go: the minimum interval, then the peer's pace (cpnd's _flush_at)."""
        assert conn.adj_out is not None
        due = conn.adj_out.due(self.now)
        if due is None:
            return self.now if conn.end_of_rib_pending else None
        limits = conn.session.peer_limits
        if limits is not None:
            batch = min(FLUSH_SLICE, max(1, limits.rate // 10), max(1, conn.adj_out.backlog))
            due = max(due, conn.session.send_ready_at(batch, self.now))
        return due

    def schedule_flush(self, conn: Conn) -> None:
        due = self.flush_due(conn)
        if due is not None and (conn.flush_at is None or due < conn.flush_at):
            conn.flush_at = due
            self.at(due, self.flush, conn, due)

    def flush(self, conn: Conn, t: float) -> None:
        if conn.flush_at != t or conn.adj_out is None or not conn.node.alive or conn.session.state is not State.ESTABLISHED:
            return
        conn.flush_at = None
        use_shared_table(conn.node.shared)
        due = self.flush_due(conn)
        if due is not None and due > self.now:
            self.schedule_flush(conn)
            return
        if conn.adj_out.due(self.now) is not None:
            adv, wd = conn.adj_out.flush(conn.node.rib, self.now, conn.session.send_budget(self.now))
            if adv or wd:
                self.updates += conn.session.send_update(adv, wd)
                self.entries += len(adv) + len(wd)
        if conn.end_of_rib_pending and conn.adj_out.initial_done:
            conn.end_of_rib_pending = False
            conn.session.send_end_of_rib()
            self.updates += 1
        self.process(conn)
        if conn.adj_out.due(self.now) is not None:
            self.schedule_flush(conn)  # the rest of a burst the peer's pace cut short

    # ---- scenario steps

    def established(self) -> bool:
        return all(c.session.state is State.ESTABLISHED for n in self.nodes.values() for c in n.conns.values())

    def announce(self, routes: int, seed: int) -> None:
        """``routes`` instances spread over the gateways, of SERVICES services, announced at once."""
        rng = random.Random(seed)
        names = sorted(self.nodes)
        for i in range(routes):
            node = self.nodes[names[i % len(names)] if routes >= len(names) else rng.choice(names)]
            svc = f"/svc{i % SERVICES}"
            iid = f"i{i}"
            use_shared_table(node.shared)
            node.local[iid] = RouteAdv(svc, iid, node.id, node.seq, service_label(svc), (node.id,), 0, 50.0, 0.0,
                                       1.0, 1000)
            node.pacers[iid] = LoadPacer()
            node.loads[iid] = 0.0
        for node in self.nodes.values():
            if node.local:
                use_shared_table(node.shared)
                self.propagate(node, node.rib.set_local(node.local.values(), self.now))

    def crypto(self) -> tuple[int, int]:
        """Origin signatures made and verified (cache misses) so far, over all gateways."""
        signs = sum(n.rib.signer.signs for n in self.nodes.values() if n.rib.signer is not None)
        verifies = sum(n.rib.trust.verifies for n in self.nodes.values() if n.rib.trust is not None)
        return signs, verifies

    def messages(self) -> tuple[int, int]:
        msgs = sum(c.session.stats["msgs_out"] for n in self.nodes.values() for c in n.conns.values())
        byts = sum(c.session.stats["bytes_out"] for n in self.nodes.values() for c in n.conns.values())
        return msgs, byts

    def paths_held(self) -> tuple[int, int]:
        live = [n for n in self.nodes.values() if n.alive]
        return (sum(len(t) for n in live for t in n.rib.adj_in.values()) + sum(len(n.rib.local) for n in live),
                sum(len(n.rib) for n in live))

    def converged(self, routes: int | None = None) -> bool:
        """Every live gateway holds exactly the routes whose origin it can still reach (all of them by default)."""
        live = self.g.subgraph(n for n, node in self.nodes.items() if node.alive)
        for comp in nx.connected_components(live):
            want = sum(len(self.nodes[n].local) for n in comp)
            if any(len(self.nodes[n].rib) != want for n in comp):
                return False
        return routes is None or sum(len(n.local) for n in self.nodes.values()) == routes

    def kill(self, gid: str) -> None:
        """The gateway dies: its links break (its neighbours see the connection go)."""
        node = self.nodes[gid]
        node.alive = False
        for conn in node.conns.values():
            other = conn.other
            if other is not None and other.node.alive:
                other.other = None
                use_shared_table(other.node.shared)
                other.session.receive_data(b"", self.now)
                self.process(other)

    def churn(self, seconds: float, paced: bool, seed: int, instances: int) -> None:
        """``instances`` instances' loads random-walk; their origins re-advertise as cpnd's load loop does."""
        rng = random.Random(seed)
        end = self.now + seconds
        live = [(node, iid) for node in self.nodes.values() if node.alive for iid in node.local]
        churning = set(rng.sample(live, min(instances, len(live))))

        def tick() -> None:
            for node in self.nodes.values():
                if not node.alive or not node.local:
                    continue
                use_shared_table(node.shared)
                changed = False
                for iid, adv in node.local.items():
                    if (node, iid) not in churning:
                        continue
                    load = min(1.0, max(0.0, node.loads[iid] + rng.uniform(-0.05, 0.05)))
                    node.loads[iid] = load
                    pacer = node.pacers[iid]
                    if (pacer.should_advertise(self.now, load, 0.0, 1000) if paced else load != pacer.last_load):
                        pacer.advertised(self.now, load, 0.0, 1000)
                        node.seq += 1
                        node.local[iid] = RouteAdv(adv.service, iid, node.id, node.seq, adv.label, adv.path, 0,
                                                   adv.capacity, round(load, 3), adv.price, adv.compute_us)
                        changed = True
                if changed:
                    self.propagate(node, node.rib.set_local(node.local.values(), self.now))
            if self.now + LOAD_CHECK_S < end:
                self.at(self.now + LOAD_CHECK_S, tick)

        self.at(self.now, tick)
        self.run_until(end)


def run_case(n: int, kind: str, routes: int, seed: int, trust: bool = False) -> dict[str, Any]:
    g = topology(kind, n, seed)
    cpu0 = time.process_time()
    rss0 = rss_kib()
    sim = Sim(g, trust=trust)
    while not sim.established():
        sim.run_until(sim.now + 0.1)
        if sim.now > 60:
            raise RuntimeError("sessions never came up")
    setup_s = sim.now
    sim.run_until(sim.now + 1.0)  # past the start-up keepalives
    rss1 = rss_kib()
    msgs0, bytes0 = sim.messages()
    updates0 = sim.updates
    t0 = sim.now
    sim.announce(routes, seed)
    done = sim.run_until_quiet()
    if not sim.converged(routes):
        raise RuntimeError("quiet but not converged")
    conv_s = done - t0
    msgs1, bytes1 = sim.messages()
    sim.updates_at_convergence = sim.updates
    rss2 = rss_kib()
    held, loc = sim.paths_held()
    cpu_conv = time.process_time() - cpu0
    crypto_conv = sim.crypto()
    # Hub failure.
    hub = max(g.degree, key=lambda d: d[1])[0]
    hub_routes = len(sim.nodes[hub].local)
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
    signs_conv, verifies_conv = crypto_conv
    churn = {}
    for paced in (True, False):
        u0, e0 = sim.updates, sim.entries
        s0, v0 = sim.crypto()
        sim.churn(CHURN_S, paced, seed, CHURN_INSTANCES)
        s1, v1 = sim.crypto()
        churn["paced" if paced else "unpaced"] = {"updates": round((sim.updates - u0) / (n - 1) / CHURN_S, 2),
                                                   "routes": round((sim.entries - e0) / (n - 1) / CHURN_S, 2),
                                                   "signs": round((s1 - s0) / CHURN_S, 2),
                                                   "verifies": round((v1 - v0) / (n - 1) / CHURN_S, 2)}
        sim.run_until_quiet()
    return {
        "gateways": n, "topology": kind, "links": g.number_of_edges(), "routes": routes,
        "setup_s": round(setup_s, 3), "converge_s": round(conv_s, 3),
        "msgs_per_gateway": round((msgs1 - msgs0) / n, 1), "updates_per_gateway": round((sim.updates_at_convergence - updates0) / n, 1),
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
        # Origin validation: signatures made (all gateways) and verified (per gateway) until convergence.
        "trust": trust, "signs": signs_conv, "verifies_per_gateway": round(verifies_conv / n, 1),
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
    ap.add_argument("--trust", choices=("off", "on", "both"), default="off",
                    help="origin signatures and validation on every gateway (both: each case twice)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process, print its row
    args = ap.parse_args(argv)
    if args.one:
        n, kind, routes = args.one.split(":")
        print(json.dumps(run_case(int(n), kind, int(routes), args.seed, args.trust == "on")))
        return 0
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(spec, t) for spec in args.cases.split(",") for t in (("off", "on") if args.trust == "both" else (args.trust,))]
    for spec, trust in runs:
        # Each case in a fresh process: memory per path is read from RSS growth, which a heap
        # left over from an earlier case would hide.
        out = subprocess.run([sys.executable, __file__, "--one", spec, "--seed", str(args.seed), "--trust", trust],
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
