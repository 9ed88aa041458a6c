"""TLS at the edge with real processes: https_listen (httpx, curl, raw ssl), https instances through a
tunnel hop, certificate failures, reload of the served certificate, and Forwarded seen by instances."""

from __future__ import annotations

import json
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, free_ports, write_lab
from tlscerts import CertAuthority

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000,
        "health_interval_ms": 200, "health_failures": 2, "http_header_timeout_ms": 1000,
        "max_http_clients_per_ip": 4}
GOOD = {"CPN-Max-Price": "1"}  # the https instance s_tls at b, one tunnel hop away
BAD = {"CPN-Max-Price": "0.5"}  # only s_bad: its certificate is from a CA nobody trusts


def cpnctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=30)


def _add_gateway_keys(path: Path, lines: list[str]) -> None:
    text = path.read_text()
    path.write_text(text.replace("\n\n", "\n" + "\n".join(lines) + "\n\n", 1))


def _add_instance_keys(path: Path, iid: str, lines: list[str]) -> None:
    text = path.read_text()
    marker = f'id = "{iid}"\n'
    head, tail = text.split(marker, 1)
    url_line, rest = tail.split("\n", 1)
    path.write_text(head + marker + url_line + "\n" + "\n".join(lines) + "\n" + rest)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """a (https_listen, local http s_local) - b (https s_tls, trusted by its CA file; https s_bad, not)."""
    work = tmp_path_factory.mktemp("tls")
    ca = CertAuthority.create(work / "pki")
    rogue = CertAuthority.create(work / "pki", "rogue CA")
    gw_cert = ca.issue(work / "pki", "gw-a", ["localhost", "127.0.0.1"])
    inst_cert = ca.issue(work / "pki", "s_tls", ["inst.test"])
    bad_cert = rogue.issue(work / "pki", "s_bad", ["127.0.0.1"])
    insts = InstanceProcs()
    insts.start("s_tls", tls=inst_cert)
    insts.start("s_bad", tls=bad_cert)
    insts.start("s_local")
    urls = {"s_tls": f"https://127.0.0.1:{insts.ports['s_tls']}/v1",
            "s_bad": f"https://127.0.0.1:{insts.ports['s_bad']}/v1",
            "s_local": f"http://127.0.0.1:{insts.ports['s_local']}/v1"}
    topo = Topology(("a", "b"), (Link("a", "b", 1),),
                    (Instance("s_tls", "b", "/svc", 1000, 1, 1), Instance("s_bad", "b", "/svc", 1000, 1, 0.5),
                     Instance("s_local", "a", "/loc", 1000, 1, 0)), FAST)
    specs = write_lab(topo, work / "gw", instance_url=lambda i: urls[i.id])
    https = f"127.0.0.1:{free_ports(1)[0]}"
    _add_gateway_keys(specs["a"].config, [f'https_listen = "{https}"', f'tls_cert_file = "{gw_cert[0]}"',
                                          f'tls_key_file = "{gw_cert[1]}"'])
    _add_instance_keys(specs["b"].config, "s_tls", [f'tls_ca_file = "{ca.cert_file}"', 'tls_server_name = "inst.test"'])
    _add_instance_keys(specs["b"].config, "s_bad", [f'tls_ca_file = "{ca.cert_file}"'])
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: all(_up(lab, gw, "s_tls") and _up(lab, gw, "s_local") for gw in "ab"), 30, "convergence")
        yield {"lab": lab, "https": https, "ca": ca, "specs": specs, "gw_cert": gw_cert, "work": work,
               "http": specs["a"].http}
    finally:
        lab.stop_all()
        insts.stop_all()


def _up(lab: Lab, gw: str, iid: str) -> bool:
    return any(r["instance"] == iid and r["best"] and not r["down"] for r in lab.routes(gw))


