"""What an operator meets first, with real processes: busy ports, Ctrl-C on the lab, status and logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cpnd.crypto import generate_key, write_private_key
from cpnd.lab import free_ports


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
