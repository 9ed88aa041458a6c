"""Reload (cpnctl reload and SIGHUP) with real processes: peers and services change, nothing else moves."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx

from cpnd.lab import Instance, Lab, Link, Topology, write_lab
from test_fairshare import one_gateway

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500}


def cpnctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=30)


def without_peer(text: str, peer: str) -> str:
    return re.sub(r'\n\[\[peers\]\]\nid = "%s"\n(?:[^\[\n][^\n]*\n)*' % peer, "\n", text)


def without_services(text: str) -> str:
    return text.split("\n[[services]]")[0] + "\n"


def test_reload_adds_and_removes_peers_and_services(tmp_path) -> None:
    topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("a", "c", 1)),
                    (Instance("s1", "a", "/svc"), Instance("s2", "c", "/svc")), FAST)
    specs = write_lab(topo, tmp_path)
    full = specs["a"].config.read_text()
    specs["a"].config.write_text(without_peer(full, "c"))
    sock = str(specs["a"].control)

    def peers(gw: str) -> dict:
        return {p["id"]: p for p in lab.query(gw, "show-peers")}

    def instances(gw: str) -> set:
        return {r["instance"] for r in lab.routes(gw) if r["best"]}

    with Lab(specs) as lab:
        lab.start_all()
        lab.wait_for(lambda: peers("a")["b"]["state"] == "established" and "s1" in instances("b"), 20, "a-b up")
        assert "c" not in peers("a")
        b_before = peers("a")["b"]

        specs["a"].config.write_text(full)
        r = cpnctl("--socket", sock, "reload")  # c added
        assert r.returncode == 0 and "peers +1 -0 ~0 (+c)" in r.stdout, r.stderr
        assert "gateway keys changed: none" in r.stdout and f"cpnctl reload: {r.stdout.strip()}" in lab.log("a")
        lab.wait_for(lambda: peers("a").get("c", {}).get("state") == "established" and "s2" in instances("b"), 20, "a-c up")
        b_after = peers("a")["b"]
        assert b_after["flaps"] == b_before["flaps"] and b_after["uptime_s"] > b_before["uptime_s"]  # untouched

        specs["a"].config.write_text(full.replace('selection = "per-request"', 'selection = "sometimes"'))
        r = cpnctl("--socket", sock, "reload")
        assert r.returncode == 1 and "a.toml:" in r.stderr and "gateway.selection: must be one of" in r.stderr
        assert "the old one keeps running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert peers("a")["c"]["state"] == "established"

        specs["a"].config.write_text(full.replace('listen = "', 'listen = "127.0.0.2:1" #"', 1))
        r = cpnctl("--socket", sock, "reload")
        assert r.returncode == 1 and "gateway.listen: changing it needs a restart" in r.stderr
        assert "cpnctl reload: new config refused, the old one keeps running" in lab.log("a")

        specs["a"].config.write_text(without_services(full))  # s1 gone, by SIGHUP this time
        lab.procs["a"].send_signal(signal.SIGHUP)
        lab.wait_for(lambda: "s1" not in instances("b") and "s1" not in instances("c"), 10, "s1 withdrawn")
        assert "SIGHUP: reloaded a.toml: peers +0 -0 ~0, instances +0 -1 ~0 (-s1)" in lab.log("a")
        assert peers("a")["b"]["flaps"] == b_before["flaps"]

        specs["a"].config.write_text(without_peer(full, "b"))  # b removed: its session ends with Cease
        r = cpnctl("--socket", sock, "reload")
        assert r.returncode == 0 and "peers +0 -1 ~0 (-b)" in r.stdout
        lab.wait_for(lambda: "a" not in {p["id"] for p in lab.query("b", "show-peers") if p["state"] == "established"},
                     10, "b to lose a")
        assert "peer-deconfigured" in peers("b")["a"]["last_error"] or "peer-deconfigured" in lab.log("b")
        assert not lab.dead()


def test_a_reloaded_compute_latency_is_used_at_once(tmp_path) -> None:
    """``compute_latency_ms`` changed by a reload is the instance's compute at once: it was taken only
    at the next answer, and an instance made 300 ms (out of a 200 ms bound: no answer comes) stayed
    300 ms after a reload back to 1 ms, every tight request 503 no_instance."""
    with one_gateway(tmp_path, 10_000) as (lab, url):
        config = lab.specs["a"].config
        fast = config.read_text()
        assert "compute_latency_ms = 1\n" in fast
        tight = {"CPN-Max-Latency": "200ms"}
        with httpx.Client(base_url=url, timeout=10) as c:
            for text, status in ((fast.replace("compute_latency_ms = 1\n", "compute_latency_ms = 300\n"), 503),
                                 (fast, 200)):
                config.write_text(text)
                r = cpnctl("--socket", str(lab.specs["a"].control), "reload")
                assert r.returncode == 0 and "instances +0 -0 ~1 (~l1)" in r.stdout, r.stderr
                assert c.get("/local", headers=tight).status_code == status
