"""Integration: an admitted request holds its instance's capacity until a second after its answer,
not a second after the admission guard (``admission_guard_ms``; cpnd/load.py, SlotHolds)."""

from __future__ import annotations

import time

import httpx

from cpnd.lab import Instance, InstanceProcs, Lab, Topology, write_lab

GUARD_MS = 10_000  # the most the key takes: without the answer ending the hold, a slot would stay taken 11 s


def test_an_answer_frees_the_slot_long_before_the_guard(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        insts.start("l1")
        topo = Topology(("a",), (), (Instance("l1", "a", "/local", capacity=1),),
                        {"health_interval_ms": 0, "admission_guard_ms": GUARD_MS})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "the gateway's route to l1")
            url = f"http://{specs['a'].http}/local"
            with httpx.Client(timeout=10) as client:
                first = client.get(url)
                assert first.status_code == 200 and first.headers["cpn-instance"] == "l1"
                # Capacity 1: the slot is taken until a second after that answer; then free again,
                # ten seconds before the guard alone would free it. Polled, bounded well below that.
                deadline = time.monotonic() + 6
                statuses = []
                while time.monotonic() < deadline:
                    r = client.get(url)
                    statuses.append(r.status_code if r.status_code == 200 else r.json()["error"])
                    if r.status_code == 200:
                        break
                    time.sleep(0.05)  # pacing the poll, not synchronisation
                assert statuses[-1] == 200, statuses
                assert set(statuses[:-1]) <= {"no_capacity"}, statuses
    finally:
        insts.stop_all()
