"""The RIB: best path, loop prevention and withdrawals, against a networkx oracle."""

from __future__ import annotations

import random
import re
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.errors import CeaseSub, Code, ProtocolError, UpdateSub
from cpnd.names import service_label
from cpnd.rib import BEST_PATH_CHAIN, AdjRibOut, BestReason, Rib, gateway_time_after
from cpnd.wire import RouteAdv, Update, Withdrawal

ROOT = Path(__file__).resolve().parent.parent
LABEL = service_label("/svc")


def local_route(gw: str, inst: str, seq: int = 1, **kw) -> RouteAdv:
    return RouteAdv("/svc", inst, gw, seq, LABEL, (gw,), 0, kw.get("cap", 10.0), kw.get("load", 0.0), kw.get("price", 1.0), 1000)


class Net:
    """Ribs wired by AdjRibOuts, delivering UPDATEs in a random order until quiet."""

    def __init__(self, graph: nx.Graph, rng: random.Random) -> None:
        self.g = graph
        self.rng = rng
        self.ribs = {n: Rib(n) for n in graph}
        self.out = {n: {m: AdjRibOut(m, 0.0) for m in graph[n]} for n in graph}
        for n in graph:
            for m in graph[n]:
                self.ribs[n].set_link_cost(m, graph[n][m]["w"])
        self.messages = 0

    def announce(self, node: str, inst: str) -> None:
        self._changed(node, self.ribs[node].set_local([local_route(node, inst)], 0.0))

    def _changed(self, node: str, keys) -> None:
        for ao in self.out[node].values():
            ao.mark(keys)

    def run(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            pending = [(n, m) for n in self.out for m, ao in self.out[n].items() if ao.dirty]
            if not pending:
                return
            n, m = self.rng.choice(pending)
            adv, wd = self.out[n][m].flush(self.ribs[n], 0.0)
            if adv or wd:
                self.messages += 1
                self._changed(m, self.ribs[m].apply_update(n, Update(tuple(adv), tuple(wd)), 0.0))
        raise AssertionError("did not converge")

    def kill(self, node: str) -> None:
        for m in list(self.g[node]):
            del self.out[m][node]
            self._changed(m, self.ribs[m].peer_down(node))
        self.g.remove_node(node)
        del self.ribs[node], self.out[node]

    def check_against_oracle(self, origins: dict[str, str]) -> None:
        for n, rib in self.ribs.items():
            dist = nx.single_source_dijkstra_path_length(self.g, n, weight="w")
            for inst, origin in origins.items():
                best = rib.loc.get(("/svc", origin, inst))
                if origin not in dist:
                    assert best is None, (n, inst)
                    continue
                assert best is not None, (n, inst)
                assert best.latency_us == dist[origin], (n, inst)
                hops = [n] + ([] if best.route.peer is None else list(best.route.adv.path))
                assert hops[-1] == origin and len(set(hops)) == len(hops)
                assert sum(self.g[u][v]["w"] for u, v in zip(hops, hops[1:])) == best.latency_us


@st.composite
def topologies(draw: st.DrawFn) -> nx.Graph:
    n = draw(st.integers(2, 12))
    kind = draw(st.sampled_from(["random", "tree", "ring"]))
    seed = draw(st.integers(0, 2**31))
    if kind == "random":
        g = nx.gnp_random_graph(n, draw(st.floats(0.2, 0.8)), seed=seed)
    elif kind == "tree":
        g = nx.random_labeled_tree(n, seed=seed) if hasattr(nx, "random_labeled_tree") else nx.random_tree(n, seed=seed)
    else:
        g = nx.cycle_graph(n)
    g = nx.relabel_nodes(g, {i: f"g{i}" for i in g})
    for u, v in g.edges:
        g[u][v]["w"] = draw(st.integers(1, 20_000))
    return g


@settings(max_examples=60, deadline=None)
@given(topologies(), st.integers(0, 2**31))
def test_best_path_is_shortest_path(g: nx.Graph, seed: int) -> None:
    rng = random.Random(seed)
    net = Net(g, rng)
    origins = {}
    for i, node in enumerate(rng.sample(sorted(g), k=min(3, len(g)))):
        net.announce(node, f"s{i}")
        origins[f"s{i}"] = node
    net.run()
    net.check_against_oracle(origins)
    # Kill a node that is not an origin: everything learned through it must heal or go.
    others = [n for n in g if n not in origins.values()]
    if others:
        net.kill(rng.choice(others))
        net.run()
        net.check_against_oracle(origins)
    # Kill an origin: its instance disappears everywhere.
    victim = origins.pop("s0")
    net.kill(victim)
    net.run()
    for rib in net.ribs.values():
        assert all(key[1] != victim for key in rib.loc)
    net.check_against_oracle(origins)


def test_loop_is_dropped_and_replaces_the_old_path() -> None:
    rib = Rib("me")
    rib.set_link_cost("p", 100)
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 5, 1.0, 0, 1, 0),)), 0)
    assert len(rib) == 1
    changed = rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 2, LABEL, ("p", "me", "o"), 5, 1.0, 0, 1, 0),)), 0)
    assert changed and len(rib) == 0


