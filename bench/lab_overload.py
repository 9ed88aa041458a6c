"""The paper lab over its capacity, with ``[gateway] workers = 1`` and ``2`` on every gateway: does
any instance get more than its capacity?

    python bench/lab_overload.py [--workers 1,2] [--seconds 10] [--connections 16] [--guard-ms 0,100]
                                 [--out bench/results]

``cpnd lab paper --workers N`` (GW1..GW7, s1..s5 of /yolo with capacity 50 req/s each, 250 in all);
wrk on gw1 and on gw2 at once, as fast as they answer (open the throttle: each far above what the
instances take). The simulated instances count their own arrivals over a sliding second and answer
503 with ``{"error": "overloaded"}`` past their capacity, so every such body a client sees is a
request an instance received beyond its capacity in that second (the gateways' own refusals are 503
``no_capacity``). Counted per status with a wrk Lua script. Writes ``lab_overload.json``.

``--guard-ms``: run the lab once per value of ``[gateway] admission_guard_ms`` (the paper scenario
written as a topology file with that key; 0: a request's slot is held until its write to the instance,
then a second; the default is the gateway's, 100 ms).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from cpnd.lab import paper_topology

LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body)
  local k = tostring(status)
  if body and body:find("overloaded") then k = k .. "-instance-overloaded" end
  counts[k] = (counts[k] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do io.write(string.format("COUNT %s %d\\n", k, v)) end
  end
end
"""


def paper_with(tmp: Path, guard_ms: int) -> Path:
    """The paper scenario as a topology file, every gateway with ``admission_guard_ms = guard_ms``."""
    topo = paper_topology()
    lines = ["[gateway]", f"admission_guard_ms = {guard_ms}"]
    lines += [line for gw in topo.gateways for line in ("", "[[gateways]]", f'id = "{gw}"')]
    lines += [line for link in topo.links
              for line in ("", "[[links]]", f'a = "{link.a}"', f'b = "{link.b}"', f"rtt_ms = {link.rtt_ms!r}")]
    lines += [line for i in topo.instances
              for line in ("", "[[instances]]", f'id = "{i.id}"', f'gateway = "{i.gateway}"', f'service = "{i.service}"',
                           f"capacity = {i.capacity!r}", f"price = {i.price!r}",
                           f"compute_latency_ms = {i.compute_latency_ms!r}")]
    path = tmp / f"paper-guard{guard_ms}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_lab(workers: int, seconds: float, connections: int, wrk: str, tmp: Path, guard_ms: int | None = None) -> dict:
    script = tmp / "count.lua"
    script.write_text(LUA)
    scenario = "paper" if guard_ms is None else str(paper_with(tmp, guard_ms))
    lab = subprocess.Popen([sys.executable, "-m", "cpnd", "lab", scenario, "--dir", str(tmp / f"lab{workers}-{guard_ms}"),
                            "--workers", str(workers), "--timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        http = {}
        while True:
            line = lab.stdout.readline().strip() if lab.stdout else ""
            if not line or line == "ready":
                break
            http[line.split()[0]] = line.split("http=")[1].split()[0]
        if line != "ready":
            raise RuntimeError(f"the lab did not start: {lab.stderr.read() if lab.stderr else ''}")
        out: dict[str, dict] = {}

        def drive(gw: str) -> None:
            r = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
                                f"http://{http[gw]}/yolo"], capture_output=True, text=True, timeout=seconds + 60)
            counts = {k: int(v) for k, v in re.findall(r"COUNT (\S+) (\d+)", r.stdout)}
            rps = re.search(r"Requests/sec:\s+([0-9.]+)", r.stdout)
            out[gw] = {"counts": counts, "req_per_s": float(rps.group(1)) if rps else 0.0}

        threads = [threading.Thread(target=drive, args=(gw,)) for gw in ("gw1", "gw2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = sum(v["counts"].get("200", 0) for v in out.values())
        over = sum(n for v in out.values() for k, n in v["counts"].items() if k.endswith("instance-overloaded"))
        return {"workers": workers, "admission_guard_ms": guard_ms, "seconds": seconds, "per_gateway": out, "served_per_s": round(served / seconds, 1),
                "instance_overloads": over, "instance_overloads_per_s": round(over / seconds, 2)}
    finally:
        lab.terminate()
        lab.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--guard-ms", default=None, help="comma-separated admission_guard_ms values (default: the gateway's)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("needs wrk", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpn-overload-") as tmp:
        guards = [None] if args.guard_ms is None else [int(x) for x in args.guard_ms.split(",")]
        for n, guard in ((int(x), g) for x in args.workers.split(",") for g in guards):
            rows.append(run_lab(n, args.seconds, args.connections, wrk, Path(tmp), guard))
            r = rows[-1]
            print(f"workers = {n}" + ("" if guard is None else f", admission_guard_ms = {guard}") + f": served {r['served_per_s']} req/s of 250 in capacity; instances over their capacity: "
                  f"{r['instance_overloads']} requests in {args.seconds:g} s; per gateway "
                  + "; ".join(f"{gw} {v['req_per_s']:.0f} req/s {v['counts']}" for gw, v in r["per_gateway"].items()),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab_overload.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
