"""User-space instructions a request, by function (C and Python's own), under valgrind's callgrind:
the local path (one gateway: ingress = egress) beside a floor proxy, sequential and saturated.

    python bench/instructions.py [--requests 300] [--seconds 6] [--out DIR] [--top 40]

One nginx instance (a fixed JSON answer), one ``cpnd`` gateway serving it and one
``bench/floor_proxy.py``, each proxy under ``valgrind --tool=callgrind`` with instrumentation off
until the window: then, per proxy, ``--requests`` sequential requests (one keep-alive connection),
a wrk window of ``--seconds`` (8 connections: saturated, at valgrind's pace) and an idle window of
as long, each dumped on its own (``callgrind_control``). Instructions a request are the window's
less the idle window's rate over its length (timers, the control plane), so exact but for that.
The dumps stay in ``--out`` (``callgrind_annotate FILE`` reads them); the top functions by
inclusive-less (self) instructions a request are printed for each proxy and window.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.lab import Instance, Topology, free_ports, write_lab  # noqa: E402
from dataplane import Sequential, start_peer, wrk_requests  # noqa: E402


CACHE: list[str] = []


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {proc.args}")
        try:
            Sequential("127.0.0.1", port, "/").close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no port {port}: {proc.args}")


def _ctl(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _window(pid: int, name: str, work, out: Path, prefix: str) -> tuple[int, float, Path]:
    """Instrument ``pid`` while ``work()`` runs, dump it as ``name``: (requests, wall seconds, the dump)."""
    before = set(out.glob(f"{prefix}.{pid}*"))
    _ctl("-z", str(pid))
    _ctl("-i", "on", str(pid))
    t0 = time.monotonic()
    n = work()
    wall = time.monotonic() - t0
    _ctl("-i", "off", str(pid))
    _ctl("-d", name, str(pid))
    deadline = time.monotonic() + 60
    while not (new := set(out.glob(f"{prefix}.{pid}*")) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # (written whole)
    return n, wall, max(new)


def _total(dump: Path) -> tuple[int, dict[str, int]]:
    """All instructions in a dump and the self instructions by function (callgrind_annotate's)."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True).stdout
    # (Ir first; with --cache-sim more columns follow it, each "n (p%)" or ".")
    m = re.search(r"^([\d,]+) \(100\.0%\).*PROGRAM TOTALS", out, re.M)
    total = int(m.group(1).replace(",", "")) if m else 0
    funcs: dict[str, int] = {}
    for line in out.splitlines():
        f = re.match(r"^\s*([\d,]+) \([\s\d.]+%\)(?:\s+(?:[\d,]+ \([\s\d.]+%\)|\.))*\s+(\S.*)$", line)
        if f and "PROGRAM TOTALS" not in line:
            funcs[f.group(2).strip()] = funcs.get(f.group(2).strip(), 0) + int(f.group(1).replace(",", ""))
    return total, funcs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--only", default="floor,local")
    ap.add_argument("--cache-sim", action="store_true", help="callgrind's cache and branch simulation too (slower)")
    args = ap.parse_args()
    if args.cache_sim:
        CACHE.extend(["--cache-sim=yes", "--branch-sim=yes"])
    out = Path(args.out or tempfile.mkdtemp(prefix="cpn-callgrind-"))
    out.mkdir(parents=True, exist_ok=True)
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    wrk = shutil.which("wrk")
    assert nginx and wrk, "needs nginx and wrk (python bench/dataplane.py installs them)"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cpn-cg-") as tmp_s:
            tmp = Path(tmp_s)
            inst, port = start_peer("instance", nginx, tmp, 0)
            procs.append(inst)
            topo = Topology(("c",), (), (Instance("s1", "c", "/svc", 1e6, 1, 0),), {"log_level": "warning"})
            specs = write_lab(topo, tmp / "lab", instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
            vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", *CACHE]
            targets: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
            only = args.only.split(",")
            if "local" in only:
                cport = int(specs["c"].http.rsplit(":", 1)[1])
                p = subprocess.Popen([*vg, f"--callgrind-out-file={out}/local.%p", sys.executable, "-m", "cpnd",
                                      "--config", str(specs["c"].config), "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=open(out / "local.err", "wb"))
                procs.append(p)
                targets["local"] = (p, cport, "/svc")
            if "floor" in only:
                fport = free_ports(1)[0]
                p = subprocess.Popen([*vg, f"--callgrind-out-file={out}/floor.%p", sys.executable,
                                      str(Path(__file__).resolve().parent / "floor_proxy.py"), str(fport), str(port)],
                                     stdout=subprocess.DEVNULL, stderr=open(out / "floor.err", "wb"))
                procs.append(p)
                targets["floor"] = (p, fport, "/v1")
            for name, (p, tport, path) in targets.items():
                _wait_port(tport, p)
                time.sleep(2)  # (under valgrind, the gateway's start-up work goes on a while)
                Sequential("127.0.0.1", tport, path).run(100)
            for name, (p, tport, path) in targets.items():
                seq = Sequential("127.0.0.1", tport, path)
                by: dict[str, Path] = {}
                n_seq, w_seq, by[f"{name}-seq"] = _window(
                    p.pid, f"{name}-seq", lambda: (seq.run(args.requests), args.requests)[1], out, name)
                seq.close()
                n_sat, w_sat, by[f"{name}-sat"] = _window(
                    p.pid, f"{name}-sat", lambda: wrk_requests(wrk, ("127.0.0.1", tport, path), args.seconds), out, name)
                _, w_idle, by[f"{name}-idle"] = _window(
                    p.pid, f"{name}-idle", lambda: (time.sleep(args.seconds), 0)[1], out, name)
                idle_total, idle_funcs = _total(by[f"{name}-idle"])
                for kind, n, wall in (("seq", n_seq, w_seq), ("sat", n_sat, w_sat)):
                    total, funcs = _total(by[f"{name}-{kind}"])
                    scale = wall / w_idle
                    per = (total - idle_total * scale) / n
                    print(f"\n{name} {kind}: {n} requests in {wall:.1f} s; {per:,.0f} instructions a request "
                          f"(window {total / n:,.0f}, idle {idle_total * scale / n:,.0f}); dump {by[f'{name}-{kind}']}")
                    rows = sorted(((v - idle_funcs.get(k, 0) * scale) / n, k) for k, v in funcs.items())[::-1]
                    for v, k in rows[:args.top]:
                        print(f"  {v:10,.0f}  {k.split(' [')[0].rsplit('/', 1)[-1]}")  # (file:function, less its path and object)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
