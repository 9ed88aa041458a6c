"""The gateway core (sans-IO): every peering and routing decision of one gateway.

Peers and their links (a ``Session``, an ``AdjRibOut``, End-of-RIB), our own instances (sequence
numbers, load pacers, health), collisions, the graceful-restart and swap windows, one close path and
the reload diff. Like aioquic's connection: feed bytes with ``receive_data(link, data, now)`` and
timer expiries with ``handle_timer(now)`` (due at ``get_timer()``); take ``data_to_send(link)`` and
``next_event()``. Time is a float in seconds from any monotonic clock. The trio shell
(``daemon.py``) and ``bench/scale_sim.py`` drive this same class.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import attrs

from .admission import Slot, SlotTable, Tally, preauth_budget
from .config import Address, Config, GatewayConfig, PeerConfig, peer_overhead
from .crypto import Role, public_key_b64
from .errors import CeaseSub, Code, ConfigError, FsmSub, HandshakeSub, ProtocolError
from .limits import TokenBucket
from .load import LoadPacer, Stage
from .names import service_label
from .policy import configure_rib, session_up
from .rib import AdjRibOut, Key, Rib, gateway_time_after, link_cost_after
from .session import (
    Authenticated,
    Backoff,
    DEFAULT_CAPS,
    CloseReason,
    Closed,
    Established,
    RefreshRequested,
    RttMeasured,
    Session,
    SessionConfig,
    State,
    TunnelFrame,
    UpdateReceived,
    collision_keeps_new,
)
from .status import PeerStatus
from .tunnel import TUNNEL_BATCH_CAP
from .wire import GATEWAY_TIME_CAP, INSTANCE_DOWN_CAP, Limits, RouteAdv, TunnelLimits

log = logging.getLogger("cpnd")

# Route entries per flush step: a table of 10,000 goes out in steps of ~2 ms, users' requests between them.
FLUSH_SLICE = 128
# Route work (UPDATE slices in, flush steps out, all peers together) may take this share of the
# process's CPU time, in bursts of ROUTE_WORK_BURST_S: a peer's burst of route changes (its whole
# bucket at once) slows convergence, never the users' requests, which get the rest.
ROUTE_WORK_SHARE = 0.5
ROUTE_WORK_BURST_S = 0.05
LOAD_CHECK_S = 0.05  # how often our instances' load is looked at
GATEWAY_TIME_INTERVAL_S = 5.0  # our own processing times re-advertised at most this often (routing.md)
DIAL_JITTER_S = 0.05
# [gateway] keys a running daemon cannot take over without restarting.
RESTART_KEYS = ("id", "listen", "key_file", "control_socket", "http_listen", "https_listen", "metrics_listen",
                "registration_listen", "workers")

Reading = tuple[float, float, float]  # (load, bounded load, compute latency µs) of one instance


class InstanceSource(Protocol):
    """What the core reads of our own instances (the data plane's meters and health checks)."""

    def readings(self, now: float) -> Mapping[str, Reading]:
        """Every local instance's measured load, bounded load and compute latency (µs), rounded."""

    def healthy(self, iid: str) -> bool: ...

    def own_us(self, stage: str, now: float) -> int:
        """Our own processing per request in ``stage`` (load.Stage), µs."""


# ---------------------------------------------------------------- events for the shell


@attrs.frozen
class Dial:
    """Open a connection to the peer now; report ``connected`` or ``dial_failed``."""

    peer_id: str
    address: Address
    timeout_s: float


@attrs.frozen
class LinkUp:
    """The link's session is established (the shell attaches its tunnel streams)."""

    link: Link


@attrs.frozen
class TunnelData:
    """A tunnel record for the link's streams (protocol-spec/tunnel.md)."""

    link: Link
    payload: bytes


@attrs.frozen
class LinkDown:
    """The link's session ended; its last bytes wait in ``data_to_send``, then the shell hangs up."""

    link: Link
    closed: Closed


Event = Dial | LinkUp | TunnelData | LinkDown


# ---------------------------------------------------------------- links and peers


class Link:
    """One connection to a peer (or to a stranger still in its handshake), through one ``Session``."""

    def __init__(self, session: Session, *, initiated: bool, remote: str) -> None:
        self.session = session
        self.initiated = initiated
        self.remote = remote
        self.peer: Peer | None = None
        self.adj_out: AdjRibOut | None = None
        self.end_of_rib_pending = False  # send End-of-RIB after the first flush of a new session
        self.withheld_logged = False  # the peer's route limit made us withhold: said once per session
        self.replaced = False  # closed for a newer connection the same peer dialled (a swap)
        self.preauth: Slot | None = None  # an inbound link's pre-auth slot, until it authenticates
        self.preauth_deadline = math.inf
        self.more = False  # an UPDATE slice or flush step left for the next handle_timer
        self.gone = False

    @property
    def established(self) -> bool:
        return self.session.state is State.ESTABLISHED

    def __repr__(self) -> str:
        return f"<Link {self.session.peer_id or self.remote} {'out' if self.initiated else 'in'} {self.session.state.value}>"


@attrs.define(eq=False)
class Peer:
    """What the core knows of one configured peer across its links."""

    config: PeerConfig
    backoff: Backoff
    # What its sessions may cost us (route entries and messages), one bucket across its
    # sessions: reconnecting does not refill it.
    inbound: TokenBucket
    links: dict[Link, None] = attrs.field(factory=dict)  # insertion-ordered set
    channels: dict[Link, None] = attrs.field(factory=dict)  # its data channels (session.md, "Data channels")
    status: str = "idle"  # idle | connect | active (waiting to retry)
    last_error: str = ""
    established_at: float | None = None
    flaps: int = 0
    swap_pending: bool = False  # its last session ended in a collision swap: stale routes wait for the next End-of-RIB
    removed: bool = False  # deconfigured by a reload
    dial_at: float | None = None  # the earliest time to dial it again (once it has no link)
    dialling: bool = False

    def current(self) -> Link | None:
        """The link that matters most: established first, then any other."""
        best = None
        for c in self.links:
            if c.established:
                return c
            best = best or c
        return best


class OwnInstances:
    """Our own instances as we advertise them: sequence numbers, last advertised attributes, load pacers."""

    def __init__(self, config: Config, source: InstanceSource, seq: int) -> None:
        self.origin = config.gateway.id
        self.source = source
        # Per-origin sequence numbers start from the wall clock (the caller's ``seq``) so a
        # restarted gateway still outranks what it advertised before (protocol-spec/routing.md).
        self.seq = seq
        self.config = config
        # Each instance's own seq: one instance's news re-advertises that instance alone.
        self.seqs = {i.id: seq for svc in config.services for i in svc.instances}
        self.attrs: dict[str, Reading] = {}  # what was last advertised of each (configured compute until measured)
        self.pacers = _pacers(config, {})
        self.why: collections.Counter[str] = collections.Counter()  # re-advertisements by what moved

    def reconfigure(self, config: Config) -> None:
        """Take the reloaded services: instances that stay keep their pacers and attributes."""
        self.config = config
        self.pacers = _pacers(config, self.pacers)
        self.attrs = {k: v for k, v in self.attrs.items() if k in self.pacers}

    def bump(self, iids: Iterable[str] | None) -> None:
        """Increment seq: ``iids`` (None: every instance) carry news."""
        self.seq += 1
        if iids is None:
            self.seqs = {i.id: self.seq for svc in self.config.services for i in svc.instances}
        else:
            for iid in iids:
                self.seqs[iid] = self.seq

    def poll(self, now: float) -> bool:
        """Read the instances' load (the 50 ms check): whether one moved enough to re-advertise (paced)."""
        readings = self.source.readings(now)  # every time, none configured or not: the shell's beat
        moved = False
        for iid, pacer in self.pacers.items():
            reading = readings.get(iid)
            why = pacer.why(now, *reading) if reading is not None else None
            if reading is not None and why is not None:
                self.why[why] += 1
                pacer.advertised(now, *reading)
                self.bump([iid])
                self.attrs[iid] = reading
                moved = True
        return moved

    def routes(self, egress_us: int) -> list[RouteAdv]:
        """Our instances as routes (path: us alone), ``egress_us`` our own processing as their egress."""
        out = []
        for svc in self.config.services:
            for inst in svc.instances:
                load, bload, comp = self.attrs.get(inst.id, (0.0, 0.0, inst.compute_latency_ms * 1000))
                out.append(RouteAdv(
                    service=svc.path, instance=inst.id, origin=self.origin, seq=self.seqs.get(inst.id, self.seq),
                    label=service_label(svc.path), path=(self.origin,), latency_us=0,
                    capacity=inst.capacity, load=load, price=inst.price, compute_us=int(comp), bload=bload,
                    # Down by health checks: still advertised, marked down, so that its service stays
                    # known (503 no_instance, not 404) until it recovers (routing.md, "Instances that are down").
                    down=not self.source.healthy(inst.id),
                    gateway_us=egress_us,  # our own processing as its egress (routing.md, "Gateway time")
                ))
        return out


# ---------------------------------------------------------------- the core


class Gateway:
    """One gateway's peers, RIB and own instances, without sockets or clocks of its own."""

    def __init__(self, config: Config, source: InstanceSource, now: float, *, seq: int,
                 rng: random.Random | None = None, cpu_clock: Callable[[], float] = time.thread_time) -> None:
        g = config.gateway
        self.config = config
        self.id = g.id
        self.rib = Rib(g.id, max_routes_per_peer=g.max_routes_per_peer)
        configure_rib(self.rib, config)  # origin validation and per-peer policy
        self.session_config = session_config(config)
        self.peer_keys = {p.id: p.public_key for p in config.peers}
        self.rng = rng or random.Random()
        self.peers = {p.id: _peer(config, p, self.rng) for p in config.peers}
        self.links: dict[Link, None] = {}
        self.own = OwnInstances(config, source, seq)
        # Inbound links still in the handshake: capped overall and per source address; a
        # newcomer takes the slot of the oldest (silent ones first) rather than being refused.
        self.preauth = SlotTable(g.max_preauth_connections, g.max_preauth_per_ip, evict_busy=True)
        self.nofile = 1 << 20  # the descriptor limit, as the shell found it
        self.edge_tally = Tally()  # pre-auth links that end (and the shell's edge events): one log line a second
        self.stats: collections.Counter[str] = collections.Counter()
        self.route_work = TokenBucket(ROUTE_WORK_SHARE, ROUTE_WORK_BURST_S)
        self.gateway_times_at = -math.inf  # when our own processing times were last re-advertised
        self.cpu_clock = cpu_clock
        self._events: collections.deque[Event] = collections.deque()
        self._sending: dict[Link, None] = {}
        self._load_at = now + LOAD_CHECK_S
        self._now = now
        self._processing: set[Link] = set()  # links whose events are being acted on (close re-enters)
        self._rr = 0  # where handle_timer starts its round of links (route work one link at a time)
        # Told every set of Loc-RIB changes as it is propagated (benches and tests count them); None: nobody.
        self.observe: Callable[[set[Key], float], None] | None = None
        # Set when get_timer() may have moved earlier (the shell wakes its timer); tunnel records alone never set it.
        self.timer_dirty = True

    # ---- the face: bytes, timers, events

    def start(self, now: float) -> None:
        """Announce our instances and start dialling the peers that are not passive."""
        self._now = now
        self._load_at = now + LOAD_CHECK_S
        self.rib.set_local(self.own.routes(self.rib.egress_us), now)
        for peer in self.peers.values():
            self._first_dial(peer, now)

    def receive_data(self, link: Link, data: bytes, now: float) -> None:
        """Bytes read from ``link``; ``b""`` when the connection is gone. Read more only while
        ``wants_data(link)``."""
        self._now = now
        if link.preauth is not None and data:
            self.preauth.set_idle(link.preauth, False)  # it spoke: evicted after the silent ones
        s = link.session
        if s.state is State.ESTABLISHED:  # what it reads then only moves its timer later (or ends it)
            s.receive_data(data, now)
        else:
            before = s.get_timer()
            s.receive_data(data, now)
            after = s.get_timer()
            if after is not None and (before is None or after < before):
                self.timer_dirty = True  # a new timer (a keepalive after OPEN): get_timer moved earlier
        if s.has_events() or s.has_data_to_send() or not data:
            self._process(link, now)
        # else: tunnel records only, taken by the shell from ``tunnel_in``: nothing for the core to do

    def wants_data(self, link: Link) -> bool:
        """False while the peer's UPDATEs outran its bucket: its bytes wait in the kernel."""
        return link.session.wants_data()

    def handle_timer(self, now: float) -> None:
        """Fire what is due at ``now``: dials, the load check, and the links' timers, flush steps
        and UPDATE slices (route work of one link per call: the shell lets users run between)."""
        self._now = now
        if now >= self._load_at:
            self._load_at = now + LOAD_CHECK_S
            self._load_tick(now)
        for peer in self.peers.values():
            if peer.dial_at is not None and peer.dial_at <= now and not peer.links and not peer.dialling:
                peer.dial_at, peer.dialling, peer.status = None, True, "connect"
                self._events.append(Dial(peer.config.id, peer.config.address, self.session_config.handshake_timeout_s))
        links = list(self.links)
        n = len(links)
        for i in range(n):
            link = links[(self._rr + i) % n]
            at = self._link_timer(link, now)
            if at is None or at > now:
                continue
            if self._link_step(link, now):
                self._rr = (self._rr + i + 1) % max(1, n)
                return

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called: the minimum over every session, flush,
        pace, pre-auth deadline, dial and the load check."""
        now = self._now
        at = self._load_at
        for peer in self.peers.values():
            if peer.dial_at is not None and not peer.links and not peer.dialling:
                at = min(at, peer.dial_at)
        for link in self.links:
            t = self._link_timer(link, now)
            if t is not None and t < at:
                at = t
        return at

    def data_to_send(self, link: Link) -> bytes:
        """What to write to ``link`` now."""
        self._sending.pop(link, None)
        return link.session.data_to_send()

    def links_with_data(self) -> list[Link]:
        """The links that have bytes for ``data_to_send`` (cleared as they are taken)."""
        out = list(self._sending)
        self._sending.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def has_events(self) -> bool:
        return bool(self._events)

    def events(self) -> Iterator[Event]:
        """Every pending event, oldest first (those queued while iterating included)."""
        while self._events:
            yield self._events.popleft()

    # ---- links: made, lost, closed

    def connected(self, peer_id: str, now: float) -> Link | None:
        """The dial of ``peer_id`` succeeded: its link, or None when the peer dialled us meanwhile
        (or was removed): the shell hangs up."""
        self._now = now
        peer = self.peers.get(peer_id)
        if peer is None or peer.removed:
            return None
        peer.dialling = False
        if peer.links:
            peer.dial_at = now  # again as soon as the other link is gone
            return None
        session = Session(Role.INITIATOR, self.id, self.config.key, self.peer_keys, now, expected_peer=peer_id,
                          config=self.session_config)
        link = Link(session, initiated=True, remote=str(peer.config.address))
        self.links[link] = None
        self._attach(link, peer)
        self.timer_dirty = True
        self._process(link, now)
        return link

    def dial_failed(self, peer_id: str, error: str, now: float) -> None:
        self._now = now
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        peer.dialling = False
        peer.last_error = error
        peer.status = "active"
        peer.dial_at = now + peer.backoff.next_delay()
        self.timer_dirty = True

    def accept(self, source: str, remote: str, now: float) -> Link:
        """An inbound connection from address ``source``: a pre-auth slot (the oldest pending link's, if need be)."""
        self._now = now
        adm = self.preauth.admit(source)
        assert adm.slot is not None  # evict_busy: never refused
        session = Session(Role.RESPONDER, self.id, self.config.key, self.peer_keys, now, config=self.session_config)
        link = Link(session, initiated=False, remote=remote)
        link.preauth = adm.slot
        link.preauth_deadline = now + self.config.gateway.preauth_timeout_ms / 1000
        adm.slot.owner = link
        self.links[link] = None
        self.timer_dirty = True
        for victim in adm.evicted:
            self.stats["preauth_evicted"] += 1
            self.close(victim.owner, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "too many handshakes in progress")
        self._process(link, now)
        return link

    def close(self, link: Link, code: int, subcode: int, text: str) -> None:
        """End ``link``'s session, telling the peer why (its NOTIFICATION waits in ``data_to_send``):
        the one way the core and its shell close a link."""
        link.session.close(code, subcode, text)
        if link not in self._processing:  # else the loop under way takes the Closed event
            self._process(link, self._now)

    def link_gone(self, link: Link, now: float) -> None:
        """The shell hung up ``link``: forget it (a session not yet closed counts as lost)."""
        self._now = now
        if link.gone:
            return
        if link.session.state is not State.CLOSED:
            self.receive_data(link, b"", now)
        link.gone = True
        self.timer_dirty = True
        self.links.pop(link, None)
        self._sending.pop(link, None)
        if link.preauth is not None:
            self.preauth.release(link.preauth)
            link.preauth = None
        peer = link.peer
        if peer is None:
            return
        if peer.channels.pop(link, 0) is None:  # a data channel: nothing to redial
            return
        peer.links.pop(link, None)
        if peer.removed or peer.config.passive:
            return
        if link.initiated:
            peer.status = "active"
            peer.dial_at = now + peer.backoff.next_delay()
        elif peer.dial_at is None and not peer.dialling:
            peer.dial_at = now

    def send_tunnel(self, link: Link, frame: bytes, soon: bool = False) -> bytes:
        """Seal one tunnel frame for ``link``: the bytes to write (empty once closed, or while a frame sent
        ``soon`` waits for the next one of its step to share its record: Session.tunnel_record)."""
        if link.session.state is State.CLOSED:
            return b""
        self._sending.pop(link, None)
        return link.session.tunnel_record(frame, soon)

    def release_tunnel(self, link: Link) -> bytes:
        """The frame ``send_tunnel`` kept for a batch, sealed alone: its step ended without another."""
        self._sending.pop(link, None)
        return link.session.release_soon()

    def established_link(self, peer_id: str) -> Link | None:
        peer = self.peers.get(peer_id)
        link = peer.current() if peer else None
        return link if link is not None and link.established else None

    # ---- our own instances

    def health_changed(self, iid: str, healthy: bool, now: float) -> None:
        """An instance went down or came back: re-advertise our instances."""
        log.warning("%s: instance %s is %s", self.id, iid, "healthy again" if healthy else "unhealthy: advertised as down")
        self.stats["health_changes"] += 1
        self._readvertise(now, [iid])

    def _readvertise(self, now: float, iids: Iterable[str] | None) -> None:
        """Increment seq, rebuild our routes, propagate: ``iids`` take the new seq (None: every instance)."""
        self.own.bump(iids)
        self._propagate(self.rib.set_local(self.own.routes(self.rib.egress_us), now))

    def _load_tick(self, now: float) -> None:
        """Re-advertise the measured load and compute latency of our instances (paced); our own
        processing times; drop stale routes whose window passed."""
        if self.own.poll(now):
            self.stats["load_updates"] += 1
            for why, n in self.own.why.items():  # per instance, by what moved (show stats)
                self.stats[f"load_adv_{why}"] += n
            self.own.why.clear()
            self._propagate(self.rib.set_local(self.own.routes(self.rib.egress_us), now))
        self._gateway_times(now)
        if self.rib.stale_until:
            self._propagate(self.rib.expire_stale(now))

    def _gateway_times(self, now: float) -> None:
        """Re-advertise our own processing as egress and transit when it moved materially, at most every 5 s."""
        if now - self.gateway_times_at < GATEWAY_TIME_INTERVAL_S:
            return
        egress = gateway_time_after(self.rib.egress_us, self.own.source.own_us(Stage.EGRESS, now))
        transit = gateway_time_after(self.rib.transit_us, self.own.source.own_us(Stage.TRANSIT, now))
        if egress is None and transit is None:
            return
        self.gateway_times_at = now
        self.stats["gateway_time_updates"] += 1
        changed = self.rib.set_gateway_times(self.rib.egress_us if egress is None else egress,
                                             self.rib.transit_us if transit is None else transit)
        if egress is not None:
            changed |= self.rib.set_local(self.own.routes(self.rib.egress_us), now)
        self._propagate(changed)

    # ---- reload

    def check_reload(self, new: Config) -> None:
        """Raise ConfigError when ``new`` changes what only a restart can (nothing applied)."""
        old_g, g = self.config.gateway, new.gateway
        for key in RESTART_KEYS:
            if getattr(old_g, key) != getattr(g, key):
                raise ConfigError(f"{self.config.source.name}: gateway.{key}: changing it needs a restart (reload refused)")
        if public_key_b64(new.key) != public_key_b64(self.config.key):
            raise ConfigError(f"{self.config.source.name}: gateway.key_file: the key changed: that needs a restart (reload refused)")

    def reload(self, new: Config, now: float) -> str:
        """Apply ``new``: sessions whose peer entry did not change are untouched; the summary of what changed."""
        self.check_reload(new)
        self._now = now
        old = self.config
        g = new.gateway
        self.config = new
        self.session_config = session_config(new)
        self.rib.max_routes_per_peer = g.max_routes_per_peer  # sessions keep what they announced
        configure_rib(self.rib, new)
        for peer in self.peers.values():
            peer.inbound.retune(self.session_config.limits.rate, self.session_config.limits.burst)
        self.preauth.limit = preauth_budget(self.nofile, g.max_preauth_connections)
        self.preauth.per_source = g.max_preauth_per_ip
        wanted = {p.id: p for p in new.peers}
        self.peer_keys.clear()
        self.peer_keys.update({p.id: p.public_key for p in new.peers})
        gone = [pid for pid in self.peers if pid not in wanted]
        changed = [pid for pid in self.peers if pid in wanted and self.peers[pid].config != wanted[pid]]
        for pid in gone + changed:
            peer = self.peers.pop(pid)
            peer.removed = True
            sub = CeaseSub.PEER_DECONFIGURED if pid in gone else CeaseSub.CONFIG_CHANGE
            for link in [*peer.links, *peer.channels]:
                self.close(link, Code.CEASE, sub, "peer removed from the config" if pid in gone else "peer settings changed")
        for pid in (pid for pid in wanted if pid not in self.peers):
            self.peers[pid] = _peer(new, wanted[pid], self.rng)
            self._first_dial(self.peers[pid], now)
        self.own.reconfigure(new)
        self._readvertise(now, None)  # every local instance re-advertised with the new seq
        self.stats["reloads"] += 1
        return f"reloaded {new.source.name}: {changes(old, new)}; {len(self.own.pacers)} local instances"

    def instances_changed(self, config: Config, changed: Iterable[str], now: float) -> None:
        """Our instances changed outside a reload (registration): only ``changed`` are re-advertised."""
        self._now = now
        self.config = config
        self.own.reconfigure(config)
        self._readvertise(now, list(changed))

    # ---- status

    def peer_status(self, now: float) -> list[PeerStatus]:
        """Every configured peer as ``show peers`` shows it."""
        return [peer_status(peer, self.rib, now) for _, peer in sorted(self.peers.items())]

    def session_totals(self) -> collections.Counter[str]:
        """Every link's session counters added up (bytes and tunnel frames in and out)."""
        total: collections.Counter[str] = collections.Counter()
        for link in self.links:
            if link.peer is not None:  # strangers in their handshake are the edge's, not a peer's
                total.update(link.session.stats)
        return total

    @property
    def routes_withheld(self) -> int:
        return sum(len(c.adj_out.withheld) for c in self.links if c.adj_out is not None)

    @property
    def paths(self) -> int:
        return sum(len(t) for t in self.rib.adj_in.values()) + len(self.rib.local)

    # ---- per link: timers, flush steps, events

    def _link_timer(self, link: Link, now: float) -> float | None:
        s = link.session
        if s.state is State.CLOSED:
            return None
        if link.more:
            return now
        at = s.get_timer()
        flush = self._flush_at(link, now)
        if flush is not None and (at is None or flush < at):
            at = flush
        resume = s.resume_at()  # the peer's pace holds its UPDATEs back until then
        if resume is not None:
            if s.next_is_update():
                resume = max(resume, self.route_work.ready_at(0, now))
            if at is None or resume < at:
                at = resume
        if link.preauth is not None and (at is None or link.preauth_deadline < at):
            at = link.preauth_deadline
        return at

    def _link_step(self, link: Link, now: float) -> bool:
        """Fire the link's due timers, then one flush step or one UPDATE slice; whether route work was done."""
        link.more = False
        s = link.session
        s.handle_timer(now)
        if link.preauth is not None and now >= link.preauth_deadline:
            self.close(link, Code.HANDSHAKE, HandshakeSub.TIMEOUT,
                       f"no handshake within {self.config.gateway.preauth_timeout_ms} ms (pre-auth)")
        if self._flush(link, now):
            link.more = True  # an UPDATE slice after a checkpoint: two steps, not one
            self._queue_out(link)
            return True
        return self._process(link, now)

    def _flush_at(self, link: Link, now: float) -> float | None:
        """When the next flush step may go: the minimum interval, then the peer's pace."""
        if link.adj_out is None or not link.established:
            return None
        due = link.adj_out.due(now)
        if due is None:
            return now if link.end_of_rib_pending and link.adj_out.initial_done else None
        due = max(due, self.route_work.ready_at(0, now))
        limits = link.session.peer_limits
        if limits is None:
            return due
        # Wait for a batch worth sending (a tenth of a second of the peer's pace), not for every token.
        batch = min(FLUSH_SLICE, max(1, limits.rate // 10), max(1, link.adj_out.backlog))
        return max(due, link.session.send_ready_at(batch, now))

    def _flush(self, link: Link, now: float) -> bool:
        """One flush step if one is due, and End-of-RIB after the first; whether routes went out."""
        out = link.adj_out
        if out is None or not link.established:
            return False
        sent = False
        at = self._flush_at(link, now)
        if at is not None and at <= now and out.due(now) is not None:
            started = self.cpu_clock()
            budget = min(FLUSH_SLICE, link.session.send_budget(now))
            adv, wd = out.flush(self.rib, now, budget)
            if adv or wd:
                self.stats["updates_out"] += link.session.send_update(adv, wd)
                sent = True
            spent = self.cpu_clock() - started
            self.route_work.charge(spent, now)
            self.stats["route_out_cpu_us"] += round(spent * 1e6)  # our routes' export and encoding, per peer
            if out.withheld and not link.withheld_logged:
                link.withheld_logged = True
                log.warning("%s: withholding routes from peer %s: it takes at most %d (%d withheld so far; own "
                            "instances first, then fewest hops): see routes_withheld in show peers", self.id,
                            out.peer, out.max_routes, len(out.withheld),
                            extra={"cpn": {"event": "routes_withheld", "peer": out.peer}})
        if link.end_of_rib_pending and out.initial_done:
            link.end_of_rib_pending = False
            link.session.send_end_of_rib()
            self._queue_out(link)
        return sent

    def _process(self, link: Link, now: float) -> bool:
        """Act on the link's pending session events, at most one UPDATE slice (the next waits for
        the next call, and for the route-work budget); whether a slice was taken."""
        self._processing.add(link)
        try:
            routing, slices = self._take_events(link, now)
        finally:
            self._processing.discard(link)
        self._queue_out(link)
        if routing or link.more or not link.session.wants_data():
            self.timer_dirty = True
        return slices > 0

    def _take_events(self, link: Link, now: float) -> tuple[bool, int]:
        """The event loop of ``_process``: whether any event was not a tunnel record, and the UPDATE slices taken."""
        s = link.session
        slices = 0
        routing = False
        while True:
            update = s.next_is_update()
            if update and slices:
                link.more = True  # the next slice after a checkpoint: users' requests run in between
                break
            if update and self.route_work.level(now) < 0:
                break  # get_timer says when route work may run again
            started = self.cpu_clock() if update else 0.0
            event = s.next_event()
            if event is None:
                break
            _HANDLERS[type(event)](self, link, event, now)
            routing = routing or type(event) is not TunnelFrame
            if update:
                slices += 1
                spent = self.cpu_clock() - started
                self.route_work.charge(spent, now)
                self.stats["route_in_cpu_us"] += round(spent * 1e6)  # decode, RIB, marking the re-flood
        return routing, slices

    def _queue_out(self, link: Link) -> None:
        if link.session.has_data_to_send():
            self._sending[link] = None

    # ---- the decisions, one per session event

    def _attach(self, link: Link, peer: Peer) -> None:
        link.peer = peer
        peer.links[link] = None

    def _on_authenticated(self, link: Link, event: Authenticated, now: float) -> None:
        if link.preauth is not None:
            self.preauth.release(link.preauth)
            link.preauth = None
        peer = self.peers.get(event.peer_id)
        if peer is None:  # removed by a reload while this handshake ran
            self.close(link, Code.CEASE, CeaseSub.PEER_DECONFIGURED, f"{event.peer_id} is no longer configured")
            return
        if link.session.data_channel:
            self._accept_channel(link, peer)
            return
        link.session.use_inbound_bucket(peer.inbound)
        if link.peer is None:
            self._attach(link, peer)
        for other in list(peer.links):
            if other is link or other.session.peer_id is None or other.session.state is State.CLOSED:
                continue  # a closed one (still sending its NOTIFICATION) has lost already: no collision
            self._collide(peer, other, link)

    def _collide(self, peer: Peer, other: Link, new: Link) -> None:
        """Two links to one peer: close the one ``collision_keeps_new`` says loses (session.md, "Collisions")."""
        keep_new = collision_keeps_new(self.id, peer.config.id, other.established, other.initiated, new.initiated)
        loser = other if keep_new else new
        if other.initiated == new.initiated:
            # It dialled again, so it gave the old connection up (session.md, "Collisions"):
            # a swap, its routes kept stale until the new session's End-of-RIB.
            log.info("%s: %s connected again: its new connection replaces the old one", self.id, peer.config.id)
            other.replaced = True
            text = "replaced by a newer connection from the same peer"
        else:
            log.info("%s: connection collision with %s, closing the one %s initiated", self.id, peer.config.id,
                     "we" if loser.initiated else "it")
            text = "connection collision resolution"
        self.close(loser, Code.CEASE, CeaseSub.COLLISION, text)

    def _accept_channel(self, link: Link, peer: Peer) -> None:
        """A data channel from ``peer``: beside its established session, no collision (session.md, "Data channels")."""
        limit = self.config.gateway.max_data_channels_per_peer
        full = len(peer.channels) >= limit
        link.peer = peer
        peer.channels[link] = None  # until the shell hangs up, refused or not
        if self.established_link(peer.config.id) is None:
            self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "a data channel needs an established session")
        elif full:
            self.stats["data_channels_refused"] += 1
            self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, f"at most {limit} data channels")

    def _on_established(self, link: Link, event: Established, now: float) -> None:
        peer = link.peer
        assert peer is not None
        if link.session.data_channel:  # tunnel streams only: the shell attaches them, routing never hears of it
            self.stats["data_channels"] += 1
            self._events.append(LinkUp(link))
            return
        s = link.session
        peer.established_at = now
        peer.backoff.reset()
        peer.last_error = ""
        log.info("%s: peer %s up (%s, hold %d ms, rtt %.2f ms)", self.id, peer.config.id, link.remote,
                 s.hold_ms, (s.srtt or 0) * 1000,
                 extra={"cpn": {"event": "peer_up", "peer": peer.config.id, "remote": link.remote}})
        if s.min_rtt is not None:
            self.rib.set_link_cost(peer.config.id, link_cost_after(None, s.min_rtt) or 1)
        # What this session announced is what it enforces (a reload changes the next session's).
        self.rib.import_limits[peer.config.id] = s.config.limits.routes
        link.adj_out = AdjRibOut(peer.config.id, self.config.gateway.min_adv_interval_ms / 1000,
                                 max_routes=s.export_limit, down_ok=INSTANCE_DOWN_CAP in s.agreed_caps,
                                 gw_ok=GATEWAY_TIME_CAP in s.agreed_caps,
                                 **session_up(self.rib, peer.config, s.agreed_caps))
        link.adj_out.mark_all(self.rib)
        link.end_of_rib_pending = True
        if peer.config.id in self.rib.stale_until and not s.peer_restart_ms and not peer.swap_pending:
            self._propagate(self.rib.end_of_rib(peer.config.id))  # back without graceful restart: stale routes go now
        peer.swap_pending = False
        self._events.append(LinkUp(link))

    def _on_rtt(self, link: Link, event: RttMeasured, now: float) -> None:
        if not link.established or link.peer is None or link.session.data_channel:
            return
        pid = link.peer.config.id
        cost = link_cost_after(self.rib.link_cost_us.get(pid), event.min_rtt)
        if cost is not None:
            self._propagate(self.rib.set_link_cost(pid, cost))

    def _on_update(self, link: Link, event: UpdateReceived, now: float) -> None:
        """One UPDATE, or one slice of one (session.UPDATE_SLICE entries at most); empty: End-of-RIB."""
        assert link.peer is not None
        if link.session.data_channel:
            self.close(link, Code.FSM, FsmSub.UNEXPECTED_IN_ESTABLISHED, "UPDATE on a data channel")
            return
        pid = link.peer.config.id
        self.stats["route_entries_in"] += len(event.update.adv) + len(event.update.wd)
        if not event.update.adv and not event.update.wd:
            self._propagate(self.rib.end_of_rib(pid))
            return
        try:
            changed = self.rib.apply_update(pid, event.update, now)
        except ProtocolError as exc:
            log.warning("%s: peer %s sent a bad UPDATE: %s", self.id, pid, exc)
            self.close(link, exc.code, exc.subcode, exc.detail)
            return
        self._propagate(changed)

    def _on_refresh(self, link: Link, event: RefreshRequested, now: float) -> None:
        if link.adj_out is not None:
            link.adj_out.mark_all(self.rib)

    def _on_tunnel(self, link: Link, event: TunnelFrame, now: float) -> None:
        self._events.append(TunnelData(link, event.payload))

    def _on_closed(self, link: Link, event: Closed, now: float) -> None:
        self._events.append(LinkDown(link, event))
        peer = link.peer
        if peer is not None and link in peer.channels:
            log.debug("%s: a data channel of %s ended: %s", self.id, peer.config.id, event.describe())
            return
        name = peer.config.id if peer else link.remote
        if peer is None:  # a stranger that never authenticated: a flood of these costs one line a second
            self.stats["preauth_closed"] += 1
            if not self.edge_tally.note("unauthenticated peering connections ended ("
                                        + event.describe().split(": ", 1)[0] + ")", now):
                return
        level = logging.INFO if event.code in (0, Code.CEASE) else logging.WARNING
        was_up = link.adj_out is not None
        log.log(level, "%s: peer %s %s: %s", self.id, name, "down" if was_up else "not established", event.describe(),
                extra={"cpn": {"event": "peer_down" if was_up else "peer_not_established", "peer": name,
                               "reason": event.reason.value, "code": event.code, "subcode": event.subcode}})
        link.adj_out = None
        if peer is None:
            return
        peer.last_error = event.describe()
        if was_up:
            self._peer_down(peer, link, event, now)
            for channel in list(peer.channels):  # they carry data for this session alone
                self.close(channel, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "its session ended")

    def _peer_down(self, peer: Peer, link: Link, event: Closed, now: float) -> None:
        """An established session ended: keep the peer's routes as stale for its graceful restart or a
        swap (the window), or drop them now."""
        # The peer closed this session for a collision: it keeps (or is making) another
        # connection to us, a swap rather than a flap. Its routes stay, marked stale, until
        # that session's End-of-RIB or, if none comes up, the swap window passes. A session
        # its own newer connection replaced is a swap too, but the peer did lose it: a flap.
        swap = swapped(event) or link.replaced
        if not swapped(event):
            peer.flaps += 1
        peer.established_at = None
        if any(c.established for c in peer.links if c is not link):
            return
        window_ms = stale_window_ms(event, link.session.peer_restart_ms, swap, self.config.gateway)
        peer.swap_pending = swap
        if window_ms:
            log.info("%s: keeping %d routes of %s as stale for %d ms (%s)", self.id,
                     len(self.rib.adj_in.get(peer.config.id, {})), peer.config.id, window_ms,
                     "replaced by its new connection" if link.replaced else
                     "connection collision swap" if swap else "graceful restart")
            self._propagate(self.rib.peer_stale(peer.config.id, now + window_ms / 1000))
        else:
            self._propagate(self.rib.peer_down(peer.config.id))

    def _propagate(self, keys: Iterable[Key]) -> None:
        keys = set(keys)
        if not keys:
            return
        self.timer_dirty = True
        self.stats["rib_changes"] += len(keys)
        if self.observe is not None:
            self.observe(keys, self._now)
        for link in self.links:
            if link.adj_out is not None:
                link.adj_out.mark(keys)

    def _first_dial(self, peer: Peer, now: float) -> None:
        if peer.config.passive:
            return
        self.timer_dirty = True
        # Gateways started together would dial each other at once; let the greater id
        # dial first so the usual start needs no collision resolution.
        first = 0.0 if self.id.encode() > peer.config.id.encode() else self.config.gateway.connect_retry_min_ms / 1000
        peer.dial_at = now + first + self.rng.uniform(0, DIAL_JITTER_S)


_HANDLERS: dict[type, Callable[[Gateway, Link, object, float], None]] = {
    Authenticated: Gateway._on_authenticated,  # type: ignore[dict-item]
    Established: Gateway._on_established,  # type: ignore[dict-item]
    RttMeasured: Gateway._on_rtt,  # type: ignore[dict-item]
    UpdateReceived: Gateway._on_update,  # type: ignore[dict-item]
    RefreshRequested: Gateway._on_refresh,  # type: ignore[dict-item]
    TunnelFrame: Gateway._on_tunnel,  # type: ignore[dict-item]
    Closed: Gateway._on_closed,  # type: ignore[dict-item]
}


# ---------------------------------------------------------------- pure rules


def peer_status(peer: Peer, rib: Rib, now: float) -> PeerStatus:
    """One peer as ``show peers`` shows it: its current link's session, and what the RIB holds from it."""
    pid = peer.config.id
    link = peer.current()
    s = link.session if link else None
    up = s is not None and link is not None and link.established and s.established_at is not None
    out_rib = link.adj_out if up and link is not None else None
    return PeerStatus(
        id=pid, address=str(peer.config.address), state=s.state.value if s else peer.status,
        uptime_s=round(now - s.established_at, 3) if up and s and s.established_at is not None else 0.0,
        rtt_ms=round(s.srtt * 1000, 3) if s and s.srtt is not None else None,
        routes_received=len(rib.adj_in.get(pid, {})) if up else 0,
        link_cost_ms=round(rib.link_cost_us[pid] / 1000, 3) if pid in rib.link_cost_us else None,
        flaps=peer.flaps, last_error=peer.last_error,
        msgs_in=s.stats["msgs_in"] if s else 0, msgs_out=s.stats["msgs_out"] if s else 0,
        bytes_in=s.stats["bytes_in"] if s else 0, bytes_out=s.stats["bytes_out"] if s else 0,
        caps=list(s.agreed_caps) if up and s else [],
        peer_limits=attrs.asdict(s.peer_limits) if up and s and s.peer_limits else None,
        routes_sent=len(out_rib.sent) if out_rib else 0,
        routes_withheld=len(out_rib.withheld) if out_rib else 0,
        route_entries_in=s.stats["route_entries_in"] if s else 0,
        inbound_paced=bool(up and s and not s.wants_data()),
        import_=list(peer.config.import_prefixes) if peer.config.import_prefixes is not None else None,
        export=list(peer.config.export_prefixes) if peer.config.export_prefixes is not None else None,
        local_pref=peer.config.local_pref, routes_invalid=rib.invalid_by_peer[pid],
        routes_filtered=rib.filtered_by_peer[pid], last_invalid=rib.last_invalid.get(pid, ""),
        tunnel_frames_in=s.stats["tunnel_in"] if s else 0, tunnel_frames_out=s.stats["tunnel_out"] if s else 0,
        batches_in=s.stats["batch_in"] if s else 0, batches_out=s.stats["batch_out"] if s else 0,
    )


def swapped(event: Closed) -> bool:
    """Whether the peer ended an established session for a connection collision (session.md, "Collisions")."""
    return event.reason is CloseReason.PEER_NOTIFICATION and (event.code, event.subcode) == (Code.CEASE, CeaseSub.COLLISION)


def restart_expected(event: Closed) -> bool:
    """Whether a session's end lets the peer's graceful restart keep its routes (routing.md)."""
    if event.reason in (CloseReason.HOLD_EXPIRED, CloseReason.CONNECTION_LOST):
        return True
    return event.reason is CloseReason.PEER_NOTIFICATION and (event.code, event.subcode) == (Code.CEASE, CeaseSub.RESTARTING)


def stale_window_ms(event: Closed, peer_restart_ms: int, swap: bool, g: GatewayConfig) -> int:
    """How long a peer's routes stay, stale, after its last session ended with ``event`` (0: they go now):
    its graceful-restart window, or for a swap long enough for its new connection to come up."""
    if swap:
        return g.handshake_timeout_ms + 2 * g.connect_retry_min_ms
    return peer_restart_ms if restart_expected(event) else 0


def changes(old: Config, new: Config) -> str:
    """What a reload changed, for its log line: peers and instances (+added -removed ~changed, by id), gateway keys."""
    def diff(what: str, a: Mapping[str, object], b: Mapping[str, object]) -> str:
        added = [k for k in b if k not in a]
        gone = [k for k in a if k not in b]
        changed = [k for k in a if k in b and a[k] != b[k]]
        names = ", ".join(f"{sign}{k}" for sign, ks in (("+", added), ("-", gone), ("~", changed)) for k in ks)
        return f"{what} +{len(added)} -{len(gone)} ~{len(changed)}" + (f" ({names})" if names else "")

    inst = {i.id: (s.path, i) for s in old.services for i in s.instances}  # ids are unique in a gateway
    inst_new = {i.id: (s.path, i) for s in new.services for i in s.instances}
    keys = [f.name for f in attrs.fields(type(old.gateway)) if getattr(old.gateway, f.name) != getattr(new.gateway, f.name)]
    return (f"{diff('peers', {p.id: p for p in old.peers}, {p.id: p for p in new.peers})}, "
            f"{diff('instances', inst, inst_new)}, gateway keys changed: {', '.join(keys) or 'none'}")


def session_config(config: Config) -> SessionConfig:
    g = config.gateway
    # peer_buffer_bytes bounds both directions and the streams: what the peer may have un-credited here (the
    # connection window we announce), and what we queue for it (max_peer_send_buffer).
    tunnel = TunnelLimits(g.tunnel_window_bytes, g.peer_buffer_bytes - peer_overhead(g), g.max_streams_per_peer)
    caps = DEFAULT_CAPS if g.tunnel_batch else tuple(c for c in DEFAULT_CAPS if c != TUNNEL_BATCH_CAP)
    return SessionConfig(hold_ms=g.hold_time_ms, keepalive_ms=g.keepalive_ms, handshake_timeout_s=g.handshake_timeout_ms / 1000,
                         caps=caps, restart_ms=g.graceful_restart_ms, tunnel=tunnel, limits=route_limits(config))


def route_limits(config: Config) -> Limits:
    """What this gateway takes from each peer (announced in LIMITS, enforced on receipt)."""
    g = config.gateway
    return Limits(g.max_routes_per_peer, g.route_changes_per_s, g.route_changes_burst or g.max_routes_per_peer)


def _peer(config: Config, peer: PeerConfig, rng: random.Random) -> Peer:
    g = config.gateway
    lim = route_limits(config)
    backoff = Backoff(base=g.connect_retry_min_ms / 1000, cap=g.connect_retry_max_ms / 1000,
                      rng=random.Random(rng.getrandbits(64)))  # the core's rng decides: a seeded core repeats
    return Peer(peer, backoff,
                inbound=TokenBucket(lim.rate, lim.burst))


def _pacers(config: Config, old: Mapping[str, LoadPacer]) -> dict[str, LoadPacer]:
    """A load pacer per local instance: the old one of an instance that stays, else one that knows
    what the instance's first route carries (no load, its configured compute latency), so that the
    first load poll re-advertises only what moved."""
    g = config.gateway
    out = {}
    for svc in config.services:
        for inst in svc.instances:
            pacer = old.get(inst.id)
            if pacer is None:
                pacer = LoadPacer(min_interval_s=g.load_adv_interval_ms / 1000, load_threshold=g.load_change_threshold)
                pacer.last_compute_us = inst.compute_latency_ms * 1000
            # A reload may change these: the loads' noise is counted against the capacity.
            pacer.capacity, pacer.min_interval_s = inst.capacity, g.load_adv_interval_ms / 1000
            pacer.load_threshold = g.load_change_threshold
            out[inst.id] = pacer
    return out
