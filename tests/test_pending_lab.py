"""Integration: a kept-alive user's requests, each one's accounting left pending until its next request
went upstream (cpnd/pending.py), are all in what the gateway reports while the connection sits idle
after its last answer, and after a user that hangs up right after one: as when it ran at once."""

from __future__ import annotations

import re
import socket

import httpx

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000,
        "health_interval_ms": 0}


def _one(sock: socket.socket, host: str, path: str) -> None:
    """One GET on a kept-alive connection, its response read whole (a 200 of known length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += sock.recv(65536) or b"!closed"
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    length = int(re.search(rb"\r\ncontent-length: *(\d+)", buf[:end], re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(buf) < end + 4 + length:
        buf += sock.recv(65536) or b"!closed"


def _counts(text: str) -> dict[str, float]:
    """The requests the metrics count, and the latencies they took in, by instance and by service."""
    out = {}
    for m in re.finditer(r'^cpn_requests_total\{instance="(\w*)",service="([^"]*)",status="200"\} (\S+)$', text, re.M):
        out[f"answered {m[1]}"] = float(m[3])
    for m in re.finditer(r'^cpn_request_seconds_count\{service="([^"]*)"\} (\S+)$', text, re.M):
        out[f"timed {m[1]}"] = float(m[2])
    return out


def test_every_answer_is_accounted_while_idle_after_it_and_when_the_user_hangs_up(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        for iid in ("l1", "r1"):
            insts.start(iid)
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("l1", "a", "/local", capacity=10_000), Instance("r1", "b", "/far", capacity=10_000)), FAST)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            host, port = specs["a"].http.rsplit(":", 1)

            def metrics() -> dict[str, float]:
                return _counts(httpx.get(f"http://{specs['a'].metrics}/metrics", timeout=10).text)

            def late() -> int:
                return lab.query("a", "stats")["http"].get("late", 0)

            with socket.create_connection((host, int(port)), timeout=10) as kept:
                for i in range(20):  # our own instance and one a tunnel away, in turn, on one connection
                    _one(kept, specs["a"].http, "/local" if i % 2 == 0 else "/far")
                # The connection waits for a next request, its last answer's accounting still pending:
                # the metrics endpoint's task, and show stats's, have it run before they read.
                assert metrics() == {"answered l1": 10, "answered r1": 10, "timed /local": 10, "timed /far": 10}
                assert late() == 0
                # A user that hangs up right after its answer: the connection's end runs what it left.
                with socket.create_connection((host, int(port)), timeout=10) as brief:
                    for path in ("/far", "/local", "/far"):
                        _one(brief, specs["a"].http, path)
                assert metrics() == {"answered l1": 11, "answered r1": 12, "timed /local": 11, "timed /far": 12}
                _one(kept, specs["a"].http, "/local")  # the first connection goes on
                assert metrics() == {"answered l1": 12, "answered r1": 12, "timed /local": 12, "timed /far": 12}
    finally:
        insts.stop_all()
