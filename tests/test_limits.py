"""Slow clients and connection floods: bounded, and never at the cost of other work."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

OPTS = {"hold_time_ms": 1500, "http_header_timeout_ms": 500, "http_idle_timeout_ms": 700, "max_http_clients": 8,
        "handshake_timeout_ms": 700}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    insts = InstanceProcs()
    port = insts.start("s1")
    topo = Topology(("a", "b"), (Link("a", "b", 0),), (Instance("s1", "b", "/svc", 1e6, 1, 0),), OPTS)
    specs = write_lab(topo, tmp_path_factory.mktemp("limits"), instance_url=lambda i: f"http://127.0.0.1:{port}/")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
        yield lab, specs
    finally:
        lab.stop_all()
        insts.stop_all()


def _addr(hostport: str) -> tuple[str, int]:
    h, p = hostport.rsplit(":", 1)
    return h, int(p)


def _closed_within(s: socket.socket, seconds: float) -> float:
    s.settimeout(seconds)
    t0 = time.monotonic()
    while s.recv(65536):
        pass
    return time.monotonic() - t0


def test_slow_loris_head_is_cut_off(lab) -> None:
    _, specs = lab
    s = socket.create_connection(_addr(specs["a"].http))
    s.sendall(b"GET /svc HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert _closed_within(s, 5) < 2.0  # header timeout 0.5 s
    s.close()


def test_idle_keep_alive_is_closed(lab) -> None:
    _, specs = lab
    s = socket.create_connection(_addr(specs["a"].http))
    s.sendall(b"GET /svc HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(5)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    assert _closed_within(s, 5) < 2.0  # idle timeout 0.7 s
    s.close()


def test_client_flood_is_bounded_and_service_continues(lab) -> None:
    lab_, specs = lab
    socks = [socket.create_connection(_addr(specs["a"].http)) for _ in range(20)]
    try:
        lab_.wait_for(lambda: lab_.query("a", "status")["http_clients"] == 8, 5, "the client limit to fill")
        refused = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                refused += s.recv(1) == b""
            except (socket.timeout, TimeoutError):
                pass
            except ConnectionResetError:
                refused += 1
        assert refused >= 12  # max_http_clients = 8
    finally:
        for s in socks:
            s.close()
    r = httpx.get(f"http://{specs['a'].http}/svc", timeout=10)
    assert r.status_code == 200


def test_peer_port_flood_leaves_sessions_up(lab) -> None:
    lab_, specs = lab
    before = lab_.query("a", "show-peers")[0]
    socks = [socket.create_connection(_addr(specs["a"].listen)) for _ in range(80)]
    try:
        for s in socks[:10]:
            s.sendall(b"\x00\x00\x00\x05hello")  # garbage handshakes too
        deadline = time.monotonic() + 5
        for s in socks:  # every one is closed: at once beyond 64, or by the handshake timeout
            assert _closed_within(s, max(0.1, deadline - time.monotonic())) < 5
    finally:
        for s in socks:
            s.close()
    after = lab_.query("a", "show-peers")[0]
    assert after["state"] == "established" and after["flaps"] == before["flaps"]
    # 80 - 64 allowed at once - the 10 garbage ones closed early: some were refused at the door.
    assert lab_.query("a", "status")["stats"].get("connections_refused", 0) > 0
