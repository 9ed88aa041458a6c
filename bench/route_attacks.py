"""Hostile routing peers against real gateways: a route limit that would spill over, and churn.

    python bench/route_attacks.py [spill|churn|both] [--rate 47000] [--seconds 5] [--keys 500]
                                  [--path /svc] [--json]

Two real gateways on loopback: ``a`` (the target, with an instance of its own, ``/own``) and ``b``
(an honest peer with ``/svc``), defaults everywhere; ``x`` logs in to ``a`` as a peer from outside
with the interop suite's wire client (a second implementation of the protocol).

* spill: x sends exactly a's ``max_routes_per_peer`` (10,000) routes, then one more. Reported:
  b's session with a (flaps, whether b still has a's own instance, routes a withholds from b),
  and what x gets for the route over the limit.
* churn: an honest user sends GETs at 100/s through a (to ``--path``: ``/svc`` goes on to b's
  instance, ``/own`` stays at a) for ``--seconds``, first alone (baseline), then while x
  advertises and withdraws ``--keys`` routes (one UPDATE of ``--keys`` entries each way) at
  ``--rate`` route entries/s for ``--seconds``. Reported: a's CPU (share of one core, from
  /proc) and RSS, the user's success and p50/p99 both times, the sessions' flaps, what x
  offered and what a took. a's CPU share counts the user's requests too (baseline: those alone).

The user runs in a process of its own (the attacker's loop would otherwise hold its GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab  # noqa: E402
from interop.wire import KEEPALIVE, UPDATE, Closed, Peer, load_key, new_route, pack, parse_pub  # noqa: E402

USER = """
import json, sys, time
import httpx
url, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
out, nxt, end = [], time.monotonic(), time.monotonic() + seconds
with httpx.Client(timeout=10) as c:
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            ok = c.get(url).status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append((time.monotonic() - t0, ok))
        nxt += 1 / rate
        time.sleep(max(0.0, nxt - time.monotonic()))
print(json.dumps(out))
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def user(url: str, seconds: float, rate: float = 100) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", USER, url, str(seconds), str(rate)], capture_output=True, text=True, check=True)
    samples = json.loads(r.stdout)
    lat = sorted(s * 1000 for s, ok in samples if ok)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2) if lat else None

    return {"requests": len(samples), "ok": sum(ok for _, ok in samples), "p50_ms": pct(50), "p99_ms": pct(99)}


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.insts = InstanceProcs()
        urls = {"sa": f"http://127.0.0.1:{self.insts.start('sa')}/", "sb": f"http://127.0.0.1:{self.insts.start('sb')}/"}
        self.topo = Topology(("a", "b"), (Link("a", "b", 0),),
                             (Instance("sa", "a", "/own", 1e6, 1, 0), Instance("sb", "b", "/svc", 1e6, 1, 0)))
        self.specs = write_lab(self.topo, tmp, instance_url=lambda i: urls[i.id])
        add_outside_peer(self.specs["a"], "x", tmp / "x.key")
        self.key = load_key(str(tmp / "x.key"))
        self.lab = Lab(self.specs)
        self.lab.start_all()
        self.lab.wait_for(lambda: self.lab.converged(self.topo), 30, "convergence")

    def attacker(self) -> Peer:
        host, port = self.specs["a"].listen.rsplit(":", 1)
        p = Peer((host, int(port)), "a", parse_pub(self.specs["a"].public_key), "x", self.key, timeout=30)
        p.open_session(caps=["route-refresh", "tunnel", "route-limits"])
        return p

    def peer(self, gw: str, pid: str) -> dict[str, Any]:
        return {p["id"]: p for p in self.lab.query(gw, "show-peers")}[pid]

    def close(self) -> None:
        self.lab.stop_all()
        self.insts.stop_all()


