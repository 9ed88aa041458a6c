"""Graceful shutdown with real processes: in-flight requests finish, new ones are turned away."""

from __future__ import annotations

import signal
import socket

import httpx
import trio

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab


def test_sigterm_drains_in_flight_requests(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        port = insts.start("s1")
        topo = Topology(("a", "b"), (Link("a", "b", 1),), (Instance("s1", "a", "/svc", 1e6, 1, 0),),
                        {"hold_time_ms": 1500, "drain_timeout_ms": 5000})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{port}/")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            host, http_port = specs["a"].http.rsplit(":", 1)
            results: dict[str, object] = {}

            async def main() -> None:
                async with httpx.AsyncClient(timeout=10) as c:
                    async def slow(url: str, key: str) -> None:
                        r = await c.get(url)
                        results[key] = (r.status_code, r.headers.get("cpn-instance"))

                    async with trio.open_nursery() as n:
                        n.start_soon(slow, f"http://{specs['a'].http}/svc?delay=1.5", "local")
                        n.start_soon(slow, f"http://{specs['b'].http}/svc?delay=1.5", "via b")
                        await trio.sleep(0.5)  # both are in flight (the instance takes 1.5 s)
                        lab.procs["a"].send_signal(signal.SIGTERM)
                        t0 = trio.current_time()
                        while trio.current_time() - t0 < 1.0:  # a stops accepting new users
                            try:
                                s = socket.create_connection((host, int(http_port)), timeout=0.2)
                                s.close()
                            except OSError:
                                results["refused"] = True
                                break
                            await trio.sleep(0.05)

            trio.run(main)
            assert results["local"] == (200, "s1") and results["via b"] == (200, "s1")
            assert results.get("refused") is True
            assert lab.procs["a"].wait(10) == 0
            assert "still in flight" not in lab.log("a")
            lab.procs.pop("a")  # exited cleanly: no longer part of the lab
            lab.wait_for(lambda: all(p["state"] != "established" for p in lab.query("b", "show-peers")), 5, "b to see a go")
            assert "admin-shutdown" in lab.log("b")
    finally:
        insts.stop_all()
