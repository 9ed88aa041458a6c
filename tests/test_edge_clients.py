"""Client keys and instance registration with real processes: httpx and curl at the ingress of a, instances
that register at b (cpnctl and HTTP) and become routable from a one hop away, then leave (DELETE, TTL)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cpnd.clients import key_sha256, new_key
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, free_ports, write_lab

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000,
        "health_interval_ms": 0, "auth_failures_per_s": 0.01, "auth_failures_burst": 3}
ALICE, BOB, SLOW, NEWCOMER, TOKEN, TOKEN_OTHER = (new_key() for _ in range(6))


def cpnctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=30)


def clients_toml(alice_rate: float = 1000) -> str:
    return (f'\n[[clients]]\nid = "alice"\napi_key_sha256 = "{key_sha256(ALICE)}"\nrate = {alice_rate!r}\nburst = 1000\n'
            f'\n[[clients]]\nid = "bob"\napi_key_sha256 = "{key_sha256(BOB)}"\nservices = ["/other"]\n'
            f'\n[[clients]]\nid = "slow"\napi_key_sha256 = "{key_sha256(SLOW)}"\nrate = 0.05\nburst = 2\n')


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """a (ingress with [[clients]], local instance l1 of /local) - b (s1 of /yolo, registration endpoint)."""
    insts = InstanceProcs()
    for iid in ("l1", "s1", "r1", "r2"):
        insts.start(iid)
    topo = Topology(("a", "b"), (Link("a", "b", 2),),
                    (Instance("l1", "a", "/local"), Instance("s1", "b", "/yolo")), FAST)
    specs = write_lab(topo, tmp_path_factory.mktemp("edge"),
                      instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    (reg_port,) = free_ports(1)
    a_text = specs["a"].config.read_text() + clients_toml()
    specs["a"].config.write_text(a_text)
    b_text = specs["b"].config.read_text().replace(
        "[gateway]\n", f'[gateway]\nregistration_listen = "127.0.0.1:{reg_port}"\nmax_registered_instances = 3\n', 1)
    b_text += (f'\n[[registrars]]\nid = "site1"\ntoken_sha256 = "{key_sha256(TOKEN)}"\nservices = ["/reg"]\n'
               f'\n[[registrars]]\nid = "site2"\ntoken_sha256 = "{key_sha256(TOKEN_OTHER)}"\nservices = ["/else"]\n')
    specs["b"].config.write_text(b_text)
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        yield {"lab": lab, "specs": specs, "insts": insts, "url": f"http://{specs['a'].http}",
               "reg": f"http://127.0.0.1:{reg_port}", "a_text": a_text}
    finally:
        lab.stop_all()
        insts.stop_all()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def best(lab: Lab, gw: str) -> dict[str, dict]:
    return {r["instance"]: r for r in lab.routes(gw) if r["best"] and not r["down"]}


def test_keys_forbidden_and_the_key_never_reaches_the_instance(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        r = c.get("/yolo")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer") and "cpn-instance" not in r.headers
        r = c.get("/yolo", headers=bearer("cpn_not-a-key"))
        assert r.status_code == 401 and r.json() == {"error": "unauthorized", "detail": "unknown client key"}
        r = c.get("/yolo", headers=bearer(BOB))
        assert r.status_code == 403 and r.json()["error"] == "forbidden" and "bob may not call /yolo" in r.json()["detail"]
        for path, iid in (("/yolo/x", "s1"), ("/local/x", "l1")):  # one hop away, and the ingress's own
            r = c.post(path, content=b"hi", headers={**bearer(ALICE), "X-Keep": "1"})
            assert r.status_code == 200 and r.headers["cpn-instance"] == iid, r.text
            seen = r.json()["headers"]
            assert "authorization" not in seen and seen["x-keep"] == "1"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sS", "-i", net["url"] + "/yolo", "-H", f"Authorization: Bearer {ALICE}"],
                             capture_output=True, text=True, timeout=10).stdout
        assert out.startswith("HTTP/1.1 200") and "cpn-instance: s1" in out and ALICE not in out
        out = subprocess.run(["curl", "-sS", "-i", net["url"] + "/yolo"], capture_output=True, text=True, timeout=10).stdout
        assert out.startswith("HTTP/1.1 401") and '"error": "unauthorized"' in out


def test_rate_limited_with_retry_after(net) -> None:
    with httpx.Client(base_url=net["url"], timeout=10) as c:
        codes = [c.get("/yolo", headers=bearer(SLOW)).status_code for _ in range(3)]
        r = c.get("/yolo", headers=bearer(SLOW))
    assert codes == [200, 200, 429]  # burst 2
    assert r.status_code == 429 and r.json()["error"] == "rate_limited" and "slow is over its rate" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 20  # 0.05 req/s: a token every 20 s
    rows = {row["id"]: row for row in json.loads(cpnctl("--socket", str(net["specs"]["a"].control), "show", "clients",
                                                        "--json").stdout)}
    assert (rows["slow"]["allowed"], rows["slow"]["rate_limited"]) == (2, 2)
    text = cpnctl("--socket", str(net["specs"]["a"].control), "show", "clients").stdout
    assert re.search(r"^slow\s+/\s+0\.05\s+2\.00\s+\S+\s+2\s+0\s+2\s", text, re.M), text
    metrics = httpx.get(f"http://{net['specs']['a'].metrics}/metrics", timeout=10).text
    assert 'cpn_client_requests_total{client="slow",result="rate_limited"} 2.0' in metrics
    assert re.search(r"^cpn_client_unauthorized_total [1-9]", metrics, re.M)


def test_failed_keys_are_paced_per_source_address(net) -> None:
    # From 127.0.0.2: three wrong keys (auth_failures_burst), then even the right key waits; 127.0.0.1 does not.
    with httpx.Client(base_url=net["url"], timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        assert [c.get("/yolo", headers=bearer(f"cpn_guess{i}")).status_code for i in range(3)] == [401] * 3
        r = c.get("/yolo", headers=bearer(ALICE))
        assert r.status_code == 429 and "failed authentications" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
    assert httpx.get(net["url"] + "/yolo", headers=bearer(ALICE), timeout=10).status_code == 200


def test_clients_reload(net) -> None:
    spec = net["specs"]["a"]
    spec.config.write_text(net["a_text"] + f'\n[[clients]]\nid = "newcomer"\napi_key_sha256 = "{key_sha256(NEWCOMER)}"\n')
    try:
        r = cpnctl("--socket", str(spec.control), "reload")
        assert r.returncode == 0, r.stderr
        assert httpx.get(net["url"] + "/yolo", headers=bearer(NEWCOMER), timeout=10).status_code == 200
        rows = {row["id"]: row for row in net["lab"].query("a", "show-clients")}
        assert rows["slow"]["rate_limited"] >= 2  # counters of clients that stay survive the reload
    finally:
        spec.config.write_text(net["a_text"])
        assert cpnctl("--socket", str(spec.control), "reload").returncode == 0
    assert httpx.get(net["url"] + "/yolo", headers=bearer(NEWCOMER), timeout=10).status_code == 401


def test_register_with_cpnctl_joins_survives_reload_and_leaves(net) -> None:
    lab, b = net["lab"], str(net["specs"]["b"].control)
    url = f"http://127.0.0.1:{net['insts'].ports['r1']}/r1"
    r = cpnctl("--socket", b, "register", "--service", "/reg", "--id", "r1", "--url", url, "--capacity", "20",
               "--price", "1.5", "--compute-latency-ms", "2")
    assert r.returncode == 0 and r.stdout.strip() == "r1 of /reg: added", r.stderr
    lab.wait_for(lambda: "r1" in best(lab, "a"), 10, "r1 at a")
    route = best(lab, "a")["r1"]
    assert (route["origin"], route["next_hop"], route["capacity"], route["price"]) == ("b", "b", 20.0, 1.5)
    call = httpx.get(net["url"] + "/reg/x", headers=bearer(ALICE), timeout=10)
    assert call.status_code == 200 and call.headers["cpn-instance"] == "r1" and call.json()["path"] == "/r1/x"
    svc = {s["instance"]: s for s in json.loads(cpnctl("--socket", b, "show", "services", "--json").stdout)}
    assert svc["r1"]["registered"] is True and svc["r1"]["registered_by"] == "cpnctl" and svc["r1"]["expires_in_s"] is None
    assert svc["s1"]["registered"] is False
    assert cpnctl("--socket", b, "reload").returncode == 0  # registered instances survive a reload
    assert "r1" in {s["instance"] for s in lab.query("b", "show-services")}
    assert httpx.get(net["url"] + "/reg", headers=bearer(ALICE), timeout=10).headers["cpn-instance"] == "r1"
    bad = cpnctl("--socket", b, "register", "--service", "/reg", "--id", "s1", "--url", url, "--capacity", "1")
    assert bad.returncode == 1 and "instance s1 is configured in the gateway's config file" in bad.stderr
    bad = cpnctl("--socket", b, "register", "--service", "reg", "--id", "x", "--url", url, "--capacity", "1")
    assert bad.returncode == 1 and bad.stderr.strip() == "cpnctl: service: must start with '/'"
    r = cpnctl("--socket", b, "deregister", "--id", "r1")
    assert r.returncode == 0 and "r1 of /reg: deregistered" in r.stdout
    lab.wait_for(lambda: "r1" not in {x["instance"] for x in lab.routes("a")}, 10, "r1 withdrawn at a")
    assert httpx.get(net["url"] + "/reg", headers=bearer(ALICE), timeout=10).status_code == 404
    assert "instance r1 of /reg deregistered by cpnctl" in lab.log("b")


def test_register_over_http_heartbeat_delete_and_ttl_expiry(net) -> None:
    lab = net["lab"]
    url = f"http://127.0.0.1:{net['insts'].ports['r2']}/r2"
    body = {"service": "/reg/v2", "url": url, "capacity": 10, "ttl_s": 30}
    with httpx.Client(base_url=net["reg"], headers=bearer(TOKEN), timeout=10) as c:
        r = c.put("/cpn/v1/instances/r2", json=body)
        assert r.status_code == 201 and r.json() == {"id": "r2", "service": "/reg/v2", "result": "added", "ttl_s": 30.0}
        lab.wait_for(lambda: "r2" in best(lab, "a"), 10, "r2 at a")
        assert httpx.get(net["url"] + "/reg/v2", headers=bearer(ALICE), timeout=10).headers["cpn-instance"] == "r2"
        r = c.put("/cpn/v1/instances/r2", json=body)  # the heartbeat
        assert r.status_code == 200 and r.json()["result"] == "refreshed"
        assert {s["instance"]: s for s in lab.query("b", "show-services")}["r2"]["heartbeats"] == 1
        r = c.delete("/cpn/v1/instances/r2")
        assert r.status_code == 200 and r.json()["result"] == "deleted"
        lab.wait_for(lambda: "r2" not in {x["instance"] for x in lab.routes("a")}, 10, "r2 withdrawn at a (DELETE)")

        r = c.put("/cpn/v1/instances/r2", json={**body, "ttl_s": 1})  # and now no heartbeat
        assert r.status_code == 201
        lab.wait_for(lambda: "r2" in best(lab, "a"), 10, "r2 at a again")
        lab.wait_for(lambda: "r2" not in {x["instance"] for x in lab.routes("a")}, 15, "r2 withdrawn at a (TTL)")
        assert "instance r2 of /reg/v2 withdrawn: no heartbeat within its ttl (1 s)" in lab.log("b")
        assert "r2" not in {s["instance"] for s in lab.query("b", "show-services")}
    metrics = httpx.get(f"http://{net['specs']['b'].metrics}/metrics", timeout=10).text
    for result in ("added", "refreshed", "deleted", "expired"):
        assert re.search(rf'^cpn_registrations_total{{result="{result}"}} [1-9]', metrics, re.M), result
    assert lab.query("b", "stats")["gateway"]["registration_expired"] >= 1


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "error", "field"), [
    ("PUT", "/cpn/v1/instances/x", {}, {"service": "/reg", "url": "http://127.0.0.1:9/", "capacity": 1}, 401, "unauthorized", None),
    ("PUT", "/cpn/v1/instances/x", bearer("cpn_nope"), {}, 401, "unauthorized", None),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), {"service": "/yolo", "url": "http://127.0.0.1:9/", "capacity": 1},
     403, "forbidden", None),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), {"service": "/reg", "url": "http://127.0.0.1:9/", "capacity": -1},
     400, "bad_request", "capacity"),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), {"service": "/reg", "url": "gopher://h/", "capacity": 1},
     400, "bad_request", "url"),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), {"service": "/reg", "capacity": 1}, 400, "bad_request", "url"),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), {"service": "/reg", "url": "http://h/", "capacity": 1, "ttl": 5},
     400, "bad_request", "ttl"),
    ("PUT", "/cpn/v1/instances/no%20id", bearer(TOKEN), {"service": "/reg", "url": "http://h/", "capacity": 1},
     400, "bad_request", "id"),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), "not json", 400, "bad_request", "body"),
    ("PUT", "/cpn/v1/instances/s1", bearer(TOKEN), {"service": "/reg", "url": "http://h/", "capacity": 1}, 409, "conflict", None),
    ("DELETE", "/cpn/v1/instances/nobody", bearer(TOKEN), None, 404, "not_registered", None),
    ("GET", "/cpn/v1/instances/x", bearer(TOKEN), None, 405, "method_not_allowed", None),
    ("PUT", "/elsewhere", bearer(TOKEN), {}, 404, "not_found", None),
    ("PUT", "/cpn/v1/instances/x", bearer(TOKEN), "x" * 20_000, 413, "body_too_large", None),
])
def test_bad_registrations(net, method, path, headers, body, status, error, field) -> None:
    content = body if isinstance(body, str) else None if body is None else json.dumps(body)
    r = httpx.request(method, net["reg"] + path, headers=headers, content=content, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"] == error
    assert r.json().get("field") == field and r.json()["detail"]
    if field:
        assert r.json()["detail"].startswith(f"{field}: ")


def test_registration_bound(net) -> None:
    lab = net["lab"]
    with httpx.Client(base_url=net["reg"], headers=bearer(TOKEN), timeout=10) as c:
        try:
            for i in range(3):  # max_registered_instances = 3
                assert c.put(f"/cpn/v1/instances/n{i}", json={"service": "/reg/n", "url": "http://127.0.0.1:9/",
                                                               "capacity": 1}).status_code == 201
            r = c.put("/cpn/v1/instances/n3", json={"service": "/reg/n", "url": "http://127.0.0.1:9/", "capacity": 1})
            assert r.status_code == 503 and r.json()["error"] == "registry_full"
            other = httpx.delete(net["reg"] + "/cpn/v1/instances/n0", headers=bearer(TOKEN_OTHER), timeout=10)
            assert other.status_code == 403  # site2 may register only /else: not take site1's instances away
        finally:
            for i in range(3):
                c.delete(f"/cpn/v1/instances/n{i}")
    assert not [s for s in lab.query("b", "show-services") if s.get("registered")]


def test_the_readme_edge_example_runs_as_written(tmp_path) -> None:
    from test_readme import blocks, ports_outside_ephemeral_range, section

    if shutil.which("curl") is None:
        pytest.skip("the example calls curl")
    fixed = ["7201", "7202", "8201", "9202", "9001"]
    port = dict(zip(fixed, map(str, ports_outside_ephemeral_range(len(fixed)))))
    setup, run, join, tryit, leave = (re.sub(r"(?<=[:\s])(7201|7202|8201|9202|9001)\b", lambda m: port[m.group(1)], b)
                                      for b in blocks(section("edge"), "sh"))
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if k != "CPN_SOCKET"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    edge = tmp_path / "edge"

    def sh(script: str, cwd: Path = edge) -> str:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def gw1_has_e1() -> bool:
        r = subprocess.run(["cpnctl", "--config", "gw1.toml", "show", "routes", "--json"], cwd=edge, env=env,
                           capture_output=True, text=True, timeout=10)
        return r.returncode == 0 and any(x["instance"] == "e1" and x["best"] for x in json.loads(r.stdout))

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert all(p.poll() is None for p in procs), [(edge / f"{i}.log").read_text() for i in range(len(procs))]
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    sh(setup, tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        for line in run.strip().splitlines():  # each a long-running process, as in its own terminal
            with open(edge / f"{len(procs)}.log", "wb") as log:
                procs.append(subprocess.Popen(["bash", "-c", "exec " + line], cwd=edge, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait(lambda: (edge / "gw2.sock").exists() and (edge / "gw1.sock").exists() and
             b"listening" in (edge / "0.log").read_bytes(), "the gateways and the instance to start")
        assert json.loads(sh(join)) == {"id": "e1", "service": "/echo", "result": "added", "ttl_s": 30.0}
        wait(gw1_has_e1, "gw1 to learn e1 through gw2")
        out = sh(tryit)
        row = next(ln.split() for ln in out.splitlines() if ln.startswith("/echo"))
        assert row[:5] == ["/echo", "e1", "gw2", "gw2", "gw2"] and "*" in row, out
        ok, unauthorized = out.split("HTTP/1.1 ")[1:3]
        assert ok.startswith("200 OK") and "cpn-instance: e1" in ok and "cpn-origin: gw2" in ok, ok
        answer, _ = json.JSONDecoder().raw_decode(ok.partition("\n\n")[2])
        assert answer["path"] == "/v1/hello" and "authorization" not in answer["headers"]
        assert unauthorized.startswith("401") and '"error": "unauthorized"' in unauthorized
        assert re.search(r"^alice\s+/echo\s+10\.00\s+20\.00\s+\S+\s+1\s+0\s+0\s", out, re.M), out
        assert re.search(r"^/echo\s+e1\s+yes\s.*\syes\s+http://127\.0\.0\.1:\d+/v1$", out, re.M), out
        assert json.loads(sh(leave)) == {"id": "e1", "service": "/echo", "result": "deleted"}
        wait(lambda: not gw1_has_e1(), "e1 to be withdrawn at gw1")
        gone = sh(tryit.replace("cpnctl --config gw1.toml show routes\n", ""))
        assert gone.startswith("HTTP/1.1 404") and "no_such_service" in gone
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0]


def test_hostile_registrations_never_harm_the_gateway(net) -> None:
    lab = net["lab"]
    host, port = net["reg"].removeprefix("http://").split(":")
    nasty = [b"[" * 16_000, b"\xff\xfe{}", b'{"service": "/reg", "url": "http://h/", "capacity": 1' + b"0" * 500 + b"}",
             json.dumps({"service": "/reg/" + "a/" * 200 + "b", "url": "http://h/", "capacity": 1}).encode()]
    for body in nasty:
        r = httpx.put(net["reg"] + "/cpn/v1/instances/x", content=body, headers=bearer(TOKEN), timeout=10)
        assert r.status_code == 400 and r.json()["field"] in ("body", "capacity", "service"), r.text
    for raw in (b"GARBAGE\r\n\r\n", b"PUT /cpn/v1/instances/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"\x16\x03\x01\x00"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass  # closed by the gateway, whatever it answered
    assert not lab.dead()
    r = httpx.put(net["reg"] + "/cpn/v1/instances/x", json={}, headers=bearer(TOKEN), timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "service"
    assert "Traceback" not in lab.log("b")


def test_a_deeply_nested_control_request_is_an_error_not_a_crash(net) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(net["specs"]["a"].control))
        s.sendall(b"[" * 60_000 + b"\n")
        assert json.loads(s.makefile().readline()) == {"ok": False, "error": "request is not JSON"}
    assert not net["lab"].dead() and net["lab"].query("a", "status")["id"] == "a"


def test_idle_registration_connections_cannot_lock_registrars_out(net) -> None:
    host, port = net["reg"].removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(16)]  # 16 per address
    try:
        with httpx.Client(base_url=net["reg"], headers=bearer(TOKEN), timeout=10) as c:
            r = c.delete("/cpn/v1/instances/nobody")  # the 17th: the longest idle is closed for it
        assert r.status_code == 404 and r.json()["error"] == "not_registered"
        idle[0].settimeout(3.0)  # well inside READ_TIMEOUT_S (5 s): closed for the newcomer, not for its silence
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
