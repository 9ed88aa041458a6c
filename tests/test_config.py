"""Config validation: every error is one line naming file, line and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cpnd.config import load_config
from cpnd.crypto import generate_key, public_key_b64, write_private_key
from cpnd.errors import ConfigError

PEER_KEY = public_key_b64(generate_key())


def write(tmp_path, body: str, *, key: bool = True):
    if key:
        write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    path = tmp_path / "gw1.toml"
    path.write_text(body)
    return path


GOOD = f"""\
[gateway]
id = "gw1"
listen = "127.0.0.1:7101"
http_listen = "127.0.0.1:8101"
control_socket = "run/gw1.sock"
key_file = "gw1.key"
selection = "per-request"

[[peers]]
id = "gw3"
address = "127.0.0.1:7103"
public_key = "{PEER_KEY}"
emulated_rtt_ms = 4

[[services]]
path = "/yolo"
[[services.instances]]
id = "s1"
url = "http://127.0.0.1:9001/v1/detect"
capacity = 50
price = 2
compute_latency_ms = 1
"""


def test_good_config(tmp_path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.gateway.id == "gw1"
    assert cfg.gateway.control_socket == tmp_path / "run" / "gw1.sock"  # relative to the file
    assert cfg.gateway.key_file == tmp_path / "gw1.key"
    assert cfg.peers[0].emulated_rtt_ms == 4.0
    assert cfg.services[0].instances[0].capacity == 50.0
    assert cfg.gateway.hold_time_ms == 3000
    off = load_config(write(tmp_path, GOOD.replace('selection = "per-request"', 'selection = "per-request"\nhealth_interval_ms = 0')))
    assert off.gateway.health_interval_ms == 0


@pytest.mark.parametrize(("old", "new", "expected"), [
    (f'public_key = "{PEER_KEY}"', 'public_key = "not base64!"', "gw1.toml:12: peers[0].public_key: not valid base64"),
    (f'public_key = "{PEER_KEY}"', 'public_key = "AAAA"', "gw1.toml:12: peers[0].public_key: must decode to 32 bytes"),
    ('id = "gw3"', 'id = "gw1"', "gw1.toml:10: peers[0].id: 'gw1' is this gateway itself"),
    ('address = "127.0.0.1:7103"', 'address = "127.0.0.1:7101"', "gw1.toml:11: peers[0].address: 127.0.0.1:7101 is this gateway's own listen address"),
    ('address = "127.0.0.1:7103"', 'address = "127.0.0.1"', "gw1.toml:11: peers[0].address: '127.0.0.1' is not HOST:PORT"),
    ('listen = "127.0.0.1:7101"', 'listen = "example.com:7101"', "gw1.toml:3: gateway.listen: 'example.com' is not an IP address"),
    ('selection = "per-request"', 'selection = "random"', "gw1.toml:7: gateway.selection: must be one of"),
    ('selection = "per-request"', 'selecton = "per-request"', "gw1.toml:7: gateway.selecton: unknown key"),
    ('emulated_rtt_ms = 4', 'emulated_rtt_ms = -4', "gw1.toml:13: peers[0].emulated_rtt_ms: must be between 0 and 10000"),
    ('emulated_rtt_ms = 4', 'emulated_rtt_ms = "4"', "gw1.toml:13: peers[0].emulated_rtt_ms: must be an integer or a number"),
    ('capacity = 50', 'capacity = 0', "gw1.toml:20: services[0].instances[0].capacity: must be between"),
    ('path = "/yolo"', 'path = "yolo"', "gw1.toml:16: services[0].path: must start with '/'"),
    ('url = "http://127.0.0.1:9001/v1/detect"', 'url = "ftp://x/"', "gw1.toml:19: services[0].instances[0].url: must be an http:// or https:// URL"),
    ('id = "s1"', 'id = "s 1"', "gw1.toml:18: services[0].instances[0].id: must be 1-64 characters"),
    ('key_file = "gw1.key"', 'key_file = "nope.key"', "gw1.toml:6: gateway.key_file:"),
    ('id = "gw1"', 'id = 1', "gw1.toml:2: gateway.id: must be a string, got int"),
    ('price = 2', 'price = true', "gw1.toml:21: services[0].instances[0].price: must be an integer or a number, got bool"),
    ('[gateway]', '[gateway', "gw1.toml:1: TOML syntax"),
    ('selection = "per-request"', 'selection = "per-request"\nhealth_interval_ms = 10',
     "gw1.toml:8: gateway.health_interval_ms: must be 0 (active probes off) or between 50 and 3600000, got 10"),
    ('selection = "per-request"', 'selection = "per-request"\nlatency_quantile = 1.5',
     "gw1.toml:8: gateway.latency_quantile: must be between 0.5 and 1, got 1.5"),
    ('selection = "per-request"', 'selection = "per-request"\nworkers = 0', "gw1.toml:8: gateway.workers: must be between 1 and 64, got 0"),
    ('selection = "per-request"', 'selection = "per-request"\nworkers = 65', "gw1.toml:8: gateway.workers: must be between 1 and 64, got 65"),
    ('selection = "per-request"', 'selection = "per-request"\nworkers = "many"', """gw1.toml:8: gateway.workers: must be an integer or "auto", got 'many'"""),
    ('selection = "per-request"', 'selection = "per-request"\nworkers = 1.5', "gw1.toml:8: gateway.workers: must be an integer, got float"),
    ('http_listen = "127.0.0.1:8101"', 'workers = 2', "gw1.toml:4: gateway.workers: set above 1 without http_listen"),
    # A relay may queue half a stream window at once after senders stopped at 1 MiB: the buffer must hold it.
    ('selection = "per-request"', 'selection = "per-request"\ntunnel_window_bytes = 8388608\npeer_buffer_bytes = 134217728',
     "gw1.toml:8: gateway.tunnel_window_bytes: max_peer_send_buffer must be >= 1 MiB + max(256 KiB, tunnel_window_bytes / 2) + 64 KiB (5308416)"),
    ('selection = "per-request"', 'selection = "per-request"\nmax_peer_send_buffer = 1048576',
     "gw1.toml:8: gateway.max_peer_send_buffer: max_peer_send_buffer must be >= 1 MiB + max(256 KiB, tunnel_window_bytes / 2) + 64 KiB (1638400)"),
])
def test_errors_name_file_line_and_key(tmp_path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))
    msg = str(ei.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_duplicates(tmp_path) -> None:
    dup_peer = GOOD + f'\n[[peers]]\nid = "gw3"\naddress = "127.0.0.1:7104"\npublic_key = "{PEER_KEY}"\n'
    with pytest.raises(ConfigError, match=r"gw1.toml:25: peers\[1\].id: duplicate peer id 'gw3' \(also peers\[0\]\)"):
        load_config(write(tmp_path, dup_peer))
    dup_inst = GOOD + '\n[[services]]\npath = "/other"\n[[services.instances]]\nid = "s1"\nurl = "http://127.0.0.1:1/"\ncapacity = 1\n'
    with pytest.raises(ConfigError, match=r"gw1.toml:27: services\[1\].instances\[0\].id: duplicate instance id"):
        load_config(write(tmp_path, dup_inst))


def test_missing_gateway_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"gw1.toml: gateway: missing"):
        load_config(write(tmp_path, "[[peers]]\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_cpnd_exits_2_without_traceback(tmp_path) -> None:
    path = write(tmp_path, GOOD.replace('selection = "per-request"', 'selection = 5'))
    r = subprocess.run([sys.executable, "-m", "cpnd", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "cpnd: gw1.toml:7: gateway.selection: must be a string, got int"
    ok = subprocess.run([sys.executable, "-m", "cpnd", "--config", str(write(tmp_path, GOOD)), "--check"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_every_key_is_in_the_readme_configuration_table() -> None:
    import re
    from pathlib import Path

    import attrs

    from cpnd import config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Bounds")]
    documented = {name for cell in re.findall(r"^\| ([^|]+) \|", table, re.M)
                  for name in re.findall(r"`(?:\[\[?[a-z.]+\]\]? )?([a-z_0-9]+)`", cell)}
    keys = {f.name for f in attrs.fields(config.GatewayConfig)} | config._PEER_KEYS | (config._SERVICE_KEYS - {"instances"}) \
        | config._INSTANCE_KEYS | config._CLIENT_KEYS | config._REGISTRAR_KEYS
    assert sorted(keys - documented) == []
