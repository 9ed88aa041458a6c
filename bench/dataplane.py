"""Data-plane benchmark: cpnd at 0, 1 and 2 tunnel hops vs nginx, HAProxy and calling the instance directly.

    python bench/dataplane.py [--repeats 3] [--seconds 4] [--rate 1000] [--out bench/results]

Topology: gateways a - b - c on loopback (no emulated delay), one instance behind c:
an nginx server block answering a fixed JSON body (so the instance costs next to nothing
and every path measures its proxies, not the instance; without nginx, a simulated
instance). Paths measured side by side in every repeat:
  direct   client -> instance
  nginx    client -> nginx (proxy_pass, upstream keep-alive) -> instance
  haproxy  client -> HAProxy (mode http, connection reuse) -> instance
  floor    client -> bench/floor_proxy.py -> instance: the least a trio + h11 proxy does
           (parse, re-serialise, nothing else), so cpnd's own cost is measured against
           what its stack must cost, not only against C proxies
  local    client -> c (ingress and egress in one gateway) -> instance
  1 hop    client -> b -> c -> instance
  2 hops   client -> a -> b -> c -> instance (b is a transit)
For each: requests/s at saturation (wrk, 8 keep-alive connections, 1 thread) and the
latency at a fixed open-loop rate (p50/p99, measured from each request's scheduled
send time so queueing counts), and the speed of a 5 MB response body (curl, one
download at a time, from an nginx static file on the instance). Reported as medians over the repeats, with the added
latency and the throughput ratio against direct, nginx, HAProxy and the floor, and plotted.
nginx, HAProxy, wrk and curl are installed with apt-get when missing (as root); a peer
that cannot be installed is left out (and said so).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.lab import Instance, Lab, Link, Topology, write_lab  # noqa: E402
from httpclient import exchange  # noqa: E402


def ensure(binary: str, package: str) -> str | None:
    """The path of ``binary``, installing Debian's ``package`` first when it is missing."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found:
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        print(f"note: {package} could not be installed: {binary} is left out", file=sys.stderr)
        return None
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.err warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fastcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  {http}
}}
"""
# The proxy under test: proxy_pass to the instance over kept-alive upstream connections.
NGINX_PROXY = """upstream instance {{ server 127.0.0.1:{upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location /svc {{ proxy_pass http://instance/v1; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""
# The instance every path calls: a fixed JSON answer, as cheap as an instance can be.
NGINX_INSTANCE = """server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{{"instance": "s1"}}'; }}
    location = /v1/big {{ default_type application/octet-stream; alias {dir}/big.bin; }}
  }}"""
BIG_BYTES = 5 * 1024 * 1024

HAPROXY_CONF = """global
  maxconn 1024
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-request set-path %[path,regsub(^/svc,/v1)]
  server s1 127.0.0.1:{upstream}
"""


def start_peer(name: str, binary: str, workdir: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    """nginx or HAProxy in the foreground on a free port, one worker, proxying to the instance."""
    from cpnd.lab import free_ports

    port = free_ports(1)[0]
    if name == "floor":
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "floor_proxy.py"), str(port), str(upstream)]
    elif name in ("nginx", "instance"):
        conf = workdir / f"{name}.conf"
        if name == "instance":
            (workdir / "big.bin").write_bytes(bytes(range(256)) * (BIG_BYTES // 256))
        http = (NGINX_PROXY if name == "nginx" else NGINX_INSTANCE).format(port=port, upstream=upstream, dir=workdir)
        conf.write_text(NGINX_CONF.format(dir=workdir, name=name, http=http))
        cmd = [binary, "-c", str(conf), "-e", str(workdir / f"{name}.err")]
    else:
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=port, upstream=upstream))
        cmd = [binary, "-db", "-f", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not start")


def wrk_rps(wrk: str, url: str, seconds: float, headers: dict[str, str]) -> float:
    cmd = [wrk, "-t1", "-c8", f"-d{seconds:g}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx and int(non2xx.group(1)) > 0:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} errors on {url}")
    return float(m.group(1)) if m else 0.0


async def _one(stream: trio.SocketStream, req: bytes) -> None:
    status, _, _ = await exchange(stream, req)
    if status != 200:
        raise RuntimeError(f"status {status}")


def open_loop(host: str, port: int, path: str, rate: float, seconds: float, conns: int = 8) -> list[float]:
    """Latencies (ms) of requests sent at ``rate``/s, measured from their scheduled times."""
    req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    n = int(rate * seconds)
    lat: list[float] = []

    async def main() -> None:
        send, recv = trio.open_memory_channel[float](n)
        t0 = trio.current_time() + 0.2
        for i in range(n):
            send.send_nowait(t0 + i / rate)
        send.close()

        async def worker() -> None:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                async for at in recv:
                    await trio.sleep_until(at)
                    await _one(stream, req)
                    lat.append((trio.current_time() - at) * 1000)

        async with trio.open_nursery() as nursery:
            for _ in range(conns):
                nursery.start_soon(worker)

    trio.run(main)
    return lat


def bulk_mbps(url: str, times: int = 3) -> float | None:
    """Median MB/s of downloading the instance's 5 MB body through ``url`` (curl, one at a time)."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    speeds = []
    for _ in range(times):
        out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}", url],
                             capture_output=True, text=True, timeout=120).stdout.split()
        if len(out) != 3 or out[0] != "200" or int(float(out[1])) != BIG_BYTES:
            raise RuntimeError(f"bulk download through {url} failed: {out}")
        speeds.append(float(out[2]) / 1e6)
    return statistics.median(speeds)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    wrk = ensure("wrk", "wrk")
    ensure("curl", "curl")  # the 5 MB downloads (left out without it)
    peers = {name: b for name, b in (("nginx", ensure("nginx", "nginx-light")), ("haproxy", ensure("haproxy", "haproxy"))) if b}
    peer_procs: list[subprocess.Popen[bytes]] = []
    inst_dir = tempfile.TemporaryDirectory(prefix="cpn-dp-instance-")
    if "nginx" in peers:
        inst, port = start_peer("instance", peers["nginx"], Path(inst_dir.name), 0)
    else:
        inst = subprocess.Popen([sys.executable, "-m", "cpnd.simulate", "--id", "s1"], stdout=subprocess.PIPE, text=True)
        port = int(inst.stdout.readline().rsplit(":", 1)[1])
    topo = Topology(("a", "b", "c"), (Link("a", "b"), Link("b", "c")), (Instance("s1", "c", "/svc", 1e6, 1, 0),),
                    {"log_level": "warning"})
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cpn-dp-") as tmp:
            specs = write_lab(topo, Path(tmp), instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
            with Lab(specs, log_level="warning") as lab:
                lab.start_all()
                lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
                targets = {"direct": ("127.0.0.1", port, "/v1")}
                for name, binary in peers.items():
                    proc, peer_port = start_peer(name, binary, Path(tmp), port)
                    peer_procs.append(proc)
                    targets[name] = ("127.0.0.1", peer_port, "/svc")
                proc, peer_port = start_peer("floor", sys.executable, Path(tmp), port)
                peer_procs.append(proc)
                targets["floor"] = ("127.0.0.1", peer_port, "/v1")
                targets.update({"local": (*_hp(specs["c"].http), "/svc"), "1 hop": (*_hp(specs["b"].http), "/svc"),
                                "2 hops": (*_hp(specs["a"].http), "/svc")})
                for rep in range(args.repeats):
                    for name, (h, p, path) in targets.items():
                        r = results.setdefault(name, {"rps": [], "p50": [], "p99": [], "mbps": []})
                        if wrk:
                            r["rps"].append(wrk_rps(wrk, f"http://{h}:{p}{path}", args.seconds, {}))
                        lat = open_loop(h, p, path, args.rate, args.seconds)
                        r["p50"].append(pct(lat, 50))
                        r["p99"].append(pct(lat, 99))
                        mbps = bulk_mbps(f"http://{h}:{p}{path}/big")
                        if mbps is not None:
                            r["mbps"].append(mbps)
                        print(f"rep {rep} {name}: rps {r['rps'][-1] if r['rps'] else '-'} p50 {r['p50'][-1]:.3f} ms p99 {r['p99'][-1]:.3f} ms"
                              f" 5 MB at {r['mbps'][-1] if r['mbps'] else '-'} MB/s", flush=True)
    finally:
        for proc in [inst, *peer_procs]:
            proc.kill()
            proc.wait()
        inst_dir.cleanup()
    med = {k: {m: statistics.median(v) if v else None for m, v in r.items()} for k, r in results.items()}
    d = med["direct"]
    rows = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    for name, m in med.items():
        rows.append({
            "path": name, "rps": m["rps"], "rps_vs_direct": ratio(m["rps"], d["rps"]),
            "rps_vs_nginx": ratio(m["rps"], med.get("nginx", {}).get("rps")),
            "rps_vs_haproxy": ratio(m["rps"], med.get("haproxy", {}).get("rps")),
            "rps_vs_floor": ratio(m["rps"], med.get("floor", {}).get("rps")),
            "p50_ms": round(m["p50"], 3), "p99_ms": round(m["p99"], 3),
            "added_p50_ms": round(m["p50"] - d["p50"], 3), "added_p99_ms": round(m["p99"] - d["p99"], 3),
            "mbps_5mb": round(m["mbps"], 1) if m.get("mbps") else None,
            "mbps_vs_nginx": ratio(m.get("mbps"), med.get("nginx", {}).get("mbps")),
            "mbps_vs_haproxy": ratio(m.get("mbps"), med.get("haproxy", {}).get("mbps")),
            "mbps_vs_floor": ratio(m.get("mbps"), med.get("floor", {}).get("mbps")),
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane.json").write_text(json.dumps({"rows": rows, "repeats": args.repeats, "rate": args.rate,
                                                    "seconds": args.seconds, "command": " ".join(sys.argv)}, indent=1) + "\n")
    print(f"\n| path | req/s (wrk, 8 conns) | vs direct | vs nginx | vs HAProxy | vs floor | p50 ms @{args.rate:g}/s | p99 ms |"
          " added p50 | added p99 | 5 MB body, MB/s | vs nginx | vs HAProxy | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rps = f"{r['rps']:.0f}" if r["rps"] else "-"
        print(f"| {r['path']} | {rps} | {r['rps_vs_direct'] or '-'} | {r['rps_vs_nginx'] or '-'} | {r['rps_vs_haproxy'] or '-'} | {r['rps_vs_floor'] or '-'} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['added_p50_ms']} | {r['added_p99_ms']} | "
              f"{r['mbps_5mb'] or '-'} | {r['mbps_vs_nginx'] or '-'} | {r['mbps_vs_haproxy'] or '-'} | {r['mbps_vs_floor'] or '-'} |")
    plot(rows, args.rate, out / "dataplane.png")
    return 0


def plot(rows: list[dict], rate: float, path: Path) -> None:
    """Throughput and added latency per path, side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    names = [r["path"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [r["rps"] or 0 for r in rows], color=["grey", "tab:green", "tab:olive", "tab:purple", "tab:blue", "tab:blue", "tab:blue"][:len(rows)])
    ax1.set_yscale("log")  # cpnd is two orders of magnitude below nginx and HAProxy
    ax1.set_ylabel("requests/s at saturation (wrk, 8 conns, log)")
    ax1.set_title("throughput")
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [r["p99_ms"] for r in rows], width=0.4, label="p99")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel(f"latency ms at {rate:g} req/s (open loop)")
    ax2.set_title("latency")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hp(hostport: str) -> tuple[str, int]:
    h, p = hostport.rsplit(":", 1)
    return h, int(p)


if __name__ == "__main__":
    raise SystemExit(main())
