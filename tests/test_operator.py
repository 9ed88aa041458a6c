"""What an operator meets first, with real processes: busy ports, Ctrl-C on the lab, status and logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cpnd.crypto import generate_key, write_private_key
from cpnd.lab import Instance, InstanceProcs, Lab, Topology, free_ports, write_lab


def _gateway(tmp_path: Path, **over: str) -> tuple[Path, dict[str, str]]:
    """A one-gateway config with every listener, ``over`` replacing some; its file and addresses."""
    write_private_key(tmp_path / "gw.key", generate_key(), force=True)
    ports = free_ports(3)
    addrs = {"listen": f"127.0.0.1:{ports[0]}", "http_listen": f"127.0.0.1:{ports[1]}",
             "metrics_listen": f"127.0.0.1:{ports[2]}", "control_socket": str(tmp_path / "gw.sock"), **over}
    lines = ["[gateway]", 'id = "gw"', 'key_file = "gw.key"'] + [f'{k} = "{v}"' for k, v in addrs.items()]
    cfg = tmp_path / "gw.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, addrs


@pytest.mark.parametrize("key", ["listen", "http_listen", "metrics_listen", "control_socket"])
def test_a_busy_listener_is_one_line_and_exit_1(tmp_path, key: str) -> None:
    cfg, addrs = _gateway(tmp_path)
    if key == "control_socket":
        busy = socket.socket(socket.AF_UNIX)
        busy.bind(addrs[key])  # another daemon, serving it
    else:
        host, port = addrs[key].rsplit(":", 1)
        busy = socket.socket()
        busy.bind((host, int(port)))
    busy.listen()
    try:
        r = subprocess.run([sys.executable, "-m", "cpnd", "--config", str(cfg)], capture_output=True, text=True,
                           timeout=30)
    finally:
        busy.close()
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"cpnd: {key} {addrs[key]}: Address already in use\n"
    if key != "control_socket":
        assert not Path(addrs["control_socket"]).exists()  # what did open is closed and removed again


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def test_ctrl_c_on_the_lab_is_quiet_and_reaps_every_child(tmp_path) -> None:
    topo = tmp_path / "small.toml"
    topo.write_text('[[gateways]]\nid = "a"\n[[gateways]]\nid = "b"\n[[links]]\na = "a"\nb = "b"\nrtt_ms = 2\n'
                    '[[instances]]\nid = "s1"\ngateway = "b"\nservice = "/svc"\n')
    # Its own process group, as a shell gives a foreground job: Ctrl-C is SIGINT to the whole group.
    proc = subprocess.Popen([sys.executable, "-m", "cpnd", "lab", str(topo)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read() if proc.poll() is not None else "")
            lines.append(line.strip())
        children = _children(proc.pid)
        assert len(children) == 3  # two gateways, one process for the instances
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "ExceptionGroup" not in err and "KeyboardInterrupt" not in err, err
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]  # every one reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_on_a_simulated_instance_is_quiet() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cpnd.simulate", "--id", "s1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("listening ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0 and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def lone(tmp_path):
    """One real gateway with an HTTP ingress (no peers, no instances): what a client meets first."""
    topo = Topology(("a",), (), ())
    with Lab(write_lab(topo, tmp_path)) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.query("a", "status") is not None, 10, "a to answer")
        host, port = lab.specs["a"].http.rsplit(":", 1)
        yield lab, (host, int(port))


def _exchange(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, read until the gateway closes (bounded)."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_a_tls_client_hello_gets_a_plain_400_and_one_line(lone) -> None:
    lab, addr = lone
    with socket.create_connection(addr, timeout=5) as raw:
        ctx = ssl.create_default_context()
        with pytest.raises(ssl.SSLError):  # what a TLS client sees: not TLS here
            ctx.wrap_socket(raw, server_hostname="localhost")
    answer = _exchange(addr, bytes.fromhex("160301002a0100002603035a") + b"\x00" * 40)  # a ClientHello's start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "bad_request", "detail": "this port speaks plain HTTP, not TLS: use http://"}
    lab.wait_for(lambda: lab.log("a").count("TLS ClientHello") == 2, 5, "one line per connection")


def test_malformed_requests_and_broken_exchanges_leave_no_h11_internals(lone) -> None:
    lab, addr = lone
    answer = _exchange(addr, b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body == {"error": "bad_request", "detail": "malformed HTTP/1.1 request: illegal header line"}
    # A client that pipelines requests whose (error) answers it never reads, then resets: the gateway's
    # write fails half-way through an answer. That connection must just end (h11 used to be asked to
    # start another exchange from the broken one: "not in a reusable state. self.states={...}").
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(addr)
        s.settimeout(0.5)
        req = b"GET /" + b"n" * 60000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"  # each 404 echoes the 60 KB path
        try:
            for _ in range(200):
                s.sendall(req)
        except TimeoutError:
            pass  # both directions full: the gateway is stuck writing an answer
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset
    lab.wait_for(lambda: lab.query("a", "status")["http_clients"] == 0, 10, "the connections to end")
    log = lab.log("a")
    assert "404 no_such_service" in log
    for needle in ("LocalProtocolError", "self.states", "bytearray", "Traceback"):
        assert needle not in log, needle


def test_refusals_log_a_bounded_number_of_lines_and_no_next_candidate_when_none(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        port = insts.start("s1")
        topo = Topology(("a",), (), (Instance("s1", "a", "/svc", 2, 1, 0),))  # capacity 2/s: a hard cap
        with Lab(write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{port}/")) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 10, "a to advertise s1")
            with httpx.Client(base_url=f"http://{lab.specs['a'].http}", timeout=10) as c:
                statuses = [c.get("/svc").status_code for _ in range(60)]
            assert statuses.count(200) <= 4 and statuses.count(503) >= 56
            lab.wait_for(lambda: "more failed-attempt lines suppressed" in lab.log("a"), 5, "the count of the rest")
            log = lab.log("a")
            attempts = [ln for ln in log.splitlines() if "via a/s1 failed: stream reset: REFUSED" in ln]
            assert 10 <= len(attempts) < 56 and "trying the next candidate" not in log  # s1 was the only one
    finally:
        insts.stop_all()


def cpnctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def test_status_stats_the_up_line_and_the_process_name(lone) -> None:
    lab, _ = lone
    spec = lab.specs["a"]
    # cpnctl finds the socket from the gateway's config by the rule cpnd uses (<id>.sock beside it here).
    r = cpnctl("--config", str(spec.config), "show", "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len({len(ln) - len(ln.split(None, 1)[1]) for ln in lines}) == 1, r.stdout  # values in one column
    values = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines}
    pid = lab.query("a", "status")["pid"]
    assert values["gateway"] == f"a (cpnd 0.1.0, pid {pid})" and values["http_listen"] == spec.http
    assert values["listen"] == spec.listen and values["control_socket"] == str(spec.control)
    assert values["peers"] == "0/0 established" and values["metrics_listen"] == spec.metrics
    status = json.loads(cpnctl("--socket", str(spec.control), "show", "status", "--json").stdout)
    assert status["id"] == "a" and status["version"] == "0.1.0" and "stats" not in status
    stats = json.loads(cpnctl("--socket", str(spec.control), "show", "stats", "--json").stdout)
    assert set(stats) == {"gateway", "http", "gauges"} and stats["gauges"]["http_clients"] == 0
    env = {**os.environ, "CPN_SOCKET": str(spec.control)}
    text = cpnctl("show", "stats", env=env).stdout
    assert text.splitlines()[0].split() == ["COUNTER", "VALUE"] and "gauges.http_clients" in text
    assert "{" not in r.stdout + text  # tables, never dict reprs
    assert (f"a up: peers on {spec.listen}, http on {spec.http}, metrics on {spec.metrics}, "
            f"control socket {spec.control}; 0 peers, 0 local instances") in lab.log("a")
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "cpnd"  # what ps -e and pgrep match, not python3
    assert str(pid) in subprocess.run(["pgrep", "-x", "cpnd"], capture_output=True, text=True).stdout.split()


def test_cpnctl_needs_to_be_told_which_gateway(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CPN_SOCKET"}
    r = cpnctl("show", "routes", env=env)
    assert r.returncode == 2 and "which gateway?" in r.stderr
    cfg = tmp_path / "gw7.toml"
    cfg.write_text('[gateway]\nid = "gw7"\nlisten = "127.0.0.1:1"\nkey_file = "none.key"\n')
    r = cpnctl("--config", str(cfg), "show", "peers", env=env)  # no daemon: the path it looked for, by cpnd's rule
    assert r.returncode == 1 and f"{tmp_path / 'gw7.sock'}: no such control socket" in r.stderr