def test_path_must_start_with_sender() -> None:
    with pytest.raises(ProtocolError) as ei:
        Rib("me").apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("x", "o"), 5, 1.0, 0, 1, 0),)), 0)
    assert (ei.value.code, ei.value.subcode) == (Code.UPDATE, UpdateSub.BAD_PATH)


def test_max_routes_per_peer() -> None:
    rib = Rib("me", max_routes_per_peer=3)
    advs = tuple(RouteAdv("/svc", f"s{i}", "p", 1, LABEL, ("p",), 0, 1.0, 0, 1, 0) for i in range(4))
    rib.apply_update("p", Update(advs[:3]), 0)
    rib.apply_update("p", Update(advs[:3]), 0)  # re-advertising is no growth
    with pytest.raises(ProtocolError) as ei:
        rib.apply_update("p", Update(advs[3:]), 0)
    assert (ei.value.code, ei.value.subcode) == (Code.CEASE, CeaseSub.MAX_ROUTES)
    rib.apply_update("p", Update(advs[3:], (Withdrawal("/svc", "p", "s0"),)), 0)  # room made in the same UPDATE


def test_attributes_come_from_freshest_seq() -> None:
    rib = Rib("me")
    rib.set_link_cost("near", 10)
    rib.set_link_cost("far", 1000)
    rib.apply_update("near", Update((RouteAdv("/svc", "s", "o", 5, LABEL, ("near", "o"), 0, 1.0, 0.1, 1, 0),)), 0)
    rib.apply_update("far", Update((RouteAdv("/svc", "s", "o", 6, LABEL, ("far", "o"), 0, 1.0, 0.9, 1, 0),)), 0)
    best = rib.loc[("/svc", "o", "s")]
    assert best.route.peer == "near" and best.reason is BestReason.LATENCY
    assert best.fresh.load == 0.9 and best.fresh.seq == 6
    out = rib.export("x", ("/svc", "o", "s"))
    assert out.path == ("me", "near", "o") and out.load == 0.9 and out.latency_us == 10


def test_split_horizon_and_pacing() -> None:
    rib = Rib("me")
    rib.set_link_cost("p", 10)
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),)), 0)
    assert rib.export("p", ("/svc", "o", "s")) is None
    assert rib.export("o", ("/svc", "o", "s")) is None
    ao = AdjRibOut("q", min_interval_s=0.5)
    ao.mark_all(rib)
    assert ao.due(10.0) == 10.0
    adv, wd = ao.flush(rib, 10.0)
    assert len(adv) == 1 and not wd
    ao.mark(rib.peer_down("p"))
    assert ao.due(10.1) == pytest.approx(10.5)
    adv, wd = ao.flush(rib, 10.5)
    assert not adv and wd == [Withdrawal("/svc", "o", "s")]


