"""Per-peer policy with real gateways: export filters, local preference, shown in show peers."""

from __future__ import annotations

import httpx

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500}


def with_peer_option(spec, peer: str, line: str) -> None:
    text = spec.config.read_text()
    entry = f'[[peers]]\nid = "{peer}"\n'
    assert entry in text
    spec.config.write_text(text.replace(entry, entry + line + "\n"))


def test_export_filters_and_local_pref(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        urls = {i: f"http://127.0.0.1:{insts.start(i)}/" for i in ("s1", "h1")}
        # c reaches a directly (20 ms) or through b (2 ms); a and c tell b only of /svc.
        topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("b", "c", 1), Link("a", "c", 20)),
                        (Instance("s1", "a", "/svc", 1e6, 1, 0), Instance("h1", "a", "/hidden", 1e6, 1, 0)), FAST)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        with_peer_option(specs["a"], "b", 'export = ["/svc"]')
        with_peer_option(specs["c"], "b", 'export = ["/svc"]')
        with_peer_option(specs["c"], "a", "local_pref = 200")
        with Lab(specs) as lab:
            lab.start_all()

            def best(gw: str) -> dict:
                return {r["instance"]: r for r in lab.routes(gw) if r["best"]}

            lab.wait_for(lambda: {"s1", "h1"} <= set(best("c")) and "s1" in best("b")
                         and sum(r["instance"] == "s1" for r in lab.routes("c")) == 2, 20, "both paths to s1 at c")
            assert "h1" not in best("b")  # neither a nor c tells b of /hidden
            s1 = best("c")["s1"]
            assert s1["next_hop"] == "a" and s1["reason"] == "local-pref", s1  # 20 ms, but a is preferred
            assert httpx.get(f"http://{specs['b'].http}/hidden/x", timeout=10).status_code == 404
            r = httpx.get(f"http://{specs['c'].http}/hidden/x", timeout=10)
            assert r.status_code == 200 and r.headers["CPN-Instance"] == "h1"
            peers = {p["id"]: p for p in lab.query("a", "show-peers")}
            assert peers["b"]["export"] == ["/svc"] and peers["b"]["import"] is None and peers["b"]["local_pref"] == 100
            assert {p["id"]: p for p in lab.query("c", "show-peers")}["a"]["local_pref"] == 200
            assert not lab.dead()
    finally:
        insts.stop_all()
