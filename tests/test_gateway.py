"""The gateway core under a virtual clock: paired cores over in-memory links (cpnd.vnet), no sockets, no trio.

Collisions, graceful restart within and past its window, the swap of a peer that dialled again,
route refresh, the reload diff, pre-auth and the load poll: decisions the daemon used to make in
its trio code, and that only end-to-end tests could reach.
"""

from __future__ import annotations

import random

import attrs
import pytest

from cpnd.crypto import generate_key
from cpnd.errors import CeaseSub, Code, ConfigError
from cpnd.gateway import LOAD_CHECK_S, Gateway, stale_window_ms
from cpnd.session import CloseReason, Closed, State
from cpnd.vnet import Instances, Net, config_for, established

KEYS = {gid: generate_key() for gid in ("a", "b", "c")}
PUB = {gid: k.public_key() for gid, k in KEYS.items()}
SEQ = 1000


def core(gid: str, peers: tuple[str, ...], *, services: dict[str, list[str]] | None = None, seq: int = SEQ,
         source: Instances | None = None, passive: tuple[str, ...] = (), **gateway: object) -> Gateway:
    cfg = config_for(gid, KEYS[gid], {p: PUB[p] for p in peers}, services=services, passive=passive, **gateway)
    return Gateway(cfg, source or Instances(), 0.0, seq=seq, rng=random.Random(gid), cpu_clock=lambda: 0.0)


def pair(**kw: object) -> tuple[Net, Gateway, Gateway]:
    """``a`` with instance a1 of /s, ``b`` with b1 of /s, peered and established."""
    net = Net()
    a = net.add(core("a", ("b",), services={"/s": ["a1"]}, **kw))
    b = net.add(core("b", ("a",), services={"/s": ["b1"]}, **kw))
    net.run_while(lambda: not established([a, b]) or len(a.rib) < 2 or len(b.rib) < 2)
    return net, a, b


def key(origin: str, iid: str) -> tuple[str, str, str]:
    return ("/s", origin, iid)


def test_two_cores_peer_exchange_routes_and_end_of_rib() -> None:
    net, a, b = pair()
    # The greater id dials first: one connection, no collision.
    assert len(net.all_links) == 2
    link = a.established_link("b")
    assert link is not None and not link.initiated and b.established_link("a").initiated
    assert key("b", "b1") in a.rib.loc and key("a", "a1") in b.rib.loc
    net.run_for(0.5)
    assert not link.end_of_rib_pending and link.adj_out.initial_done
    assert a.peer_status(net.now)[0].state == "established" and a.peer_status(net.now)[0].routes_received == 1


def test_collision_race_keeps_the_connection_the_greater_id_initiated() -> None:
    net = Net()
    a = net.add(core("a", ("b",)))
    b = net.add(core("b", ("a",)))
    # Both dial at the same instant: two connections, each side sees the other's as the newer.
    a.peers["b"].dial_at = b.peers["a"].dial_at = 0.01
    net.run_while(lambda: not established([a, b]))
    net.run_for(0.5)
    assert len(net.all_links) == 4
    kept_a, kept_b = a.established_link("b"), b.established_link("a")
    assert kept_b.initiated and not kept_a.initiated  # b > a: b's dial wins on both sides
    assert net.other.get(kept_a) is kept_b  # the same connection
    losers = [link for link in net.all_links if link not in (kept_a, kept_b)]
    assert all(link.session.closed.subcode == CeaseSub.COLLISION for link in losers)
    # A collision before either was up is not a flap, and costs no routes.
    assert a.peers["b"].flaps == 0 and b.peers["a"].flaps == 0
    assert len(a.links) == len(b.links) == 1


def test_collision_with_an_established_session_keeps_it() -> None:
    net, a, b = pair()
    up = a.established_link("b")
    # a dials b although b is up (a stale view): b keeps the established one, a's new one loses.
    a.peers["b"].dial_at = net.now
    a.peers["b"].links.clear()  # a forgets its link so that its core dials again (the "stale view")
    net.run_for(1.0)
    a.peers["b"].links[up] = None
    assert b.established_link("a") is not None and b.established_link("a").initiated
    assert b.peers["a"].flaps == 0 and key("a", "a1") in b.rib.loc


