"""A peer that floods routes, against real gateways: the limit never spills over to other
peers, and churn is taken at the announced pace while users and other sessions carry on.

The hostile peer is the interop suite's wire client (a second implementation, from the spec).
Timings are measured and printed, never asserted.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time

import httpx
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab
from interop.cases import LIMITS_CAPS, Target
from interop.wire import KEEPALIVE, UPDATE, load_key, new_route, pack, parse_pub

LIMIT = 300  # max_routes_per_peer on both gateways: the same on both, as by default
OPTS = {"hold_time_ms": 3000, "max_routes_per_peer": LIMIT, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000}


@pytest.fixture
def lab(tmp_path):
    """a (the target, with an instance of its own) peered with b (an honest gateway with one
    of its own); x, a peer from outside, may log in to a."""
    insts = InstanceProcs()
    try:
        urls = {"sa": f"http://127.0.0.1:{insts.start('sa')}/", "sb": f"http://127.0.0.1:{insts.start('sb')}/"}
        topo = Topology(("a", "b"), (Link("a", "b", 0),),
                        (Instance("sa", "a", "/own", 1e6, 1, 0), Instance("sb", "b", "/svc", 1e6, 1, 0)),
                        dict(OPTS, route_changes_per_s=500, route_changes_burst=2000))
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        add_outside_peer(specs["a"], "x", tmp_path / "x.key")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            host, port = specs["a"].listen.rsplit(":", 1)
            x = Target((host, int(port)), parse_pub(specs["a"].public_key), "x", load_key(str(tmp_path / "x.key")),
                       specs["a"].http)
            yield lab, specs, x
            for gw in ("a", "b"):
                assert "Traceback" not in lab.log(gw), lab.log(gw)[-3000:]
    finally:
        insts.stop_all()


def _peer(lab: Lab, gw: str, pid: str) -> dict:
    return {p["id"]: p for p in lab.query(gw, "show-peers")}[pid]


def _keepalive(p) -> None:
    p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})


def test_a_peer_at_its_limit_does_not_cut_the_gateway_off_from_the_others(lab) -> None:
    lab_, specs, x = lab
    before = _peer(lab_, "a", "b")
    p = x.session(caps=LIMITS_CAPS, limits=(10_000, 1000, 10_000))
    assert p.target_limits == {"routes": LIMIT, "rate": 500, "burst": 2000}
    try:
        # Exactly a's limit: accepted. a has LIMIT + 1 routes to offer b (x's and its own), b takes LIMIT.
        for start in range(0, LIMIT, 100):
            p.send_msg({"t": UPDATE, "adv": [new_route(f"/x{n % 7}", f"i{n}", "x") for n in range(start, start + 100)], "wd": []})
        lab_.wait_for(lambda: _peer(lab_, "a", "x")["routes_received"] == LIMIT, 10, "a to take x's routes")
        lab_.wait_for(lambda: _peer(lab_, "a", "b")["routes_withheld"] == 1, 10, "a to withhold one route from b")
        lab_.wait_for(lambda: _peer(lab_, "b", "a")["routes_received"] == LIMIT, 10, "b to take what a sent")
        _keepalive(p)
        ab, ba = _peer(lab_, "a", "b"), _peer(lab_, "b", "a")
        assert ab["routes_sent"] == LIMIT and ab["peer_limits"] == {"routes": LIMIT, "rate": 500, "burst": 2000}
        assert ba["routes_received"] == LIMIT and ba["state"] == "established" and ba["flaps"] == 0
        own = [r for r in lab_.routes("b") if r["origin"] == "a"]
        assert [r["instance"] for r in own] == ["sa"]  # a's own instance is never the one withheld
        assert lab_.query("a", "status")["routes_withheld"] == 1
        # One route over: cease/max-routes, for x only.
        p.send_msg({"t": UPDATE, "adv": [new_route("/x0", "one-more", "x")], "wd": []})
        err = p.expect_error(5.0)
        assert err is not None and err[:2] == (6, 1), err
    finally:
        p.close()
    lab_.wait_for(lambda: _peer(lab_, "a", "b")["routes_withheld"] == 0 and _peer(lab_, "b", "a")["routes_received"] == 1,
                  10, "x's routes to leave b")
    after = _peer(lab_, "a", "b")
    assert after["state"] == "established" and after["flaps"] == before["flaps"] == 0
    assert _peer(lab_, "b", "a")["flaps"] == 0 and httpx.get(f"http://{specs['b'].http}/own", timeout=10).status_code == 200
    assert sum("withholding routes from peer b" in line for line in lab_.log("a").splitlines()) == 1  # said once


FLOOD_S = 3.0
FLOOD_MAX = 300_000  # route entries
KEYS = 250  # routes per UPDATE, flapped: advertised, then withdrawn


def _flood(x: Target, out: dict) -> None:
    """x advertises and withdraws KEYS routes as fast as a lets it, for FLOOD_S (bounded in count too)."""
    p = x.session(caps=LIMITS_CAPS)
    out["session"] = p
    up = pack({"t": UPDATE, "adv": [new_route(f"/x{n % 7}", f"c{n}", "x") for n in range(KEYS)], "wd": []})
    down = pack({"t": UPDATE, "adv": [], "wd": [[f"/x{n % 7}", "x", f"c{n}"] for n in range(KEYS)]})
    p.sock.settimeout(30)
    out["start"] = time.monotonic()
    sent = 0
    try:
        while time.monotonic() - out["start"] < FLOOD_S and sent < FLOOD_MAX:
            p.send_msg(up if (sent // KEYS) % 2 == 0 else down)
            sent += KEYS
            if sent % (KEYS * 20) == 0:
                _keepalive(p)
    except OSError as exc:
        out["error"] = repr(exc)
    out["sent"], out["end"] = sent, time.monotonic()


def test_a_churn_flood_from_one_peer_is_taken_at_its_pace_and_spares_users(lab) -> None:
    lab_, specs, x = lab
    base: list[float] = []
    with httpx.Client(timeout=10) as client:
        for _ in range(100):  # the honest user's baseline, through a to b's instance
            t0 = time.monotonic()
            assert client.get(f"http://{specs['a'].http}/svc").status_code == 200
            base.append(time.monotonic() - t0)
        flood: dict = {}
        attacker = threading.Thread(target=_flood, args=(x, flood))
        attacker.start()
        under: list[float] = []
        statuses: list[int] = []
        paced_seen = False
        try:
            while attacker.is_alive():
                for path in ("/svc", "/own"):
                    t0 = time.monotonic()
                    statuses.append(client.get(f"http://{specs['a'].http}{path}").status_code)
                    under.append(time.monotonic() - t0)
                if not paced_seen and "start" in flood:
                    paced_seen = _peer(lab_, "a", "x")["inbound_paced"]
                time.sleep(0.01)
        finally:
            attacker.join()
    assert "error" not in flood, flood  # a never hung up on x: outrunning the pace is not an error
    xa = _peer(lab_, "a", "x")
    assert xa["state"] == "established" and paced_seen
    # a took no more than its bucket allows: the burst, then 500 entries a second (and a slice).
    assert xa["route_entries_in"] <= 2000 + 500 * (time.monotonic() - flood["start"]) + 32, (xa, flood["sent"])
    assert flood["sent"] > xa["route_entries_in"]  # the rest waited unread
    assert statuses and all(s == 200 for s in statuses), statuses
    for gw, peer in (("a", "b"), ("b", "a")):
        p = _peer(lab_, gw, peer)
        assert p["state"] == "established" and p["flaps"] == 0, p
    p = flood["session"]
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset: the backlog goes too
    p.close()
    lab_.wait_for(lambda: _peer(lab_, "a", "x")["state"] != "established", 10, "a to drop x's reset session")
    ms = lambda xs, q: round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 2)  # noqa: E731
    print(f"\nflood: {flood['sent']} route entries offered in {flood['end'] - flood['start']:.2f} s, "
          f"{xa['route_entries_in']} taken; user p50/p99 {ms(base, 50)}/{ms(base, 99)} ms before, "
          f"{ms(under, 50)}/{ms(under, 99)} ms during ({len(under)} requests)")
