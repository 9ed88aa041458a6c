"""Issue 20's four attacks by one authenticated peer, against real gateways: none takes effect.

v (the victim, /svc) -- t (the target, /loc) -- c (a third gateway); ``evil`` is a peer only t
lists. The lab's domain key certified v for /svc and t for /loc. Evil speaks with the interop
suite's wire client (a second implementation, from the spec) and replays what t sends it.
Each attack is followed by a sentinel route of evil's own: once c has it, t has read the attack
and told c whatever it would tell it.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab
from interop.cases import Target
from interop.wire import ROUTE_REFRESH, TUNNEL, UPDATE, load_key, new_route, parse_pub, sign_route

OPTS = {"hold_time_ms": 3000, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 1000}
SIG_CAPS = ["route-refresh", "tunnel", "origin-sig"]
HUGE = (1 << 64) - 1
SV = ("/svc", "v", "sv")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("origin")
    insts = InstanceProcs()
    try:
        urls = {"sv": f"http://127.0.0.1:{insts.start('sv')}/", "sl": f"http://127.0.0.1:{insts.start('sl')}/"}
        topo = Topology(("v", "t", "c"), (Link("v", "t", 0), Link("t", "c", 0)),
                        (Instance("sv", "v", "/svc", 1e6, 1, 0), Instance("sl", "t", "/loc", 1e6, 1, 0)), OPTS)
        specs = write_lab(topo, tmp, instance_url=lambda i: urls[i.id])
        add_outside_peer(specs["t"], "evil", tmp / "evil.key")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            host, port = specs["t"].listen.rsplit(":", 1)
            key = load_key(str(tmp / "evil.key"))
            evil = Target((host, int(port)), parse_pub(specs["t"].public_key), "evil", key, specs["t"].http)
            yield lab, specs, evil, key
            for gw in specs:
                assert "Traceback" not in lab.log(gw), lab.log(gw)[-3000:]
    finally:
        insts.stop_all()


def best(lab: Lab, gw: str, key: tuple[str, str, str]) -> dict[str, Any] | None:
    for r in lab.routes(gw):
        if r["best"] and (r["service"], r["origin"], r["instance"]) == key:
            return r
    return None


def invalid_from_evil(lab: Lab) -> int:
    return {p["id"]: p for p in lab.query("t", "show-peers")}["evil"]["routes_invalid"]


def routes_from_t(p) -> dict[tuple[str, str, str], dict[str, Any]]:
    """What t advertises to evil (after a ROUTE-REFRESH): the genuine signatures evil can replay."""
    p.send_msg({"t": ROUTE_REFRESH})
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    deadline = time.monotonic() + 5
    while SV not in out or ("/loc", "t", "sl") not in out:
        assert time.monotonic() < deadline, f"t never advertised /svc and /loc to evil: {list(out)}"
        ctype, msg = p.recv(5)
        if ctype != TUNNEL and msg.get("t") == UPDATE:
            out.update({(r["svc"], r["origin"], r["inst"]): r for r in msg["adv"]})
    return out


_sentinels = iter(range(1000))


def attack(lab: Lab, p, key, routes: list[dict[str, Any]]) -> int:
    """Send ``routes`` from evil, then a sentinel; wait until c holds the sentinel (so whatever the
    attack changed at t has reached c); how many of them t counted invalid."""
    before = invalid_from_evil(lab)
    n = next(_sentinels)
    sentinel = sign_route(new_route(f"/evil/sentinel{n}", "s", "evil", seq=1, path=["evil"]), key, "t")
    p.send_msg({"t": UPDATE, "adv": routes, "wd": []})
    p.send_msg({"t": UPDATE, "adv": [sentinel], "wd": []})
    lab.wait_for(lambda: best(lab, "c", (f"/evil/sentinel{n}", "evil", "s")) is not None, 10, "the sentinel at c")
    return invalid_from_evil(lab) - before


def served_by_v(lab: Lab, specs, gw: str, headers: dict[str, str] | None = None) -> None:
    r = httpx.get(f"http://{specs[gw].http}/svc/x", headers=headers or {}, timeout=10)
    assert r.status_code == 200 and r.headers["CPN-Origin"] == "v" and r.headers["CPN-Instance"] == "sv", (r, r.text)


def untouched(lab: Lab, specs) -> None:
    """The victim's instance is still reached over the real path, with its real attributes, everywhere."""
    at_t, at_c = best(lab, "t", SV), best(lab, "c", SV)
    assert at_t is not None and at_t["path"] == ["v"] and at_t["validation"] == "valid", at_t
    assert at_c is not None and at_c["path"] == ["t", "v"] and at_c["validation"] == "valid", at_c
    for r in (at_t, at_c):
        assert r["seq"] < HUGE and r["price"] == 1 and r["load"] < 1, r
    assert all(r["path"][:1] != ["evil"] for gw in ("t", "c") for r in lab.routes(gw) if r["instance"] == "sv")
    for gw in ("t", "c"):
        served_by_v(lab, specs, gw, {"CPN-Max-Price": "1.5", "CPN-Max-Latency": "2s"})


