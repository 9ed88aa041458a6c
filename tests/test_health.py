"""Instance health: hysteresis and flap damping (sans-IO), and withdrawal network-wide (real processes)."""

from __future__ import annotations

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


def test_dead_instance_is_withdrawn_and_restored(tmp_path) -> None:
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
            lab.wait_for(lambda: not any(r["instance"] == "s1" for r in lab.routes("a")), 10, "s1 withdrawn at a")
            insts.start("s1", port=port)
            lab.wait_for(lambda: any(r["instance"] == "s1" and r["best"] for r in lab.routes("a")), 10, "s1 back")
            assert "instance s1 is unhealthy" in lab.log("b") and "healthy again" in lab.log("b")
    finally:
        insts.stop_all()