def test_graceful_restart_within_the_window_keeps_routes_stale_until_end_of_rib() -> None:
    net, a, b = pair(graceful_restart_ms=2000)
    seen = []
    net.kill("b")  # connection lost: a keeps b's routes for b's announced window
    assert a.rib.stale_until["b"] == pytest.approx(net.now + 2.0)
    assert a.rib.adj_in["b"][key("b", "b1")].stale and key("b", "b1") in a.rib.loc
    net.run_for(0.5)
    # b comes back without b1, with b2: b2 arrives, b1 goes at b's End-of-RIB (not at the window's end).
    b2 = net.add(core("b", ("a",), services={"/s": ["b2"]}, seq=SEQ + 100, graceful_restart_ms=2000))
    net.run_while(lambda: key("b", "b1") in a.rib.loc, limit_s=1.4)
    seen.append(net.now)
    assert key("b", "b2") in a.rib.loc and "b" not in a.rib.stale_until
    assert not a.rib.adj_in["b"][key("b", "b2")].stale
    assert a.peers["b"].flaps == 1 and b2.established_link("a") is not None


def test_graceful_restart_past_the_window_drops_the_routes() -> None:
    net, a, b = pair(graceful_restart_ms=1000)
    net.kill("b")
    net.run_for(0.9)
    assert key("b", "b1") in a.rib.loc
    net.run_for(0.1 + 2 * LOAD_CHECK_S)  # expired at the next load check after the window
    assert key("b", "b1") not in a.rib.loc and "b" not in a.rib.stale_until


def test_without_graceful_restart_routes_go_at_once() -> None:
    net, a, b = pair()
    net.kill("b")
    assert key("b", "b1") not in a.rib.loc and a.peers["b"].flaps == 1


def test_swap_a_peer_that_dials_again_keeps_its_routes_until_the_new_end_of_rib() -> None:
    net, a, b = pair()
    old = a.established_link("b")
    # b restarts and a never noticed (the connection died silently on b's side): b's new core
    # dials a, which replaces the old session by the new one.
    net.silence("b")
    present = []
    b2 = core("b", ("a",), services={"/s": ["b1", "b3"]}, seq=SEQ + 100)
    b2.peers["a"].dial_at = net.now
    net.add(b2)
    while b2.established_link("a") is None or key("b", "b3") not in a.rib.loc:
        net.run_for(0.001)
        present.append(key("b", "b1") in a.rib.loc)
        assert net.now < 10
    assert all(present)  # never withdrawn: no flap network-wide
    assert old.session.state is State.CLOSED and old.replaced
    assert old.session.closed.subcode == CeaseSub.COLLISION
    assert a.peers["b"].flaps == 1  # its session was lost (by b), though its routes were not
    assert "b" not in a.rib.stale_until and not a.peers["b"].swap_pending


def test_swap_window_when_the_new_session_never_comes() -> None:
    g = config_for("a", KEYS["a"], {}).gateway
    closed = Closed(CloseReason.PEER_NOTIFICATION, Code.CEASE, CeaseSub.COLLISION)
    assert stale_window_ms(closed, 0, True, g) == g.handshake_timeout_ms + 2 * g.connect_retry_min_ms
    lost = Closed(CloseReason.CONNECTION_LOST)
    assert stale_window_ms(lost, 3000, False, g) == 3000
    assert stale_window_ms(Closed(CloseReason.PEER_NOTIFICATION, Code.CEASE, CeaseSub.ADMIN_SHUTDOWN), 3000, False, g) == 0
    assert stale_window_ms(Closed(CloseReason.PEER_NOTIFICATION, Code.CEASE, CeaseSub.RESTARTING), 3000, False, g) == 3000


def test_route_refresh_resends_the_whole_table() -> None:
    net, a, b = pair()
    net.run_for(0.5)
    link = a.established_link("b")
    bursts, sent = link.adj_out.bursts, link.session.stats["msgs_out"]
    b.established_link("a").session.send_route_refresh()
    b._sending[b.established_link("a")] = None
    net.pump("b")
    net.run_for(0.5)
    assert link.adj_out.bursts == bursts + 1 and link.session.stats["msgs_out"] > sent
    assert b.rib.adj_in["a"][key("a", "a1")].adv.seq == SEQ  # the same table, sent again


