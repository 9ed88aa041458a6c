"""What an operator meets first, with real processes: busy ports, Ctrl-C on the lab, status and logs."""

from __future__ import annotations

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
