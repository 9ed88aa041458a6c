"""Integration: requests through real cpnd processes to real instances, with httpx and curl."""

from __future__ import annotations

import re

import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import trio

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000}


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """a (ingress, with local s3) - b (transit) - c (s1); a - d (s2)."""
    insts = InstanceProcs()
    for iid in ("s1", "s2", "s3"):
        insts.start(iid)
    urls = {
        "s1": f"http://127.0.0.1:{insts.ports['s1']}/v1/detect",
        "s2": f"http://127.0.0.1:{insts.ports['s2']}/api/infer?model=x",
        "s3": f"http://127.0.0.1:{insts.ports['s3']}/",
    }
    topo = Topology(("a", "b", "c", "d"), (Link("a", "b", 2), Link("b", "c", 2), Link("a", "d", 100)),
                    (Instance("s1", "c", "/yolo", 50, 2, 1), Instance("s2", "d", "/yolo", 50, 1, 1),
                     Instance("s3", "a", "/yolo", 50, 3, 0)),
                    dict(FAST, max_body_bytes=8 * 1024 * 1024))
    specs = write_lab(topo, tmp_path_factory.mktemp("net"), instance_url=lambda i: urls[i.id])
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        # Start-up RTT samples can be many times the emulated 2 + 2 ms; the tests need s1 well
        # inside S1_ONLY's bound (measured links run 0.3-0.9 ms over their emulated RTT here).
        lab.wait_for(lambda: {r["instance"]: r["path_latency_ms"] for r in lab.routes("a") if r["best"]}["s1"] < 9.0,
                     20, "latencies to settle")
        yield {"lab": lab, "url": f"http://{specs['a'].http}", "insts": insts, "specs": specs}
    finally:
        lab.stop_all()
        insts.stop_all()


S1 = {"CPN-Max-Price": "2.5"}           # s3 (price 3) out: s1 (~5 ms) beats s2 (~101 ms)
# Only s1: s2's 100 ms link alone breaks the bound (S1 can pick s2 when bulk transfers on the
# a-b link inflate its measured RTT, as they should). The bound is end to end: 4 ms of links,
# three gateways' own processing and what a loaded machine adds to them (10-15 ms here, and spikes
# of 40 ms and more that the ingress's correction takes in).
S1_ONLY = {"CPN-Max-Price": "2.5", "CPN-Max-Latency": "80ms"}
S2 = {"CPN-Prefer": "price"}            # cheapest: s2
S3: dict[str, str] = {}                 # fastest: the local s3


