"""``[gateway] workers = 2`` on gateways with peers, real processes: the ingress's workers reach a
peer's instance through the control process's session (both workers serve), routes learnt and withdrawn
after the workers started reach them (200, then 404 as one process answers), a worker killed with
SIGKILL leaves the other's tunnelled requests going, and the egress's workers take the peer's streams
for its instances within their shares."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time

import attrs
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab

from test_workers import _alive, connect, raw_get, read_status

CAPACITY = 20  # /capped's instance at b: 10 a second per worker when b has two
BURST = 80
FAST = {"health_interval_ms": 0, "workers": 2, "connect_retry_min_ms": 100}


@contextlib.contextmanager
def refusing_pair(tmp_path, options=FAST):
    """a (the options' workers) and b (one worker, max_data_channels_per_peer = 0) peered and
    converged; b serves /remote (r1). Yields the lab and its specs."""
    with InstanceProcs() as insts:
        insts.start("r1")
        topo = Topology(("a", "b"), (Link("a", "b"),), (Instance("r1", "b", "/remote", capacity=1e6),), options)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        conf = specs["b"].config
        conf.write_text(conf.read_text().replace("workers = 2", "workers = 1\nmax_data_channels_per_peer = 0"))
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            yield lab, specs


def workers(lab: Lab, gw: str) -> list[dict]:
    return lab.query(gw, "status")["workers"]


@pytest.fixture(params=[1, 2], ids=["egress-1-worker", "egress-2-workers"])
def pair(request, tmp_path):
    """Gateways a (workers = 2, users) and b (workers = 1 or 2) peered; b serves /remote (r1)."""
    insts = InstanceProcs()
    for iid in ("r1", "r2", "rc"):
        insts.start(iid)
    late = Instance("r2", "b", "/late", capacity=1e6)  # in b's certificate, left out of its config until a test adds it
    topo = Topology(("a", "b"), (Link("a", "b"),), (Instance("r1", "b", "/remote", capacity=1e6),
                                                     Instance("rc", "b", "/capped", capacity=CAPACITY)), FAST)
    specs = write_lab(attrs.evolve(topo, instances=(*topo.instances, late)), tmp_path,
                      instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    conf = specs["b"].config
    text = conf.read_text()
    if request.param == 1:
        text = text.replace("workers = 2", "workers = 1")
    with_late, without = text, text[:text.index('[[services]]\npath = "/late"')]
    conf.write_text(without)
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        for gw in ("a", "b") if request.param == 2 else ("a",):
            lab.wait_for(lambda: all(w["report_age_ms"] is not None for w in workers(lab, gw)), 30, f"{gw}'s workers")
        yield lab, specs, (with_late, without), request.param, insts
    finally:
        lab.stop_all()
        insts.stop_all()


def users_on_both_workers(lab: Lab, addr: str, path: str) -> list[socket.socket]:
    """Keep-alive users, each with one request answered, until both of a's workers hold some."""
    socks: list[socket.socket] = []
    try:
        for _ in range(40):
            s = connect(addr)
            socks.append(s)
            assert raw_get(s, path) == 200
            if len(socks) >= 4:
                lab.wait_for(lambda: sum(w["http_clients"] for w in workers(lab, "a")) == len(socks), 10, "reports")
                if all(w["http_clients"] for w in workers(lab, "a")):
                    return socks
        raise AssertionError("the kernel put every connection on one worker")
    except BaseException:
        for s in socks:
            s.close()
        raise


def test_every_worker_reaches_the_peers_instance(pair) -> None:
    lab, specs, _, egress_workers, _ = pair
    # Each of a's workers dials its own data channel to b beside the control process's session.
    lab.wait_for(lambda: lab.query("a", "status")["http"].get("data_channels_up", 0) >= 2, 15, "a's data channels")
    socks = users_on_both_workers(lab, specs["a"].http, "/remote")
    try:
        for _ in range(5):
            for s in socks:
                assert raw_get(s, "/remote") == 200
        lab.wait_for(lambda: all(w["requests"] >= 2 for w in workers(lab, "a")), 10, "both workers' counts")
        lab.wait_for(lambda: lab.query("a", "status")["http"]["requests"] == 6 * len(socks), 10,
                     "the workers' counts added up")
        http = lab.query("a", "status")["http"]
        assert http["streams_on_data_channels"] == 6 * len(socks) and "streams_via_control" not in http
        # Each worker sent to r1: the control process relays each one's sends to the other (selection
        # counts every worker's), at least one message to each.
        lab.wait_for(lambda: lab.query("a", "status")["http"].get("sibling_updates", 0) >= 2, 10, "sends relayed")
        assert lab.query("b", "show-peers")[0]["state"] == "established"
        if egress_workers == 1:
            assert lab.query("b", "status")["stats"]["data_channels"] == 2  # beside a's session, at b's core
        if egress_workers == 2:  # b's control process handed a's data channels to its workers: no stream passed it
            b = lab.query("b", "status")
            assert b["stats"]["data_channels_handed"] == 2 and "data_channels" not in b["stats"], b["stats"]
            assert b["stats"].get("handed_to_workers", 0) == 0
            lab.wait_for(lambda: lab.query("b", "status")["http"]["handed_streams"] == 6 * len(socks),
                         10, "b's workers' counts")
    finally:
        for s in socks:
            s.close()


def test_routes_learnt_and_withdrawn_after_the_workers_started(pair) -> None:
    lab, specs, (with_late, without), _, _ = pair
    socks = users_on_both_workers(lab, specs["a"].http, "/remote")
    try:
        for s in socks:
            assert raw_get(s, "/late") == 404
        conf = specs["b"].config
        conf.write_text(with_late)
        lab.query("b", "reload")
        lab.wait_for(lambda: any(r["service"] == "/late" for r in lab.routes("a")), 10, "a learns /late")
        lab.wait_for(lambda: all(raw_get(s, "/late") == 200 for s in socks), 10, "every worker serves /late")
        conf.write_text(without)
        lab.query("b", "reload")
        lab.wait_for(lambda: not any(r["service"] == "/late" for r in lab.routes("a")), 10, "a forgets /late")
        lab.wait_for(lambda: all(raw_get(s, "/late") == 404 for s in socks), 10, "every worker forgets /late")
        assert all(raw_get(s, "/remote") == 200 for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_killed_worker_leaves_the_others_tunnelled_requests_going(pair) -> None:
    lab, specs, _, _, _ = pair
    addr = specs["a"].http
    socks = users_on_both_workers(lab, addr, "/remote")
    try:
        before = workers(lab, "a")
        os.kill(before[0]["pid"], signal.SIGKILL)
        answered = 0
        for s in socks:
            try:
                assert raw_get(s, "/remote") == 200
                answered += 1
            except (ConnectionError, OSError):
                pass
        assert answered == before[1]["http_clients"]  # the other worker's users, every one of them
        lab.wait_for(lambda: (w := workers(lab, "a")[0])["alive"] and w["pid"] != before[0]["pid"]
                     and w["report_age_ms"] is not None, 15, "worker 0 restarted")
        # The replacement is fed the RIB again: new users on either worker reach the peer.
        lab.wait_for(lambda: all(_get(addr, "/remote") == 200 for _ in range(10)), 15, "both workers serve /remote")
    finally:
        for s in socks:
            s.close()


def test_a_remote_instances_capacity_holds_across_both_sides_workers(pair) -> None:
    """A burst from a's two workers to b's instance (capacity 20): whichever of b's processes admits
    them (b's control process hands every peer stream to a worker, each with its share), no more than
    20 get in per started second."""
    lab, specs, _, egress_workers, _ = pair
    socks = [connect(specs["a"].http) for _ in range(BURST)]
    try:
        t0 = time.monotonic()
        for s in socks:  # every request sent before any is answered
            s.sendall(b"GET /capped HTTP/1.1\r\nHost: a\r\n\r\n")
        codes = [read_status(s) for s in socks]
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    ok = codes.count(200)
    assert 0 < ok <= CAPACITY * math.ceil(took), (ok, took, egress_workers)
    assert ok + codes.count(503) == BURST


def test_through_a_transit_with_workers_sealed_end_to_end(tmp_path) -> None:
    """a -> t -> b, every gateway with two workers: a's worker seals (the route is valid, its next hop
    is not the origin) and opens the stream on its data channel to t, whose control process hands
    that channel to a worker of t, which relays on its own data channel to b, handed to a worker of b;
    the worker that owns the stream's key (handoff.owner) opens the seal with b's key (fed to it by b's
    control process) and calls the instance; the other passes it on through b's control process."""
    insts = InstanceProcs()
    insts.start("r1")
    topo = Topology(("a", "t", "b"), (Link("a", "t"), Link("t", "b")), (Instance("r1", "b", "/remote", capacity=1e6),),
                    FAST)
    specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        for gw in ("a", "t"):  # each worker of a has a channel to t, each of t one to a and one to b
            lab.wait_for(lambda gw=gw: lab.query(gw, "status")["http"].get("data_channels_up", 0) >= 2 * len(
                topo.neighbours(gw)), 20, f"{gw}'s workers' data channels")
        for _ in range(10):
            assert _get(specs["a"].http, "/remote") == 200
        for gw, key in (("a", "sealed_streams_out"), ("b", "sealed_streams_in")):
            lab.wait_for(lambda gw=gw, key=key: lab.query(gw, "status")["http"].get(key, 0) == 10, 10, f"{gw}: {key}")
        assert lab.query("t", "status")["stats"]["data_channels_handed"] >= 2
        assert lab.query("b", "status")["stats"]["data_channels_handed"] >= 2
        assert lab.query("a", "status")["http"]["streams_on_data_channels"] == 10
        # Relayed by t's workers: no control process passed a stream on.
        lab.wait_for(lambda: lab.query("t", "status")["http"].get("relayed", 0) == 10, 10, "t's workers' relays")
        assert lab.query("t", "status")["stats"].get("handed_to_workers", 0) == 0
        # At b each sealed stream is opened by the one worker its key belongs to (one replay window per
        # key): those that came on the other worker's channel went through b's control process to it.
        lab.wait_for(lambda: lab.query("b", "status")["http"].get("passed_to_control", 0)
                     == lab.query("b", "status")["stats"].get("handed_to_workers", 0), 10, "b's passes")
    finally:
        lab.stop_all()
        insts.stop_all()


def test_refused_data_channels_leave_the_requests_to_the_control_process(tmp_path) -> None:
    """b takes no data channels (max_data_channels_per_peer = 0): a's workers send every request
    through a's control process, which relays it on its session with b."""
    with refusing_pair(tmp_path) as (lab, specs):
        lab.wait_for(lambda: lab.query("b", "status")["stats"].get("data_channels_refused", 0) >= 2, 20, "refusals")
        socks = users_on_both_workers(lab, specs["a"].http, "/remote")
        try:
            for s in socks:
                assert raw_get(s, "/remote") == 200
        finally:
            for s in socks:
                s.close()
        lab.wait_for(lambda: lab.query("a", "status")["http"].get("streams_via_control", 0) == 2 * len(socks), 10,
                     "a's workers' counts")
        http = lab.query("a", "status")["http"]
        assert "streams_on_data_channels" not in http and lab.query("a", "status")["http"]["requests"] == 2 * len(socks)


def test_an_egress_worker_killed_its_peers_channels_come_back_on_the_other(pair) -> None:
    lab, specs, _, egress_workers, _ = pair
    if egress_workers == 1:
        pytest.skip("b has no workers")
    lab.wait_for(lambda: lab.query("b", "status")["stats"].get("data_channels_handed", 0) >= 2, 15, "a's channels at b")
    victim = workers(lab, "b")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # a's workers whose channel was on the dead worker dial again; b hands the new ones to a live worker.
    lab.wait_for(lambda: all(_get(specs["a"].http, "/remote") == 200 for _ in range(10)), 15, "a's users served")
    lab.wait_for(lambda: (w := workers(lab, "b")[0])["alive"] and w["pid"] != victim, 15, "b's worker 0 restarted")
    for _ in range(10):
        assert _get(specs["a"].http, "/remote") == 200


def test_a_registered_instance_is_served_to_peers_by_the_control_process(pair) -> None:
    """Workers know the config file's instances only: a peer's request for a registered one is served
    by b's control process (the only process calling it), not handed to a worker that would not know it."""
    lab, specs, _, egress_workers, insts = pair
    url = f"http://127.0.0.1:{insts.ports['r2']}/r2"
    r = subprocess.run([sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", "--socket",
                        str(specs["b"].control), "register", "--service", "/late", "--id", "rr", "--url", url,
                        "--capacity", "100"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lab.wait_for(lambda: any(x["instance"] == "rr" for x in lab.routes("a")), 10, "a learns rr")
    lab.wait_for(lambda: _get(specs["a"].http, "/late") == 200, 10, "a's workers reach rr")
    for _ in range(6):
        assert _get(specs["a"].http, "/late") == 200
    if egress_workers == 2:  # on a's data channels, handed to b's workers, which passed them to b's control process
        assert lab.query("b", "status")["stats"].get("handed_to_workers", 0) == 0
        lab.wait_for(lambda: lab.query("b", "status")["http"].get("passed_to_control", 0) >= 7, 10, "b's workers' counts")


def test_sigterm_ends_both_gateways_and_every_worker(pair) -> None:
    """With sessions, data channels and requests in flight on them, SIGTERM drains and ends every process."""
    lab, specs, _, egress_workers, _ = pair
    lab.wait_for(lambda: lab.query("a", "status")["http"].get("data_channels_up", 0) >= 2, 15, "a's data channels")
    assert _get(specs["a"].http, "/remote") == 200
    pids = [w["pid"] for gw in ("a", "b") for w in workers(lab, gw)]
    assert lab.stop("a") == 0 and lab.stop("b") == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _get(addr: str, path: str) -> int:
    with connect(addr) as s:
        return raw_get(s, path)
