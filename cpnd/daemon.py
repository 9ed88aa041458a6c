"""The trio shell of cpnd: sockets, timers and tasks around the sans-IO cores.

Only moves bytes and drives timers; every protocol decision is made by ``session``,
``rib`` and (later) ``select``.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import math
import os
import random
import resource
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

from .admission import Slot, SlotTable, Tally, descriptor_reserve, http_client_budget, preauth_budget
from .aio import open_listeners, open_nursery, release_free_memory, serve_accepting, sleep_until_precisely
from .clients import ClientTable
from .config import Config, PeerConfig, load_config, peer_overhead
from .crypto import public_key_b64
from .crypto import Role
from .errors import CeaseSub, Code, ConfigError, HandshakeSub, ProtocolError
from .dataplane import DataPlane, HttpLimits
from .limits import TokenBucket
from .names import service_label
from .load import LoadPacer
from .load import Stage
from .metrics import MAX_CLIENTS as METRICS_CLIENTS, Metrics, serve_metrics
from .registration import Registrations
from .rib import AdjRibOut, Key, Rib, gateway_time_after, link_cost_after
from .streams import BufferAccount, Mux
from .tunnel import LARGE_DATA_CAP, mux_settings
from .session import (
    Authenticated,
    Backoff,
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
from .wire import GATEWAY_TIME_CAP, INSTANCE_DOWN_CAP, Limits, RouteAdv, TunnelLimits
from .workers import Workers

log = logging.getLogger("cpnd")

RECEIVE_CHUNK = 256 * 1024  # several records per read in a bulk transfer: fewer event-loop rounds
# A peer that is using its route bucket is read a record at a time: what one read brings is
# unpacked in one step and waits for tokens before the next read, and both stay short.
PACED_CHUNK = 64 * 1024
# Route entries per flush step: a table of 10,000 goes out in steps of ~2 ms, users' requests between them.
FLUSH_SLICE = 128
# Route work (UPDATE slices in, flush steps out, all peers together) may take this share of the
# process's CPU time, in bursts of ROUTE_WORK_BURST_S: a peer's burst of route changes (its whole
# bucket at once) slows convergence, never the users' requests, which get the rest.
ROUTE_WORK_SHARE = 0.5
ROUTE_WORK_BURST_S = 0.05
TUNNEL_HIGH_WATER = 1024 * 1024
TUNNEL_LOW_WATER = 256 * 1024
WRITE_BATCH = 256 * 1024  # most bytes the peer writer joins into one send
# Over an emulated delay, small records queued this close together leave together, at
# the later one's time (never early): one timer wake-up and one write instead of one each.
COALESCE_S = 0.0001
COALESCE_BYTES = 16 * 1024
FLUSH_ON_CLOSE_S = 1.0
LINGER_S = 0.5  # after a close, how long the peer's last bytes are read and dropped
# [gateway] keys a running daemon cannot take over without restarting.
RESTART_KEYS = ("id", "listen", "key_file", "control_socket", "http_listen", "https_listen", "metrics_listen",
                "registration_listen", "workers")
LOAD_CHECK_S = 0.05
GATEWAY_TIME_INTERVAL_S = 5.0  # our own processing times re-advertised at most this often (routing.md)
TRIM_CHECK_S = 1.0
TRIM_AFTER_BYTES = 8 * 1024 * 1024
HEALTH_OFF_RECHECK_S = 1.0  # how often a loop with active probes off looks again (a reload may turn them on)


class Connection:
    """One TCP connection to a peer, pumped through one ``Session``."""

    def __init__(self, daemon: Daemon, stream: trio.SocketStream, session: Session, *, initiated: bool, remote: str) -> None:
        self.daemon = daemon
        self.stream = stream
        self.session = session
        self.initiated = initiated
        self.remote = remote
        self.peer: PeerState | None = None
        self.adj_out: AdjRibOut | None = None
        self.end_of_rib_pending = False  # send End-of-RIB after the first flush of a new session
        self.withheld_logged = False  # the peer's route limit made us withhold: said once per session
        self._wake = trio.Event()
        self._readable = trio.Event()  # set when the session wants the peer's bytes again
        self._out: collections.deque[tuple[float, bytes]] = collections.deque()
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._done = trio.Event()
        self.flushed = trio.Event()  # closed and its last bytes (the NOTIFICATION) sent or given up
        self._sending = False
        self._delay_s = 0.0
        self.replaced = False  # closed for a newer connection the same peer dialled (a swap)
        self.preauth: Slot | None = None  # an inbound connection's pre-auth slot, until it authenticates
        self.preauth_deadline = math.inf
        self.mux: Mux | None = None
        self._writable = trio.Event()

    @property
    def established(self) -> bool:
        return self.session.state is State.ESTABLISHED

    def wake(self) -> None:
        self._wake.set()

    def evict(self) -> None:
        """Its pre-auth slot went to a newer connection: end it (6/5, too many connections)."""
        self.session.close(Code.CEASE, CeaseSub.CONNECTION_REJECTED, "too many handshakes in progress")
        self._process()

    def send_tunnel(self, frame: bytes, *, flush: bool = False) -> None:
        """Seal and queue one tunnel frame (streams call this); ``flush``: the last of a burst, written
        now if the writer is idle (``flush``)."""
        if self.session.state is State.CLOSED:
            return
        self.session.send_tunnel(frame)
        self._enqueue(self.session.data_to_send())
        if flush:
            self.flush()

    def flush(self) -> None:
        """Write what is queued from the caller's own step when the writer task is idle and nothing is
        held back for an emulated delay: a request or response does not wait for the writer's turn
        (a wake-up, a scheduler pass and trio's send machinery on every hop). What the socket does
        not take at once stays queued for the writer."""
        if self._sending or not self._out or self._delay_s or self.session.state is State.CLOSED:
            return
        data = self._out[0][1] if len(self._out) == 1 else b"".join(chunk for _, chunk in self._out)
        try:
            n = os.write(self.stream.socket.fileno(), data)  # the socket is non-blocking (trio's)
        except OSError:
            return  # full (BlockingIOError), or broken: the writer finds out and handles it
        self._out.clear()
        if n < len(data):
            self._out.append((trio.current_time(), data[n:]))
        self._out_bytes -= n
        if self._out_bytes <= TUNNEL_LOW_WATER:
            self._writable.set()

    async def wait_writable(self) -> None:
        """Backpressure for tunnel data: wait while too much is queued for this peer."""
        while self._out_bytes > TUNNEL_HIGH_WATER and self.session.state is not State.CLOSED:
            self._writable = trio.Event()
            await self._writable.wait()

    async def run(self) -> None:
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._ticker)
                self._process()
                await self._done.wait()
                # Closed: give the NOTIFICATION a bounded chance to leave, then hang up.
                with trio.move_on_after(FLUSH_ON_CLOSE_S + self._delay_s):
                    while self._out or self._sending:  # until the last bytes are in the kernel
                        await self._out_ready.wait()
                        await trio.sleep(0)
                self.flushed.set()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._linger()
                await self.stream.aclose()
            self.daemon._connection_gone(self)

    async def _linger(self) -> None:
        """Half-close after our last bytes, then read and drop what the peer still sends (bounded):
        closing with unread bytes answers them with a reset, which can destroy our NOTIFICATION
        in the peer's kernel before the peer has read it."""
        with trio.move_on_after(LINGER_S):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(RECEIVE_CHUNK):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                pass

    async def _reader(self) -> None:
        while not self._done.is_set():
            while not self.session.wants_data() and not self._done.is_set():
                # The peer's UPDATEs outran its bucket: its bytes wait in the kernel (TCP pushes back).
                self._readable = trio.Event()
                await self._readable.wait()
            if self._done.is_set():
                return
            bucket = self.session.inbound
            size = RECEIVE_CHUNK if bucket.level(trio.current_time()) >= bucket.burst else PACED_CHUNK
            try:
                data = await self.stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if self.preauth is not None and data:
                self.daemon.preauth.set_idle(self.preauth, False)  # it spoke: evicted after the silent ones
            self.session.receive_data(data, trio.current_time())
            self._process()
            if not self.session.wants_data():
                self.wake()  # held back: the ticker's next deadline is when the pace lets it go on
            if not data:
                return

    async def _ticker(self) -> None:
        while not self._done.is_set():
            now = trio.current_time()
            deadlines = [self.session.get_timer(), self._flush_at(now)]
            resume = self.session.resume_at()  # the peer's pace holds its UPDATEs back until then
            if resume is not None:
                if self.session.next_is_update():
                    resume = max(resume, self.daemon.route_work.ready_at(0, now))
                deadlines.append(resume)
            if self.preauth is not None:
                deadlines.append(self.preauth_deadline)
            deadline = min((d for d in deadlines if d is not None), default=math.inf)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self.session.handle_timer(now)
            if self.preauth is not None and now >= self.preauth_deadline:
                self.session.close(Code.HANDSHAKE, HandshakeSub.TIMEOUT,
                                   f"no handshake within {self.daemon.config.gateway.preauth_timeout_ms} ms (pre-auth)")
            if self._flush_routes(now):
                await trio.lowlevel.checkpoint()  # a flush step and an UPDATE slice: two steps, not one
            self._process()

    async def _writer(self) -> None:
        while True:
            while not self._out:
                self._out_ready = trio.Event()
                await self._out_ready.wait()
            release, _ = self._out[0]
            if release > trio.current_time():
                await sleep_until_precisely(release)
            # Everything already due goes in one write (up to WRITE_BATCH bytes): streams that
            # queued records meanwhile share one system call instead of one each.
            now = trio.current_time()
            chunks = [self._out.popleft()[1]]
            size = len(chunks[0])
            while self._out and self._out[0][0] <= now and size + len(self._out[0][1]) <= WRITE_BATCH:
                chunks.append(self._out.popleft()[1])
                size += len(chunks[-1])
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._out_bytes -= size
            if self._out_bytes <= TUNNEL_LOW_WATER:
                self._writable.set()
            try:
                self._sending = True
                await self.stream.send_all(data)
                self._sending = False
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._sending = False
                self._out.clear()
                self._out_bytes = 0
                self.session.receive_data(b"", trio.current_time())
                self._process()
                self._out_ready.set()
                return
            if not self._out:
                self._out_ready.set()

    def _flush_at(self, now: float) -> float | None:
        """When the next flush step may go: the minimum interval, then the peer's pace."""
        if self.adj_out is None or not self.established:
            return None
        due = self.adj_out.due(now)
        if due is None:
            return None
        due = max(due, self.daemon.route_work.ready_at(0, now))
        if self.session.peer_limits is None:
            return due
        # Wait for a batch worth sending (a tenth of a second of the peer's pace), not for every token.
        batch = min(FLUSH_SLICE, max(1, self.session.peer_limits.rate // 10), max(1, self.adj_out.backlog))
        return max(due, self.session.send_ready_at(batch, now))

    def _flush_routes(self, now: float) -> bool:
        """One flush step if one is due; whether it sent anything."""
        if self.adj_out is None or not self.established:
            return False
        sent = False
        at = self._flush_at(now)
        if at is not None and at <= now:
            started = time.thread_time()
            budget = min(FLUSH_SLICE, self.session.send_budget(now))
            adv, wd = self.adj_out.flush(self.daemon.rib, now, budget)
            if adv or wd:
                n = self.session.send_update(adv, wd)
                self.daemon.stats["updates_out"] += n
                sent = True
            self.daemon.route_work.charge(time.thread_time() - started, now)
            if self.adj_out.withheld and not self.withheld_logged:
                self.withheld_logged = True
                log.warning("%s: withholding routes from peer %s: it takes at most %d (%d withheld so far; own "
                            "instances first, then fewest hops): see routes_withheld in show peers", self.daemon.id,
                            self.adj_out.peer, self.adj_out.max_routes, len(self.adj_out.withheld),
                            extra={"cpn": {"event": "routes_withheld", "peer": self.adj_out.peer}})
            if self.adj_out.due(now) == now:
                self.wake()  # the rest of this burst after a checkpoint: users' requests go in between
        if self.end_of_rib_pending and self.adj_out.initial_done:
            self.end_of_rib_pending = False
            self.session.send_end_of_rib()
        return sent

    def _enqueue(self, data: bytes) -> None:
        if not data:
            return
        release = trio.current_time() + self._delay_s
        if (self._delay_s and self._out and release - self._out[-1][0] <= COALESCE_S
                and len(self._out[-1][1]) + len(data) <= COALESCE_BYTES):
            self._out[-1] = (release, self._out[-1][1] + data)
        else:
            self._out.append((release, data))
        self._out_bytes += len(data)
        self._out_ready.set()
        if self._out_bytes > self.daemon.config.gateway.max_peer_send_buffer and self.session.state is not State.CLOSED:
            # The peer does not read: drop the session rather than buffer without bound.
            self._out.clear()
            self._out_bytes = 0
            self.session.close(Code.CEASE, CeaseSub.OUT_OF_RESOURCES, "send buffer full: peer is not reading")
            self._process()

    def _process(self) -> None:
        """Act on every pending session event (UPDATE entries one slice per call), then queue
        what the session wants sent."""
        slices = 0
        work = self.daemon.route_work
        while True:
            update = self.session.next_is_update()
            if update and slices:
                self.wake()  # the next slice after a checkpoint: users' requests run in between
                break
            if update and work.level(trio.current_time()) < 0:
                break  # the ticker comes back when route work may run again
            started = time.thread_time() if update else 0.0
            event = self.session.next_event()
            if event is None:
                break
            if isinstance(event, Authenticated):
                self.daemon._authenticated(self, event.peer_id)
            elif isinstance(event, Established):
                self.daemon._established(self)
            elif isinstance(event, RttMeasured):
                self.daemon._rtt(self, event.min_rtt)
            elif isinstance(event, UpdateReceived):
                slices += 1
                self.daemon._update(self, event)
                work.charge(time.thread_time() - started, trio.current_time())
            elif isinstance(event, RefreshRequested):
                if self.adj_out is not None:
                    self.adj_out.mark_all(self.daemon.rib)
                    self.wake()
            elif isinstance(event, TunnelFrame):
                if self.mux is not None:
                    try:
                        self.mux.handle(event.payload)
                    except ProtocolError as exc:
                        log.warning("%s: peer %s sent a bad tunnel frame: %s", self.daemon.id, self.session.peer_id, exc)
                        self.session.close(exc.code, exc.subcode, exc.detail)
            elif isinstance(event, Closed):
                if self.mux is not None:
                    self.mux.fail_all(event.describe())
                self._writable.set()
                self.daemon._closed(self, event)
                self._done.set()
                self._readable.set()
        self._enqueue(self.session.data_to_send())
        if self.session.wants_data():
            self._readable.set()


@attrs.define
class PeerState:
    """What the daemon knows of one configured peer across its connections."""

    config: PeerConfig
    backoff: Backoff
    conns: set[Connection] = attrs.field(factory=set)
    changed: trio.Event = attrs.field(factory=trio.Event)
    status: str = "idle"  # idle | connect | active (waiting to retry)
    last_error: str = ""
    established_at: float | None = None
    flaps: int = 0
    swap_pending: bool = False  # its last session ended in a collision swap: stale routes wait for the next End-of-RIB
    removed: bool = False  # deconfigured by a reload: its dial loop ends
    # What its sessions may cost us (route entries and messages), one bucket across its
    # sessions: reconnecting does not refill it.
    inbound: TokenBucket = attrs.field(factory=lambda: TokenBucket(1000, 10_000))

    def current(self) -> Connection | None:
        """The connection that matters most: established first, then any authenticated."""
        best = None
        for c in self.conns:
            if c.established:
                return c
            best = best or c
        return best

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Daemon:
    """One gateway: peers, RIB and the local control socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        g = config.gateway
        self.id = g.id
        self.rib = Rib(g.id, max_routes_per_peer=g.max_routes_per_peer)
        self.session_config = _session_config(config)
        self.peer_keys = {p.id: p.public_key for p in config.peers}
        self.peers = {p.id: _peer_state(config, p) for p in config.peers}
        # Per-origin sequence numbers start from the wall clock so a restarted gateway
        # still outranks what it advertised before (protocol-spec/routing.md).
        self.seq = time.time_ns() // 1000
        self.local_seq: dict[str, int] = {}
        self.local_attrs: dict[str, tuple[float, float, float]] = {}
        self.pacers = {i.id: _pacer(config) for s in config.services for i in s.instances}
        self.started_at = 0.0
        # Inbound connections still in the handshake: capped overall and per source address;
        # a newcomer takes the slot of the oldest (silent ones first) rather than being refused.
        self.preauth = SlotTable(g.max_preauth_connections, g.max_preauth_per_ip, evict_busy=True)
        self.edge_tally = Tally()  # pre-auth connections that end, accept errors: one log line a second
        self.nofile = 1 << 20  # the descriptor limit, once raised at start
        self.gateway_times_at = -math.inf  # when our own processing times were last re-advertised
        self.stats: collections.Counter[str] = collections.Counter()
        self.tunnel_bytes = BufferAccount()  # tunnel DATA held for every peer together
        self.route_work = TokenBucket(ROUTE_WORK_SHARE, ROUTE_WORK_BURST_S)
        self.listen_port: int | None = None
        self.metrics_port: int | None = None
        self.nursery: trio.Nursery | None = None
        self.metrics = Metrics(self)
        self.dataplane = DataPlane(self, HttpLimits(
            max_body_bytes=g.max_body_bytes, header_timeout_s=g.http_header_timeout_ms / 1000,
            idle_timeout_s=g.http_idle_timeout_ms / 1000, max_clients=g.max_http_clients,
            max_clients_per_ip=g.max_http_clients_per_ip,
        ))
        self.clients = ClientTable.from_config(config)  # [[clients]]: keys and quotas at the ingress
        self.registrations = Registrations(self)  # instances that join by cpnctl register or HTTP
        self.workers = Workers(self) if g.workers > 1 else None  # [gateway] workers: users served by N processes

    # ---- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .control import serve_control

        g = self.config.gateway
        # Signals are ours from the first instant to the last: a second SIGTERM during
        # the drain must not fall back to the default action and skip the clean-up.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            self.started_at = trio.current_time()
            self.rib.set_local(self._local_routes(), self.started_at)
            self._fit_descriptors()
            listeners = await open_listeners("listen", g.listen.host, g.listen.port, str(g.listen))
            self.listen_port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await nursery.start(serve_control, self, g.control_socket)
                await nursery.start(self.registrations.run)
                if self.workers is not None:
                    await nursery.start(self.workers.run)
                elif g.http_listen is not None:
                    await nursery.start(self.dataplane.serve)
                if g.https_listen is not None and self.workers is None:  # [tls]
                    await nursery.start(functools.partial(self.dataplane.serve, tls=True))
                if g.metrics_listen is not None:
                    await nursery.start(serve_metrics, self)
                for listener in listeners:
                    nursery.start_soon(serve_accepting, listener, functools.partial(self._accept, nursery), self.edge_event,
                                       "peering")
                nursery.start_soon(self._edge_log_loop)
                for peer in self.peers.values():
                    if not peer.config.passive:
                        nursery.start_soon(self._dial_loop, peer)
                nursery.start_soon(self._load_loop)
                nursery.start_soon(self._memory_loop)
                nursery.start_soon(self._health_loop)
                log.info("%s up: peers on %s, http on %s%s, metrics on %s, control socket %s; %d peers, %d local instances",
                         self.id, attrs.evolve(g.listen, port=self.listen_port),
                         attrs.evolve(g.http_listen, port=self.dataplane.http_port) if g.http_listen else "-",
                         f", https on {attrs.evolve(g.https_listen, port=self.dataplane.https_port)}" if g.https_listen else "",
                         attrs.evolve(g.metrics_listen, port=self.metrics_port) if g.metrics_listen else "-",
                         g.control_socket, len(self.peers), len(self.rib.local))
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        try:
                            self.reload("SIGHUP")  # logs what changed, or why it was refused
                        except ConfigError:
                            pass
                        continue
                    log.info("%s: %s received, shutting down", self.id, signal.Signals(signum).name)
                    break
                await self.shutdown(restarting=signum == signal.SIGTERM and self.config.gateway.graceful_restart_ms > 0)
                nursery.cancel_scope.cancel()

    async def shutdown(self, *, restarting: bool = False) -> None:
        """Stop taking requests, let those in flight finish (bounded), then say Cease to every peer.

        ``restarting``: Cease/restarting, so peers keep our routes through our graceful restart.
        """
        self.dataplane.stop_accepting()
        if self.workers is not None:
            self.workers.stop()
        drain_s = self.config.gateway.drain_timeout_ms / 1000
        with trio.move_on_after(drain_s) as drain:
            await self.dataplane.drained()
            if self.workers is not None:
                await self.workers.drained()
        if drain.cancelled_caught:
            log.warning("%s: %d requests still in flight after %g s of draining: cut", self.id, self.dataplane.inflight, drain_s)
        conns = [c for p in self.peers.values() for c in p.conns]
        for c in conns:
            if restarting:
                c.session.close(Code.CEASE, CeaseSub.RESTARTING, "gateway restarting: keep my routes")
            else:
                c.session.close(Code.CEASE, CeaseSub.ADMIN_SHUTDOWN, "gateway shutting down")
            c._process()
        with trio.move_on_after(FLUSH_ON_CLOSE_S + 0.1):
            for c in conns:
                await c.flushed.wait()

    def _local_routes(self) -> list[RouteAdv]:
        out = []
        for svc in self.config.services:
            for inst in svc.instances:
                load, bload, comp = self.local_attrs.get(inst.id, (0.0, 0.0, inst.compute_latency_ms * 1000))
                out.append(RouteAdv(
                    service=svc.path, instance=inst.id, origin=self.id, seq=self.local_seq.get(inst.id, self.seq),
                    label=service_label(svc.path), path=(self.id,), latency_us=0,
                    capacity=inst.capacity, load=load, price=inst.price, compute_us=int(comp), bload=bload,
                    # Down by health checks: still advertised, marked down, so that its service stays
                    # known (503 no_instance, not 404) until it recovers (routing.md, "Instances that are down").
                    down=not self.dataplane.health(inst.id).healthy,
                    gateway_us=self.rib.egress_us,  # our own processing as its egress (routing.md, "Gateway time")
                ))
        return out

    def reload(self, trigger: str = "cpnctl reload") -> str:
        """Re-read the config file and apply it, logging what changed (or why not); the summary.

        Sessions whose peer entry did not change are untouched, in-flight requests too.
        Raises ConfigError (nothing applied) for an invalid file or a change that needs a restart.
        """
        try:
            summary = self._reload()
        except ConfigError as exc:
            log.error("%s: %s: new config refused, the old one keeps running: %s", self.id, trigger, exc)
            raise
        log.info("%s: %s: %s", self.id, trigger, summary)
        return summary

    def _reload(self) -> str:
        old = self.config
        new = load_config(self.config.source)
        old_g, g = self.config.gateway, new.gateway
        for key in RESTART_KEYS:
            if getattr(old_g, key) != getattr(g, key):
                raise ConfigError(f"{self.config.source.name}: gateway.{key}: changing it needs a restart (reload refused)")
        if public_key_b64(new.key) != public_key_b64(self.config.key):
            raise ConfigError(f"{self.config.source.name}: gateway.key_file: the key changed: that needs a restart (reload refused)")
        new = self.registrations.reconfigure(new)  # registered instances stay
        self.clients.reconfigure(new.clients, g)
        self.config = new
        self.session_config = _session_config(new)
        self.rib.max_routes_per_peer = g.max_routes_per_peer  # sessions keep what they announced
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
            for conn in list(peer.conns):
                conn.session.close(Code.CEASE, sub, "peer removed from the config" if pid in gone else "peer settings changed")
                conn._process()
            peer.notify()
        added = [pid for pid in wanted if pid not in self.peers]
        for pid in added:
            peer = _peer_state(new, wanted[pid])
            self.peers[pid] = peer
            if not peer.config.passive and self.nursery is not None:
                self.nursery.start_soon(self._dial_loop, peer)
        self.pacers = {i.id: self.pacers.get(i.id) or _pacer(new) for svc in new.services for i in svc.instances}
        self.local_attrs = {k: v for k, v in self.local_attrs.items() if k in self.pacers}
        self.dataplane.reconfigure(new)
        if self.workers is not None:
            self.workers.reload()
        self.seq += 1
        self.local_seq = {}  # every local instance re-advertised with the new seq
        self._propagate(self.rib.set_local(self._local_routes(), trio.current_time()))
        self.stats["reloads"] += 1
        return f"reloaded {new.source.name}: {_changes(old, new)}; {len(self.pacers)} local instances"

    def apply_registry(self, changed: Iterable[str]) -> None:
        """Registered instances joined, changed or left (cpnd/registration.py): the instance half of a
        reload, re-advertising only those that ``changed``."""
        self.config = self.registrations.registry.merge(self.config)
        self.pacers = {i.id: self.pacers.get(i.id) or _pacer(self.config) for svc in self.config.services for i in svc.instances}
        self.local_attrs = {k: v for k, v in self.local_attrs.items() if k in self.pacers}
        self.dataplane.reconfigure(self.config)
        for iid in changed:
            self.seq += 1
            self.local_seq[iid] = self.seq
        self._propagate(self.rib.set_local(self._local_routes(), trio.current_time()))

    def health_changed(self, iid: str, healthy: bool) -> None:
        """An instance went down or came back: re-advertise our instances."""
        log.warning("%s: instance %s is %s", self.id, iid, "healthy again" if healthy else "unhealthy: advertised as down")
        self.stats["health_changes"] += 1
        self.seq += 1
        self.local_seq[iid] = self.seq
        self._propagate(self.rib.set_local(self._local_routes(), trio.current_time()))

    async def _health_loop(self) -> None:
        """Probe instances that are down, or that no request has vouched for lately."""
        while True:
            interval_ms = self.config.gateway.health_interval_ms
            await trio.sleep(interval_ms / 1000 if interval_ms else HEALTH_OFF_RECHECK_S)
            if not self.config.gateway.health_interval_ms:
                continue  # active probes off (a reload may turn them on); passive checks still run
            async with trio.open_nursery() as nursery:
                for svc in self.config.services:
                    for inst in svc.instances:
                        nursery.start_soon(self.dataplane.probe, inst)

    async def _load_loop(self) -> None:
        """Re-advertise measured load and compute latency of our instances, paced."""
        while True:
            await trio.sleep(LOAD_CHECK_S)
            now = trio.current_time()
            changed = False
            for iid, pacer in self.pacers.items():
                meter = self.dataplane.meters[iid]
                meter.expire(now)
                load, bload, comp = round(meter.load(now), 3), round(meter.bounded_load(now), 3), round(meter.base_us)
                if self.workers is not None:  # the workers call our instances, not this process
                    load, bload, comp = self.workers.advertised(iid, meter.capacity, meter.base_us)
                if pacer.should_advertise(now, load, bload, comp):
                    pacer.advertised(now, load, bload, comp)
                    self.seq += 1
                    self.local_seq[iid] = self.seq
                    self.local_attrs[iid] = (load, bload, comp)
                    changed = True
            if changed:
                self.stats["load_updates"] += 1
                self._propagate(self.rib.set_local(self._local_routes(), now))
            self._gateway_times(now)
            if self.rib.stale_until:
                self._propagate(self.rib.expire_stale(now))
            self.dataplane.flush_log_counts()

    def _gateway_times(self, now: float) -> None:
        """Re-advertise our own processing as egress and transit when it moved materially, at most every 5 s."""
        if now - self.gateway_times_at < GATEWAY_TIME_INTERVAL_S:
            return
        own = self.dataplane.own
        egress = gateway_time_after(self.rib.egress_us, own.us(Stage.EGRESS, now))
        transit = gateway_time_after(self.rib.transit_us, own.us(Stage.TRANSIT, now))
        if egress is None and transit is None:
            return
        self.gateway_times_at = now
        self.stats["gateway_time_updates"] += 1
        changed = self.rib.set_gateway_times(self.rib.egress_us if egress is None else egress,
                                             self.rib.transit_us if transit is None else transit)
        if egress is not None:
            changed |= self.rib.set_local(self._local_routes(), now)
        self._propagate(changed)

    async def _memory_loop(self) -> None:
        """After a burst of tunnel buffering has drained, hand the freed memory back (once a second at most)."""
        while True:
            await trio.sleep(TRIM_CHECK_S)
            peak = self.tunnel_bytes.take_peak()
            if peak >= TRIM_AFTER_BYTES and self.tunnel_bytes.buffered <= peak // 4 and release_free_memory():
                self.stats["memory_trims"] += 1

    # ---- connections

    def _accept(self, nursery: trio.Nursery, stream: trio.SocketStream) -> None:
        """A pre-auth slot for an inbound connection (the oldest pending one's, if need be), and its task."""
        try:
            source = stream.socket.getpeername()[0]
        except OSError:
            stream.socket.close()  # it went away already
            return
        adm = self.preauth.admit(source)
        assert adm.slot is not None  # evict_busy: never refused
        for victim in adm.evicted:
            self.stats["preauth_evicted"] += 1
            victim.owner.evict()
        now = trio.current_time()
        session = Session(Role.RESPONDER, self.id, self.config.key, self.peer_keys, now, config=self.session_config)
        conn = Connection(self, stream, session, initiated=False, remote=_peername(stream))
        conn.preauth = adm.slot
        conn.preauth_deadline = now + self.config.gateway.preauth_timeout_ms / 1000
        adm.slot.owner = conn
        nursery.start_soon(self._run_connection, conn)

    def edge_event(self, kind: str, line: str) -> None:
        """A failed accept or a refusal (peering, control): in full when the first of a spell, else counted."""
        if self.edge_tally.note(kind, trio.current_time()):
            log.warning("%s: %s (more are counted: one line a second)", self.id, line)

    async def _edge_log_loop(self) -> None:
        """Once a second, the lines that sum up floods at the edges (peering, HTTP, metrics)."""
        while True:
            await trio.sleep(1.0)
            line = self.edge_tally.flush(trio.current_time())
            if line:
                log.warning("%s: %s", self.id, line)
            self.dataplane.flush_edge_log()
            self.metrics.flush_edge_log()

    def _fit_descriptors(self) -> None:
        """Raise the descriptor limit to the hard one; fit the pending handshakes and then
        max_http_clients under it, with a reserve for everything else."""
        from .control import MAX_CLIENTS as CONTROL_CLIENTS

        before, nofile = raise_nofile_limit()
        self.nofile = nofile
        if nofile != before:
            log.info("%s: descriptor limit (RLIMIT_NOFILE) raised from %d to %d", self.id, before, nofile)
        g = self.config.gateway
        self.preauth.limit = preauth_budget(nofile, g.max_preauth_connections)
        if self.preauth.limit < g.max_preauth_connections:
            log.warning("%s: max_preauth_connections lowered from %d to %d: a quarter of the descriptor limit (%d)",
                        self.id, g.max_preauth_connections, self.preauth.limit, nofile)
        local = sum(len(s.instances) for s in self.config.services)
        reserve = descriptor_reserve(peers=len(self.peers), preauth=self.preauth.limit, local_instances=local,
                                     pool_idle_per_instance=self.dataplane.limits.pool_idle_per_instance,
                                     control_clients=CONTROL_CLIENTS, metrics_clients=METRICS_CLIENTS)
        budget = http_client_budget(nofile, reserve, local)
        if (g.http_listen or g.https_listen) is not None and budget < g.max_http_clients:
            log.warning("%s: max_http_clients lowered from %d to %d: the descriptor limit is %d and %d are kept for "
                        "peers, handshakes, instances, control and metrics (raise LimitNOFILE / ulimit -n)",
                        self.id, g.max_http_clients, budget, nofile, reserve)
            self.dataplane.slots.limit = budget

    async def _dial_loop(self, peer: PeerState) -> None:
        addr = peer.config.address
        # Gateways started together would dial each other at once; let the greater id
        # dial first so the usual start needs no collision resolution.
        first = 0.0 if self.id.encode() > peer.config.id.encode() else self.config.gateway.connect_retry_min_ms / 1000
        await trio.sleep(first + random.uniform(0, 0.05))
        while not peer.removed:
            while peer.current() is not None:
                await peer.changed.wait()
            if peer.removed:
                return
            peer.status = "connect"
            try:
                with trio.fail_after(self.session_config.handshake_timeout_s):
                    stream = await trio.open_tcp_stream(addr.host, addr.port)
            except (OSError, trio.TooSlowError) as exc:
                peer.last_error = f"connect {addr}: {getattr(exc, 'strerror', None) or 'timed out'}"
                peer.status = "active"
                await trio.sleep(peer.backoff.next_delay())
                continue
            if peer.current() is not None:  # the peer dialled us meanwhile
                await stream.aclose()
                continue
            session = Session(Role.INITIATOR, self.id, self.config.key, self.peer_keys, trio.current_time(),
                              expected_peer=peer.config.id, config=self.session_config)
            conn = Connection(self, stream, session, initiated=True, remote=str(addr))
            self._attach(conn, peer)
            await self._run_connection(conn)
            peer.status = "active"
            await trio.sleep(peer.backoff.next_delay())

    async def _run_connection(self, conn: Connection) -> None:
        try:
            await conn.run()
        except Exception:  # a bug must cost this session, never the daemon
            log.exception("%s: connection %s failed", self.id, conn.remote)

    def established_conn(self, peer_id: str) -> Connection | None:
        peer = self.peers.get(peer_id)
        conn = peer.current() if peer else None
        return conn if conn is not None and conn.established else None

    def _attach(self, conn: Connection, peer: PeerState) -> None:
        conn.peer = peer
        conn._delay_s = peer.config.emulated_rtt_ms / 2000
        peer.conns.add(conn)
        peer.notify()

    def _authenticated(self, conn: Connection, peer_id: str) -> None:
        if conn.preauth is not None:
            self.preauth.release(conn.preauth)
            conn.preauth = None
        peer = self.peers.get(peer_id)
        if peer is None:  # removed by a reload while this handshake ran
            conn.session.close(Code.CEASE, CeaseSub.PEER_DECONFIGURED, f"{peer_id} is no longer configured")
            return
        conn.session.use_inbound_bucket(peer.inbound)
        if conn.peer is None:
            self._attach(conn, peer)
        for other in list(peer.conns):
            if other is conn or other.session.peer_id is None or other.session.state is State.CLOSED:
                continue  # a closed one (still sending its NOTIFICATION) has lost already: no collision
            keep_new = collision_keeps_new(self.id, peer_id, other.established, other.initiated, conn.initiated)
            loser = other if keep_new else conn
            if other.initiated == conn.initiated:
                # It dialled again, so it gave the old connection up (session.md, "Collisions"):
                # a swap, its routes kept stale until the new session's End-of-RIB.
                log.info("%s: %s connected again: its new connection replaces the old one", self.id, peer_id)
                other.replaced = True
                text = "replaced by a newer connection from the same peer"
            else:
                log.info("%s: connection collision with %s, closing the one %s initiated", self.id, peer_id,
                         "we" if loser.initiated else "it")
                text = "connection collision resolution"
            loser.session.close(Code.CEASE, CeaseSub.COLLISION, text)
            if loser is not conn:
                loser._process()

    def _established(self, conn: Connection) -> None:
        peer = conn.peer
        assert peer is not None
        now = trio.current_time()
        peer.established_at = now
        peer.backoff.reset()
        peer.last_error = ""
        log.info("%s: peer %s up (%s, hold %d ms, rtt %.2f ms)", self.id, peer.config.id, conn.remote,
                 conn.session.hold_ms, (conn.session.srtt or 0) * 1000,
                 extra={"cpn": {"event": "peer_up", "peer": peer.config.id, "remote": conn.remote}})
        if conn.session.min_rtt is not None:
            self.rib.set_link_cost(peer.config.id, link_cost_after(None, conn.session.min_rtt) or 1)
        if conn.session.tunnel_enabled:
            ours = conn.session.config.tunnel
            assert ours is not None
            settings = mux_settings(ours, conn.session.peer_tunnel, LARGE_DATA_CAP in conn.session.agreed_caps,
                                    timed_load=GATEWAY_TIME_CAP in conn.session.agreed_caps)
            conn.mux = Mux(conn, peer.config.id, conn.initiated, self.dataplane.on_stream, settings, self.tunnel_bytes)
        # What this session announced is what it enforces (a reload changes the next session's).
        self.rib.import_limits[peer.config.id] = conn.session.config.limits.routes
        conn.adj_out = AdjRibOut(peer.config.id, self.config.gateway.min_adv_interval_ms / 1000,
                                 max_routes=conn.session.export_limit,
                                 down_ok=INSTANCE_DOWN_CAP in conn.session.agreed_caps,
                                 gw_ok=GATEWAY_TIME_CAP in conn.session.agreed_caps)
        conn.adj_out.mark_all(self.rib)
        conn.end_of_rib_pending = True
        if peer.config.id in self.rib.stale_until and not conn.session.peer_restart_ms and not peer.swap_pending:
            self._propagate(self.rib.end_of_rib(peer.config.id))  # back without graceful restart: stale routes go now
        peer.swap_pending = False
        conn.wake()

    def _rtt(self, conn: Connection, rtt: float) -> None:
        if not conn.established or conn.peer is None:
            return
        pid = conn.peer.config.id
        cost = link_cost_after(self.rib.link_cost_us.get(pid), rtt)
        if cost is not None:
            self._propagate(self.rib.set_link_cost(pid, cost))

    def _update(self, conn: Connection, event: UpdateReceived) -> None:
        """One UPDATE, or one slice of one (session.UPDATE_SLICE entries at most)."""
        assert conn.peer is not None
        self.stats["route_entries_in"] += len(event.update.adv) + len(event.update.wd)
        if not event.update.adv and not event.update.wd:
            self._propagate(self.rib.end_of_rib(conn.peer.config.id))
            return
        try:
            changed = self.rib.apply_update(conn.peer.config.id, event.update, trio.current_time())
        except ProtocolError as exc:
            log.warning("%s: peer %s sent a bad UPDATE: %s", self.id, conn.peer.config.id, exc)
            conn.session.close(exc.code, exc.subcode, exc.detail)
            return
        self._propagate(changed)

    def _closed(self, conn: Connection, event: Closed) -> None:
        peer = conn.peer
        name = peer.config.id if peer else conn.remote
        if peer is None:  # a stranger that never authenticated: a flood of these costs one line a second
            self.stats["preauth_closed"] += 1
            if not self.edge_tally.note("unauthenticated peering connections ended (" + event.describe().split(": ", 1)[0] + ")",
                                        trio.current_time()):
                return
        level = logging.INFO if event.code in (0, Code.CEASE) else logging.WARNING
        was_up = conn.adj_out is not None
        log.log(level, "%s: peer %s %s: %s", self.id, name, "down" if was_up else "not established", event.describe(),
                extra={"cpn": {"event": "peer_down" if was_up else "peer_not_established", "peer": name,
                               "reason": event.reason.value, "code": event.code, "subcode": event.subcode}})
        if peer is not None:
            peer.last_error = event.describe()
            if was_up:
                # The peer closed this session for a collision: it keeps (or is making) another
                # connection to us, a swap rather than a flap. Its routes stay, marked stale, until
                # that session's End-of-RIB or, if none comes up, the swap window passes. A session
                # its own newer connection replaced is a swap too, but the peer did lose it: a flap.
                swap = _swapped(event) or conn.replaced
                if not _swapped(event):
                    peer.flaps += 1
                peer.established_at = None
                others_up = any(c.established for c in peer.conns if c is not conn)
                if not others_up:
                    window_ms = conn.session.peer_restart_ms if _restart_expected(event) else 0
                    if swap:
                        g = self.config.gateway
                        window_ms = g.handshake_timeout_ms + 2 * g.connect_retry_min_ms
                    peer.swap_pending = swap
                    if window_ms:
                        log.info("%s: keeping %d routes of %s as stale for %d ms (%s)", self.id,
                                 len(self.rib.adj_in.get(peer.config.id, {})), peer.config.id, window_ms,
                                 "replaced by its new connection" if conn.replaced else
                                 "connection collision swap" if swap else "graceful restart")
                        self._propagate(self.rib.peer_stale(peer.config.id, trio.current_time() + window_ms / 1000))
                    else:
                        self._propagate(self.rib.peer_down(peer.config.id))
            conn.adj_out = None

    def _connection_gone(self, conn: Connection) -> None:
        if conn.preauth is not None:
            self.preauth.release(conn.preauth)
            conn.preauth = None
        if conn.peer is not None:
            conn.peer.conns.discard(conn)
            conn.peer.notify()

    def _propagate(self, keys: Iterable[Key]) -> None:
        keys = set(keys)
        if not keys:
            return
        self.stats["rib_changes"] += len(keys)
        for peer in self.peers.values():
            for c in peer.conns:
                if c.adj_out is not None:
                    c.adj_out.mark(keys)
                    c.wake()


def _changes(old: Config, new: Config) -> str:
    """What a reload changed, for its log line: peers and instances (+added -removed ~changed, by id), gateway keys."""
    def diff(what: str, a: dict[str, object], b: dict[str, object]) -> str:
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


def _swapped(event: Closed) -> bool:
    """Whether the peer ended an established session for a connection collision (session.md, "Collisions")."""
    return event.reason is CloseReason.PEER_NOTIFICATION and (event.code, event.subcode) == (Code.CEASE, CeaseSub.COLLISION)


def _restart_expected(event: Closed) -> bool:
    """Whether a session's end lets the peer's graceful restart keep its routes (routing.md)."""
    if event.reason in (CloseReason.HOLD_EXPIRED, CloseReason.CONNECTION_LOST):
        return True
    return event.reason is CloseReason.PEER_NOTIFICATION and (event.code, event.subcode) == (Code.CEASE, CeaseSub.RESTARTING)


def _session_config(config: Config) -> SessionConfig:
    g = config.gateway
    # peer_buffer_bytes bounds both directions and the streams: what the peer may have un-credited here (the
    # connection window we announce), and what we queue for it (max_peer_send_buffer).
    tunnel = TunnelLimits(g.tunnel_window_bytes, g.peer_buffer_bytes - peer_overhead(g), g.max_streams_per_peer)
    return SessionConfig(hold_ms=g.hold_time_ms, keepalive_ms=g.keepalive_ms, handshake_timeout_s=g.handshake_timeout_ms / 1000,
                         restart_ms=g.graceful_restart_ms, tunnel=tunnel, limits=_limits(config))


def _limits(config: Config) -> Limits:
    """What this gateway takes from each peer (announced in LIMITS, enforced on receipt)."""
    g = config.gateway
    return Limits(g.max_routes_per_peer, g.route_changes_per_s, g.route_changes_burst or g.max_routes_per_peer)


def _peer_state(config: Config, peer: PeerConfig) -> PeerState:
    g = config.gateway
    lim = _limits(config)
    return PeerState(peer, Backoff(base=g.connect_retry_min_ms / 1000, cap=g.connect_retry_max_ms / 1000),
                     inbound=TokenBucket(lim.rate, lim.burst))


def _pacer(config: Config) -> LoadPacer:
    g = config.gateway
    return LoadPacer(min_interval_s=g.load_adv_interval_ms / 1000, load_threshold=g.load_change_threshold)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one (systemd's soft default is 1024); (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses more than fs.nr_open
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY:
        return target, target
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError):
            pass
    return soft, soft


def _peername(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except OSError as exc:
        return f"<{errno.errorcode.get(exc.errno or 0, 'unknown')}>"