def test_translation_per_instance(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        r1 = c.post("/yolo/sub/x?q=1", content=b"hi", headers=S1)
        r2 = c.post("/yolo/sub/x?q=1", content=b"hi", headers=S2)
        r3 = c.post("/yolo/sub/x?q=1", content=b"hi", headers=S3)
    for r, iid, origin, path, query in ((r1, "s1", "c", "/v1/detect/sub/x", "q=1"),
                                       (r2, "s2", "d", "/api/infer/sub/x", "model=x&q=1"),
                                       (r3, "s3", "a", "/sub/x", "q=1")):
        assert r.status_code == 200, r.text
        assert r.headers["cpn-instance"] == iid and r.headers["cpn-origin"] == origin
        body = r.json()
        assert (body["instance"], body["path"], body["query"], body["body_bytes"]) == (iid, path, query, 2)
        assert body["headers"]["host"] == f"127.0.0.1:{net['insts'].ports[iid]}"
        assert not any(h.startswith("cpn-") for h in body["headers"])  # never leaked to instances


def test_constraints_and_objectives(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        def who(**h: str) -> str:
            r = c.get("/yolo", headers={k.replace("_", "-"): v for k, v in h.items()})
            return r.headers.get("cpn-instance") or f"{r.status_code} {r.json()['error']}"

        assert who() == "s3"                                        # lowest latency
        assert who(CPN_Prefer="price") == "s2"                      # cheapest
        assert who(CPN_Max_Price="2.5") == "s1"
        assert who(CPN_Max_Price="2.5", CPN_Max_Latency="80ms") == "s1"
        assert who(CPN_Max_Price="1", CPN_Max_Latency="80ms") == "503 no_instance"  # s2: 100 ms link + compute
        # The answer says what is achievable: the best estimate and who, as the routes show them.
        detail = c.get("/yolo", headers={"CPN-Max-Price": "1", "CPN-Max-Latency": "80ms"}).json()["detail"]
        m = re.search(r"the best estimate now is ([0-9.]+) ms \(s2 at d: path ([0-9.]+) ms", detail)
        assert m and float(m.group(1)) > 80 and float(m.group(2)) >= 100 and "CPN-Max-Latency 80 ms" in detail, detail
        assert who(CPN_Max_Latency="300ms", CPN_Prefer="price") == "s2"  # ~101 ms and the gateways, the cheapest
        assert who(CPN_Max_Latency="80ms", CPN_Prefer="price") == "s1"  # s2 (100 ms link + compute) is over
        assert who(CPN_QoS="bulk", CPN_Max_Price="0") == "503 no_instance"


@pytest.mark.parametrize(("method", "path", "headers", "status", "error"), [
    ("GET", "/nothing/here", {}, 404, "no_such_service"),
    ("GET", "/yolov2", {}, 404, "no_such_service"),
    ("GET", "/yolo", {"CPN-Max-Price": "0.1"}, 503, "no_instance"),
    ("GET", "/yolo", {"CPN-Max-Latency": "soon"}, 400, "bad_header"),
    ("GET", "/yolo", {"CPN-Prefer": "random"}, 400, "bad_header"),
    ("GET", "/yolo/%2e%2e/admin", {}, 400, "bad_request"),
    ("GET", "/yolo?delay=3", {"CPN-Timeout": "300ms"}, 504, "deadline_exceeded"),
])
def test_gateway_errors(net, method, path, headers, status, error) -> None:
    r = httpx.request(method, net["url"] + path, headers=headers, timeout=10)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == error and r.json()["detail"]
    assert "cpn-instance" not in r.headers and "cpn-origin" not in r.headers


def test_an_error_to_a_head_request_has_no_body_and_the_connection_goes_on(net) -> None:
    """The error's head (its length, the body it would have) and nothing after it; the next request is served."""
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        r = c.head("/nothing/here")
        assert r.status_code == 404 and r.content == b"" and int(r.headers["content-length"]) > 0
        again = c.get("/nothing/here")
        assert again.json()["error"] == "no_such_service"
        assert r.extensions["network_stream"] is again.extensions["network_stream"]  # one connection


def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_smuggling_and_oversize_refused(net) -> None:
    both = raw_exchange(net["url"], b"POST /yolo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert both.startswith(b"HTTP/1.1 400 ") and b"ambiguous framing" in both and b"cpn-instance" not in both.lower()
    dots = raw_exchange(net["url"], b"GET /yolo/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert dots.startswith(b"HTTP/1.1 400 ") and b"dot segments" in dots  # (httpx would normalise the path)
    two_cl = raw_exchange(net["url"], b"POST /yolo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd")
    assert two_cl.startswith(b"HTTP/1.1 400 ")
    big_header = raw_exchange(net["url"], b"GET /yolo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert big_header.startswith(b"HTTP/1.1 431 ")
    r = httpx.post(net["url"] + "/yolo", content=b"x" * (8 * 1024 * 1024 + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_five_megabytes_both_ways_across_two_hops(net) -> None:
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    r = httpx.post(net["url"] + "/yolo?echo=1", content=payload, headers=S1, timeout=60)
    assert r.status_code == 200 and r.headers["cpn-origin"] == "c"
    assert r.content == payload
    # Chunked upload (no Content-Length) too.
    r = httpx.post(net["url"] + "/yolo?echo=1", content=iter([payload[:1000], payload[1000:]]), headers=S1, timeout=60)
    assert r.status_code == 200 and r.content == payload


@pytest.mark.parametrize("headers", [S1, S3], ids=["remote", "local"])
def test_request_body_whole_or_in_pieces(net, headers) -> None:
    # A body that came with its head goes upstream in one write; one that trickles in is
    # streamed by a task: both must reach the instance exactly.
    host, port = net["url"].removeprefix("http://").rsplit(":", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    body = b"0123456789" * 30
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for parts in ([body], [body[:7], body[7:100], body[100:]]):
            head = f"POST /yolo?echo=1 HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode()
            s.sendall(head + parts[0])
            for part in parts[1:]:
                time.sleep(0.05)  # not synchronisation: gaps in the byte stream are the point
                s.sendall(part)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < len(body):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            resp_head, resp_body = data.split(b"\r\n\r\n", 1)
            assert resp_head.startswith(b"HTTP/1.1 200"), resp_head
            assert resp_body == body, (len(parts), resp_body[:40])


@pytest.mark.parametrize("headers", [S1, S3], ids=["remote", "local"])
def test_streaming_arrives_incrementally(net, headers) -> None:
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("GET", net["url"] + "/yolo?sse=5&interval=0.3", headers=headers, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - t0, json.loads(line[6:])["i"]))
    assert [i for _, i in arrivals] == [0, 1, 2, 3, 4]
    assert arrivals[0][0] < 0.6 and arrivals[-1][0] > 1.1  # first long before last
    assert arrivals[-1][0] - arrivals[0][0] > 1.0


def test_slow_request_does_not_delay_fast_one_over_the_same_peer(net) -> None:
    async def main() -> dict[str, float]:
        done: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=net["url"], timeout=10) as c:
            t0 = trio.current_time()

            # No bound on the fast ones either (S1: s1 by latency, ~5 ms against s2's ~101): an 80 ms
            # bound made this a timed test on a busy box (a 504 at the bound), which it is not about.
            async def req(name: str, path: str, headers: dict[str, str] = S1) -> None:
                r = await c.get(path, headers=headers)
                assert r.status_code == 200 and r.headers["cpn-instance"] == "s1", (path, r.text)
                done[name] = trio.current_time() - t0

            async with trio.open_nursery() as n:
                n.start_soon(req, "slow", "/yolo?delay=2")  # a 2 s answer is a success
                n.start_soon(req, "stream", "/yolo?stream=20&interval=0.1")
                await trio.sleep(0.2)
                for i in range(5):
                    n.start_soon(req, f"fast{i}", "/yolo")
        return done

    done = trio.run(main)
    assert done["slow"] > 2.0 and done["stream"] > 1.9
    assert max(done[f"fast{i}"] for i in range(5)) < 1.0


@pytest.mark.parametrize("headers", [S1_ONLY, {"CPN-Max-Latency": "80ms"}], ids=["remote", "local"])
def test_a_response_not_ready_by_the_bound_is_a_504_at_the_bound(net, headers) -> None:
    """CPN-Max-Latency is a deadline for the response head: no late 200, a 504 at the bound."""
    lab = net["lab"]
    before = lab.query("a", "stats")["http"].get("bound_cut", 0)
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        t0 = time.monotonic()
        r = c.get("/yolo?delay=1", headers=headers)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
        assert "latency bound" in r.json()["detail"] and "cpn-instance" not in r.headers
        assert took < 0.9  # answered at the bound, not when the instance was done
        assert c.get("/yolo", headers=headers).status_code == 200  # the connection goes on
    stats = lab.query("a", "stats")["http"]
    assert stats["bound_cut"] == before + 1 and stats.get("late", 0) == 0


def test_no_stream_is_left_open(net) -> None:
    """Every finished exchange releases its tunnel streams on every gateway on the way."""
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        for h in (S1, S2, S3, S1):
            for path in ("/yolo", "/yolo?stream=3&interval=0", "/yolo?die=1"):
                c.post(path, content=b"x" * 1000, headers=h)
    lab = net["lab"]
    lab.wait_for(lambda: all(lab.query(gw, "status")["tunnel_streams"] == 0 for gw in "abcd"), 10, "streams to close")


@pytest.mark.parametrize("headers", [S2, S3], ids=["remote", "local"])
def test_a_response_cut_short_becomes_a_clean_error(net, headers) -> None:
    # A small response is gathered whole before the user sees its head, so an instance that
    # dies half-way through its body costs a retry (GET) or a 502 (POST), never a cut response.
    with httpx.Client(timeout=10) as c:
        for method in ("GET", "POST"):
            r = c.request(method, net["url"] + "/yolo?truncate=1", headers=headers)
            assert r.status_code == 502 and r.json()["error"] == "bad_gateway", (method, r.text)
            assert "cpn-instance" not in r.headers
        r = c.get(net["url"] + "/yolo", headers=headers)  # the same keep-alive connection goes on
        assert r.status_code == 200 and r.headers["cpn-instance"] == ("s2" if headers is S2 else "s3")


def test_errors_keep_the_connection_alive(net) -> None:
    """A gateway-made error on a keep-alive connection is not a reason to drop it."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    with httpx.Client(base_url=net["url"], transport=transport, timeout=10) as c:
        addrs = set()
        for path, headers, body, status in (("/yolo", {"CPN-Max-Price": "0"}, None, 503), ("/nope", {}, b"x" * 100, 404),
                                            ("/yolo", {"CPN-Prefer": "x"}, None, 400), ("/yolo", S1, None, 200)):
            r = c.request("POST" if body else "GET", path, headers=headers, content=body)
            assert r.status_code == status
            addrs.add(r.extensions["network_stream"].get_extra_info("client_addr"))
        assert len(addrs) == 1


def test_prometheus_metrics(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        assert c.get("/yolo", headers=S1).status_code == 200
        assert c.get("/nothing").status_code == 404
    text = httpx.get(f"http://{net['specs']['a'].metrics}/metrics", timeout=10).text
    for line in ('cpn_sessions{state="established"} 2.0', 'cpn_routes 3.0',
                 'cpn_requests_total{instance="s1",service="/yolo",status="200"}',
                 'cpn_requests_total{instance="",service="",status="404"}'):
        assert line in text, line
    for name in ("cpn_request_seconds_bucket", "cpn_peer_bytes_total", "cpn_tunnel_frames_total", "cpn_selection_retries_total",
                 "cpn_admission_rejects_total", "cpn_instance_load", "cpn_paths", "cpn_user_abandoned_total"):
        assert name in text, name
    http = net["lab"].query("a", "stats")["http"]  # the same counters as show stats
    for event, key in (("cut", "bound_cut"), ("probe", "bound_probes"), ("late", "late")):
        assert f'cpn_latency_bound_total{{event="{event}"}} {float(http.get(key, 0))}' in text, (event, http)
    assert httpx.get(f"http://{net['specs']['a'].metrics}/other", timeout=10).status_code == 404


def test_keep_alive_successive_requests_go_to_different_instances(net) -> None:
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    with httpx.Client(base_url=net["url"], transport=transport, timeout=10) as c:
        seen = [c.get("/yolo", headers=h) for h in (S3, S1_ONLY, S2, S3, S1_ONLY)]
        assert all("cpn-instance" in r.headers for r in seen), [r.text for r in seen]
        seen = [r.headers["cpn-instance"] for r in seen]
        peers = set()
        for h in (S3, S1_ONLY):
            r = c.get("/yolo", headers=h)
            peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert seen == ["s3", "s1", "s2", "s3", "s1"]
    assert len(peers) == 1  # one client connection throughout


def test_answers_passed_on_whole_and_read_anew_share_one_user_connection(net) -> None:
    """Tunnelled answers that come whole (passed on to the user as they came, whole.whole_response) and
    those read and written again (HEAD, chunked, over the hold, a closing request) follow each other
    on one keep-alive connection, each framed right, over one hop and two."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    with httpx.Client(base_url=net["url"], transport=transport, timeout=10) as c:
        streams = set()
        for h, iid in ((S2, "s2"), (S1_ONLY, "s1")):
            for _ in range(2):
                r = c.get("/yolo?k=v", headers=h)
                assert r.json()["instance"] == iid and r.json()["query"].endswith("k=v") and r.headers["cpn-origin"]
                streams.add(r.extensions["network_stream"])
                head = c.head("/yolo", headers=h)
                assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
                chunked = c.get("/yolo?stream=3&interval=0", headers=h)
                assert chunked.text == "chunk 0\nchunk 1\nchunk 2\n" and chunked.headers["cpn-instance"] == iid
                big = c.get("/yolo?size=100000", headers=h)
                assert big.content == b"x" * 100000
                missing = c.get("/yolo?status=404", headers=h)
                assert missing.status_code == 404 and missing.json()["instance"] == iid
                streams |= {x.extensions["network_stream"] for x in (head, chunked, big, missing)}
        assert len(streams) == 1  # one connection throughout
        last = c.get("/yolo", headers={**S2, "Connection": "close"})
        assert last.json()["instance"] == "s2" and last.headers["connection"] == "close"


def test_show_routes_tells_the_ingress_estimate(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        for _ in range(5):
            r = c.get("/yolo", headers=S1_ONLY)
            assert r.headers.get("cpn-instance") == "s1", r.text
    routes = net["lab"].routes("a")
    est = next(r for r in routes if r["best"] and r["instance"] == "s1")["estimate"]
    assert est["load"] > 0 and est["bounded_load"] > 0  # at least the requests just sent
    assert est["compute_latency_ms"] > 0
    assert all("estimate" not in r for r in routes if not r["best"])
    # The estimate is end to end (selection.md, "Estimate"): every best path tells it in parts.
    for r in routes:
        if r["best"]:
            e = r["estimate"]
            parts = e["path_ms"] + e["gateways_ms"] + e["compute_ms"] + e["correction_ms"]
            assert abs(e["total_ms"] - parts) < 0.01 and e["gateways_ms"] > 0, r
            assert e["path_ms"] == r["path_latency_ms"]
    gauges = net["lab"].query("a", "stats")["gauges"]
    assert {"own_ingress_ms", "own_transit_ms", "own_egress_ms", "own_local_ms"} <= set(gauges)


def test_a_bound_no_instance_can_meet_is_refused_at_once_with_the_best_estimate(net) -> None:
    """DESIGN 6: 503 no_instance at once, before any attempt, saying what the best estimate is and of what."""
    lab = net["lab"]
    before = lab.query("a", "stats")["http"]
    r = httpx.get(net["url"] + "/yolo", headers={"CPN-Max-Latency": "100us"}, timeout=10)
    after = lab.query("a", "stats")["http"]
    assert r.status_code == 503 and r.json()["error"] == "no_instance" and "cpn-instance" not in r.headers
    detail = r.json()["detail"]
    m = re.search(r"the best estimate now is ([0-9.]+) ms \((s\d) at ([a-d]): path ([0-9.]+) ms \+ gateways ([0-9.]+) ms "
                  r"\+ compute ([0-9.]+) ms(?: ([+-]) correction ([0-9.]+) ms)?\), over CPN-Max-Latency 0.1 ms", detail)
    assert m, detail
    total, path, gateways, compute = (float(m.group(i)) for i in (1, 4, 5, 6))
    correction = float(m.group(8) or 0) * (-1 if m.group(7) == "-" else 1)
    assert abs(total - (path + gateways + compute + correction)) < 0.01 * total + 0.01, detail
    assert gateways > 0  # the gateways' own processing is part of what the bound is checked against
    # Refused by the ingress's estimate alone: no instance was tried.
    assert after.get("retries", 0) == before.get("retries", 0)
    assert {k: v for k, v in after.items() if k.startswith("status_")} == {k: v for k, v in before.items() if k.startswith("status_")}
    assert after["error_503"] == before.get("error_503", 0) + 1


def test_a_flexible_request_with_room_elsewhere_yields_at_its_egress(net) -> None:
    """EXT_FLAG_YIELDS travels in the extension header to the egress that admits the request (through a
    transit too) and reaches the ingress's own admission: set on a flexible request whose other
    candidates have room, never on a latency-bound one (show stats' ``admission_yielding`` where it counts)."""
    lab = net["lab"]

    def yielding() -> dict[str, int]:
        return {gw: lab.query(gw, "stats")["http"].get("admission_yielding", 0) for gw in ("a", "c", "d")}

    before = yielding()
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        for headers, gw in ((S2, "d"), (S1, "c"), (S3, "a")):  # flexible: s2 at d, s1 at c through b, the local s3
            r = c.post("/yolo", content=b"x", headers=headers)
            assert r.status_code == 200 and r.headers["cpn-origin"] == gw, (headers, r.text)
        mid = yielding()
        assert {gw: mid[gw] - before[gw] for gw in mid} == {"a": 1, "c": 1, "d": 1}
        r = c.post("/yolo", content=b"x", headers=S1_ONLY)  # latency-bound: it never yields
        assert r.status_code == 200 and r.headers["cpn-origin"] == "c", r.text
    assert yielding() == mid


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_head_and_expect_continue(net, tmp_path) -> None:
    head = subprocess.run(["curl", "-sS", "-I", net["url"] + "/yolo", "-H", "CPN-Max-Price: 2.5"],
                          capture_output=True, text=True, timeout=30)
    assert head.returncode == 0 and head.stdout.startswith("HTTP/1.1 200")
    assert "cpn-instance: s1" in head.stdout.lower()
    big = tmp_path / "big"
    big.write_bytes(b"y" * 2_000_000)
    post = subprocess.run(["curl", "-sS", "-v", "--data-binary", f"@{big}", "-H", "Expect: 100-continue",
                           "-H", "CPN-Max-Price: 2.5", net["url"] + "/yolo"], capture_output=True, text=True, timeout=30)
    assert post.returncode == 0, post.stderr
    assert "< HTTP/1.1 100 Continue" in post.stderr, post.stdout
    assert json.loads(post.stdout).get("body_bytes") == 2_000_000, post.stdout


def test_unreachable_instance_is_retried_then_502(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        insts.start("good")
        urls = {"dead": f"http://127.0.0.1:{dead_port()}/x", "good": f"http://127.0.0.1:{insts.ports['good']}/y"}
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("dead", "b", "/svc", 50, 0.5, 1), Instance("good", "b", "/svc", 50, 1, 1)), FAST)
        specs = write_lab(topo, tmp_path / "r", instance_url=lambda i: urls[i.id])
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            url = f"http://{specs['a'].http}/svc"
            # The cheapest is dead: connection refused means "not delivered", so even a POST moves on.
            r = httpx.post(url, content=b"body", headers={"CPN-Prefer": "price"}, timeout=10)
            assert r.status_code == 200 and r.headers["cpn-instance"] == "good" and r.json()["body_bytes"] == 4
            # Only the dead one admissible: 502 with the contract's body.
            r = httpx.get(url, headers={"CPN-Max-Price": "0.5"}, timeout=10)
            assert r.status_code == 502 and r.json()["error"] == "bad_gateway"
            assert "instance_unreachable" in r.json()["detail"] and "cpn-instance" not in r.headers
            # An instance that dies mid-request: a GET may be retried elsewhere; a POST may not.
            r = httpx.get(url + "?die=1", headers={"CPN-Max-Price": "1"}, timeout=10)
            assert r.status_code == 502 and "instance_failed" in r.json()["detail"]
    finally:
        insts.stop_all()


def test_per_connection_mode_pins(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        for iid in ("near", "far"):
            insts.start(iid)
        topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("a", "c", 15)),
                        (Instance("near", "b", "/svc", 50, 1, 1), Instance("far", "c", "/svc", 50, 1, 1)), FAST)
        specs = write_lab(topo, tmp_path / "p", selection="per-connection",
                          instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
            with httpx.Client(base_url=f"http://{specs['a'].http}", transport=transport, timeout=10) as c:
                first = c.get("/svc").headers["cpn-instance"]
                # Even a request whose constraints exclude the pinned instance stays on it: anycast.
                later = c.get("/svc", headers={"CPN-Max-Latency": "0.1ms"}).headers["cpn-instance"]
            assert first == later == "near"
    finally:
        insts.stop_all()
