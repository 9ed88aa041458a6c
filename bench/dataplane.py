"""Data-plane benchmark: cpnd at 0, 1 and 2 tunnel hops vs nginx, HAProxy, chained floor proxies and the instance itself.

    python bench/dataplane.py [--repeats 3] [--seconds 4] [--rate 1000] [--idle-rounds 7] [--idle-requests 400]
    python bench/dataplane.py --idle-only           # the sequential idle table alone (~2 min)
    python bench/dataplane.py --breakdown [--breakdown-requests 2000]   # what a request costs each gateway
    python bench/dataplane.py --saturation-cpu [--repeats 3] [--seconds 4]   # CPU per request of each process, saturated
    python bench/dataplane.py --opcodes [--breakdown-requests 200]   # bytecodes a request by function (and phase), exact
    python bench/dataplane.py --saturation-breakdown [--repeats 2 --seconds 4 --breakdown-requests 300]   # saturated vs sequential
    python bench/dataplane.py --https [--idle-rounds 5]   # TLS at the ingress and an https instance vs nginx
    python bench/dataplane.py --grpc [--repeats 3] [--seconds 4] [--idle-rounds 5]   # gRPC unary beside direct calls
    python bench/dataplane.py --workers [--repeats 5]    # a local instance with [gateway] workers = 1 and 2

Topology: gateways a - b - c on loopback (no emulated delay), one instance behind c:
an nginx server block answering a fixed JSON body (so the instance costs next to nothing
and every path measures its proxies, not the instance; without nginx, a simulated
instance). Paths measured side by side in every repeat:
  direct    client -> instance
  nginx     client -> nginx (proxy_pass, upstream keep-alive) -> instance
  haproxy   client -> HAProxy (mode http, connection reuse) -> instance
  floor     client -> bench/floor_proxy.py -> instance: the least a trio + h11 proxy does
            (parse, re-serialise, nothing else), so cpnd's own cost is measured against
            what its stack must cost, not only against C proxies
  floor x2, floor x3   two and three floor proxies chained: the floor of a path through as
            many proxies as 1 hop and 2 hops have gateways
  local     client -> c (ingress and egress in one gateway) -> instance
  1 hop     client -> b -> c -> instance
  2 hops    client -> a -> b -> c -> instance (b is a transit)
For each: requests/s at saturation (wrk, 8 keep-alive connections, 1 thread) and the
latency at a fixed open-loop rate (p50/p99, measured from each request's scheduled
send time so queueing counts), and the speed of a 5 MB response body (curl, one
download at a time, from an nginx static file on the instance). Reported as medians over the repeats, with the added
latency and the throughput ratio against direct, nginx, HAProxy and the floor, and plotted.
Then the **idle table**: one request at a time over one keep-alive connection, every path in
each round (the order rotated from round to round), p50/p99 per round, medians over the rounds;
each cpnd path's added latency against the floor chain with as many proxies (local vs 1 proxy,
1 hop vs 2, 2 hops vs 3).
``--breakdown`` starts everything again with ``CPN_PROBE`` (cpnd/probe.py) and counts, per
path and per gateway, over N sequential requests: CPU time (/proc/PID/stat), syscalls by kind
(perf stat on the syscall tracepoints, else strace -c), scheduler batches (epoll_wait calls),
wake-ups (batches that slept), task steps and spawns (a trio Instrument) and CPU per task,
each per request, with the same for the floor proxies; then a cProfile pass per gateway.
nginx, HAProxy, wrk and curl are installed with apt-get when missing (as root); a peer
that cannot be installed is left out (and said so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.lab import Instance, Lab, Link, Topology, free_ports, write_lab  # noqa: E402
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

FLOORS = ("floor", "floor x2", "floor x3")  # the floor chain with 1, 2 and 3 proxies
# [gateway] keys for the rig's gateways a, b, c beyond the defaults (--gateway-option KEY=VALUE): one
# tree's A/B of a setting, e.g. tunnel_batch=false.
GATEWAY_OPTIONS: dict[str, Any] = {}
CPND = ("local", "1 hop", "2 hops")
FLOOR_OF = dict(zip(CPND, FLOORS))  # each cpnd path beside the floor with as many proxies as it has gateways


def start_peer(name: str, binary: str, workdir: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    """nginx, HAProxy or a floor proxy in the foreground on a free port, one worker, proxying to ``upstream``."""
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


class Rig:
    """The instance, gateways a - b - c, nginx/HAProxy and the floor chain; every process reaped on exit.

    ``targets``: path name -> (host, port, URL path); ``roles``: path name -> [(role, pid)], the
    processes a request crosses, client side first.
    """

    def __init__(self, peers: dict[str, str], *, with_peers: bool = True) -> None:
        self.peers = peers if with_peers else {}
        self.targets: dict[str, tuple[str, int, str]] = {}
        self.roles: dict[str, list[tuple[str, int]]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _proc(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        def reap() -> None:
            proc.kill()
            proc.wait()
        self._stack.callback(reap)
        return proc

    def _start(self) -> None:
        inst_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="cpn-dp-instance-")))
        nginx = self.peers.get("nginx") or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if nginx:
            inst, port = start_peer("instance", nginx, inst_dir, 0)
            self._proc(inst)
        else:
            inst = self._proc(subprocess.Popen([sys.executable, "-m", "cpnd.simulate", "--id", "s1"],
                                               stdout=subprocess.PIPE, text=True))
            port = int(inst.stdout.readline().rsplit(":", 1)[1])
        self.instance_pid = inst.pid
        topo = Topology(("a", "b", "c"), (Link("a", "b"), Link("b", "c")), (Instance("s1", "c", "/svc", 1e6, 1, 0),),
                        {"log_level": "warning", **GATEWAY_OPTIONS})
        tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="cpn-dp-")))
        specs = write_lab(topo, tmp, instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
        lab = self._stack.enter_context(Lab(specs, log_level="warning"))
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        self.targets["direct"] = ("127.0.0.1", port, "/v1")
        self.roles["direct"] = []
        for name, binary in self.peers.items():
            proc, peer_port = start_peer(name, binary, tmp, port)
            self.targets[name] = ("127.0.0.1", peer_port, "/svc")
            self.roles[name] = [(name, self._proc(proc).pid)]
        chain: list[tuple[str, int]] = []
        upstream = port
        for n, name in enumerate(FLOORS, 1):
            proc, upstream = start_peer("floor", sys.executable, tmp, upstream)
            chain.insert(0, (f"proxy {n}", self._proc(proc).pid))  # the newest is the client's side
            self.targets[name] = ("127.0.0.1", upstream, "/v1")
            self.roles[name] = [(f"proxy {i + 1} of {n}", pid) for i, (_, pid) in enumerate(chain)]
        pid = {gw: lab.procs[gw].pid for gw in "abc"}
        self.targets.update({"local": (*_hp(specs["c"].http), "/svc"), "1 hop": (*_hp(specs["b"].http), "/svc"),
                             "2 hops": (*_hp(specs["a"].http), "/svc")})
        self.roles.update({"local": [("ingress+egress (c)", pid["c"])],
                           "1 hop": [("ingress (b)", pid["b"]), ("egress (c)", pid["c"])],
                           "2 hops": [("ingress (a)", pid["a"]), ("transit (b)", pid["b"]), ("egress (c)", pid["c"])]})


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


class Sequential:
    """One keep-alive connection, one request at a time, a blocking socket: the cheapest client
    Python has, so that what it adds is the same small constant on every path."""

    _LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)

    def __init__(self, host: str, port: int, path: str) -> None:
        self.req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def one(self) -> None:
        self.sock.sendall(self.req)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        if buf[9:12] != b"200":
            raise RuntimeError(f"status {buf[9:12]!r}")
        m = self._LENGTH.search(buf, 0, end + 2)
        want = end + 4 + (int(m.group(1)) if m else 0)
        while len(buf) < want:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            buf += chunk

    def run(self, n: int) -> list[float]:
        """Latencies (ms) of ``n`` requests, one after the other."""
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.one()
            lat.append((time.perf_counter() - t0) * 1000)
        return lat


def machine_load() -> str:
    """The 1-minute load average and the processes runnable now (2 cores, shared with other agents)."""
    fields = Path("/proc/loadavg").read_text().split()
    return f"load {fields[0]} (1 min), {fields[3].split('/')[0]} runnable, {os.cpu_count()} cores"


def idle_table(targets: dict[str, tuple[str, int, str]], rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    """p50/p99 and added p50/p99 (against direct in the same round) of every path, per round."""
    names = list(targets)
    out: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": [], "added_p50": [], "added_p99": []} for k in names}
    clients = {k: Sequential(*targets[k]) for k in names}
    try:
        for c in clients.values():
            c.run(50)  # warm: pools filled, sessions' streams and caches exercised
        for rnd in range(rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # no path always follows the same one
            got = {}
            for k in order:
                lat = clients[k].run(n)
                got[k] = (pct(lat, 50), pct(lat, 99))
            for k, (p50, p99) in got.items():
                out[k]["p50"].append(p50)
                out[k]["p99"].append(p99)
                out[k]["added_p50"].append(p50 - got["direct"][0])
                out[k]["added_p99"].append(p99 - got["direct"][1])
            print(f"idle round {rnd}: " + ", ".join(f"{k} {got[k][0]:.3f}" for k in names) + f" ms p50; {machine_load()}",
                  flush=True)
    finally:
        for c in clients.values():
            c.close()
    return out


def idle_rows(idle: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in idle.items()}
    rows = []
    for k, m in med.items():
        floor = FLOOR_OF.get(k)
        f = med.get(floor or "")
        rows.append({"path": k, "p50_ms": round(m["p50"], 3), "p99_ms": round(m["p99"], 3),
                     "added_p50_ms": round(m["added_p50"], 3), "added_p99_ms": round(m["added_p99"], 3),
                     "floor": floor if f else None,
                     "floor_added_p50_ms": round(f["added_p50"], 3) if f else None,
                     "floor_added_p99_ms": round(f["added_p99"], 3) if f else None,
                     "ratio_p50": round(m["added_p50"] / f["added_p50"], 2) if f and f["added_p50"] > 0 else None,
                     "ratio_p99": round(m["added_p99"] / f["added_p99"], 2) if f and f["added_p99"] > 0 else None})
    return rows


def print_idle(rows: list[dict[str, Any]], rounds: int, n: int) -> None:
    print(f"\nIdle: one request at a time over one keep-alive connection, {n} per path per round, medians of {rounds} rounds")
    print("| path | p50 ms | p99 ms | added p50 | added p99 | the floor with as many proxies | its added p50 | its added p99 "
          "| ratio p50 | ratio p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['p50_ms']} | {r['p99_ms']} | {r['added_p50_ms']} | {r['added_p99_ms']} | "
              f"{r['floor'] or '-'} | {_dash(r['floor_added_p50_ms'])} | {_dash(r['floor_added_p99_ms'])} | "
              f"{_dash(r['ratio_p50'])} | {_dash(r['ratio_p99'])} |")


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


def _dash(v: object) -> object:
    return "-" if v is None else v


def saturation(rig: Rig, args: argparse.Namespace, wrk: str | None) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for rep in range(args.repeats):
        for name, (h, p, path) in rig.targets.items():
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
                  f" 5 MB at {r['mbps'][-1] if r['mbps'] else '-'} MB/s; {machine_load()}", flush=True)
    return results


def saturation_rows(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    med = {k: {m: statistics.median(v) if v else None for m, v in r.items()} for k, r in results.items()}
    d = med["direct"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    rows = []
    for name, m in med.items():
        chain = med.get(FLOOR_OF.get(name, ""), {})
        rows.append({
            "path": name, "rps": m["rps"], "rps_vs_direct": ratio(m["rps"], d["rps"]),
            "rps_vs_nginx": ratio(m["rps"], med.get("nginx", {}).get("rps")),
            "rps_vs_haproxy": ratio(m["rps"], med.get("haproxy", {}).get("rps")),
            "rps_vs_floor": ratio(m["rps"], med.get("floor", {}).get("rps")),
            "floor_chain": FLOOR_OF.get(name) if chain else None,
            "rps_vs_floor_chain": ratio(m["rps"], chain.get("rps")),
            "p50_ms": round(m["p50"], 3), "p99_ms": round(m["p99"], 3),
            "added_p50_ms": round(m["p50"] - d["p50"], 3), "added_p99_ms": round(m["p99"] - d["p99"], 3),
            "mbps_5mb": round(m["mbps"], 1) if m.get("mbps") else None,
            "mbps_vs_nginx": ratio(m.get("mbps"), med.get("nginx", {}).get("mbps")),
            "mbps_vs_haproxy": ratio(m.get("mbps"), med.get("haproxy", {}).get("mbps")),
            "mbps_vs_floor": ratio(m.get("mbps"), med.get("floor", {}).get("mbps")),
        })
    return rows


def print_saturation(rows: list[dict[str, Any]], rate: float) -> None:
    print(f"\n| path | req/s (wrk, 8 conns) | vs direct | vs nginx | vs HAProxy | vs floor | p50 ms @{rate:g}/s | p99 ms |"
          " added p50 | added p99 | 5 MB body, MB/s | vs nginx | vs HAProxy | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rps = f"{r['rps']:.0f}" if r["rps"] else "-"
        print(f"| {r['path']} | {rps} | {_dash(r['rps_vs_direct'])} | {_dash(r['rps_vs_nginx'])} | {_dash(r['rps_vs_haproxy'])} | "
              f"{_dash(r['rps_vs_floor'])} | {r['p50_ms']} | {r['p99_ms']} | {r['added_p50_ms']} | {r['added_p99_ms']} | "
              f"{_dash(r['mbps_5mb'])} | {_dash(r['mbps_vs_nginx'])} | {_dash(r['mbps_vs_haproxy'])} | {_dash(r['mbps_vs_floor'])} |")
    by = {r["path"]: r for r in rows}
    print("\n| path | req/s (wrk, 8 conns) | the floor with as many proxies | its req/s | ratio |")
    print("|---|---|---|---|---|")
    for name in CPND:
        r = by.get(name)
        if r and r["floor_chain"]:
            f = by[r["floor_chain"]]
            print(f"| {name} | {r['rps']:.0f} | {r['floor_chain']} | {f['rps']:.0f} | {r['rps_vs_floor_chain']} |")


# ---------------------------------------------------------------- CPU at saturation


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of ``pid`` so far."""
    got = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if "ctxt_switches" in line)
    return int(got["voluntary_ctxt_switches"]), int(got["nonvoluntary_ctxt_switches"])


