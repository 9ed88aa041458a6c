"""``[gateway] workers = 2`` with real processes: both workers serve (http and https), an instance's capacity holds across
them under a burst, a killed worker is restarted while the other's keep-alive users go on, status and
metrics add them up, an instance registered at run time is served to the workers' users (through the
control process), and SIGTERM reaps every worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import json
import math

import httpx
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Topology, write_lab

CAPACITY = 20  # req/s for the gateway: 10 per worker
BURST = 80
FAST = {"health_interval_ms": 0, "workers": 2}


@pytest.fixture
def gw(tmp_path):
    insts = InstanceProcs()
    insts.start("l1")
    topo = Topology(("a",), (), (Instance("l1", "a", "/local", capacity=CAPACITY),), FAST)
    specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: all(w["report_age_ms"] is not None for w in workers(lab)), 30, "both workers' reports")
        yield lab, specs["a"].http
    finally:
        lab.stop_all()
        insts.stop_all()


def workers(lab: Lab) -> list[dict]:
    return lab.query("a", "status")["workers"]


def raw_get(sock: socket.socket, path: str = "/local") -> int:
    """One keep-alive GET on ``sock``; its status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return read_status(sock)


def read_status(sock: socket.socket, *, body: bool = True) -> int:
    """One whole response from ``sock`` (every answer here has a Content-Length); its status.
    ``body=False``: the head only (for a body that may trickle or never come)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    if not body:
        return int(head.split(b" ", 2)[1])
    length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(head.split(b" ", 2)[1])


def connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_both_workers_serve_and_status_lists_them(gw) -> None:
    lab, addr = gw
    ws = workers(lab)
    control = lab.query("a", "status")["pid"]
    assert [w["index"] for w in ws] == [0, 1] and all(w["alive"] for w in ws)
    assert len({w["pid"] for w in ws} | {control}) == 3
    for _ in range(60):  # new connections: the kernel spreads them over the workers' sockets
        with connect(addr) as s:
            assert raw_get(s) in (200, 503)
        if all(w["requests"] for w in workers(lab)):
            break
    lab.wait_for(lambda: all(w["requests"] > 0 for w in workers(lab)), 10, "requests answered by both workers")
    shown = subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", "--socket",
                            str(lab.specs["a"].control), "show", "status", "--json"], capture_output=True, text=True, timeout=30)
    assert [w["pid"] for w in json.loads(shown.stdout)["workers"]] == [w["pid"] for w in ws]
    text = subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", "--socket",
                           str(lab.specs["a"].control), "show", "status"], capture_output=True, text=True, timeout=30).stdout
    assert f"2/2 running (pids {ws[0]['pid']}, {ws[1]['pid']}), 0 restarts" in text
    status = lab.query("a", "status")
    assert status["http"]["requests"] == sum(w["requests"] for w in status["workers"])
    metrics = httpx.get(f"http://{lab.specs['a'].metrics}/metrics", timeout=10).text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("cpn_requests_total{"))
    assert counted == status["http"]["requests"]
    # The latency histogram counts the workers' answers too (their reports carry their histograms).
    answered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("cpn_requests_total{") and 'status="200"' in line)
    timed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("cpn_request_seconds_count{"))
    assert timed == answered > 0


def test_capacity_holds_across_workers_under_a_burst(gw) -> None:
    lab, addr = gw
    socks = [connect(addr) for _ in range(BURST)]  # connections of their own: the kernel spreads them
    try:
        t0 = time.monotonic()
        for s in socks:  # every request sent before any is answered
            s.sendall(b"GET /local HTTP/1.1\r\nHost: a\r\n\r\n")
        codes = [read_status(s) for s in socks]
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    ok = codes.count(200)
    # Admission counts the last second: over a burst of ``took`` s at most CAPACITY per started second
    # gets in; a worker blind to the other's sends would let in up to twice that (each its own 20).
    assert ok <= CAPACITY * math.ceil(took), (ok, took)
    assert ok + codes.count(503) == BURST and codes.count(503) > 0
    lab.wait_for(lambda: lab.query("a", "status")["http"].get("admission_rejects", 0) == codes.count(503), 10,
                 "the workers' refusals in status")


def test_a_killed_worker_is_restarted_and_the_others_users_keep_working(gw) -> None:
    lab, addr = gw
    socks: list[socket.socket] = []
    try:
        for _ in range(40):  # keep-alive users until each worker holds some
            s = connect(addr)
            raw_get(s)
            socks.append(s)
            if len(socks) >= 4:
                lab.wait_for(lambda: sum(w["http_clients"] for w in workers(lab)) == len(socks), 10, "reports")
                if all(w["http_clients"] for w in workers(lab)):
                    break
        before = workers(lab)
        assert all(w["http_clients"] for w in before)
        os.kill(before[0]["pid"], signal.SIGKILL)
        answered = 0
        for s in socks:
            try:
                raw_get(s)
                answered += 1
            except (ConnectionError, OSError):
                pass
        assert answered == before[1]["http_clients"]  # the other worker's users, every one of them
        lab.wait_for(lambda: (w := workers(lab)[0])["alive"] and w["pid"] != before[0]["pid"] and w["restarts"] == 1
                     and w["report_age_ms"] is not None, 15, "worker 0 restarted")
        for _ in range(20):  # new users are served by both again
            with connect(addr) as s:
                assert raw_get(s) in (200, 503)
        assert lab.query("a", "status")["stats"]["worker_restarts"] == 1
    finally:
        for s in socks:
            s.close()


def test_sigterm_stops_every_worker(gw) -> None:
    lab, _ = gw
    pids = [w["pid"] for w in workers(lab)]
    assert lab.stop("a") == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_https_listen_is_served_by_the_workers(tmp_path) -> None:
    import ssl

    from tlscerts import CertAuthority

    ca = CertAuthority.create(tmp_path / "ca")
    cert, key = ca.issue(tmp_path / "certs", "gw", ["127.0.0.1"])
    insts = InstanceProcs()
    insts.start("l1")
    topo = Topology(("a",), (), (Instance("l1", "a", "/local", capacity=1e6),), FAST)
    specs = write_lab(topo, tmp_path / "lab", instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    text = specs["a"].config.read_text()
    specs["a"].config.write_text(text.replace("[gateway]\n", f'[gateway]\nhttps_listen = "127.0.0.1:0"\n'
                                              f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n', 1))
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: all(w["report_age_ms"] is not None for w in workers(lab)), 30, "both workers' reports")
        url = lab.query("a", "status")["https_listen"]
        for _ in range(10):
            with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.cert_file)), timeout=10) as c:
                assert c.get(f"https://{url}/local").status_code == 200
        lab.wait_for(lambda: sum(w["requests"] for w in workers(lab)) == 10, 10, "the workers' https requests")
    finally:
        lab.stop_all()
        insts.stop_all()


def _cpnctl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", "--socket",
                           str(lab.specs["a"].control), *args], capture_output=True, text=True, timeout=30)


def test_a_registered_instance_is_served_to_the_workers_users_by_the_control_process(gw) -> None:
    """The workers know their config's instances; one registered at run time (cpnctl register) is in the
    control process only: the workers have its route from the feed and send its requests there."""
    lab, addr = gw
    insts = InstanceProcs()
    try:
        insts.start("x1")
        r = _cpnctl(lab, "register", "--service", "/local", "--id", "x1", "--url",
                    f"http://127.0.0.1:{insts.ports['x1']}/x1", "--capacity", "1000", "--price", "0.1")
        assert r.returncode == 0, r.stderr
        seen: set[str] = set()

        def both() -> bool:  # new connections: the kernel spreads them over the workers
            with connect(addr) as s:
                s.sendall(b"GET /local HTTP/1.1\r\nHost: a\r\nCPN-Prefer: price\r\n\r\n")
                head = s.recv(65536)
            if b" 200 " in head.split(b"\r\n", 1)[0] and b"cpn-instance: x1" in head.lower():
                seen.add("x1")
            return lab.query("a", "status")["http"].get("streams_to_registered", 0) >= 4
        lab.wait_for(both, 20, "the workers' users served by the registered x1")
        assert seen == {"x1"}
        assert _cpnctl(lab, "deregister", "--id", "x1").returncode == 0
        lab.wait_for(lambda: all("x1" not in r["instance"] for r in lab.routes("a")), 10, "x1 withdrawn")
        for _ in range(6):  # the workers forgot it: their own l1 serves again
            with connect(addr) as s:
                s.sendall(b"GET /local HTTP/1.1\r\nHost: a\r\nCPN-Prefer: price\r\n\r\n")
                head = s.recv(65536).lower()
            assert b"cpn-instance: x1" not in head
    finally:
        insts.stop_all()