def _get(net, headers: dict[str, str], **kw) -> httpx.Response:
    return httpx.get(f"https://{net['https']}/svc/x", headers=headers, verify=_trust(net), timeout=10, **kw)


def _trust(net) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(net["ca"].cert_file))


def test_httpx_over_https_listen_reaches_an_https_instance_one_hop_away(net) -> None:
    r = _get(net, {**GOOD, "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "CPN-Client": "6.6.6.6"})
    assert r.status_code == 200, r.text
    assert r.headers["cpn-instance"] == "s_tls" and r.headers["cpn-origin"] == "b"
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert r.json()["path"] == "/v1/x"
    # The user's own Forwarded / X-Forwarded-For are replaced by what the ingress saw.
    assert seen["forwarded"] == "for=127.0.0.1;by=a" and seen["x-forwarded-for"] == "127.0.0.1"
    assert "cpn-client" not in seen and "cpn-ingress" not in seen
    # Keep-alive over TLS, to the local instance this time: the ingress calls it itself, same headers.
    with httpx.Client(verify=_trust(net), timeout=10) as c:
        for _ in range(3):
            r = c.get(f"https://{net['https']}/loc/y", headers={"X-Forwarded-For": "6.6.6.6"})
            assert r.status_code == 200 and r.headers["cpn-instance"] == "s_local"
            seen = {k.lower(): v for k, v in r.json()["headers"].items()}
            assert seen["forwarded"] == "for=127.0.0.1;by=a" and seen["x-forwarded-for"] == "127.0.0.1"


def test_curl_over_https_listen_and_its_tls_parameters(net) -> None:
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(net["ca"].cert_file), "-H", "CPN-Max-Price: 1",
                        "-w", "\n%{http_version} %{ssl_verify_result}", f"https://{net['https']}/svc/curl?q=1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    body, meta = r.stdout.rsplit("\n", 1)
    assert json.loads(body)["instance"] == "s_tls" and json.loads(body)["query"] == "q=1"
    assert meta == "1.1 0"
    # HTTP/2 by ALPN on the same port (httpx with h2): the same routing, per stream.
    with httpx.Client(verify=_trust(net), timeout=10, http2=True) as c:
        r2 = c.get(f"https://{net['https']}/svc/h2?q=2", headers={"CPN-Max-Price": "1"})
    assert r2.http_version == "HTTP/2" and r2.status_code == 200 and r2.json()["instance"] == "s_tls"
    # TLS 1.2 and 1.3 both served, ALPN h2 or http/1.1 as the client prefers, a forward-secret AEAD suite on 1.2.
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(net["ca"].cert_file))
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2", "http/1.1"] if version is ssl.TLSVersion.TLSv1_3 else ["http/1.1"])
        host, port = net["https"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == version.name.replace("_", ".")
            assert s.selected_alpn_protocol() == ("h2" if version is ssl.TLSVersion.TLSv1_3 else "http/1.1")
            if version is ssl.TLSVersion.TLSv1_2:
                name, _, _ = s.cipher()
                assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_plain_http_to_the_https_port_is_told_so(net) -> None:
    r = httpx.get(f"http://{net['https']}/svc", timeout=10)
    assert r.status_code == 400 and "use https://" in r.json()["detail"]
    # A ClientHello that is not one: the handshake fails, the connection is closed, counted and logged.
    host, port = net["https"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as bogus:
        bogus.sendall(b"\x16\x03\x01\x00\x05hello")
        while bogus.recv(100):  # a TLS alert, perhaps, then the close
            pass

    def refused(reason: str) -> float:
        metrics = httpx.get(f"http://{net['specs']['a'].metrics}/metrics", timeout=10).text
        return float(metrics.split(f'cpn_tls_refused_total{{reason="{reason}"}} ')[1].split()[0])

    net["lab"].wait_for(lambda: refused("handshake_failures") >= 1, 5, "the failed handshake counted")
    assert refused("plain_http") >= 1
    # One line a second for such refusals (the first of a spell in full, then a count).
    net["lab"].wait_for(lambda: "https TLS handshakes failed" in net["lab"].log("a")
                        or "https: TLS handshake from 127.0.0.1:" in net["lab"].log("a"), 5, "the handshake failure line")


def test_probes_of_https_instances_verify_their_certificate(net) -> None:
    lab = net["lab"]
    # No request went to s_bad: its probes (a TLS handshake each) took it out network-wide.
    lab.wait_for(lambda: any(x["instance"] == "s_bad" and x["down"] for x in lab.routes("a")), 15, "s_bad down")
    r = _get(net, BAD)
    assert r.status_code == 503 and r.json()["error"] == "no_instance"  # its service stays known
    assert _get(net, GOOD).status_code == 200  # the trusted one serves on


def test_an_untrusted_instance_certificate_is_502_an_http_error_line_and_a_health_failure(tmp_path) -> None:
    ca = CertAuthority.create(tmp_path / "pki")
    rogue = CertAuthority.create(tmp_path / "pki", "rogue CA")
    insts = InstanceProcs()
    try:
        insts.start("s_bad", tls=rogue.issue(tmp_path / "pki", "s_bad", ["127.0.0.1"]))
        insts.start("s_plain")  # speaks http:// where https:// is configured
        urls = {"s_bad": f"https://127.0.0.1:{insts.ports['s_bad']}/", "s_plain": f"https://127.0.0.1:{insts.ports['s_plain']}/"}
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("s_bad", "b", "/svc", 1000, 1, 1), Instance("s_plain", "b", "/plain", 1000, 1, 1)),
                        dict(FAST, health_interval_ms=0))  # probes off: only requests count
        specs = write_lab(topo, tmp_path / "gw", instance_url=lambda i: urls[i.id])
        for iid in ("s_bad", "s_plain"):
            _add_instance_keys(specs["b"].config, iid, [f'tls_ca_file = "{ca.cert_file}"'])
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            url = f"http://{specs['a'].http}"
            r = httpx.get(url + "/svc", timeout=10)
            assert r.status_code == 502 and r.json()["error"] == "bad_gateway", r.text
            detail = r.json()["detail"]
            assert "s_bad" in detail and "TLS certificate of '127.0.0.1' not trusted" in detail, detail
            assert "unable to get local issuer certificate" in detail and "cpn-instance" not in r.headers
            lab.wait_for(lambda: "GET /svc -> 502 bad_gateway" in lab.log("a"), 5, "the http_error line")
            assert "TLS certificate of '127.0.0.1' not trusted" in lab.log("b")  # the egress says why, too
            r = httpx.get(url + "/plain", timeout=10)
            assert r.status_code == 502 and "s_plain" in r.json()["detail"] and "TLS handshake failed" in r.json()["detail"], r.text
            # health_failures = 2: a second failed request takes s_bad out network-wide.
            assert httpx.get(url + "/svc", timeout=10).status_code == 502
            lab.wait_for(lambda: any(x["instance"] == "s_bad" and x["down"] for x in lab.routes("a")), 10, "s_bad down")
            r = httpx.get(url + "/svc", timeout=10)
            assert r.status_code == 503 and r.json()["error"] == "no_instance"
    finally:
        insts.stop_all()


def test_a_silent_or_slow_handshake_holds_no_more_than_an_idle_connection(net) -> None:
    host, port = net["https"].rsplit(":", 1)
    # A handshake that stops after its first byte is closed after http_header_timeout_ms (1 s).
    slow = socket.create_connection((host, int(port)), timeout=10)
    slow.sendall(b"\x16\x03\x01")
    started = time.monotonic()
    assert slow.recv(100) == b"" and time.monotonic() - started < 8
    slow.close()
    # max_http_clients_per_ip = 4 covers connections before their handshake too: four silent ones (idle
    # for up to http_idle_timeout_ms, 60 s) hold this address's slots; a newcomer takes the oldest's.
    waiting = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    r = _get(net, GOOD)
    assert r.status_code == 200
    closed, _, _ = select.select(waiting, [], [], 5)  # one taken back for the newcomer, long before any timeout
    assert len(closed) == 1 and closed[0].recv(100) == b""
    assert not select.select([s for s in waiting if s is not closed[0]], [], [], 0.2)[0]  # the others wait on
    for s in waiting:
        s.close()


def test_reload_serves_a_new_certificate_and_refuses_a_bad_one(net) -> None:
    specs = net["specs"]
    host, port = net["https"].rsplit(":", 1)

    def served_serial() -> int:
        ctx = ssl.create_default_context(cafile=str(net["ca"].cert_file))
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            from cryptography import x509
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    before = served_serial()
    cert_file, key_file = net["gw_cert"]
    new_cert, new_key = net["ca"].issue(net["work"] / "pki2", "gw-a", ["localhost", "127.0.0.1"])
    cert_file.write_bytes(new_cert.read_bytes())
    key_file.write_bytes(new_key.read_bytes())
    r = cpnctl("--socket", str(specs["a"].control), "reload")
    assert r.returncode == 0, r.stderr
    after = served_serial()
    assert after != before
    from cryptography import x509
    assert after == x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number
    # A certificate file that is not one: the reload is refused in one line, the old certificate stays.
    good = cert_file.read_bytes()
    cert_file.write_text("not a certificate\n")
    try:
        r = cpnctl("--socket", str(specs["a"].control), "reload")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "a.toml:" in r.stderr and "gateway.tls_cert_file:" in r.stderr and "no PEM certificate" in r.stderr
        assert served_serial() == after
    finally:
        cert_file.write_bytes(good)


class _CountingTlsServer(ThreadingHTTPServer):
    """An https instance that counts its TLS connections; ``handshake_delay_s`` before each handshake,
    and ``close``: one request per connection (so every request needs a new handshake)."""

    daemon_threads = True

    def __init__(self, cert: tuple[Path, Path], *, handshake_delay_s: float = 0.0, close: bool = False) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(*cert)
        self.delay, self.close, self.connections = handshake_delay_s, close, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = json.dumps({"instance": "tls", "connection": server.connections}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                if server.close:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.connections += 1
        super().finish_request(request, client_address)


@pytest.mark.parametrize("close", [False, True])
def test_instance_tls_connections_are_pooled_and_their_handshakes_are_not_compute_time(tmp_path, close: bool) -> None:
    ca = CertAuthority.create(tmp_path / "pki")
    # With close, every request to the instance needs a new, slow (0.25 s) handshake.
    server = _CountingTlsServer(ca.issue(tmp_path / "pki", "inst", ["127.0.0.1"]), handshake_delay_s=0.25 if close else 0,
                                close=close)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        topo = Topology(("a",), (), (Instance("tls", "a", "/svc", 1000, 1, 0),), dict(FAST, health_interval_ms=0))
        specs = write_lab(topo, tmp_path / "gw", instance_url=lambda i: f"https://127.0.0.1:{server.server_address[1]}/")
        _add_instance_keys(specs["a"].config, "tls", [f'tls_ca_file = "{ca.cert_file}"'])
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            n = 6
            with httpx.Client(base_url=f"http://{specs['a'].http}", timeout=10) as c:
                answers = [c.get("/svc") for _ in range(n)]
            assert all(r.status_code == 200 and r.headers["cpn-instance"] == "tls" for r in answers)
            assert server.connections == (n if close else 1)  # kept alive and reused, unless the instance closes
            (svc,) = lab.query("a", "show-services")
            # The measured compute latency leaves the handshakes out: 0.25 s each, it would be at least 250 ms.
            assert svc["compute_latency_ms"] < 100, svc
    finally:
        server.shutdown()
        server.server_close()
