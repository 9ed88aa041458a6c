"""The https rows of bench/dataplane.py (``--https``): TLS at the ingress and an https instance, beside nginx
doing the same.

    python bench/dataplane.py --https [--repeats 3] [--seconds 4] [--idle-rounds 5] [--idle-requests 400]

The instance is an nginx server block on TLS answering a fixed JSON body; certificates come from a
test CA made here with ``cryptography`` (ECDSA P-256). Paths, every one TLS end to end:
  direct https       client -> instance
  nginx https        client -> nginx (listen ssl; proxy_pass https://, upstream keep-alive,
                     proxy_ssl_verify against the CA) -> instance
  local https        client -> c's https_listen (ingress and egress in one gateway) -> instance
  1 hop https        client -> b's https_listen -> tunnel -> c -> instance
and, in the same run for what TLS costs, the plain paths (the instance's plain port): direct http,
nginx http, local http (c's http_listen to the plain instance).
Measured: requests/s at saturation (wrk, 8 keep-alive connections, 1 thread: the handshakes
happen once per connection) and one request at a time over one kept-alive TLS connection
(p50/p99); medians over the repeats and rounds; cpnd against nginx as ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cpnd.lab import Instance, Lab, Link, Topology, free_ports, write_lab  # noqa: E402
from tlscerts import CertAuthority  # noqa: E402

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
  ssl_protocols TLSv1.2 TLSv1.3;
  {http}
}}
"""
NGINX_INSTANCE = """server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ default_type application/json; return 200 '{{"instance": "s1"}}'; }}
  }}
  server {{
    listen 127.0.0.1:{plain};
    location / {{ default_type application/json; return 200 '{{"instance": "s1"}}'; }}
  }}"""