def test_reload_diff_closes_removed_peers_and_announces_new_instances() -> None:
    net = Net()
    a = net.add(core("a", ("b", "c"), services={"/s": ["a1"]}))
    b = net.add(core("b", ("a",)))
    c = net.add(core("c", ("a",)))
    net.run_while(lambda: not established([a, b, c]) or key("a", "a1") not in c.rib.loc)
    new = config_for("a", KEYS["a"], {"b": PUB["b"]}, services={"/s": ["a1", "a2"]}, hold_time_ms=6000)
    summary = a.reload(new, net.now)
    assert summary == ("reloaded a.toml: peers +0 -1 ~0 (-c), instances +1 -0 ~0 (+a2), "
                       "gateway keys changed: hold_time_ms; 2 local instances")
    net.pump("a")
    net.run_for(0.05)  # before c dials again (and is refused: c is no longer known to a)
    assert c.peers["a"].last_error == "peer-notification cease/peer-deconfigured: peer removed from the config"
    net.run_for(0.5)
    assert key("a", "a2") in b.rib.loc and b.rib.loc[key("a", "a2")].fresh.seq == SEQ + 1
    assert b.rib.loc[key("a", "a1")].fresh.seq == SEQ + 1  # every instance re-advertised with the new seq
    assert a.established_link("b").session.hold_ms == 3000  # the session b had is untouched
    with pytest.raises(ConfigError, match="gateway.listen: changing it needs a restart"):
        a.check_reload(attrs.evolve(new, gateway=attrs.evolve(new.gateway, listen=attrs.evolve(new.gateway.listen, port=9))))


def test_close_tells_the_peer_why() -> None:
    net, a, b = pair()
    a.close(a.established_link("b"), Code.CEASE, CeaseSub.ADMIN_RESET, "operator said so")
    net.pump("a")
    net.run_for(0.1)
    assert b.peers["a"].last_error == "peer-notification cease/admin-reset: operator said so"
    assert key("a", "a1") not in b.rib.loc


def test_preauth_deadline_closes_a_silent_stranger() -> None:
    net = Net()
    a = net.add(core("a", ()))
    stranger = a.accept("10.0.0.9", "10.0.0.9:4000", net.now)
    net.pump("a")
    assert len(a.preauth) == 1
    net.run_for(a.config.gateway.preauth_timeout_ms / 1000 + 0.01)
    assert stranger.session.state is State.CLOSED and a.stats["preauth_closed"] == 1
    a.link_gone(stranger, net.now)
    assert len(a.preauth) == 0


def test_load_poll_paces_readvertisements_with_new_sequence_numbers() -> None:
    source = Instances({"a1": (0.0, 0.0, 1000.0)})
    net = Net()
    a = net.add(core("a", ("b",), services={"/s": ["a1"]}, source=source))
    b = net.add(core("b", ("a",)))
    net.run_while(lambda: key("a", "a1") not in b.rib.loc)
    source.values["a1"] = (0.5, 0.0, 1000.0)
    net.run_for(0.3)
    assert b.rib.loc[key("a", "a1")].fresh.load == 0.5 and b.rib.loc[key("a", "a1")].fresh.seq > SEQ
    seq = a.own.seq
    source.values["a1"] = (0.51, 0.0, 1000.0)  # below the 5 % threshold: not news
    net.run_for(1.0)
    assert a.own.seq == seq and b.rib.loc[key("a", "a1")].fresh.load == 0.5


def test_health_change_readvertises_the_instance_as_down() -> None:
    source = Instances()
    net = Net()
    a = net.add(core("a", ("b",), services={"/s": ["a1"]}, source=source))
    b = net.add(core("b", ("a",)))
    net.run_while(lambda: key("a", "a1") not in b.rib.loc)
    source.down.add("a1")
    a.health_changed("a1", False, net.now)
    net.pump("a")
    net.run_for(0.3)
    assert b.rib.loc[key("a", "a1")].fresh.down


def test_timer_is_the_earliest_of_every_deadline() -> None:
    net, a, b = pair()
    link = a.established_link("b")
    assert a.get_timer() <= link.session.get_timer()
    assert a.get_timer() <= a._load_at