def saturated_cpu(rig: Rig, name: str, wrk: str, seconds: float) -> dict[str, Any]:
    """wrk (8 connections) on one path: requests/s, and for every process on it, the instance and wrk
    itself, CPU µs per request, the share of a core it used, and context switches per request."""
    h, p, path = rig.targets[name]
    pids = [("instance", rig.instance_pid), *rig.roles[name]]
    cpu0 = {role: cpu_seconds(pid) for role, pid in pids}
    sw0 = {role: _switches(pid) for role, pid in pids}
    t0 = time.monotonic()
    proc = subprocess.Popen([wrk, "-t1", "-c8", f"-d{seconds:g}s", f"http://{h}:{p}{path}"], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    m = re.search(r"(\d+) requests in", out)
    n = int(m.group(1)) if m else 0
    if not n or "Non-2xx" in out:
        raise RuntimeError(f"wrk on {name}: {out}")
    row: dict[str, Any] = {"rps": n / seconds, "processes": {}}
    for role, pid in pids:
        sw = _switches(pid)
        row["processes"][role] = {"cpu_us": (cpu_seconds(pid) - cpu0[role]) / n * 1e6,
                                  "core": (cpu_seconds(pid) - cpu0[role]) / wall,
                                  "switches": (sw[0] - sw0[role][0]) / n, "preempted": (sw[1] - sw0[role][1]) / n}
    cpu = usage.ru_utime + usage.ru_stime
    row["processes"]["wrk"] = {"cpu_us": cpu / n * 1e6, "core": cpu / wall, "switches": usage.ru_nvcsw / n,
                               "preempted": usage.ru_nivcsw / n}
    return row


def saturation_cpu(args: argparse.Namespace, wrk: str, out: Path) -> int:
    """Each cpnd path and the floor with as many proxies, at saturation in alternation: where its CPU goes."""
    ensure("nginx", "nginx-light")
    paths = [p for pair in zip(FLOORS, CPND) for p in pair]
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
    with Rig({}, with_peers=False) as rig:
        for k in paths:
            Sequential(*rig.targets[k]).run(50)
        for rep in range(args.repeats):
            for k in paths:
                rows[k].append(saturated_cpu(rig, k, wrk, args.seconds))
                procs = rows[k][-1]["processes"]
                print(f"rep {rep} {k}: {rows[k][-1]['rps']:.0f} req/s; " + "; ".join(
                    f"{role} {v['cpu_us']:.0f} µs, {v['core']:.2f} core" for role, v in procs.items()) + f"; {machine_load()}",
                    flush=True)
    med = {k: {"rps": statistics.median(r["rps"] for r in v),
               "processes": {role: {m: round(statistics.median(r["processes"][role][m] for r in v), 2)
                                    for m in ("cpu_us", "core", "switches", "preempted")} for role in v[0]["processes"]}}
           for k, v in rows.items()}
    print(f"\nAt saturation (wrk, 8 connections, {args.seconds:g} s, medians of {args.repeats}): per request, CPU µs "
          "and context switches (voluntary / preempted) of each process, and the share of a core it used")
    print("| path | req/s | of its floor | process: CPU µs per request, core share, switches |")
    print("|---|---|---|---|")
    for k in paths:
        floor = med.get(FLOOR_OF.get(k, ""), {})
        ratio = f"{med[k]['rps'] / floor['rps']:.2f}" if floor else "-"
        print(f"| {k} | {med[k]['rps']:.0f} | {ratio} | " + "; ".join(
            f"{role} {v['cpu_us']:.0f} µs, {v['core']:.2f}, {v['switches']:.2f} / {v['preempted']:.2f}"
            for role, v in med[k]["processes"].items()) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane_saturation_cpu.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "medians": med, "runs": rows, "load_after": machine_load()}, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------- the breakdown


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Counted by kind (the rest of raw_syscalls:sys_enter is "other"): a tracepoint for each of the
# ~350 syscalls takes perf ~15 s to tear down per process.
SYSCALL_KINDS = ("epoll_wait", "epoll_ctl", "recvfrom", "sendto", "poll", "read", "write", "close", "socket",
                 "connect", "accept4", "getpeername", "getsockname", "setsockopt", "getsockopt", "futex",
                 "timerfd_settime", "getpid", "getrandom", "ioctl", "fcntl", "mmap", "munmap", "brk", "madvise",
                 "openat", "newfstatat", "rt_sigreturn", "shutdown", "sendmsg", "recvmsg", "clock_gettime")


class SyscallCounter:
    """Syscalls by kind of one process between ``enable()`` and ``disable()``: perf stat on the
    syscall tracepoints, switched on and off through its control FIFO (counted in the kernel:
    nothing slows down), else strace -c over the whole life of the counter (ptrace: slower)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.perf = shutil.which("perf")
        if self.perf:
            self.ctl, self.ack = out.with_suffix(".ctl"), out.with_suffix(".ack")
            for f in (self.ctl, self.ack):
                f.unlink(missing_ok=True)
                os.mkfifo(f)
            events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{k}" for k in SYSCALL_KINDS)])
            cmd = [self.perf, "stat", "-x", ",", "-o", str(out), "-e", events, "-D", "-1",
                   "--control", f"fifo:{self.ctl},{self.ack}", "-p", str(pid)]
        else:
            strace = ensure("strace", "strace")
            if strace is None:
                raise RuntimeError("neither perf nor strace is available for the syscall counts")
            cmd = [strace, "-c", "-f", "-q", "-o", str(out), "-p", str(pid)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.perf:
            # Opening the FIFOs waits for perf to open them: it is attached once they are open.
            self._ctl = open(self.ctl, "w")  # noqa: SIM115 - closed in stop()
            self._ack = open(self.ack)  # noqa: SIM115
        else:
            time.sleep(1.0)  # strace says nothing when it is attached

    def _command(self, what: str) -> None:
        if self.perf:
            self._ctl.write(what + "\n")
            self._ctl.flush()
            if self._ack.readline().strip("\0\n") != "ack":
                raise RuntimeError(f"perf did not acknowledge {what}")

    def enable(self) -> None:
        self._command("enable")

    def disable(self) -> None:
        self._command("disable")

    def interrupt(self) -> None:
        """Tell the counter to write its counts (several are stopped together: perf takes a moment)."""
        self.proc.send_signal(signal.SIGINT)

    def stop(self) -> dict[str, int]:
        self.interrupt()
        self.proc.wait(timeout=60)
        if self.perf:
            self._ctl.close()
            self._ack.close()
        text = self.out.read_text()
        counts: dict[str, int] = {}
        if self.perf:
            for line in text.splitlines():
                parts = line.split(",")
                if len(parts) > 2 and parts[0].isdigit():
                    name = "total" if parts[2] == "raw_syscalls:sys_enter" else parts[2].split("sys_enter_", 1)[-1]
                    counts[name] = int(parts[0])
            counts["other"] = counts.pop("total", 0) - sum(counts.values())
        else:
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
        return {k: v for k, v in counts.items() if v}


class Probe:
    """The probe counters (cpnd/probe.py) of a set of processes, over a window (what ``DIR/mode`` says)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def start(self, pids: list[int]) -> None:
        for pid in pids:
            (self.dir / f"probe-{pid}.json").unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)

    def read(self, pids: list[int], what: str = "json") -> dict[int, Any]:
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        out: dict[int, Any] = {}
        deadline = time.monotonic() + 10
        for pid in pids:
            f = self.dir / f"probe-{pid}.json"
            while not f.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"process {pid} wrote no probe counters: was it started with CPN_PROBE?")
                time.sleep(0.01)
            out[pid] = json.loads(f.read_text()) if what == "json" else self.dir / f"probe-{pid}.prof"
        return out