def test_down_is_an_instance_attribute_and_withdrawn_to_peers_without_the_capability() -> None:
    """routing.md, "Instances that are down": held and propagated, taken from the freshest seq;
    a peer that did not offer instance-down gets a withdrawal instead, and the route back later."""
    from cpnd.selection import candidates, no_live_instance

    rib = Rib("me")
    rib.set_link_cost("p", 10)
    key = ("/svc", "o", "s")
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),)), 0)
    new, old = AdjRibOut("new", 0.0, down_ok=True), AdjRibOut("old", 0.0, down_ok=False)
    for ao in (new, old):
        ao.mark_all(rib)
        assert len(ao.flush(rib, 0)[0]) == 1
    changed = rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 2, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0, down=True),)), 1)
    assert changed == {key} and rib.loc[key].fresh.down and "/svc" in rib.by_service  # still known
    assert candidates(rib, "/svc") == [] and "1 down by health checks" in no_live_instance(rib, "/svc")
    for ao in (new, old):
        ao.mark(changed)
    adv, wd = new.flush(rib, 1)
    assert [a.down for a in adv] == [True] and not wd
    adv, wd = old.flush(rib, 1)
    assert not adv and wd == [Withdrawal(*key)]
    changed = rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 3, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),)), 2)
    old.mark(changed)
    adv, wd = old.flush(rib, 2)
    assert [(a.key, a.down) for a in adv] == [(key, False)] and not wd
    assert len(candidates(rib, "/svc")) == 1


def test_gateway_time_accumulates_like_latency_and_is_stripped_for_old_peers() -> None:
    """routing.md, "Gateway time": `gw` is the best path's plus our own as its transit; our own
    instances carry our egress time; a route without `gw` counts what we take ourselves; a peer
    without gateway-time gets no `gw`."""
    rib = Rib("me")
    rib.set_link_cost("p", 10)
    rib.set_gateway_times(700, 300)
    rib.set_local([RouteAdv("/mine", "m", "me", 1, service_label("/mine"), ("me",), 0, 1.0, 0, 1, 0, gateway_us=700)], 0)
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0, gateway_us=900),
                                  RouteAdv("/svc", "t", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0))), 0)
    assert rib.path_gateway_us(rib.loc[("/svc", "o", "s")].route) == 900
    assert rib.path_gateway_us(rib.loc[("/svc", "o", "t")].route) == 700 + 300  # o's egress and p's transit, as ours
    new, old = AdjRibOut("new", 0.0), AdjRibOut("old", 0.0, gw_ok=False)
    for ao in (new, old):
        ao.mark_all(rib)
    assert {a.instance: a.gateway_us for a in new.flush(rib, 0)[0]} == {"m": 700, "s": 1200, "t": 1300}
    assert {a.instance: a.gateway_us for a in old.flush(rib, 0)[0]} == {"m": None, "s": None, "t": None}
    changed = rib.set_gateway_times(700, 500)  # our transit time moved: every learned route's export changes
    assert changed == {("/svc", "o", "s"), ("/svc", "o", "t")}
    new.mark(changed)
    assert {a.instance: a.gateway_us for a in new.flush(rib, 1)[0]} == {"s": 1400, "t": 1700}
    assert rib.set_gateway_times(700, 500) == set()
    # Only material moves are re-advertised (like link costs): max(250 us, 25 %).
    assert gateway_time_after(500, 740) is None and gateway_time_after(500, 760) == 760
    assert gateway_time_after(4000, 4900) is None and gateway_time_after(4000, 2900) == 2900


def test_tie_breaks_are_deterministic() -> None:
    rib = Rib("me")
    for p in ("b", "a"):
        rib.set_link_cost(p, 100)
        rib.apply_update(p, Update((RouteAdv("/svc", "s", "o", 1, LABEL, (p, "o"), 0, 1.0, 0, 1, 0),)), 0)
    best = rib.loc[("/svc", "o", "s")]
    assert best.route.peer == "a" and best.reason is BestReason.NEXT_HOP


def test_best_path_order_matches_spec() -> None:
    text = (ROOT / "protocol-spec" / "routing.md").read_text()
    documented = re.findall(r"^\d\. \*\*`([a-z-]+)`\*\*", text, flags=re.M)
    assert documented == [reason.value for reason, _ in BEST_PATH_CHAIN]


