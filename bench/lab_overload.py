"""The paper lab over its capacity, with ``[gateway] workers = 1`` and ``2`` on every gateway: does
any instance get more than its capacity?

    python bench/lab_overload.py [--workers 1,2] [--seconds 10] [--connections 16] [--out bench/results]

``cpnd lab paper --workers N`` (GW1..GW7, s1..s5 of /yolo with capacity 50 req/s each, 250 in all);
wrk on gw1 and on gw2 at once, as fast as they answer (open the throttle: each far above what the
instances take). The simulated instances count their own arrivals over a sliding second and answer
503 with ``{"error": "overloaded"}`` past their capacity, so every such body a client sees is a
request an instance received beyond its capacity in that second (the gateways' own refusals are 503
``no_capacity``). Counted per status with a wrk Lua script. Writes ``lab_overload.json``.
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


def run_lab(workers: int, seconds: float, connections: int, wrk: str, tmp: Path) -> dict:
    script = tmp / "count.lua"
    script.write_text(LUA)
    lab = subprocess.Popen([sys.executable, "-m", "cpnd", "lab", "paper", "--dir", str(tmp / f"lab{workers}"),
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
        return {"workers": workers, "seconds": seconds, "per_gateway": out, "served_per_s": round(served / seconds, 1),
                "instance_overloads": over, "instance_overloads_per_s": round(over / seconds, 2)}
    finally:
        lab.terminate()
        lab.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("needs wrk", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpn-overload-") as tmp:
        for n in (int(x) for x in args.workers.split(",")):
            rows.append(run_lab(n, args.seconds, args.connections, wrk, Path(tmp)))
            r = rows[-1]
            print(f"workers = {n}: served {r['served_per_s']} req/s of 250 in capacity; instances over their capacity: "
                  f"{r['instance_overloads']} requests in {args.seconds:g} s; per gateway "
                  + "; ".join(f"{gw} {v['req_per_s']:.0f} req/s {v['counts']}" for gw, v in r["per_gateway"].items()),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab_overload.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
