"""Instance health: hysteresis and flap damping (sans-IO), and withdrawal network-wide (real processes)."""

from __future__ import annotations

import httpx

from cpnd.health import HealthTracker
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab


def test_hysteresis_and_flap_damping() -> None:
    h = HealthTracker(failures=3, successes=2, hold_down_s=1.0)
    assert not h.result(False, 0.0) and not h.result(False, 0.1)
    assert h.result(False, 0.2) and not h.healthy  # third failure in a row: down
    assert not h.result(True, 0.3) and not h.result(True, 0.4)  # inside the 1 s hold-down
    assert h.result(True, 1.3) and h.healthy  # two successes after the hold-down
    for t in (2.0, 2.1, 2.2):
        h.result(False, t)
    assert not h.healthy and h.hold_down(2.2) == 2.0  # second flap: hold-down doubled
    assert not h.result(True, 3.0) and not h.result(True, 4.0)
    assert h.result(True, 4.3) and h.healthy
    assert h.hold_down(400.0) == 1.0  # flaps are forgotten after 5 minutes


def _route(lab: Lab, gw: str, iid: str) -> dict | None:
    return next((r for r in lab.routes(gw) if r["instance"] == iid and r["best"]), None)


def test_dead_instance_is_marked_down_and_restored(tmp_path) -> None:
    """Health checks take the only instance out: its service stays known, 503 no_instance at the
    origin and at a remote gateway (clients retry a 503, not a 404); an unknown path is still 404."""
    insts = InstanceProcs()
    try:
        port = insts.start("s1")
        topo = Topology(("a", "b"), (Link("a", "b", 1),), (Instance("s1", "b", "/svc"),),
                        {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "health_interval_ms": 200})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{port}/")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            insts.kill("s1")
            lab.wait_for(lambda: (_route(lab, "a", "s1") or {}).get("down"), 10, "s1 marked down at a")
            assert _route(lab, "b", "s1")["down"]
            for gw in ("b", "a"):  # the origin, and a gateway that learnt the service from it
                r = httpx.get(f"http://{specs[gw].http}/svc/x", timeout=10)
                assert r.status_code == 503 and r.json()["error"] == "no_instance", (gw, r.text)
                assert "down by health checks" in r.json()["detail"] and "cpn-instance" not in r.headers
                r = httpx.get(f"http://{specs[gw].http}/elsewhere", timeout=10)
                assert r.status_code == 404 and r.json()["error"] == "no_such_service"
            insts.start("s1", port=port)
            lab.wait_for(lambda: not (_route(lab, "a", "s1") or {"down": True})["down"], 10, "s1 back")
            r = httpx.get(f"http://{specs['a'].http}/svc/x", timeout=10)
            assert r.status_code == 200 and r.headers["cpn-instance"] == "s1"
            assert "instance s1 is unhealthy" in lab.log("b") and "healthy again" in lab.log("b")
    finally:
        insts.stop_all()
