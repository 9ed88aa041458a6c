"""One address flooding abandoned requests must not cost an honest user its service.

Sans-IO: a party that abandons its requests has no share of an instance once it is half full
(cpnd/fairshare.py), and only a hang-up counts as one (a cut at the bound does not). Real
processes: a, the ingress, with n1 of /near, and b, one hop away, with f1 of /far (20 req/s each).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from cpnd.egress import user_gone
from cpnd.fairshare import FATE_S, IDLE, Shares
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab
from cpnd.pipes import pipe
from cpnd.relay import StreamSink
from cpnd.tunnel import ResetCode


def _run(capacity: float, offered: dict[str, int], seconds: int, abandoning: set[str]) -> dict[str, float]:
    """Each party offers its rate (req/s, evenly spaced); an admitted request of a party in
    ``abandoning`` is abandoned 2 ms later, any other answered at once; each is held a second after
    (as the egress counts it). Admitted per party a second over the run's last 3 s."""
    shares = Shares()
    held: list[float] = []
    running: list[tuple[float, str]] = []
    got = {p: 0 for p in offered}
    events = sorted((k / rate, p) for p, rate in offered.items() for k in range(rate * seconds))
    for t, party in events:
        for end, who in [r for r in running if r[0] <= t]:
            running.remove((end, who))
            shares.ended(who, end, who in abandoning)
        held = [h for h in held if h > t]
        if len(held) + 1 > capacity:  # the instance's own bound
            shares.refuse(party, len(held), capacity, t)
            continue
        if shares.refuse(party, len(held), capacity, t) is None:
            shares.admitted(party)
            end = t + (0.002 if party in abandoning else 0.0)
            running.append((end, party))
            held.append(end + 1.0)
            if t >= seconds - 3:
                got[party] += 1
    return {p: n / 3 for p, n in got.items()}


def test_a_user_abandoning_its_requests_leaves_the_instance_to_those_who_wait() -> None:
    """The paper lab's flood: one address at 400 req/s, each request abandoned, beside u1 at 35 of an
    instance's 50 req/s. Before, the flood counted as a user: u1 was held to its share (25) and the
    instance ran full (its compute doubled); now the flood gets only the idle half while u1 asks."""
    got = _run(50, {"flood": 400, "u1": 35}, 8, {"flood"})
    assert got["u1"] == 35, got
    assert got["flood"] <= 1, got  # u1 alone holds more than half: hardly any of it is the flood's
    alone = _run(50, {"flood": 400}, 8, {"flood"})  # alone, it still gets what costs nobody anything
    assert alone["flood"] >= IDLE * 50 - 1, alone
    both = _run(50, {"flood": 400, "u1": 35}, 8, set())  # the same load, answered: a user like any other
    assert both["u1"] < 30 and both["flood"] >= 20, both


def test_a_few_abandoned_requests_cost_no_share() -> None:
    """A party is abandoning only while most of its requests ended that way (within FATE_S)."""
    s = Shares()
    for i in range(3):
        s.admitted("a")
        s.ended("a", 0.1 * i, abandoned=i == 0)  # one of three abandoned
    assert not s.abandons("a", 0.5) and s.refuse("a", 30, 50, 0.5) is None
    s.admitted("b")
    s.ended("b", 0.5, abandoned=True)
    why = s.refuse("b", 30, 50, 0.6)
    assert why is not None and "abandoned most of its requests" in why
    assert s.refuse("b", IDLE * 50 - 1, 50, 0.7) is None  # below half full: whoever asks gets in
    assert s.refuse("b", 30, 50, 0.5 + FATE_S + 0.01) is None  # forgotten after FATE_S
    # Refused for a second (no ends then), it is still remembered as abandoning.
    s.admitted("c")
    s.ended("c", 10.0, abandoned=True)
    assert s.refuse("c", 30, 50, 12.0) is not None


