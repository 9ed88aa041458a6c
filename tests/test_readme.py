"""README.md's examples, run as written: the complete gateway config and the three-gateway deployment."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpnd.config import load_config
from cpnd.crypto import generate_key, write_private_key

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(name: str) -> str:
    m = re.search(rf"<!-- example:{name} -->\n(.*?)<!-- /example:{name} -->", README, re.S)
    assert m, f"README.md has no example:{name} markers"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def ports_outside_ephemeral_range(n: int) -> list[int]:
    """``n`` ports free now below the kernel's ephemeral range: bound later by the example's processes,
    they cannot meanwhile become the source port of one of their own outgoing connections."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    out: list[int] = []
    for candidate in random.Random().sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        out.append(candidate)
        if len(out) == n:
            return out
    raise RuntimeError("no free ports below the ephemeral range")


def test_the_complete_gateway_config_is_valid(tmp_path) -> None:
    (toml,) = blocks(section("gateway-toml"), "toml")
    (tmp_path / "gw1.toml").write_text(toml)
    write_private_key(tmp_path / "gw1.key", generate_key())
    config = load_config(tmp_path / "gw1.toml")
    assert [p.id for p in config.peers] == ["gw2", "gw3"]
    assert [i.id for s in config.services for i in s.instances] == ["s1", "s2"]
    assert str(config.gateway.control_socket) == "/run/cpn/gw1.sock"


def test_the_three_gateway_example_runs_as_written(tmp_path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the example calls curl")
    setup, run, tryit = blocks(section("three-gateways"), "sh")
    # The README's fixed ports become ports the OS says are free, the same everywhere they appear.
    fixed = ["7101", "7102", "7103", "8101", "8102", "8103", "9001"]
    port = dict(zip(fixed, map(str, ports_outside_ephemeral_range(len(fixed)))))

    def ports(text: str) -> str:
        return re.sub(r"(?<=[:\s])(7101|7102|7103|8101|8102|8103|9001)\b", lambda m: port[m.group(1)], text)

    setup, run, tryit = ports(setup), ports(run), ports(tryit)
    # `. .venv/bin/activate` from the repository root: here, the interpreter running the tests.
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if k != "CPN_SOCKET"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok (") == 3  # cpnd --check of each config
    demo = tmp_path / "demo"
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    procs = []
    try:
        for line in run.strip().splitlines():  # each a long-running process, as in its own terminal
            log = open(demo / f"{len(procs)}.log", "wb")
            procs.append(subprocess.Popen(["bash", "-c", "exec " + line], cwd=demo, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()

        def learnt() -> bool:
            r = subprocess.run(["cpnctl", "--config", "gw1.toml", "show", "routes", "--json"], cwd=demo, env=env,
                               capture_output=True, text=True, timeout=10)
            return r.returncode == 0 and any(x["instance"] == "e1" and x["best"] for x in json.loads(r.stdout))

        deadline = time.monotonic() + 30
        while not learnt():
            assert all(p.poll() is None for p in procs), [(demo / f"{i}.log").read_text() for i in range(len(procs))]
            assert time.monotonic() < deadline, "gw1 never learnt /echo"
            time.sleep(0.1)
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", tryit], cwd=demo, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        routes = out[:out.index("HTTP/1.1")]
        row = next(ln.split() for ln in routes.splitlines() if " e1 " in f" {ln} ")
        assert row[:6] == ["/echo", "e1", "gw3", "gw2", "gw2", "gw3"] and "*" in row, routes
        head, _, rest = out[out.index("HTTP/1.1"):].partition("\n\n")  # text mode: \r\n read as \n
        assert head.startswith("HTTP/1.1 200 OK") and "cpn-instance: e1" in head and "cpn-origin: gw3" in head, head
        answer, _ = json.JSONDecoder().raw_decode(rest)  # curl adds no newline: the peers table follows
        assert answer["instance"] == "e1" and answer["path"] == "/v1/hello" and answer["body_bytes"] == 2
        peers = rest[rest.index("PEER"):]
        assert re.search(r"^gw2\s+127\.0\.0\.1:\d+\s+established", peers, re.M), peers
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert not list(demo.glob("*.sock"))  # each gateway removed its control socket