def keepalives(p: Peer, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        try:
            p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
        except OSError:
            return


def spill(s: Setup, seconds: float) -> dict[str, Any]:
    p = s.attacker()
    limit = p.target_limits["routes"] if p.target_limits else 10_000  # a's LIMITS, or the default before them
    stop = threading.Event()
    threading.Thread(target=keepalives, args=(p, stop), daemon=True).start()
    for start in range(0, limit, 400):
        p.send_msg({"t": UPDATE, "adv": [new_route(f"/x{n % 50}", f"i{n}", "x") for n in range(start, start + 400)], "wd": []})
    s.lab.wait_for(lambda: s.peer("a", "x")["routes_received"] == limit, 30, "a to take x's routes")
    time.sleep(seconds)  # what b's session does meanwhile is the result
    ba, ab = s.peer("b", "a"), s.peer("a", "b")
    out: dict[str, Any] = {
        "x_routes_at_a": limit, "b_session": ba["state"], "b_flaps": ba["flaps"], "b_routes_from_a": ba["routes_received"],
        "b_has_a_own_instance": any(r["origin"] == "a" for r in s.lab.routes("b")),
        "a_withholds_from_b": ab.get("routes_withheld"), "seconds_watched": seconds,
    }
    stop.set()
    p.send_msg({"t": UPDATE, "adv": [new_route("/x0", "one-more", "x")], "wd": []})
    try:
        err = p.expect_error(10.0)
    except AssertionError as exc:
        err = str(exc)
    out["x_one_over"] = err
    out["b_flaps_after"] = s.peer("b", "a")["flaps"]
    p.close()
    return out


def churn(s: Setup, rate: float, seconds: float, keys: int, path: str) -> dict[str, Any]:
    pid = s.lab.procs["a"].pid
    url = f"http://{s.specs['a'].http}{path}"
    cpu0, t0 = cpu_s(pid), time.monotonic()
    base = user(url, seconds)
    base_cpu = (cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    p = s.attacker()
    up = pack({"t": UPDATE, "adv": [new_route(f"/x{n % 50}", f"c{n}", "x") for n in range(keys)], "wd": []})
    down = pack({"t": UPDATE, "adv": [], "wd": [[f"/x{n % 50}", "x", f"c{n}"] for n in range(keys)]})
    result: dict[str, Any] = {}
    done = threading.Event()

    def flood() -> None:
        sent, nxt, start, last_ka = 0, time.monotonic(), time.monotonic(), 0.0
        try:
            while time.monotonic() - start < seconds:
                p.send_msg(up if (sent // keys) % 2 == 0 else down)
                sent += keys
                if time.monotonic() - last_ka > 0.5:
                    p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                    last_ka = time.monotonic()
                nxt += keys / rate
                time.sleep(max(0.0, nxt - time.monotonic()))
        except (OSError, Closed) as exc:
            result["x_error"] = repr(exc)
        result["offered"], result["offered_per_s"] = sent, round(sent / (time.monotonic() - start))
        done.set()

    cpu0, t0 = cpu_s(pid), time.monotonic()
    threading.Thread(target=flood, daemon=True).start()
    under = user(url, seconds)
    done.wait(60)
    cpu = (cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    xa = s.peer("a", "x")
    result.update({
        "recipe": f"{keys} routes advertised then withdrawn, {keys} entries per UPDATE, at {rate:g} entries/s for {seconds:g} s",
        "a_cpu_share": round(cpu, 3), "a_cpu_share_baseline": round(base_cpu, 3), "a_rss_mib": rss_mib(pid), "taken_by_a": xa.get("route_entries_in"),
        "user_baseline": base, "user_under_attack": under,
        "a_b_flaps": s.peer("a", "b")["flaps"], "b_a_flaps": s.peer("b", "a")["flaps"], "x_session": xa["state"],
    })
    p.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attack", nargs="?", default="both", choices=("spill", "churn", "both"))
    ap.add_argument("--rate", type=float, default=47_000, help="route entries/s x offers (churn)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--keys", type=int, default=500, help="routes x flaps (churn)")
    ap.add_argument("--path", default="/svc", help="what the user asks a for: /svc (via b) or /own (at a)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = {}
    for attack in ("spill", "churn") if args.attack == "both" else (args.attack,):
        with tempfile.TemporaryDirectory(prefix="cpn-attack-") as d:
            s = Setup(Path(d))
            try:
                results[attack] = spill(s, args.seconds) if attack == "spill" else \
                    churn(s, args.rate, args.seconds, args.keys, args.path)
            finally:
                s.close()
        print(json.dumps({attack: results[attack]}) if args.json else f"{attack}: {json.dumps(results[attack], indent=1)}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
