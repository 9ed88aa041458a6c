"""Integration: `cpnd lab paper` starts, converges, serves, and keeps both users' constraints."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time

import httpx
import trio

from cpnd.control import request
from cpnd.lab import PAPER_COMPUTE_MS, PAPER_RTT

ORIGIN = {f"s{i}": f"gw{i + 2}" for i in range(1, 6)}
COMPUTE = {f"s{i}": PAPER_COMPUTE_MS[i - 1] for i in range(1, 6)}
U1 = {"CPN-Max-Latency": "10ms", "CPN-Prefer": "price"}
U2 = {"CPN-Prefer": "latency"}


def start_lab(tmp_path) -> tuple[subprocess.Popen, dict[str, str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "cpnd", "lab", "paper", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    http, control = {}, {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if not line or line == "ready":
            break
        http[line.split()[0]] = line.split("http=")[1].split()[0]
        control[line.split()[0]] = line.split("control=")[1].split()[0]
    assert line == "ready", proc.stderr.read() if proc.poll() is not None else line
    return proc, http, control


# A measured RTT includes both gateways' handling of the probe (1-1.6 ms here when quiet, more on a
# loaded CI machine); start-up noise is 2-5 ms over.
SETTLED_MS = 2.5


def settled(control: dict[str, str]) -> bool:
    """Both ingresses measure every path within SETTLED_MS of its emulated RTT (start-up noise filtered out)."""
    for gw in ("gw1", "gw2"):
        for r in request(control[gw], "show-routes"):
            if r["best"] and r["path_latency_ms"] > PAPER_RTT[gw][ORIGIN[r["instance"]]] + SETTLED_MS:
                return False
    return True


async def drive(url: str, headers: dict[str, str], rate: float, seconds: float, out: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=4)) as client:
        async def one() -> None:
            r = await client.post("/yolo", content=b"image", headers=headers)
            out.append((r.status_code, r.headers.get("cpn-instance"), r.json()))

        async with trio.open_nursery() as nursery:
            for _ in range(int(rate * seconds)):
                nursery.start_soon(one)
                await trio.sleep(1 / rate)


def test_paper_lab_serves_both_users_within_their_constraints(tmp_path) -> None:
    proc, http, control = start_lab(tmp_path)
    try:
        # Let the RTT filters settle after the start-up burst of seven processes.
        deadline = time.monotonic() + 40
        while not settled(control):
            assert time.monotonic() < deadline, "path latencies never settled near the emulated RTTs"
            time.sleep(0.1)
        u1: list = []
        u2: list = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive, f"http://{http['gw1']}", U1, 20, 3, u1)
                nursery.start_soon(drive, f"http://{http['gw2']}", U2, 20, 3, u2)

        trio.run(main)
        assert len(u1) == len(u2) == 60
        assert all(status == 200 for status, _, _ in u2), [(s, b) for s, _, b in u2 if s != 200]
        # u1's bound is end to end: on a loaded machine the gateways' own time can leave no instance
        # within 10 ms, and u1 is then told so at once (503 no_instance with the best estimate, or
        # no_capacity from the egress when the time left when the request reached it was too short
        # for the instance's compute), never served over its bound by the gateway's own estimate.
        for status, inst, body in u1:
            if status == 503 and body["error"] == "no_capacity":
                assert re.search(r"expected compute [0-9.]+ ms exceeds the [0-9.]+ ms the latency bound leaves",
                                 body["detail"]), body
                continue
            if status == 503:
                assert body["error"] == "no_instance", body
                m = re.search(r"the best estimate now is ([0-9.]+) ms \((s\d) at (gw\d): path [0-9.]+ ms \+ gateways", body["detail"])
                # (The detail gives 3 significant digits: an estimate just over 9.9 ms reads "9.9".)
                assert m and float(m.group(1)) >= 9.9, body
                continue
            if status == 504:  # the estimate said yes, the machine was slower: cut at the bound, never late
                assert body["error"] == "deadline_exceeded" and "latency bound" in body["detail"], body
                continue
            assert status == 200 and body["instance"] == inst, (status, body)
            # u1's bound: the path's RTT plus the compute the instance reports.
            assert PAPER_RTT["gw1"][ORIGIN[inst]] + body["compute_ms"] <= 10.0, (inst, body)
        assert "s5" not in {inst for _, inst, _ in u1}  # 10 ms away: never within the bound
        # u2 gets the lowest latency as gw2 estimates it (s5 by the model; a loaded machine can measure
        # s5's compute high enough that s3 comes near or wins): mostly the near-equal best (selection.md:
        # within max(0.5 ms, 10 %)), with 2 ms for the view moving during the run. The estimate includes
        # what gw2 observed of each instance lately, so on a busy machine u2 spreads over instances whose
        # estimates come close: only its most used one is checked.
        view = {r["instance"]: r["estimate"]["total_ms"] for r in request(control["gw2"], "show-routes") if r["best"]}
        best_total = min(view.values())
        near_best = {i for i, total in view.items() if total <= best_total + max(0.5, 0.1 * best_total) + 2.0}
        u2_where = collections.Counter(inst for _, inst, _ in u2)
        assert u2_where.most_common(1)[0][0] in near_best, (u2_where, view)
        # Which of s1..s4 u1 gets depends on the gateways' own overhead on this machine: s2 and s4
        # (price 1) sit at 9 ms of the 10 ms bound by network and compute alone, so with the gateways'
        # time u1 pays for s1 or s3. The price ranking itself is tested without timing noise in test_select.
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