def test_swap_past_its_window_drops_the_routes() -> None:
    net, a, b = pair()
    # b ends the session for a collision (it holds, or is making, another connection to a) and
    # then never comes back: a keeps b's routes for the swap window, then drops them.
    b.close(b.established_link("a"), Code.CEASE, CeaseSub.COLLISION, "connection collision resolution")
    net.pump("b")
    net.run_while(lambda: a.established_link("b") is not None, limit_s=1.0)
    net.kill("b")
    g = a.config.gateway
    window = (g.handshake_timeout_ms + 2 * g.connect_retry_min_ms) / 1000
    assert a.peers["b"].swap_pending and a.peers["b"].flaps == 0  # a swap is not a flap
    net.run_for(window - 0.1)
    assert key("b", "b1") in a.rib.loc and a.rib.adj_in["b"][key("b", "b1")].stale
    net.run_for(0.2)
    assert key("b", "b1") not in a.rib.loc


def test_cease_restarting_keeps_our_routes_at_the_peer() -> None:
    net, a, b = pair(graceful_restart_ms=2000)
    a.close(a.established_link("b"), Code.CEASE, CeaseSub.RESTARTING, "gateway restarting: keep my routes")
    net.pump("a")
    net.run_for(0.005)  # the NOTIFICATION arrives
    assert b.peers["a"].last_error == "peer-notification cease/restarting: gateway restarting: keep my routes"
    net.kill("a")  # it restarts: gone until its new process comes up
    net.run_for(0.05)
    assert b.rib.adj_in["a"][key("a", "a1")].stale and key("a", "a1") in b.rib.loc
    assert 1.9 < b.rib.stale_until["a"] - net.now < 2.0


def test_reload_with_changed_peer_settings_reconnects_it() -> None:
    net, a, b = pair()
    old = a.established_link("b")
    changed = config_for("a", KEYS["a"], {"b": PUB["b"]}, services={"/s": ["a1"]})
    changed = attrs.evolve(changed, peers=(attrs.evolve(changed.peers[0], emulated_rtt_ms=2.0),))
    assert "peers +0 -0 ~1 (~b)" in a.reload(changed, net.now)
    net.pump("a")
    net.run_while(lambda: a.established_link("b") is None or a.established_link("b") is old)
    assert old.session.closed.subcode == CeaseSub.CONFIG_CHANGE
    assert a.peers["b"].config.emulated_rtt_ms == 2.0


def test_one_instance_news_readvertises_that_instance_alone() -> None:
    source = Instances({"a1": (0.0, 0.0, 1000.0), "a2": (0.0, 0.0, 1000.0)})
    net = Net()
    a = net.add(core("a", ("b",), services={"/s": ["a1", "a2"]}, source=source))
    b = net.add(core("b", ("a",)))
    net.run_while(lambda: key("a", "a2") not in b.rib.loc)
    net.run_for(0.5)
    # The first polls find what the first routes carried (no load, the configured 1 ms): nothing to tell.
    assert a.own.seq == SEQ and a.stats["load_updates"] == 0
    source.values["a1"] = (0.5, 0.0, 1000.0)
    net.run_for(0.3)
    assert b.rib.loc[key("a", "a1")].fresh.seq == SEQ + 1 and b.rib.loc[key("a", "a2")].fresh.seq == SEQ


def test_a_silently_cut_connection_ends_at_the_hold_time_and_comes_back() -> None:
    net, a, b = pair()
    old = b.established_link("a")
    start = net.now
    net.cut("a", "b")  # a sees its end lost; b hears nothing more on its end
    # a dials again at once; b keeps its established session (it wins the collision) until
    # its hold timer says the peer is gone.
    net.run_while(lambda: old.session.state is not State.CLOSED, limit_s=5.0)
    assert old.session.closed.reason is CloseReason.HOLD_EXPIRED
    assert 2.9 <= net.now - start <= 3.2  # hold_time_ms 3000 (keepalives a third of it)
    net.run_while(lambda: not established([a, b]) or key("a", "a1") not in b.rib.loc, limit_s=10.0)
    assert b.established_link("a") is not old