def test_graceful_restart_keeps_stale_routes_until_end_of_rib() -> None:
    rib = Rib("me")
    key = ("/svc", "o", "s")
    rib.set_link_cost("p", 10)
    rib.set_link_cost("q", 500)
    gone_key = ("/svc", "p", "t")
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),
                                  RouteAdv("/svc", "t", "p", 1, LABEL, ("p",), 0, 1.0, 0, 1, 0))), 0)
    rib.apply_update("q", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("q", "o"), 0, 1.0, 0, 1, 0),)), 0)
    assert rib.loc[key].route.peer == "p"
    changed = rib.peer_stale("p", until=10.0)
    assert changed == {key, gone_key}
    # A live path wins over a stale one whatever its latency; a stale one is kept when it is all there is.
    assert rib.loc[key].route.peer == "q" and rib.loc[key].reason is BestReason.NOT_STALE
    assert rib.loc[gone_key].route.stale and rib.export("x", gone_key) is not None
    assert rib.expire_stale(9.9) == set()
    # p is back: it re-advertises s, then End-of-RIB removes t, which it no longer has.
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 2, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),)), 1.0)
    assert rib.loc[key].route.peer == "p" and not rib.loc[key].route.stale
    assert rib.end_of_rib("p") == {gone_key} and gone_key not in rib.loc
    assert rib.end_of_rib("p") == set()  # only once per restart
    assert "p" not in rib.stale_until


def test_stale_routes_expire_with_the_window() -> None:
    rib = Rib("me")
    rib.set_link_cost("p", 10)
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "p", 1, LABEL, ("p",), 0, 1.0, 0, 1, 0),)), 0)
    rib.peer_stale("p", until=5.0)
    assert len(rib) == 1 and rib.expire_stale(4.0) == set()
    assert rib.expire_stale(5.0) == {("/svc", "p", "s")} and len(rib) == 0
    assert rib.stale_until == {}


def test_lookup_target_by_label_follows_the_loc_rib() -> None:
    rib = Rib("me")
    rib.set_link_cost("p", 10)
    other = service_label("/other")
    rib.apply_update("p", Update((RouteAdv("/svc", "s", "o", 1, LABEL, ("p", "o"), 0, 1.0, 0, 1, 0),
                                  RouteAdv("/other", "t", "o", 1, other, ("p", "o"), 0, 1.0, 0, 1, 0))), 0)
    assert rib.lookup_target(LABEL, "o", "s") == ("/svc", "o", "s")
    assert rib.lookup_target(other, "o", "t") == ("/other", "o", "t")
    assert rib.lookup_target(LABEL, "o", "t") is None and rib.lookup_target(12345, "o", "s") is None
    rib.apply_update("p", Update((), (Withdrawal("/svc", "o", "s"),)), 1)
    assert rib.lookup_target(LABEL, "o", "s") is None
    assert rib.by_label == {other: {"/other"}} and set(rib.by_service) == {"/other"}
    rib.peer_down("p")
    assert rib.by_label == {} and rib.by_service == {}


def test_a_flooded_copy_of_news_already_held_changes_nothing() -> None:
    """The same change through a second peer (same seq, same values) is not news to pass on,
    whichever peer's routes are looked at first; the old behaviour re-marked every peer for it."""
    rib = Rib("me")
    rib.set_link_cost("far", 1000)
    rib.set_link_cost("near", 10)
    key = ("/svc", "o", "s")

    def adv(peer: str, seq: int, load: float) -> Update:
        path = (peer, "o") if peer == "near" else (peer, "x", "o")
        return Update((RouteAdv("/svc", "s", "o", seq, LABEL, path, 0, 50.0, load, 1, 0),))

    rib.apply_update("far", adv("far", 1, 0.1), 0)  # "far" is looked at first from now on
    rib.apply_update("near", adv("near", 1, 0.1), 0)
    assert rib.apply_update("near", adv("near", 2, 0.5), 1) == {key}  # the news, by the best path
    assert rib.loc[key].fresh.load == 0.5
    assert rib.apply_update("far", adv("far", 2, 0.5), 1.01) == set()  # its copy: nothing changed
    assert rib.loc[key].fresh_at == 1  # and it came when the first one did
    assert rib.apply_update("far", adv("far", 3, 0.6), 2) == {key}  # news by either path is news
    assert rib.apply_update("near", adv("near", 3, 0.6), 2.01) == {key}  # (the best path's own route is new)
    assert rib.loc[key].fresh.path == ("far", "x", "o") and rib.loc[key].fresh_at == 2
