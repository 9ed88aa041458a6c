"""Graceful restart with real processes: peers keep a restarting gateway's routes for its window."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from cpnd.lab import Instance, Lab, Link, Topology, add_outside_peer, write_lab
from interop.wire import NOTIFICATION, UPDATE, Peer, load_key, new_route, parse_pub

FAST = {"hold_time_ms": 1500, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500}
TOPO = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("b", "c", 1)), (Instance("s", "c", "/svc"),),
                {**FAST, "graceful_restart_ms": 2500})


def route(lab: Lab, gw: str) -> dict | None:
    return next((r for r in lab.routes(gw) if r["instance"] == "s" and r["best"]), None)


def start(tmp_path) -> Lab:
    lab = Lab(write_lab(TOPO, tmp_path))
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(TOPO), 20, "convergence")
    except BaseException:  # the caller's ``with`` never gets it: its gateways must not outlive the failure
        lab.stop_all()
        raise
    return lab


def test_routes_survive_a_graceful_restart_without_a_flap(tmp_path) -> None:
    with start(tmp_path) as lab:
        seq_before = route(lab, "b")["seq"]
        assert lab.stop("c", signal.SIGTERM) == 0
        lab.wait_for(lambda: route(lab, "b") is not None and route(lab, "b")["stale"], 5, "b to keep s as stale")
        assert "cease/restarting" in lab.log("b") and "keeping 1 routes of c as stale" in lab.log("b")
        seen_at_a = []
        lab.start("c")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until c is back and b holds its fresh route
            seen_at_a.append(route(lab, "a") is not None)
            r = route(lab, "b")
            if r is not None and not r["stale"] and r["seq"] > seq_before:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"c's routes never came back fresh at b: {route(lab, 'b')}")
        assert all(seen_at_a), "a lost the route while c restarted"
        assert not route(lab, "a")["stale"]  # only b, c's neighbour, ever marks it


def test_stale_routes_go_when_the_window_passes(tmp_path) -> None:
    with start(tmp_path) as lab:
        lab.procs["c"].kill()  # a crash: no NOTIFICATION, the connection breaks
        lab.procs.pop("c").wait()
        t0 = time.monotonic()
        lab.wait_for(lambda: route(lab, "b") is not None and route(lab, "b")["stale"], 5, "b to keep s as stale")
        lab.wait_for(lambda: route(lab, "a") is None and route(lab, "b") is None, 10, "the stale route to go")
        assert time.monotonic() - t0 >= 2.0  # kept for the window (2.5 s, less polling slack)


def test_sigint_is_a_hard_shutdown(tmp_path) -> None:
    with start(tmp_path) as lab:
        before = len(lab.log("b"))  # a collision at start-up may have kept routes stale for a swap
        assert lab.stop("c", signal.SIGINT) == 0
        lab.wait_for(lambda: route(lab, "a") is None and route(lab, "b") is None, 5, "the routes to go at once")
        after = lab.log("b")[before:]
        assert "cease/admin-shutdown" in after and "as stale" not in after


def _x_session(lab: Lab, spec, key_path: Path) -> Peer:
    host, port = spec.listen.rsplit(":", 1)
    p = Peer((host, int(port)), "a", parse_pub(spec.public_key), "x", load_key(str(key_path)))
    p.open_session()
    p.send_msg({"t": UPDATE, "adv": [new_route("/swap", "i1", "x")], "wd": []})
    p.send_msg({"t": UPDATE, "adv": [], "wd": []})  # End-of-RIB
    return p


def _x_notify(p: Peer, sub: int, text: str) -> None:
    """Send cease/``sub`` and hang up without a reset (unread data would make close() one)."""
    p.send_msg({"t": NOTIFICATION, "code": 6, "sub": sub, "msg": text})
    p.sock.shutdown(socket.SHUT_WR)
    try:
        while p.sock.recv(65536):
            pass
    except OSError:
        pass
    p.close()


def _x_route(lab: Lab) -> dict | None:
    return next((r for r in lab.routes("a") if r["instance"] == "i1"), None)


def test_a_collision_swap_keeps_routes_and_is_no_flap(tmp_path) -> None:
    """A peer that ends an established session with cease/collision is swapping connections:
    its routes stay (stale) until the next session's End-of-RIB, and no flap is counted."""
    topo = Topology(("a",), (), (), FAST)
    specs = write_lab(topo, tmp_path)
    add_outside_peer(specs["a"], "x", tmp_path / "x.key")
    with Lab(specs) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.query("a", "status") is not None, 10, "a to answer")
        p = _x_session(lab, specs["a"], tmp_path / "x.key")
        lab.wait_for(lambda: _x_route(lab) is not None, 10, "x's route at a")
        _x_notify(p, 7, "connection collision resolution")
        lab.wait_for(lambda: (_x_route(lab) or {}).get("stale"), 5, "x's route to be kept as stale")
        p = _x_session(lab, specs["a"], tmp_path / "x.key")
        lab.wait_for(lambda: _x_route(lab) is not None and not _x_route(lab)["stale"], 10, "x's route fresh again")
        x = {q["id"]: q for q in lab.query("a", "show-peers")}["x"]
        assert x["state"] == "established" and x["flaps"] == 0
        # Any other Cease is a real end: the routes go at once, and it counts.
        _x_notify(p, 2, "administrative shutdown")
        lab.wait_for(lambda: _x_route(lab) is None, 5, "x's route to go")
        assert {q["id"]: q for q in lab.query("a", "show-peers")}["x"]["flaps"] == 1
