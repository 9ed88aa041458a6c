"""cpnctl without a daemon: keys, argument errors, unreachable sockets."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from cpnd.cli import ROUTE_COLUMNS, table
from cpnd.crypto import parse_public_key


def cpnctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=30)


def test_keygen_and_pubkey(tmp_path) -> None:
    key = tmp_path / "gw.key"
    r = cpnctl("keygen", str(key))
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip()
    parse_public_key(pub)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert cpnctl("pubkey", str(key)).stdout.strip() == pub
    again = cpnctl("keygen", str(key))
    assert again.returncode == 1 and "already exists (use --force" in again.stderr
    assert cpnctl("pubkey", str(key)).stdout.strip() == pub  # untouched
    forced = cpnctl("keygen", "--force", str(key))
    assert forced.returncode == 0 and forced.stdout.strip() != pub


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("pubkey", "/nonexistent/k"), 1, "no such file"),
    (("keygen", "/nonexistent/dir/k"), 1, "cannot create"),
    (("--socket", "/nonexistent.sock", "show", "routes"), 1, "no such control socket"),
    (("--socket", "/nonexistent.sock", "show", "routes", "bad path"), 2, "must start with '/'"),
    (("show", "nothing"), 2, "invalid choice"),
])
def test_errors_are_one_line(args, code: int, needle: str) -> None:
    r = cpnctl(*args)
    assert r.returncode == code
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_refused_socket(tmp_path) -> None:
    import socket

    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on: a daemon that died
    r = cpnctl("--socket", str(path), "show", "peers")
    assert r.returncode == 1 and "connection refused (cpnd is not running)" in r.stderr


def test_table_is_aligned() -> None:
    rows = [{"service": "/yolo", "instance": "s1", "origin": "gw3", "next_hop": None, "path": [], "path_latency_ms": 0.0,
             "compute_latency_ms": 1.0, "load": 0.25, "capacity": 50.0, "price": 2.0, "label": 1, "age_s": 3.0, "best": True},
            {"service": "/yolo", "instance": "s22", "origin": "gw13", "next_hop": "gw1", "path": ["gw1", "gw13"],
             "path_latency_ms": 12.5, "compute_latency_ms": 3.0, "load": 0.0, "capacity": 50.0, "price": 1.0, "label": 1,
             "age_s": 3.0, "best": False}]
    lines = table(rows, ROUTE_COLUMNS).splitlines()
    col = lines[0].index("ORIGIN")
    assert lines[1][col:].startswith("gw3") and lines[2][col:].startswith("gw13")
    assert "local" in lines[1] and "gw1 gw13" in lines[2] and "25%" in lines[1]
