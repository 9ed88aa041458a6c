"""Batch records with real gateways: a transit between a peer with `tunnel-batch` and one without.

A line a - b - c, c configured ``tunnel_batch = false``: a and b agree on batches, b and c do not. Users
at a call c's instance and users at c call a's, every request through the transit b, which relays
between the two forms; ``show peers`` counts the batch records each session carried.
"""

from __future__ import annotations

import httpx

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

FAST = {"hold_time_ms": 3000, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500}
N = 20  # requests each way


def test_a_transit_between_a_batching_and_a_non_batching_peer_serves_both_ways(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        urls = {i: f"http://127.0.0.1:{insts.start(i)}/" for i in ("sa", "sc")}
        topo = Topology(("a", "b", "c"), (Link("a", "b", 0), Link("b", "c", 0)),
                        (Instance("sa", "a", "/at-a", 1e6, 1, 0), Instance("sc", "c", "/at-c", 1e6, 1, 0)), FAST)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        config = specs["c"].config
        config.write_text(config.read_text().replace("[gateway]\n", "[gateway]\ntunnel_batch = false\n", 1))
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            with httpx.Client(timeout=10) as at_a, httpx.Client(timeout=10) as at_c:
                for i in range(N):
                    r = at_a.get(f"http://{specs['a'].http}/at-c/x?from=a&i={i}")
                    assert (r.status_code, r.headers["cpn-instance"]) == (200, "sc"), r.text
                    r = at_c.get(f"http://{specs['c'].http}/at-a/x?from=c&i={i}")
                    assert (r.status_code, r.headers["cpn-instance"]) == (200, "sa"), r.text
            peers = {gw: {p["id"]: p for p in lab.query(gw, "show-peers")} for gw in ("a", "b", "c")}
            a_b, b_a, b_c, c_b = peers["a"]["b"], peers["b"]["a"], peers["b"]["c"], peers["c"]["b"]
            assert "tunnel-batch" in a_b["caps"] and "tunnel-batch" in b_a["caps"]
            assert "tunnel-batch" not in b_c["caps"] and "tunnel-batch" not in c_b["caps"]
            # a's every request goes as OPEN + DATA in one record (a GET: the whole request is in hand at
            # once), and b takes them as such.
            assert a_b["batches_out"] >= N and b_a["batches_in"] >= N
            # b batches what it relays towards a (c's requests, sc's answers: frames that came in one
            # read) and never towards c, which gets every frame in a record of its own.
            assert b_a["batches_out"] >= 1 and a_b["batches_in"] == b_a["batches_out"]
            assert b_c["batches_out"] == b_c["batches_in"] == c_b["batches_out"] == c_b["batches_in"] == 0
            assert b_c["tunnel_frames_out"] >= 2 * N and c_b["tunnel_frames_out"] >= 2 * N
            assert not lab.dead() and all("Traceback" not in lab.log(gw) for gw in ("a", "b", "c"))
    finally:
        insts.stop_all()