def test_an_abandoning_party_is_not_among_the_users_that_split_a_full_instance() -> None:
    s = Shares()
    for _ in range(30):
        s.admitted("u1")
    assert s.refuse("flood", 45, 50, 0.0) is None  # asks while full: counted among the users (2: share 25)
    s.admitted("flood")
    s.ended("flood", 0.05, abandoned=True)  # ... and abandons what it got
    assert s.refuse("u1", 45, 50, 0.2) is None  # u1 alone splits the instance: 30 of 50 is under its share
    assert s.refuse("flood", 45, 50, 0.3) is not None
    assert s.users(0.3) == 2  # (both asked)


def test_only_a_hang_up_is_abandonment() -> None:
    """The ingress resets a stream CANCEL when its user hangs up, DEADLINE at the request's bound:
    a user whose requests are cut at its bound is not abandoning them."""
    for code, gone in ((ResetCode.CANCEL, True), (ResetCode.DEADLINE, False), (ResetCode.NO_ROUTE, False)):
        ingress, egress = pipe()
        sink = StreamSink(None, egress)  # type: ignore[arg-type]
        assert not user_gone(sink)
        ingress.reset(code, True, "test")
        assert user_gone(sink) is gone, code
        egress.reset(ResetCode.DEADLINE, False, "ours")  # our own reset after it changes nothing
        assert user_gone(sink) is gone


# ---------------------------------------------------------------- real processes

CAPACITY = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[Lab, str]]:
    with InstanceProcs() as insts:
        insts.start("n1")
        insts.start("f1")
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("n1", "a", "/near", CAPACITY, 1.0, 1.0), Instance("f1", "b", "/far", CAPACITY, 1.0, 1.0)),
                        {"health_interval_ms": 0})
        specs = write_lab(topo, tmp_path_factory.mktemp("flood"),
                          instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: {r["service"] for r in lab.routes("a") if r["best"]} == {"/near", "/far"}, 30,
                         "both routes at a")
            yield lab, specs["a"].http


def _inflight(lab: Lab, gw: str, iid: str) -> int:
    return next(i["inflight"] for i in lab.query(gw, "show-services") if i["instance"] == iid)


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _send(addr: str, source: str, target: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return s


def _get(addr: str, source: str, target: str) -> httpx.Response:
    with httpx.Client(base_url=f"http://{addr}", timeout=10, transport=httpx.HTTPTransport(local_address=source)) as c:
        return c.get(target)


@pytest.mark.parametrize(("service", "gw", "iid"), [("/near", "a", "n1"), ("/far", "b", "f1")])
def test_an_address_that_abandons_its_requests_gets_none_of_a_busy_instance(site, service: str, gw: str, iid: str) -> None:
    """127.0.0.3 sends long jobs and hangs up on each once the instance has it; u1 (127.0.0.2) then
    holds 12 of the instance's 20 a second. The flood's next request is refused (503: no other
    instance), where before it was admitted up to 80 % and then to its share, beside u1's; u1 and a
    newcomer are served."""
    lab, addr = site
    for _ in range(3):
        s = _send(addr, "127.0.0.3", f"{service}/job?delay=30")
        try:
            _until(lambda: _inflight(lab, gw, iid) == 1, 10, "the job at the instance")
        finally:
            s.close()
        _until(lambda: _inflight(lab, gw, iid) == 0, 10, "the abandoned call to end")
    held = [_send(addr, "127.0.0.2", f"{service}/long?delay=30") for _ in range(12)]
    try:
        _until(lambda: _inflight(lab, gw, iid) == 12, 10, "u1's 12 requests at the instance")
        r = _get(addr, "127.0.0.3", f"{service}/again")
        assert r.status_code == 503 and "abandoned most of its requests" in r.text, r.text
        assert _get(addr, "127.0.0.2", f"{service}/more").status_code == 200
        assert _get(addr, "127.0.0.4", f"{service}/newcomer").status_code == 200
    finally:
        for s in held:
            s.close()
    assert not lab.dead() and "Traceback" not in lab.log("a") + lab.log("b")
