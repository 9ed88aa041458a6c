"""Chaos soak: real gateways and instances under load while faults come and go.

    python bench/chaos.py [--seconds 180] [--rate 40] [--seed 1] [--out bench/results] [--json]

Six gateways (g1 and g2 are the users' ingresses; g3..g6 transits and service sites)
and four simulated instances of /svc. Two users send GET and POST requests at
``--rate`` req/s in all over keep-alive connections, while a seeded chaos loop, every
``--interval`` s, does one of: kill -9 a gateway, SIGTERM it (graceful restart), kill
an instance, cut a link (a reload without the peer), delay a link (a reload with a
larger emulated RTT), or reload a config unchanged; each fault is undone 1-4 s later.
Ingresses are never killed (a user whose own gateway is gone has nothing to route).

Every request ends as exactly one of: served (200 from an instance), failed with an
explicit error (a gateway-made 4xx/5xx with the contract's JSON body), or lost (no
answer, a broken connection, a hang past the client timeout, an unexplained status).
The target is 0 lost. At the end every fault is undone, the network must heal (all
requests of a final burst served), and memory and file descriptors of the gateways
that ran throughout are compared with their start.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.control import ControlError  # noqa: E402
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab  # noqa: E402
from httpclient import classify  # noqa: E402

INGRESSES = ("g1", "g2")
LINKS = (("g1", "g3", 2), ("g1", "g4", 3), ("g2", "g3", 2), ("g2", "g4", 2), ("g3", "g5", 2), ("g4", "g5", 2),
         ("g4", "g6", 3), ("g3", "g6", 4), ("g5", "g6", 1))
INSTANCES = (("i3", "g3"), ("i4", "g4"), ("i5", "g5"), ("i6", "g6"))
OPTIONS = {"hold_time_ms": 900, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500,
           "graceful_restart_ms": 3000, "health_interval_ms": 300, "health_failures": 2, "drain_timeout_ms": 1000}
CLIENT_TIMEOUT_S = 15.0


def topology() -> Topology:
    return Topology(tuple(f"g{i}" for i in range(1, 7)), tuple(Link(a, b, rtt) for a, b, rtt in LINKS),
                    tuple(Instance(iid, gw, "/svc", 500.0, 1.0, 1.0) for iid, gw in INSTANCES), OPTIONS)


def proc_usage(pid: int) -> dict[str, int]:
    """Resident memory (KiB) and open file descriptors of a live process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Soak:
    def __init__(self, workdir: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.topo = topology()
        self.insts = InstanceProcs()
        for iid, _ in INSTANCES:
            self.insts.start(iid, compute_ms=1.0)
        ports = dict(self.insts.ports)
        self.specs = write_lab(self.topo, workdir, instance_url=lambda i: f"http://127.0.0.1:{ports[i.id]}/{i.id}")
        self.configs: dict[str, str] = {}  # each gateway's config as started: what a fault's undo restores
        self.lab = Lab(self.specs)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.down: set[str] = set()  # what a fault holds down now: "gw:g3", "inst:i4", "link:g1-g3"
        self.restarted: set[str] = set()
        self.reloads: list[Any] = []

    # ---- faults (blocking; run in a thread)

    def _reload(self, gw: str, text: str) -> None:
        path = self.specs[gw].config
        path.with_suffix(".new").write_text(text)
        path.with_suffix(".new").replace(path)  # atomic: a gateway starting meanwhile reads one or the other
        if gw in self.lab.procs:
            try:
                self.reloads.append(self.lab.query(gw, "reload"))  # what `cpnctl reload` does
            except (ControlError, OSError):
                pass  # still starting: it reads the new file anyway

    def _without_peer(self, gw: str, peer: str) -> str:
        blocks = self.configs[gw].split("\n\n")
        return "\n\n".join(b for b in blocks if f'[[peers]]\nid = "{peer}"' not in b)

    def _with_delay(self, gw: str, peer: str, extra_ms: float) -> str:
        def bump(m: re.Match[str]) -> str:
            return f"{m.group(1)}emulated_rtt_ms = {float(m.group(2)) + extra_ms!r}"
        blocks = self.configs[gw].split("\n\n")
        return "\n\n".join(re.sub(r"(.*)emulated_rtt_ms = ([0-9.]+)", bump, b, flags=re.S)
                           if f'[[peers]]\nid = "{peer}"' in b else b for b in blocks)

    def fault(self) -> tuple[str, Callable[[], None]] | None:
        """Inflict one random fault; (what, how to undo it), or None when nothing was free to break."""
        kind = self.rng.choice(["kill", "restart", "instance", "cut", "delay", "reload"])
        transits = [g for g in self.topo.gateways if g not in INGRESSES and f"gw:{g}" not in self.down]
        if kind in ("kill", "restart") and transits:
            gw = self.rng.choice(transits)
            if kind == "kill":
                self.lab.procs[gw].kill()
            else:
                self.lab.procs[gw].send_signal(signal.SIGTERM)
            self.lab.procs.pop(gw).wait(15)
            self.restarted.add(gw)
            return f"gw:{gw}", lambda: self.lab.start(gw)
        if kind == "instance":
            free = [i for i, _ in INSTANCES if f"inst:{i}" not in self.down]
            if free:
                iid = self.rng.choice(free)
                port = self.insts.ports[iid]
                self.insts.kill(iid)
                return f"inst:{iid}", lambda: self.insts.start(iid, compute_ms=1.0, port=port)
        if kind in ("cut", "delay"):
            a, b, _ = self.rng.choice(LINKS)
            if f"link:{a}-{b}" not in self.down and a in self.lab.procs:
                self._reload(a, self._without_peer(a, b) if kind == "cut" else self._with_delay(a, b, 20.0))
                return f"link:{a}-{b}", lambda: self._reload(a, self.configs[a])
        if kind == "reload":
            gw = self.rng.choice([g for g in self.topo.gateways if g in self.lab.procs])
            self._reload(gw, self.configs[gw])
            return None
        return None

    # ---- load

    async def user(self, ingress: str, rate: float, seconds: float) -> None:
        start = trio.current_time()
        async with httpx.AsyncClient(base_url=f"http://{self.specs[ingress].http}", timeout=CLIENT_TIMEOUT_S,
                                     limits=httpx.Limits(max_connections=8)) as client:
            async def one(n: int) -> None:
                method = "GET" if n % 2 else "POST"
                try:
                    r = await client.request(method, "/svc", content=b"x" * 64 if method == "POST" else None)
                except httpx.HTTPError as exc:
                    self.outcomes["lost"] += 1
                    self.lost.append(f"{ingress} {method}: {type(exc).__name__}: {exc}")
                    return
                outcome, what = classify(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
                self.outcomes[outcome] += 1
                if outcome == "failed_explicit":
                    self.errors[what] += 1
                elif outcome == "lost":
                    self.lost.append(f"{ingress} {method}: {what}")

            async with trio.open_nursery() as nursery:
                # The n-th request at start + n / rate, however late this task wakes: rate x seconds
                # requests in all (a sleep after each sent fewer the busier the box: 214 of 300 here).
                n = 0
                while n < rate * seconds:
                    await trio.sleep_until(start + n / rate)
                    nursery.start_soon(one, n)
                    n += 1

    async def chaos(self, until: float, interval: float) -> None:
        pending: dict[str, tuple[float, Callable[[], None]]] = {}
        while trio.current_time() < until:
            await trio.sleep(interval * self.rng.uniform(0.5, 1.5))
            now = trio.current_time()
            for what, (when, undo) in list(pending.items()):
                if when <= now:
                    await trio.to_thread.run_sync(undo)
                    del pending[what]
                    self.down.discard(what)
            if len(self.down) < 2:
                done = await trio.to_thread.run_sync(self.fault)
                if done is not None:
                    what, undo = done
                    self.faults[what.split(":")[0]] += 1
                    self.down.add(what)
                    pending[what] = (now + self.rng.uniform(1.0, 4.0), undo)
                else:
                    self.faults["reload-or-skip"] += 1
        for what, (_, undo) in pending.items():  # undo what is still broken
            await trio.to_thread.run_sync(undo)
            self.down.discard(what)

    # ---- the run

    def run(self, seconds: float, rate: float, interval: float) -> dict[str, Any]:
        self.lab.start_all()
        # Read once started: a port another process took first moved every gateway's ports (Lab.start_all),
        # and a config from before that would be refused on reload, or start a restarted gateway where no
        # peer looks for it.
        self.configs = {gw: spec.config.read_text() for gw, spec in self.specs.items()}
        self.lab.wait_for(lambda: self.lab.converged(self.topo), 60, "convergence")
        time.sleep(1.0)  # past the start-up noise, so the usage baseline is the steady state
        usage_start = {gw: proc_usage(p.pid) for gw, p in self.lab.procs.items()}
        t0 = time.monotonic()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for ingress in INGRESSES:
                    nursery.start_soon(self.user, ingress, rate / len(INGRESSES), seconds)
                nursery.start_soon(self.chaos, trio.current_time() + seconds, interval)

        trio.run(main)
        took = time.monotonic() - t0
        heal_t0 = time.monotonic()
        self.lab.wait_for(lambda: self.lab.converged(self.topo), 60, "the network to heal")
        healed_s = time.monotonic() - heal_t0
        before = collections.Counter(self.outcomes)
        trio.run(self.user, "g1", 20.0, 2.0)  # the healed network serves everything
        final = {k: self.outcomes[k] - before[k] for k in ("served", "failed_explicit", "lost")}
        usage_end = {gw: proc_usage(p.pid) for gw, p in self.lab.procs.items()}
        tracebacks = [gw for gw in self.specs if "Traceback" in self.lab.log(gw)]
        sent = sum(before.values())
        return {
            "seconds": round(took, 1), "rate": rate, "sent": sent,
            "served": before["served"], "failed_explicit": before["failed_explicit"], "lost": before["lost"],
            "errors": dict(self.errors), "lost_examples": self.lost[:10], "faults": dict(self.faults),
            "healed_s": round(healed_s, 2), "after_heal": final,
            "usage": {gw: {"start": usage_start.get(gw), "end": usage_end.get(gw), "restarted": gw in self.restarted}
                      for gw in self.specs},
            "tracebacks": tracebacks,
        }

    def close(self) -> None:
        self.lab.stop_all()
        self.insts.stop_all()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s, both users together")
    ap.add_argument("--interval", type=float, default=1.5, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write chaos.json here")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--keep", type=Path, help="keep configs and logs in this folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(args.keep or Path(tmp), args.seed)
        try:
            report = soak.run(args.seconds, args.rate, args.interval)
        finally:
            soak.close()
    report["seed"] = args.seed
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['seconds']} s at {args.rate:g} req/s, faults {report['faults']}")
        print(f"sent {report['sent']}: served {report['served']}, failed with an explicit error "
              f"{report['failed_explicit']} {report['errors']}, lost {report['lost']}")
        print(f"healed in {report['healed_s']} s; afterwards {report['after_heal']}")
        for gw, u in report["usage"].items():
            print(f"  {gw}: rss {u['start']['rss_kib']} -> {u['end']['rss_kib']} KiB, fds {u['start']['fds']} -> "
                  f"{u['end']['fds']}{' (restarted)' if u['restarted'] else ''}")
        for line in report["lost_examples"]:
            print(f"  lost: {line}")
    return 0 if report["lost"] == 0 and not report["tracebacks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
