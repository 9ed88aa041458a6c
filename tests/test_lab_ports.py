"""The lab's start when another process takes a port the OS gave it free: every port is chosen anew."""

from __future__ import annotations

import socket

import httpx

from cpnd.lab import InstanceProcs, Instance, Lab, Link, Topology, write_lab


def test_a_port_taken_before_its_gateway_binds_it_gets_the_lab_new_ports(tmp_path) -> None:
    insts = InstanceProcs()
    insts.start("r1")
    topo = Topology(("a", "b"), (Link("a", "b"),), (Instance("r1", "b", "/remote", capacity=1e6),), {"health_interval_ms": 0})
    specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    taken = {"http": specs["a"].http, "listen": specs["b"].listen}
    squatters = []
    for address in taken.values():  # another process binds them first, as one may between free_ports and the start
        s = socket.socket()
        s.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        s.listen()
        squatters.append(s)
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        assert specs["a"].http != taken["http"] and specs["b"].listen != taken["listen"]
        assert "Address already in use" in lab.log("a") + lab.log("b")  # the first start did fail
        r = httpx.get(f"http://{specs['a'].http}/remote", timeout=10)
        assert r.status_code == 200 and r.headers["cpn-instance"] == "r1"
    finally:
        lab.stop_all()
        insts.stop_all()
        for s in squatters:
            s.close()
