"""One address flooding abandoned requests must not cost an honest user its service.

Sans-IO: a party that abandons its requests has no share of an instance once it is half full
(cpnd/fairshare.py), and only a hang-up counts as one (a cut at the bound does not); requests per
source address (cpnd/sourcerate.py, ``max_requests_per_ip_per_s``) and their config. Real
processes: a, the ingress, with n1 of /near, and b, one hop away, with f1 of /far (20 req/s each);
r1 of /rated at a and r2 of /farrated at b take any rate.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from cpnd.config import load_config
from cpnd.egress import user_gone
from cpnd.errors import ConfigError
from cpnd.fleet import worker_config
from cpnd.fairshare import FATE_S, IDLE, Shares
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, write_lab
from cpnd.inprocess import pipe
from cpnd.relay import StreamSink
from cpnd.clients import SourceLimiter
from cpnd.sourcerate import MAX_SOURCES
from cpnd.tunnel import ResetCode
from test_config import GOOD, write
from test_hangups import _until


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
    """A party abandons while most of its requests that ended in the last second were abandoned; so
    found, it is held so for FATE_S (refused, it has no ends to show it), unless its answers come back."""
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
    s._dropped.trim(2.0)  # (its abandoned end left the last second's window)
    assert s.refuse("b", 30, 50, 3.0) is not None  # refused for seconds (no ends): still abandoning
    assert s.refuse("b", 30, 50, 0.6 + FATE_S + 0.01) is None  # forgotten FATE_S after it was last found so
    s.admitted("c")
    s.ended("c", 10.0, abandoned=True)
    assert s.refuse("c", 30, 50, 10.1) is not None
    for i in range(3):  # its answers come back (admitted below half full): no longer abandoning
        s.admitted("c")
        s.ended("c", 10.2 + 0.01 * i)
    assert s.refuse("c", 30, 50, 10.3) is None


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


def test_an_address_gets_its_burst_then_its_rate() -> None:
    r = SourceLimiter(2.0, 3, MAX_SOURCES)
    assert [r.take("10.0.0.1", 0.0) for _ in range(4)][:3] == [0.0] * 3
    assert r.take("10.0.0.1", 0.0) == pytest.approx(0.5)  # a token every 0.5 s
    assert r.take("10.0.0.2", 0.0) == 0.0  # another address: its own bucket
    assert r.take("10.0.0.1", 0.5) == 0.0 and r.take("10.0.0.1", 0.5) > 0
    # An IPv6 host holds a whole /64: one bucket for it, as the fair shares count it.
    assert [r.take(f"2001:db8::{i}", 1.0) for i in range(1, 5)][-1] > 0
    assert r.take("2001:db8:0:1::1", 1.0) == 0.0
    r.retune(100.0, 3, MAX_SOURCES)  # a reload: the levels stay, the new rate refills them
    assert r.take("10.0.0.1", 0.51) == 0.0


def test_the_table_is_bounded_and_forgets_the_least_recent_address() -> None:
    r = SourceLimiter(1.0, 1, max_sources=3)
    for i in range(3):
        assert r.take(f"10.0.0.{i}", 0.0) == 0.0
    assert r.take("10.0.0.0", 0.0) > 0  # the flooder, asking again: the most recent now
    assert r.take("10.0.0.9", 0.0) == 0.0  # a newcomer: 10.0.0.1 (least recent) is forgotten
    assert len(r.buckets) == 3 and r.forgotten == 1 and "10.0.0.1" not in r.buckets
    assert r.take("10.0.0.0", 0.0) > 0  # still empty: many addresses cannot refill the flooder's


@pytest.mark.parametrize(("new", "expected"), [
    ("max_requests_per_ip_per_s = -1", "gw1.toml:8: gateway.max_requests_per_ip_per_s: must be between 0 and 1e+07, got -1"),
    ('max_requests_per_ip_per_s = "fast"', "gw1.toml:8: gateway.max_requests_per_ip_per_s: must be an integer or a number"),
    ("max_requests_per_ip_per_s = 10\nmax_requests_per_ip_burst = 0",
     "gw1.toml:9: gateway.max_requests_per_ip_burst: must be between 1 and 1e+08, got 0"),
    ("max_requests_per_ip_per_s = 10\nmax_requests_per_ip_burst = 2.5", "gw1.toml:9: gateway.max_requests_per_ip_burst: must be an integer"),
    ("max_requests_per_ip_burst = 20",
     "gw1.toml:8: gateway.max_requests_per_ip_burst: set without max_requests_per_ip_per_s (which it is the burst of)"),
])
def test_bad_request_rates_are_one_line_errors(tmp_path, new: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, GOOD.replace('selection = "per-request"', 'selection = "per-request"\n' + new, 1)))
    assert str(ei.value).startswith(expected) and "\n" not in str(ei.value), str(ei.value)


def test_request_rates_are_off_unless_set(tmp_path) -> None:
    g = load_config(write(tmp_path, GOOD)).gateway
    assert g.max_requests_per_ip_per_s == 0 and g.max_requests_per_ip_burst is None
    assert (g.max_abandoned_per_ip_per_s, g.max_abandoned_per_ip_burst) == (50, 500)  # on: abandoning is no use
    g = load_config(write(tmp_path, GOOD.replace('selection = "per-request"',
                                                 'selection = "per-request"\nmax_requests_per_ip_per_s = 2.5', 1))).gateway
    assert g.max_requests_per_ip_per_s == 2.5 and g.max_requests_per_ip_burst is None



def test_each_worker_holds_its_share_of_an_address_rate(tmp_path) -> None:
    config = load_config(write(tmp_path, GOOD.replace(
        'selection = "per-request"', 'selection = "per-request"\nmax_requests_per_ip_per_s = 100\nmax_requests_per_ip_burst = 30', 1)))
    g = worker_config(config, 4).gateway
    assert (g.max_requests_per_ip_per_s, g.max_requests_per_ip_burst) == (25, 7)
    off = worker_config(load_config(write(tmp_path, GOOD)), 4).gateway
    assert (off.max_requests_per_ip_per_s, off.max_requests_per_ip_burst) == (0, None)


# ---------------------------------------------------------------- real processes

CAPACITY = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[Lab, str]]:
    with InstanceProcs() as insts:
        for iid in ("n1", "f1", "r1", "r2"):
            insts.start(iid)
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("n1", "a", "/near", CAPACITY, 1.0, 1.0), Instance("f1", "b", "/far", CAPACITY, 1.0, 1.0),
                         Instance("r1", "a", "/rated", 1e6, 1.0, 1.0), Instance("r2", "b", "/farrated", 1e6, 1.0, 1.0)),
                        {"health_interval_ms": 0})
        specs = write_lab(topo, tmp_path_factory.mktemp("flood"),
                          instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
        # a: its users' requests at 1 a second after a burst of 20 an address, and 5 abandoned; b: 1 (it has no users
        # of its own, and a's requests come as a peer's, never counted as one address's).
        for gw, rate in (("a", "max_requests_per_ip_per_s = 1\nmax_requests_per_ip_burst = 20\n"
                                "max_abandoned_per_ip_per_s = 0.01\nmax_abandoned_per_ip_burst = 5"),
                         ("b", "max_requests_per_ip_per_s = 1")):
            config = specs[gw].config
            config.write_text(config.read_text().replace("[gateway]\n", f"[gateway]\n{rate}\n", 1))
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: {r["service"] for r in lab.routes("a") if r["best"]} == {"/near", "/far", "/rated", "/farrated"},
                         30, "every route at a")
            yield lab, specs["a"].http


def _inflight(lab: Lab, gw: str, iid: str) -> int:
    return next(i["inflight"] for i in lab.query(gw, "show-services") if i["instance"] == iid)


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
    flood, u1, newcomer = (f"127.0.0.{n + (10 if gw == 'b' else 0)}" for n in (3, 2, 4))  # (a has a rate per address)
    for _ in range(3):
        s = _send(addr, flood, f"{service}/job?delay=30")
        try:
            _until(lambda: _inflight(lab, gw, iid) == 1, 10, "the job at the instance")
        finally:
            s.close()
        _until(lambda: _inflight(lab, gw, iid) == 0, 10, "the abandoned call to end")
    held = [_send(addr, u1, f"{service}/long?delay=30") for _ in range(12)]
    try:
        _until(lambda: _inflight(lab, gw, iid) == 12, 10, "u1's 12 requests at the instance")
        r = _get(addr, flood, f"{service}/again")
        assert r.status_code == 503 and "abandoned most of its requests" in r.text, r.text
        assert _get(addr, u1, f"{service}/more").status_code == 200
        assert _get(addr, newcomer, f"{service}/newcomer").status_code == 200
    finally:
        for s in held:
            s.close()
    assert not lab.dead() and "Traceback" not in lab.log("a") + lab.log("b")


def test_an_address_over_its_request_rate_is_refused_before_any_work(site) -> None:
    """a takes 20 requests at once from an address, then 1 a second: 127.0.0.5's next are 429
    ``rate_limited`` with Retry-After (the error table's body), counted, and never reach an
    instance; another address is served meanwhile. b, with a bound of 1 a second too, serves every
    request a's users send it: a peer's requests are not one address's."""
    lab, addr = site
    before = lab.query("a", "stats")["http"]
    with httpx.Client(base_url=f"http://{addr}", timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.5")) as c:
        got = [c.get("/rated/x") for _ in range(24)]
    statuses = [r.status_code for r in got]
    assert statuses[:20] == [200] * 20 and statuses.count(429) >= 3, statuses
    refused = next(r for r in got if r.status_code == 429)
    assert refused.json()["error"] == "rate_limited" and "max_requests_per_ip_per_s" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    after = lab.query("a", "stats")["http"]
    assert after.get("rate_limited_per_ip", 0) - before.get("rate_limited_per_ip", 0) == statuses.count(429)
    metrics = httpx.get(f"http://{lab.specs['a'].metrics}/metrics", timeout=10).text
    assert f"cpn_rate_limited_per_ip_total {float(after['rate_limited_per_ip'])}" in metrics
    assert _get(addr, "127.0.0.6", "/rated/y").status_code == 200
    for source in ("127.0.0.7", "127.0.0.8"):  # 30 through a to b, whose bound is 1 a second an address
        with httpx.Client(base_url=f"http://{addr}", timeout=10, transport=httpx.HTTPTransport(local_address=source)) as c:
            assert [c.get("/farrated/z").status_code for _ in range(15)] == [200] * 15
    assert lab.query("b", "stats")["http"].get("rate_limited_per_ip", 0) == 0


def test_a_reload_turns_the_request_rate_off_and_on(site) -> None:
    """Off by a reload: an address's 30 requests at once are served; on again: its buckets start
    anew (a's reload keeps those it had, retuned)."""
    lab, addr = site
    config = lab.specs["a"].config
    text = config.read_text()
    try:
        config.write_text(text.replace("max_requests_per_ip_per_s = 1\nmax_requests_per_ip_burst = 20\n", ""))
        lab.query("a", "reload")
        with httpx.Client(base_url=f"http://{addr}", timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.21")) as c:
            assert [c.get("/rated/off").status_code for _ in range(30)] == [200] * 30
        config.write_text(text.replace("max_requests_per_ip_burst = 20", "max_requests_per_ip_burst = 5"))
        lab.query("a", "reload")
        with httpx.Client(base_url=f"http://{addr}", timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.21")) as c:
            statuses = [c.get("/rated/on").status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5 and 429 in statuses, statuses
    finally:
        config.write_text(text)
        lab.query("a", "reload")


def test_an_address_that_abandons_too_many_requests_is_refused_for_a_while(site) -> None:
    """a lets an address abandon 5 requests (then one every 100 s): 127.0.0.30 hangs up on 5 jobs
    once r1 has each; its next request is 429 ``rate_limited`` before any work, another address's
    is served, and abandoning counts nothing against one that waits for its answers."""
    lab, addr = site
    before = lab.query("a", "stats")["http"]
    for _ in range(5):
        abandoned = lab.query("a", "stats")["http"].get("user_abandoned", 0)
        s = _send(addr, "127.0.0.30", "/rated/job?delay=30")
        try:
            _until(lambda: _inflight(lab, "a", "r1") == 1, 10, "the job at the instance")
        finally:
            s.close()
        _until(lambda: lab.query("a", "stats")["http"].get("user_abandoned", 0) == abandoned + 1, 10, "the hang-up")
    r = _get(addr, "127.0.0.30", "/rated/next")
    assert r.status_code == 429 and r.json()["error"] == "rate_limited", r.text
    assert "max_abandoned_per_ip_per_s" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
    assert lab.query("a", "stats")["http"].get("rate_limited_abandons", 0) == before.get("rate_limited_abandons", 0) + 1
    assert _get(addr, "127.0.0.31", "/rated/other").status_code == 200