NGINX_PROXY = """upstream instance {{ server 127.0.0.1:{upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location /svc {{
      proxy_pass https://instance/v1; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_verify on; proxy_ssl_trusted_certificate {ca}; proxy_ssl_name instance.test;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on;
    }}
  }}
  upstream plain {{ server 127.0.0.1:{upstream_plain}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{plain};
    location /svc {{ proxy_pass http://plain/v1; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""
PATHS = ("direct https", "nginx https", "local https", "1 hop https", "direct http", "nginx http", "local http")
PLAIN_OF = {"direct https": "direct http", "nginx https": "nginx http", "local https": "local http"}


def _nginx(binary: str, work: Path, name: str, http: str) -> subprocess.Popen[bytes]:
    conf = work / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(dir=work, name=name, http=http))
    return subprocess.Popen([binary, "-c", str(conf), "-e", str(work / f"{name}.err")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def _wait_tls(port: int, ca: Path, proc: subprocess.Popen[Any]) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, ctx.wrap_socket(raw):
                return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"nothing serves TLS on port {port}")


class Rig:
    """The https instance, nginx in front of it, gateways b - c serving https_listen; all reaped on exit."""

    def __init__(self, nginx: str) -> None:
        self.nginx = nginx
        self.procs: list[subprocess.Popen[Any]] = []
        self.lab: Lab | None = None
        self.targets: dict[str, tuple[int, str]] = {}

    def __enter__(self) -> Rig:
        self._tmp = tempfile.TemporaryDirectory(prefix="cpn-dp-https-")
        work = Path(self._tmp.name)
        try:
            self._start(work)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        if self.lab is not None:
            self.lab.stop_all()
        self._tmp.cleanup()

    def _start(self, work: Path) -> None:
        ca = CertAuthority.create(work / "pki")
        self.ca = ca.cert_file
        inst_cert, inst_key = ca.issue(work / "pki", "instance", ["instance.test", "127.0.0.1"])
        edge_cert, edge_key = ca.issue(work / "pki", "edge", ["localhost", "127.0.0.1"])
        inst_port, proxy_port, inst_plain, proxy_plain = free_ports(4)
        proc = _nginx(self.nginx, work, "instance", NGINX_INSTANCE.format(port=inst_port, cert=inst_cert, key=inst_key,
                                                                          plain=inst_plain))
        self.procs.append(proc)
        _wait_tls(inst_port, self.ca, proc)
        proc = _nginx(self.nginx, work, "proxy", NGINX_PROXY.format(port=proxy_port, upstream=inst_port, cert=edge_cert,
                                                                    key=edge_key, ca=self.ca, plain=proxy_plain,
                                                                    upstream_plain=inst_plain))
        self.procs.append(proc)
        _wait_tls(proxy_port, self.ca, proc)
        topo = Topology(("b", "c"), (Link("b", "c"),), (Instance("s1", "c", "/svc", 1e6, 1, 0),
                                                          Instance("p1", "c", "/plain", 1e6, 1, 0)), {"log_level": "warning"})
        specs = write_lab(topo, work / "gw", instance_url=lambda i: f"https://127.0.0.1:{inst_port}/v1" if i.id == "s1"
                          else f"http://127.0.0.1:{inst_plain}/v1")
        taken = {int(a.rsplit(":", 1)[1]) for sp in specs.values() for a in (sp.listen, sp.http, sp.metrics)}
        b_https, c_https = free_ports(2)  # after write_lab's own, which are not bound yet either
        while {b_https, c_https} & taken:
            b_https, c_https = free_ports(2)
        for gw, port in (("b", b_https), ("c", c_https)):
            text = specs[gw].config.read_text()
            extra = f'https_listen = "127.0.0.1:{port}"\ntls_cert_file = "{edge_cert}"\ntls_key_file = "{edge_key}"\n'
            text = text.replace("\n\n", "\n" + extra + "\n", 1)
            if gw == "c":
                text = text.replace(f'url = "https://127.0.0.1:{inst_port}/v1"', f'url = "https://127.0.0.1:{inst_port}/v1"\n'
                                    f'tls_ca_file = "{self.ca}"\ntls_server_name = "instance.test"')
            specs[gw].config.write_text(text)
        lab = self.lab = Lab(specs, log_level="warning")
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        self.targets = {"direct https": (inst_port, "/v1"), "nginx https": (proxy_port, "/svc"),
                        "local https": (c_https, "/svc"), "1 hop https": (b_https, "/svc"),
                        "direct http": (inst_plain, "/v1"), "nginx http": (proxy_plain, "/svc"),
                        "local http": (int(specs["c"].http.rsplit(":", 1)[1]), "/plain")}


class SequentialTls:
    """One kept-alive connection, one request at a time (as dataplane.Sequential), over TLS for an https path."""

    def __init__(self, port: int, path: str, ca: Path, tls: bool = True) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw  # both certificates name it
        self.req = f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()

    def one(self) -> None:
        self.sock.sendall(self.req)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        if buf[9:12] != b"200":
            raise RuntimeError(f"status {buf[9:12]!r}: {buf[:300]!r}")
        length = next(int(line.split(b":", 1)[1]) for line in buf[:end].split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buf) < end + 4 + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            buf += chunk

    def run(self, n: int) -> list[float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.one()
            lat.append((time.perf_counter() - t0) * 1000)
        self.sock.close()
        return lat


def _wrk(wrk: str, port: int, path: str, seconds: float, scheme: str) -> float:
    out = subprocess.run([wrk, "-t1", "-c8", f"-d{seconds:g}s", f"{scheme}://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx and int(non2xx.group(1)):
        raise RuntimeError(f"wrk saw {non2xx.group(1)} errors on port {port}")
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    return float(m.group(1)) if m else 0.0


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run(args: argparse.Namespace, nginx: str | None, wrk: str | None, out: Path) -> int:
    """Measure the https paths and print their table (with the ratios against nginx); JSON to ``out``."""
    if nginx is None:
        print("the https rows need nginx (the instance and the peer): none installed", file=sys.stderr)
        return 1
    load_before = Path("/proc/loadavg").read_text().split()[0]
    rps: dict[str, list[float]] = {p: [] for p in PATHS}
    p50: dict[str, list[float]] = {p: [] for p in PATHS}
    p99: dict[str, list[float]] = {p: [] for p in PATHS}
    with Rig(nginx) as rig:
        for _ in range(3):  # warm: pools filled, estimates settled
            for name, (port, path) in rig.targets.items():
                SequentialTls(port, path, rig.ca, name.endswith("https")).run(50)
        for r in range(args.idle_rounds):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            for name in order:
                port, path = rig.targets[name]
                lat = SequentialTls(port, path, rig.ca, name.endswith("https")).run(args.idle_requests)
                p50[name].append(statistics.median(lat))
                p99[name].append(_pct(lat, 99))
        if wrk:
            for _ in range(args.repeats):
                for name in PATHS:
                    rps[name].append(_wrk(wrk, *rig.targets[name], args.seconds, name.split()[-1]))
    rows = []
    med = {n: {"rps": statistics.median(rps[n]) if rps[n] else None, "p50_ms": statistics.median(p50[n]),
               "p99_ms": statistics.median(p99[n])} for n in PATHS}
    for n in PATHS:
        m = med[n]
        scheme = n.split()[-1]
        ng, direct = med[f"nginx {scheme}"], med[f"direct {scheme}"]
        rows.append({"path": n, **{k: round(v, 3) if v is not None else None for k, v in m.items()},
                     "rps_vs_nginx": round(m["rps"] / ng["rps"], 3) if m["rps"] and ng["rps"] else None,
                     "rps_vs_plain": (round(m["rps"] / med[PLAIN_OF[n]]["rps"], 3)
                                      if n in PLAIN_OF and m["rps"] and med[PLAIN_OF[n]]["rps"] else None),
                     "added_p50_ms": round(m["p50_ms"] - direct["p50_ms"], 3),
                     "added_p50_vs_nginx": round((m["p50_ms"] - direct["p50_ms"]) / max(1e-9, ng["p50_ms"] - direct["p50_ms"]), 2)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane_https.json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv),
                                                          "repeats": args.repeats, "seconds": args.seconds,
                                                          "idle_rounds": args.idle_rounds,
                                                          "idle_requests": args.idle_requests,
                                                          "load_before": load_before,
                                                          "load_after": Path("/proc/loadavg").read_text().split()[0]},
                                                         indent=1) + "\n")
    print("\n| path | req/s (wrk, 8 conns) | vs nginx (same scheme) | https vs http | p50 ms (1 at a time) | p99 ms |"
          " added p50 vs direct | added p50 / nginx's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['rps'] if r['rps'] is not None else '-'} | {r['rps_vs_nginx'] or '-'} | "
              f"{r['rps_vs_plain'] or '-'} | {r['p50_ms']} | {r['p99_ms']} | {r['added_p50_ms']} | {r['added_p50_vs_nginx']} |")
    return 0
