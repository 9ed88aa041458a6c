"""The chaos soak, short: real gateways and instances killed, restarted, cut and reloaded under load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_chaos_soak_loses_nothing_and_heals() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--seconds", "10", "--interval", "1",
                        "--rate", "30", "--seed", "7", "--json"], capture_output=True, text=True, timeout=240)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, (report["lost_examples"], report["tracebacks"], r.stderr[-2000:])
    assert report["lost"] == 0 and not report["tracebacks"]
    assert report["sent"] == report["served"] + report["failed_explicit"] and report["sent"] > 200
    assert sum(report["faults"].values()) >= 5  # faults really happened
    assert report["after_heal"]["served"] > 0 and report["after_heal"]["failed_explicit"] == report["after_heal"]["lost"] == 0
    for gw, u in report["usage"].items():
        if not u["restarted"]:
            assert u["end"]["fds"] - u["start"]["fds"] <= 16, (gw, u)  # sessions and pooled connections, no leak
            assert u["end"]["rss_kib"] - u["start"]["rss_kib"] <= 64 * 1024, (gw, u)