def test_hijack_of_another_gateways_instance_is_dropped(net) -> None:
    lab, specs, evil, key = net
    p = evil.session(caps=SIG_CAPS)
    try:
        genuine = routes_from_t(p)[SV]
        assert genuine["path"] == ["t", "v"] and len(genuine["osig"]) == 64 and genuine["cert"]
        forged = [
            # The hijack: unsigned, v's instance, "adjacent to v", latency 0, the largest seq.
            new_route("/svc", "sv", "v", seq=HUGE, path=["evil", "v"], lat=0),
            # v's genuine signature replayed over the same forged path: v never sent its routes to evil.
            {**genuine, "path": ["evil", "v"], "lat": 0},
            # ... and with a larger seq than v signed.
            {**genuine, "path": ["evil", "v"], "lat": 0, "seq": HUGE},
        ]
        for route in forged:
            dropped = attack(lab, p, key, [route])
            untouched(lab, specs)
            assert dropped == 1
    finally:
        p.close()


def test_attribute_forgery_never_reaches_the_real_path(net) -> None:
    lab, specs, evil, key = net
    p = evil.session(caps=SIG_CAPS)
    try:
        genuine = routes_from_t(p)[SV]
        forged = {**genuine, "path": ["evil", "t", "v"], "seq": HUGE, "price": 1e12, "load": 1000.0}
        # Through t itself: t drops it as a loop; the same attributes, unsigned, over a path of evil's own.
        assert attack(lab, p, key, [forged]) == 0
        dropped = attack(lab, p, key, [new_route("/svc", "sv", "v", seq=HUGE, price=1e12, load=1000.0, path=["evil", "v"])])
        untouched(lab, specs)
        assert dropped == 1
    finally:
        p.close()


def test_poisoning_a_third_gateway_off_the_route_is_dropped(net) -> None:
    lab, specs, evil, key = net
    p = evil.session(caps=SIG_CAPS)
    try:
        genuine = routes_from_t(p)[SV]
        # A path through c makes t withdraw the route from c (split horizon) if t takes it as best.
        dropped = attack(lab, p, key, [{**genuine, "path": ["evil", "c", "v"], "lat": 0}])
        dropped += attack(lab, p, key, [new_route("/svc", "sv", "v", seq=HUGE, path=["evil", "c", "v"], lat=0)])
        untouched(lab, specs)
        assert dropped == 2
        assert httpx.get(f"http://{specs['c'].http}/svc", timeout=10).status_code == 200
    finally:
        p.close()


def test_capture_of_a_prefix_another_gateway_is_authorised_for_is_dropped(net) -> None:
    lab, specs, evil, key = net
    for caps in (SIG_CAPS, ["route-refresh", "tunnel"]):  # signed with evil's own key, and as a peer from before
        p = evil.session(caps=caps)
        try:
            capture = new_route("/loc/admin", "grab", "evil", seq=1, path=["evil"])
            dropped = attack(lab, p, key, [sign_route(capture, key, "t") if "origin-sig" in caps else capture])
            assert best(lab, "t", ("/loc/admin", "evil", "grab")) is None
            assert best(lab, "c", ("/loc/admin", "evil", "grab")) is None
            for gw in ("t", "c"):
                r = httpx.get(f"http://{specs[gw].http}/loc/admin/users", timeout=10)
                assert r.status_code == 200 and r.headers["CPN-Origin"] == "t" and r.headers["CPN-Instance"] == "sl"
            assert dropped == 1
            assert "/loc/admin is authorised to t, not evil" in {p["id"]: p for p in lab.query("t", "show-peers")}["evil"]["last_invalid"]
        finally:
            p.close()
    stats = lab.query("t", "stats")
    assert stats["gateway"]["routes_invalid"] >= 2 and stats["gauges"]["origin_verifies"] > 0
    metrics = httpx.get(f"http://{specs['t'].metrics}/metrics", timeout=10).text
    line = next(ln for ln in metrics.splitlines() if ln.startswith('cpn_routes_dropped_total{reason="invalid"}'))
    assert float(line.split()[-1]) == stats["gateway"]["routes_invalid"]