def measure_window(probe: Probe, pids: list[int], work: Any, tmp: Path) -> dict[int, dict[str, Any]]:
    """Counters, syscalls and CPU of ``pids`` while ``work()`` runs; with the window's length."""
    counters = {pid: SyscallCounter(pid, tmp / f"sys-{pid}.txt") for pid in pids}
    try:
        probe.start(pids)
        for c in counters.values():
            c.enable()
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        t0 = time.monotonic()
        work()
        cpu1 = {pid: cpu_seconds(pid) for pid in pids}
        seconds = time.monotonic() - t0
        for c in counters.values():
            c.disable()
        sys_seconds = time.monotonic() - t0
        loop = probe.read(pids)
    finally:
        for c in counters.values():
            c.interrupt()
        sys_counts = {pid: c.stop() for pid, c in counters.items()}
    return {pid: {"cpu_s": cpu1[pid] - cpu0[pid], "cpu_window_s": seconds, "syscalls": sys_counts[pid],
                  "sys_window_s": sys_seconds, "loop": loop[pid]} for pid in pids}


LOOP_KEYS = ("batches", "sleeps", "steps", "spawned", "scheduled")


def per_request(m: dict[str, Any], idle: dict[str, Any], n: int) -> dict[str, Any]:
    """A window's counts per request, less what the process does on its own (timers, keepalives)
    over as long, from an idle window of the same process."""
    def bg(count: float, window: float, idle_count: float, idle_window: float) -> float:
        return (count - idle_count * window / idle_window) / n

    loop, iloop = m["loop"], idle["loop"]
    lw, ilw = loop["seconds"], iloop["seconds"]
    out: dict[str, Any] = {k: round(bg(loop[k], lw, iloop[k], ilw), 2) for k in LOOP_KEYS}
    out["cpu_us"] = round(bg(m["cpu_s"], m["cpu_window_s"], idle["cpu_s"], idle["cpu_window_s"]) * 1e6, 1)
    out["gc_runs"] = [round(bg(loop["gc_runs"][g], lw, iloop["gc_runs"][g], ilw), 4) for g in range(3)]
    out["gc_us"] = round(bg(sum(loop["gc_s"]), lw, sum(iloop["gc_s"]), ilw) * 1e6, 1)
    kinds = set(m["syscalls"]) | set(idle["syscalls"])
    sysc = {k: bg(m["syscalls"].get(k, 0), m["sys_window_s"], idle["syscalls"].get(k, 0), idle["sys_window_s"])
            for k in kinds}
    out["syscalls"] = round(sum(sysc.values()), 2)
    out["by_kind"] = {k: round(v, 2) for k, v in sorted(sysc.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    tasks = {k: bg(v, lw, iloop["step_s"].get(k, 0.0), ilw) * 1e6 for k, v in loop["step_s"].items()}
    steps = {k: bg(v, lw, iloop["step_count"].get(k, 0), ilw) for k, v in loop["step_count"].items()}
    out["tasks"] = {k: {"us": round(tasks[k], 1), "steps": round(steps[k], 2)}
                    for k in sorted(tasks, key=lambda k: -tasks[k]) if steps[k] >= 0.05}
    return out


IO_WAIT = "<method 'poll' of 'select.epoll' objects>"  # the loop waiting: not work


def profile_top(prof: Path, n_req: int, top: int = 14) -> dict[str, Any]:
    """A cProfile dump per request (the wait in epoll left out): the functions with the most own
    time, own time by module, and cpnd's functions by cumulative time."""
    st = pstats.Stats(str(prof))
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        if func == IO_WAIT:
            continue
        rows.append({"function": f"{func} ({_short(file)}:{line})", "module": _module(file, func),
                     "calls": round(nc / n_req, 2), "own_us": round(tt / n_req * 1e6, 1),
                     "cum_us": round(ct / n_req * 1e6, 1)})
    total = sum(r["own_us"] for r in rows)
    rows.sort(key=lambda r: -r["own_us"])
    for r in rows:
        r["share"] = round(r["own_us"] / total, 3) if total else 0.0
    modules: dict[str, float] = {}
    for r in rows:
        modules[r["module"]] = modules.get(r["module"], 0.0) + r["own_us"]
    cpnd = sorted((r for r in rows if r["function"].split(" (", 1)[1].startswith("cpnd/")), key=lambda r: -r["cum_us"])
    calls = sum(nc for (_, _, _), (_, nc, _, _, _) in st.stats.items())  # type: ignore[attr-defined]
    return {"total_us": round(total, 1), "python_calls": round(calls / n_req), "top": rows[:top],
            "by_module": {k: round(v, 1) for k, v in sorted(modules.items(), key=lambda kv: -kv[1])},
            "cpnd_cumulative": [{"function": r["function"], "cum_us": r["cum_us"], "calls": r["calls"]} for r in cpnd[:20]]}


def _short(file: str) -> str:
    for marker in ("/cpnd/", "/trio/", "/h11/", "/bench/", "/attr/", "/cryptography/"):
        if marker in file:
            return marker.strip("/") + "/" + file.split(marker, 1)[1]
    return file if file.startswith("~") else Path(file).name


def _module(file: str, func: str) -> str:
    """What a profiled function belongs to: h11, trio, a cpnd module, the socket calls, ..."""
    if file == "~":
        if "_socket.socket" in func:
            return "socket calls"
        if "cryptography" in func or "ChaCha20" in func:
            return "crypto"
        return "builtins"
    for marker in ("/h11/", "/trio/", "/cryptography/", "/attr/", "/msgpack/"):
        if marker in file:
            return marker.strip("/")
    if "/cpnd/" in file or "/bench/" in file:
        return _short(file).split(":", 1)[0]
    return "stdlib"


def py_spy() -> str | None:
    """py-spy (``pip install -e '.[bench]'``), beside this Python or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frame(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


# Each py-spy sample goes to the first of these whose pattern is in its stack (the leaf frame only
# for the first two): what a gateway spends its CPU on, the floor's own work (sockets, the loop,
# h11) apart from what only cpnd does.
CATEGORIES: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    # Paced by time, not by requests (load re-advertised as it changes, keepalives): per request
    # it depends on the request rate, and a slowed process (the calls mode) counts more of it.
    ("control plane (load adverts, UPDATEs, keepalives: per second, not per request)", False,
     ("Daemon._timer_loop", "Gateway.handle_timer", "Gateway._flush (", "Gateway._on_update", "Gateway._propagate",
      "PendingUpdate", "Daemon._memory_loop", "Daemon._health_loop", "Daemon._edge_log_loop")),
    ("socket send/recv calls", True, ("_SocketType._nonblocking_helper (trio/_socket.py", "Connection._write (cpnd/daemon.py")),
    ("epoll (the loop's wait and poll)", True, ("EpollIOManager.get_events", "EpollIOManager._update_registrations")),
    ("tunnel records: seal/open (crypto)", False, ("RecordLayer.seal", "RecordLayer.open")),
    ("selection (the planner: constraints, candidates, rank, estimates)", False, ("(cpnd/planner.py",)),
    ("header rewriting (filter_headers, framing, content_length, translate_target, split_head)", False,
     ("filter_headers (cpnd", "framing (cpnd", "content_length (cpnd", "translate_target (cpnd", "split_head (cpnd",
      "check_target (cpnd")),
    ("a new h11.Connection per tunnel stream", False, ("H11Stream.__init__",)),
    ("h11 events built anew (Request/Response/EndOfMessage validation)", False, ("(h11/_events.py",)),
    ("h11 parse and serialise", False, ("(h11/",)),
    ("cancel scopes and timeouts", False, ("CancelScope.__enter__", "CancelScope.__exit__", "CancelScope._close",
                                           "move_on_", "fail_after", "fail_at", "Users._waiting")),
    ("accounting, admission, health, metrics", False, ("(cpnd/load.py", "(cpnd/metrics.py", "(cpnd/health.py",
                                                       "(cpnd/admission.py", "Egress.admit", "Egress.health_result")),
    ("tunnel frames, mux, session (no crypto)", False, ("(cpnd/streams.py", "(cpnd/tunnel.py", "(cpnd/session.py",
                                                        "(cpnd/wire.py", "Connection._process", "Connection.send_tunnel",
                                                        "Connection._enqueue", "DataPlane.on_stream")),
    ("peer writer and reader tasks (wake, batch, loop)", False, ("Connection._writer", "Connection._reader")),
    ("the rest of the proxy's own request loop (cpnd's data plane modules; the floor's _handle)", False,
     tuple(f"(cpnd/{m}.py" for m in ("dataplane", "users", "attempts", "egress", "transit", "relay", "h1", "whole", "inprocess",
                                     "body", "plane"))
     + ("_handle (bench/floor_proxy.py", "_next (bench/floor_proxy.py", "_guarded (bench/floor_proxy.py")),
    ("trio scheduling and socket wrappers", False, ("(trio/",)),
)
FLOOR_WORK = ("socket send/recv calls", "epoll (the loop's wait and poll)", "h11 parse and serialise",
              "the rest of the proxy's own request loop (cpnd's data plane modules; the floor's _handle)",
              "h11 events built anew (Request/Response/EndOfMessage validation)", "trio scheduling and socket wrappers")


def _category(frames: list[str]) -> str:
    for name, leaf_only, patterns in CATEGORIES:
        where = frames[-1:] if leaf_only else frames
        if any(p in f for f in where for p in patterns):
            return name
    return "other (stdlib, partial stacks)"


def _stack_counts(raw: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Counts by category (``CATEGORIES``) and by the innermost frame of ours of a file of stacks and
    their counts (py-spy's raw format: samples; the probe's calls mode: calls)."""
    inner: dict[str, float] = {}
    cats: dict[str, float] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue  # a stack py-spy could not read whole
        frames = stack.split(";")
        ours = [f for f in frames if ("cpnd/" in f or "floor_proxy" in f) and "main.py" not in f
                and "__main__" not in f and "probe.py" not in f]
        key = _frame(ours[-1]) if ours else f"(trio/h11/stdlib, no frame of ours: {_frame(frames[-1])})"
        inner[key] = inner.get(key, 0) + int(count)
        cat = _category(frames)
        cats[cat] = cats.get(cat, 0) + int(count)
    return cats, inner


def attribute(raw: Path, n_req: int, cpu_us: float, idle: tuple[Path, float] | None = None,
              top: int = 24) -> dict[str, Any]:
    """``_stack_counts`` per request, less what the process does on its own over as long (``idle``:
    the stacks of an idle window and its length over this window's); ``us`` is a count's share
    of the process's measured CPU per request."""
    cats, inner = _stack_counts(raw)
    if idle is not None:
        icats, iinner = _stack_counts(idle[0])
        cats = {k: v - icats.get(k, 0) * idle[1] for k, v in cats.items()}
        inner = {k: v - iinner.get(k, 0) * idle[1] for k, v in inner.items()}
    total = max(sum(v for v in cats.values() if v > 0), 1)
    rows = sorted(inner.items(), key=lambda kv: -kv[1])
    return {"count": round(total), "per_request": round(total / n_req, 1),
            "categories": {k: {"per_request": round(v / n_req, 1), "us": round(v / total * cpu_us, 1)}
                           for k, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v / total >= 0.002},
            "top": [{"frame": k, "per_request": round(v / n_req, 1), "us": round(v / total * cpu_us, 1)}
                    for k, v in rows[:top]]}


def _idle_window(rig: Rig, probe: Probe, paths: list[str]) -> dict[int, float]:
    """A probe window of 3 s with no request over every process on ``paths``: what each does on its
    own (timers, keepalives, the load loop), and the window's length, by pid."""
    pids = sorted({pid for k in paths for _, pid in rig.roles[k]})
    probe.start(pids)
    time.sleep(3.0)
    return {pid: c["seconds"] for pid, c in probe.read(pids).items()}


def _request_window(rig: Rig, probe: Probe, k: str, n: int) -> dict[int, float]:
    """``n`` sequential requests on path ``k`` (after 100 that warm it) in a probe window over its
    processes: the window's length, by pid."""
    client = Sequential(*rig.targets[k])
    client.run(100)
    pids = [pid for _, pid in rig.roles[k]]
    probe.start(pids)
    client.run(n)
    seconds = {pid: c["seconds"] for pid, c in probe.read(pids).items()}
    client.close()
    return seconds


def calls_pass(rig: Rig, probe: Probe, paths: list[str], n: int, cpu: dict[str, list[float]],
               keep: Path | None = None) -> dict[str, Any]:
    """Every call each gateway makes over ``n`` sequential requests, by the stack it came from,
    less the calls of an idle window (timers, keepalives, the load loop) over as long."""
    (probe.dir / "mode").write_text("calls")
    idle_s = _idle_window(rig, probe, paths)
    for pid in idle_s:
        (probe.dir / f"probe-{pid}.calls").rename(probe.dir / f"idle-{pid}.calls")
    out: dict[str, Any] = {}
    for k in paths:
        seconds = _request_window(rig, probe, k, n)
        out[k] = {role: attribute(probe.dir / f"probe-{pid}.calls", n, cpu_us,
                                  (probe.dir / f"idle-{pid}.calls", seconds[pid] / idle_s[pid]))
                  for (role, pid), cpu_us in zip(rig.roles[k], cpu[k])}
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for role, pid in rig.roles[k]:
                name = f"{k}-{role.split(' ', 1)[0]}".replace(" ", "_")
                shutil.copy(probe.dir / f"probe-{pid}.calls", keep / f"{name}.calls")
                shutil.copy(probe.dir / f"idle-{pid}.calls", keep / f"{name}-idle.calls")
    return out


def spy_pass(rig: Rig, probe: Probe, paths: list[str], n: int, cpu: dict[str, list[float]], tmp: Path) -> dict[str, Any]:
    """Sample every gateway of each path with py-spy while ``n`` sequential requests run."""
    spy = py_spy()
    assert spy is not None
    out: dict[str, Any] = {}
    for k in paths:
        client = Sequential(*rig.targets[k])
        client.run(100)
        procs = []
        for role, pid in rig.roles[k]:
            f = tmp / f"spy-{pid}.txt"
            procs.append((role, f, subprocess.Popen([spy, "record", "-p", str(pid), "-r", "1000", "-f", "raw", "-o", str(f),
                                                     "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        pids = [pid for _, pid in rig.roles[k]]
        probe.start(pids)
        time.sleep(1.0)  # attached (py-spy says nothing when)
        client.run(n)
        client.close()
        probe.read(pids)
        for _, _, p in procs:
            p.send_signal(signal.SIGINT)
        out[k] = {}
        for (role, f, p), cpu_us in zip(procs, cpu[k]):
            p.wait(timeout=60)
            out[k][role] = attribute(f, n, cpu_us)
    return out


def _opcode_counts(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, n = line.rpartition(" ")
        out[name] = out.get(name, 0) + int(n)
    return out


def opcodes(args: argparse.Namespace) -> int:
    """Every bytecode instruction each process on a path executes per request, by function (the
    probe's opcodes mode: exact, load-independent), less an idle window's over as long."""
    probe_dir = Path(tempfile.mkdtemp(prefix="cpn-probe-"))
    os.environ["CPN_PROBE"] = str(probe_dir)
    (probe_dir / "mode").write_text("opcodes")
    n = args.breakdown_requests
    paths = ["floor", *CPND]
    result: dict[str, Any] = {"requests": n, "command": " ".join(sys.argv), "paths": {}}
    ensure("nginx", "nginx-light")
    try:
        with Rig({}, with_peers=False) as rig:
            probe = Probe(probe_dir)
            idle_s = _idle_window(rig, probe, paths)
            idle = {pid: _opcode_counts(probe_dir / f"probe-{pid}.opcodes") for pid in idle_s}
            for k in paths:
                secs = _request_window(rig, probe, k, n)
                result["paths"][k] = {}
                for role, pid in rig.roles[k]:
                    scale = secs[pid] / idle_s[pid]
                    got = _opcode_counts(probe_dir / f"probe-{pid}.opcodes")
                    per = {f: round((v - idle[pid].get(f, 0) * scale) / n, 1) for f, v in got.items()}
                    per = dict(sorted(((f, v) for f, v in per.items() if abs(v) >= 0.5), key=lambda kv: -kv[1]))
                    result["paths"][k][role] = {"total": round(sum(per.values())), "functions": per,
                                                "phases": _phases(probe_dir / f"probe-{pid}.opcodes.phases",
                                                                  idle[pid], idle_s[pid], n)}
                    print(f"\n{k}, {role}: {sum(per.values()):.0f} bytecodes a request; the most:")
                    for f, v in list(per.items())[:args.opcodes_top]:
                        print(f"  {v:8.1f}  {f}")
                    print_phases(result["paths"][k][role]["phases"], args.opcodes_top // 2)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane_opcodes.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _phases(path: Path, idle: dict[str, int], idle_s: float, n: int) -> dict[str, Any]:
    """The bytecodes of a request window by phase of the request (cpnd/probe.py, PHASES), a request:
    each phase's, less the idle window's rate over the time spent in it. "critical" is "in" and
    "out" (from the request's read to its write upstream, from the answer's read to its write
    downstream); "wait" runs while the upstream has the request; "after", from the answer's write
    to the next request's read, is on the next request's path too whenever it comes meanwhile."""
    got = json.loads(path.read_text())
    out: dict[str, Any] = {}
    for phase, ops in got["ops"].items():
        scale = got["seconds"].get(phase, 0.0) / idle_s
        per = {f: round((v - idle.get(f, 0) * scale) / n, 1) for f, v in ops.items()}
        per = dict(sorted(((f, v) for f, v in per.items() if abs(v) >= 0.5), key=lambda kv: -kv[1]))
        out[phase] = {"total": round(sum(per.values())), "functions": per}
    out["critical"] = sum(out.get(p, {}).get("total", 0) for p in ("in", "out"))
    return out


def print_phases(phases: dict[str, Any], top: int) -> None:
    print("  by phase: " + ", ".join(f"{p} {phases[p]['total']}" for p in ("in", "wait", "out", "after", "idle")
                                     if p in phases) + f" (critical: in + out = {phases['critical']})")
    for p in ("in", "out", "after", "wait"):
        if p in phases and phases[p]["total"]:
            print(f"  {p}, the most:")
            for f, v in list(phases[p]["functions"].items())[:top]:
                print(f"    {v:8.1f}  {f}")


def _save(result: dict[str, Any], args: argparse.Namespace, name: str) -> None:
    """A breakdown's result, with the machine's load after it, as ``name`` in ``--out``."""
    result["load_after"] = machine_load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1) + "\n")


def breakdown(args: argparse.Namespace) -> int:
    """Counts per request, per path and gateway, against the floor chain; then cProfile tops."""
    probe_dir = Path(tempfile.mkdtemp(prefix="cpn-probe-"))
    os.environ["CPN_PROBE"] = str(probe_dir)  # inherited by every cpnd and floor process started below
    n = args.breakdown_requests
    paths = [*FLOORS, *CPND]
    result: dict[str, Any] = {"requests": n, "command": " ".join(sys.argv), "load_before": machine_load(), "paths": {}}
    ensure("nginx", "nginx-light")  # the instance
    try:
        with Rig({}, with_peers=False) as rig:
            probe = Probe(probe_dir)
            all_pids = sorted({pid for k in paths for _, pid in rig.roles[k]})
            idle = measure_window(probe, all_pids, lambda: time.sleep(args.idle_seconds), probe_dir)
            for k in paths:
                pids = [pid for _, pid in rig.roles[k]]
                client = Sequential(*rig.targets[k])  # a new connection per path: the old ones may have idled out
                client.run(100)
                m = measure_window(probe, pids, lambda: client.run(n), probe_dir)
                client.close()
                result["paths"][k] = [{"role": role, **per_request(m[pid], idle[pid], n)} for role, pid in rig.roles[k]]
                print(f"{k}: " + "; ".join(f"{r['role']} {r['cpu_us']} µs, {r['steps']} steps, {r['sleeps']} wake-ups, "
                                          f"{r['syscalls']} syscalls" for r in result["paths"][k]) + f"; {machine_load()}",
                      flush=True)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "dataplane_breakdown.json").write_text(json.dumps(result, indent=1) + "\n")  # the counts, whatever follows
            cpu = {k: [r["cpu_us"] for r in result["paths"][k]] for k in paths}
            result["calls"] = calls_pass(rig, probe, [k for k in paths if k not in FLOORS[1:]], args.calls_requests, cpu,
                                         Path(args.keep_profiles) if args.keep_profiles else None)
            if py_spy():
                (probe_dir / "mode").write_text("quiet")  # no counters while py-spy samples
                result["py_spy"] = spy_pass(rig, probe, [k for k in paths if k not in FLOORS[1:]], args.spy_requests,
                                            cpu, probe_dir)
            else:
                print("note: py-spy missing (pip install -e '.[bench]'): cProfile only", file=sys.stderr)
            (probe_dir / "mode").write_text("profile")
            result["profiles"] = {}
            for k in paths:
                if k in FLOORS[1:]:
                    continue  # a floor proxy is the same code at every depth
                pids = [pid for _, pid in rig.roles[k]]
                client = Sequential(*rig.targets[k])
                client.run(100)
                probe.start(pids)
                client.run(args.profile_requests)
                profs = probe.read(pids, "prof")
                client.close()
                result["profiles"][k] = {role: profile_top(profs[pid], args.profile_requests) for role, pid in rig.roles[k]}
                if args.keep_profiles:
                    keep = Path(args.keep_profiles)
                    keep.mkdir(parents=True, exist_ok=True)
                    for role, pid in rig.roles[k]:
                        shutil.copy(profs[pid], keep / f"{k}-{role.split(' ', 1)[0]}.prof".replace(" ", "_"))
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    _save(result, args, "dataplane_breakdown.json")
    print_breakdown(result)
    return 0


SYSCALL_COLUMNS = ("epoll_wait", "epoll_ctl", "recvfrom", "sendto", "write", "poll")


def print_categories(result: dict[str, Any], what: str) -> None:
    """Calls (exact) or py-spy's samples by category, a column per gateway, beside the floor proxy's."""
    data = result[what]
    cols = [(k, role) for k, roles in data.items() for role in roles]
    names = [c[0] for c in CATEGORIES] + ["other (stdlib, partial stacks)"]
    cpu = {(k, r["role"]): r["cpu_us"] for k, roles in result["paths"].items() for r in roles}
    if what == "calls":
        print("\nFunction calls (Python and C) per request by category, exact (the probe's calls mode); "
              "µs = calls x the gateway's CPU per call")
    else:
        print("\nµs per request by category from py-spy's samples (share x the CPU measured above; "
              "samples taken while the process waits for a core count too)")
    print("| category | " + " | ".join(f"{k}: {role}" for k, role in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in names:
        vals = [data[k][role]["categories"].get(name) for k, role in cols]
        if any(vals):
            floor_work = " (the floor's work too)" if name in FLOOR_WORK else ""
            cell = (lambda v: f"{v['per_request']:.0f} / {v['us']:.0f}") if what == "calls" else (lambda v: f"{v['us']:.0f}")
            print(f"| {name}{floor_work} | " + " | ".join(cell(v) if v else "-" for v in vals) + " |")
    if what == "calls":
        print("| all calls / CPU µs | " + " | ".join(f"{data[k][role]['per_request']:.0f} / {cpu[(k, role)]:.0f}"
                                                    for k, role in cols) + " |")
        print("| CPU µs per call | " + " | ".join(f"{cpu[(k, role)] / data[k][role]['per_request']:.2f}"
                                                for k, role in cols) + " |")


def print_breakdown(result: dict[str, Any]) -> None:
    n = result["requests"]
    print(f"\nPer request, {n} sequential requests per path (counts less each process's idle rate); "
          f"{result['load_before']} before, {result['load_after']} after")
    print("| path | gateway | CPU µs | syscalls | " + " | ".join(SYSCALL_COLUMNS) + " | other syscalls | loop batches "
          "| wake-ups (slept) | task steps | tasks spawned | GC runs per 1000 (gen 0/1/2) | GC µs |")
    print("|---|---|---|---|" + "---|" * len(SYSCALL_COLUMNS) + "---|---|---|---|---|---|---|")
    for k, roles in result["paths"].items():
        for r in roles:
            other = ", ".join(f"{s} {v}" for s, v in r["by_kind"].items() if s not in SYSCALL_COLUMNS) or "-"
            print(f"| {k} | {r['role']} | {r['cpu_us']:.0f} | {r['syscalls']} | "
                  + " | ".join(str(r["by_kind"].get(s, 0)) for s in SYSCALL_COLUMNS)
                  + f" | {other} | {r['batches']} | {r['sleeps']} | {r['steps']} | {r['spawned']} | "
                  + "/".join(f"{g * 1000:.1f}" for g in r["gc_runs"]) + f" | {r['gc_us']} |")
    print("\nTime in task steps and steps per request, by task (the task's function name)")
    for k, roles in result["paths"].items():
        for r in roles:
            print(f"- {k}, {r['role']}: " + ", ".join(f"{t} {v['us']:.0f} µs/{v['steps']} steps"
                                                     for t, v in r["tasks"].items()))
    for what in ("calls", "py_spy"):
        if result.get(what):
            print_categories(result, what)
    for k, roles in result.get("calls", {}).items():
        for role, p in roles.items():
            print(f"\ncalls, {k}, {role} ({p['per_request']:.0f} a request): by the innermost frame of ours")
            for r in p["top"]:
                print(f"  {r['per_request']:7.1f} {r['us']:6.1f} µs  {r['frame']}")
    for k, roles in result.get("profiles", {}).items():
        for role, p in roles.items():
            print(f"\ncProfile, {k}, {role}: {p['python_calls']} Python calls and {p['total_us']:.0f} µs per request under "
                  "the profiler; own µs by module: "
                  + ", ".join(f"{m} {v:.0f}" for m, v in list(p["by_module"].items())[:10]))
            print("  own µs, share, calls per request:")
            for r in p["top"]:
                print(f"  {r['own_us']:7.1f} {r['share'] * 100:5.1f}% {r['calls']:6.2f}  {r['function']}")
            print("  cpnd, cumulative µs per request:")
            for r in p["cpnd_cumulative"][:12]:
                print(f"  {r['cum_us']:7.1f} {r['calls']:6.2f}  {r['function']}")


# ---------------------------------------------------------------- saturated beside sequential


SAT_PATHS = "floor,local,floor x2,1 hop"  # cpnd's paths and the floor with as many proxies (--sat-paths)


def wrk_requests(wrk: str, target: tuple[str, int, str], seconds: float) -> int:
    """wrk (1 thread, 8 keep-alive connections) on ``target`` for ``seconds``: the requests it had answered."""
    h, p, path = target
    out = subprocess.run([wrk, "-t1", "-c8", f"-d{seconds:g}s", f"http://{h}:{p}{path}"], capture_output=True,
                         text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk on {target}: {out}")
    return int(m.group(1))


# The tasks a request runs in: a floor proxy's connection, a user's connection, an egress's stream,
# a peer connection's reader and writer (these also carry the control plane's messages).
REQUEST_TASKS = ("_run_handler", "_client", "stream", "_reader", "_writer")


def _beside(m: dict[str, Any], n: int) -> dict[str, float]:
    """Time in steps of the tasks beside the requests' (timers, the load loop, health, accepting), per
    second of the window and per request."""
    rest = sum(v for k, v in m["loop"]["step_s"].items() if k not in REQUEST_TASKS)
    return {"ms_per_s": round(rest / m["loop"]["seconds"] * 1e3, 2), "us_per_request": round(rest / n * 1e6, 2)}


def saturation_breakdown(args: argparse.Namespace, wrk: str) -> int:
    """Each process of floor, local, floor x2 and 1 hop per request at saturation (wrk) beside one request at
    a time: CPU, loop batches, task steps, syscalls by kind, GC, the tasks beside the requests; then the
    bytecodes of a wrk window per request served beside those of sequential requests, by function."""
    paths = [k.strip() for k in args.sat_paths.split(",")]
    probe_dir = Path(tempfile.mkdtemp(prefix="cpn-probe-"))
    os.environ["CPN_PROBE"] = str(probe_dir)
    n = args.breakdown_requests
    result: dict[str, Any] = {"command": " ".join(sys.argv), "load_before": machine_load(), "counts": {}, "opcodes": {}}
    ensure("nginx", "nginx-light")
    try:
        with Rig({}, with_peers=False) as rig:
            probe = Probe(probe_dir)
            for k in paths:
                Sequential(*rig.targets[k]).run(100)
            pids = sorted({pid for k in paths for _, pid in rig.roles[k]})
            idle = measure_window(probe, pids, lambda: time.sleep(args.idle_seconds), probe_dir)
            for rep in range(args.repeats):
                for k in paths:
                    kp = [pid for _, pid in rig.roles[k]]
                    client = Sequential(*rig.targets[k])
                    client.run(20)
                    seq = measure_window(probe, kp, lambda: client.run(n), probe_dir)
                    client.close()
                    served: list[int] = []
                    sat = measure_window(probe, kp, lambda: served.append(wrk_requests(wrk, rig.targets[k], args.seconds)),
                                         probe_dir)
                    rows = result["counts"].setdefault(k, [])
                    for role, pid in rig.roles[k]:
                        rows.append({"role": role, "rep": rep, "rps": served[0] / args.seconds,
                                     "sequential": per_request(seq[pid], idle[pid], n),
                                     "saturated": {**per_request(sat[pid], idle[pid], served[0]),
                                                   "beside": _beside(sat[pid], served[0])}})
                        r = rows[-1]
                        print(f"rep {rep} {k}, {role}: {r['rps']:.0f} req/s; CPU µs a request {r['sequential']['cpu_us']} "
                              f"sequential, {r['saturated']['cpu_us']} saturated; {machine_load()}", flush=True)
            (probe_dir / "mode").write_text("opcodes")
            idle_s = _idle_window(rig, probe, list(paths))
            idle_ops = {pid: _opcode_counts(probe_dir / f"probe-{pid}.opcodes") for pid in idle_s}
            for k in paths:
                kp = [pid for _, pid in rig.roles[k]]
                for how in ("sequential", "saturated"):
                    if how == "sequential":
                        secs, served_n = _request_window(rig, probe, k, n), n
                    else:
                        probe.start(kp)
                        served_n = wrk_requests(wrk, rig.targets[k], args.seconds)
                        secs = {pid: c["seconds"] for pid, c in probe.read(kp).items()}
                    for role, pid in rig.roles[k]:
                        got = _opcode_counts(probe_dir / f"probe-{pid}.opcodes")
                        scale = secs[pid] / idle_s[pid]
                        per = {f: (v - idle_ops[pid].get(f, 0) * scale) / served_n for f, v in got.items()}
                        result["opcodes"].setdefault(k, {}).setdefault(role, {})[how] = {
                            "requests": served_n, "total": round(sum(per.values())),
                            "functions": {f: round(v, 1) for f, v in sorted(per.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.5}}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    _save(result, args, "dataplane_saturation_breakdown.json")
    print_saturation_breakdown(result, args)
    return 0


def _med(rows: list[dict[str, Any]], how: str, key: str) -> float:
    return statistics.median(r[how][key] if key != "beside" else r[how]["beside"]["ms_per_s"] for r in rows)


def print_saturation_breakdown(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nPer request, {args.breakdown_requests} sequential requests (seq) beside a {args.seconds:g} s wrk window "
          f"(sat), medians of {args.repeats}; counts less each process's idle rate; {result['load_before']} before, "
          f"{result['load_after']} after")
    print("| path | process | req/s saturated | CPU µs seq / sat | loop batches | task steps | syscalls "
          "| syscalls by kind, sat | GC µs | beside the requests, sat (ms/s) | bytecodes seq / sat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, rows in result["counts"].items():
        for role in dict.fromkeys(r["role"] for r in rows):
            rr = [r for r in rows if r["role"] == role]
            last = rr[-1]["saturated"]["by_kind"]
            ops = result["opcodes"].get(k, {}).get(role, {})
            print(f"| {k} | {role} | {statistics.median(r['rps'] for r in rr):.0f} | "
                  f"{_med(rr, 'sequential', 'cpu_us'):.0f} / {_med(rr, 'saturated', 'cpu_us'):.0f} | "
                  + " | ".join(f"{_med(rr, 'sequential', m):.2f} / {_med(rr, 'saturated', m):.2f}"
                               for m in ("batches", "steps", "syscalls"))
                  + " | " + ", ".join(f"{s} {v}" for s, v in last.items())
                  + f" | {_med(rr, 'sequential', 'gc_us'):.1f} / {_med(rr, 'saturated', 'gc_us'):.1f}"
                  + f" | {_med(rr, 'saturated', 'beside'):.1f} | "
                  + f"{ops.get('sequential', {}).get('total', '-')} / {ops.get('saturated', {}).get('total', '-')} |")
    for k, roles in result["opcodes"].items():
        for role, o in roles.items():
            seq, sat = o["sequential"]["functions"], o["saturated"]["functions"]
            delta = sorted(((f, sat.get(f, 0.0) - seq.get(f, 0.0)) for f in set(seq) | set(sat)), key=lambda kv: -abs(kv[1]))
            print(f"\n{k}, {role}: bytecodes a request {o['sequential']['total']} sequential, {o['saturated']['total']} "
                  f"saturated ({o['saturated']['requests']} served under the tracer); the functions that moved most:")
            for f, d in delta[:args.opcodes_top // 2]:
                print(f"  {d:+8.1f}  ({seq.get(f, 0.0):.1f} -> {sat.get(f, 0.0):.1f})  {f}")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--idle-rounds", type=int, default=7, help="rounds of the sequential idle table")
    ap.add_argument("--idle-requests", type=int, default=400, help="requests per path per round")
    ap.add_argument("--idle-only", action="store_true", help="only the sequential idle table")
    ap.add_argument("--breakdown", action="store_true", help="only the per-request breakdown (counters, syscalls, CPU, cProfile)")
    ap.add_argument("--https", action="store_true", help="only the https rows: TLS at the ingress and an https "
                    "instance, beside nginx doing the same (bench/dataplane_https.py)")
    ap.add_argument("--breakdown-requests", type=int, default=2000)
    ap.add_argument("--opcodes", action="store_true", help="only the bytecodes each gateway executes a request, by "
                    "function (exact; --breakdown-requests of them per path, sequential)")
    ap.add_argument("--opcodes-top", type=int, default=25, help="functions printed per gateway with --opcodes")
    ap.add_argument("--saturation-cpu", action="store_true", help="only CPU per request of every process on each path "
                    "at saturation (wrk), cpnd's paths beside the floor with as many proxies, in alternation")
    ap.add_argument("--saturation-breakdown", action="store_true", help="only the per-request counts of floor, local, "
                    "floor x2 and 1 hop at saturation (wrk) beside sequential requests: CPU, batches, steps, syscalls, "
                    "GC, tasks beside the requests, bytecodes")
    ap.add_argument("--sat-paths", default=SAT_PATHS, help="the paths of --saturation-breakdown (comma-separated)")
    ap.add_argument("--workers", action="store_true", help="only the [gateway] workers rows: a local instance with 1 and 2 workers")
    ap.add_argument("--profile-requests", type=int, default=1000)
    ap.add_argument("--calls-requests", type=int, default=300, help="requests per path while every call is counted")
    ap.add_argument("--spy-requests", type=int, default=4000, help="requests per path while py-spy samples")
    ap.add_argument("--keep-profiles", metavar="DIR",
                    help="keep the cProfile dumps (PATH-ROLE.prof) and the call stacks (PATH-ROLE.calls) in DIR")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="the idle window whose rates are subtracted")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--grpc", action="store_true", help="only the gRPC unary rows (bench/dataplane_grpc.py)")
    ap.add_argument("--gateway-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a [gateway] key for cpnd's gateways a, b, c (TOML value: true, 5, \"text\"); repeatable")
    args = ap.parse_args()
    for option in args.gateway_option:
        key, _, value = option.partition("=")
        GATEWAY_OPTIONS[key] = tomllib.loads(f"v = {value}")["v"]
    if args.breakdown:
        return breakdown(args)
    if args.opcodes:
        return opcodes(args)
    if args.saturation_cpu:
        wrk_bin = ensure("wrk", "wrk")
        if wrk_bin is None:
            raise SystemExit("wrk is needed for --saturation-cpu")
        return saturation_cpu(args, wrk_bin, Path(args.out))
    if args.saturation_breakdown:
        wrk_bin = ensure("wrk", "wrk")
        if wrk_bin is None:
            raise SystemExit("wrk is needed for --saturation-breakdown")
        return saturation_breakdown(args, wrk_bin)
    if args.workers:
        import dataplane_workers
        return dataplane_workers.run(args, ensure("nginx", "nginx-light"), ensure("wrk", "wrk"), Path(args.out))
    if args.https:
        import dataplane_https
        return dataplane_https.run(args, ensure("nginx", "nginx-light"), ensure("wrk", "wrk"), Path(args.out))
    if args.grpc:
        import dataplane_grpc
        return dataplane_grpc.run(args)
    wrk = None if args.idle_only else ensure("wrk", "wrk")
    if not args.idle_only:
        ensure("curl", "curl")  # the 5 MB downloads (left out without it)
    peers = {name: b for name, b in (("nginx", ensure("nginx", "nginx-light")), ("haproxy", ensure("haproxy", "haproxy"))) if b}
    load_before = machine_load()
    results: dict[str, dict[str, list[float]]] = {}
    with Rig(peers, with_peers=not args.idle_only) as rig:
        idle = idle_table({k: rig.targets[k] for k in ("direct", *FLOORS, *CPND)}, args.idle_rounds, args.idle_requests)
        if not args.idle_only:
            results = saturation(rig, args, wrk)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    irows = idle_rows(idle)
    doc: dict[str, Any] = {"idle": {"rows": irows, "rounds": args.idle_rounds, "requests": args.idle_requests},
                           "load_before": load_before, "load_after": machine_load(), "command": " ".join(sys.argv)}
    if results:
        rows = saturation_rows(results)
        doc.update({"rows": rows, "repeats": args.repeats, "rate": args.rate, "seconds": args.seconds})
    (out / ("dataplane_idle.json" if args.idle_only else "dataplane.json")).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{load_before} at the start, {doc['load_after']} at the end")
    if results:
        print_saturation(rows, args.rate)
        plot(rows, args.rate, out / "dataplane.png")
    print_idle(irows, args.idle_rounds, args.idle_requests)
    return 0


def plot(rows: list[dict[str, Any]], rate: float, path: Path) -> None:
    """Throughput and added latency per path, side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    names = [r["path"] for r in rows]
    colour = {"direct": "grey", "nginx": "tab:green", "haproxy": "tab:olive"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.bar(names, [r["rps"] or 0 for r in rows],
            color=[colour.get(n, "tab:purple" if n.startswith("floor") else "tab:blue") for n in names])
    ax1.set_yscale("log")  # cpnd is two orders of magnitude below nginx and HAProxy
    ax1.set_ylabel("requests/s at saturation (wrk, 8 conns, log)")
    ax1.set_title("throughput")
    ax1.tick_params(axis="x", labelrotation=45)
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [r["p99_ms"] for r in rows], width=0.4, label="p99")
    ax2.set_xticks(list(x), names, rotation=45)
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
