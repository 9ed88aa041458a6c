"""The trio shell of cpnd: sockets, signals, one timer and tasks around the gateway core.

Only moves bytes: every peering and routing decision is made by ``gateway.Gateway`` (with
``session`` and ``rib`` under it); the data plane (``dataplane`` and its parts, ``streams``) serves users.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import math
import os
import resource
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from time import time_ns

import attrs
import trio

from .admission import descriptor_reserve, http_client_budget, preauth_budget
from .aio import open_listeners, open_nursery, release_free_memory, serve_accepting, sleep_until_precisely
from .clients import ClientTable
from .config import SEND_HIGH_WATER, Config, load_config
from .errors import CeaseSub, Code, ConfigError, ProtocolError
from .gateway import Dial, Gateway, Link, LinkDown, LinkUp, Reading, TunnelData
from .dataplane import DataPlane, HttpLimits
from .load import Stage
from .metrics import MAX_CLIENTS as METRICS_CLIENTS, Metrics, serve_metrics
from .policy import stream_sealer
from .registration import Registrations
from .workers import Workers
from .rib import Best, Key, Rib
from .selection import View
from .status import InstanceStatus, Status
from .streams import BufferAccount, Mux
from .tunnel import LARGE_DATA_CAP, mux_settings
from .wire import GATEWAY_TIME_CAP

log = logging.getLogger("cpnd")

RECEIVE_CHUNK = 256 * 1024  # several records per read in a bulk transfer: fewer event-loop rounds
# A peer that is using its route bucket is read a record at a time: what one read brings is
# unpacked in one step and waits for tokens before the next read, and both stay short.
PACED_CHUNK = 64 * 1024
TUNNEL_HIGH_WATER = SEND_HIGH_WATER  # config.least_send_buffer keeps max_peer_send_buffer above this and one write
TUNNEL_LOW_WATER = 256 * 1024
WRITE_BATCH = 256 * 1024  # most bytes the peer writer joins into one send
# An emulated delay is applied where the bytes arrive, as a wire would: the sender writes at
# once and the receiver holds what it read until the delay has passed (at most this much).
DELAY_INBOX_BYTES = 4 * RECEIVE_CHUNK
FLUSH_ON_CLOSE_S = 1.0
LINGER_S = 0.5  # after a close, how long the peer's last bytes are read and dropped
TRIM_CHECK_S = 1.0
TRIM_AFTER_BYTES = 8 * 1024 * 1024
HEALTH_OFF_RECHECK_S = 1.0  # how often a loop with active probes off looks again (a reload may turn them on)


class Connection:
    """One TCP connection to a peer: the bytes of one core ``Link``, both ways."""

    def __init__(self, daemon: Daemon, stream: trio.SocketStream, link: Link) -> None:
        self.daemon = daemon
        self.core = daemon.core
        self.stream = stream
        self._fd = stream.socket.fileno()
        self.link = link
        self.mux: Mux | None = None
        # The core keeps a frame sent ``soon`` on a session with `tunnel-batch` for the record of the frame
        # after it in the same step; if the step ends first, ``flush`` has it sealed alone.
        self._soon = False
        self._readable = trio.Event()  # set when the core wants the peer's bytes again
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._done = trio.Event()
        self.is_down = False  # _done.is_set(), as a plain flag for the every-frame paths
        self.flushed = trio.Event()  # closed and its last bytes (the NOTIFICATION) sent or given up
        self._sending = False
        self._writable = trio.Event()
        self._inbox: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, bytes) read over a delay
        self._inbox_bytes = 0
        self._inbox_ready = trio.Event()
        self._inbox_space = trio.Event()

    @property
    def _delay_s(self) -> float:
        """The emulated one-way delay of what this connection reads. Before an inbound connection's
        OPEN names its peer, the longest configured: a keepalive read then and echoed would otherwise
        make a link's measured RTT undercut its emulated one (a min-RTT filter forgets the longer)."""
        peer = self.link.peer
        if peer is not None:
            return peer.config.emulated_rtt_ms / 2000
        return max((p.emulated_rtt_ms for p in self.daemon.config.peers), default=0.0) / 2000

    def send_tunnel(self, frame: bytes, *, flush: bool = False, soon: bool = False) -> None:
        """Seal and queue one tunnel frame (streams call this); ``flush``: the last of a burst, written
        now if the writer is idle (``flush``); ``soon``: a flushed frame follows from this same step
        (an OPEN before its request, a LOAD before its response), so the writer is not woken for it; on a
        session with `tunnel-batch` the two go in one record (tunnel.md, "Batches")."""
        data = self.core.send_tunnel(self.link, frame, soon)
        if not data:
            if soon:  # kept for the next frame's record: flushed, alone, at the end of the step at the latest
                self._soon = True
                self.daemon.held.add(self)
            return
        if self._soon:  # gone with this frame, in one batch: nothing left to flush for it
            self._soon = False
            self.daemon.held.discard(self)  # (what else is queued is written below, or held again)
        if not (flush and data) or self._sending or self.is_down:
            self.enqueue(data, wake=not (flush or soon))
            if flush:
                self.flush()
            return
        # flush, inline: what is queued (an OPEN or a LOAD sent ``soon``), then this, in one write
        queued = self._out_bytes
        if queued:
            self.daemon.held.discard(self)
            self._out.append(data)
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
        try:
            n = os.write(self._fd, data)  # the socket is non-blocking (trio's)
        except OSError:
            n = 0  # full (BlockingIOError), or broken: the writer finds out and handles it
        if n < len(data):
            self.enqueue(data[n:])
        if queued and self._out_bytes <= TUNNEL_LOW_WATER:
            self._drained()  # (with nothing queued before it, no sender or relay waited for room)

    def flush(self) -> None:
        """Write what is queued from the caller's own step when the writer task is idle: a request or
        response does not wait for the writer's turn (a wake-up, a scheduler pass and trio's send
        machinery on every hop). What the socket does not take at once stays queued for the writer."""
        self.daemon.held.discard(self)
        if self._soon:  # no frame followed it in its step: it goes alone
            self._soon = False
            data = self.core.release_tunnel(self.link)
            if data:
                self._out.append(data)
                self._out_bytes += len(data)
        if not self._out:
            return
        if self._sending or self.is_down:
            self._out_ready.set()  # the writer (or the close) takes it
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        try:
            n = os.write(self._fd, data)  # the socket is non-blocking (trio's)
        except OSError:
            self._out_ready.set()  # full (BlockingIOError), or broken: the writer finds out and handles it
            return
        self._out.clear()
        if n < len(data):
            self._out.append(data[n:])
            self._out_ready.set()
        self._out_bytes -= n
        if self._out_bytes <= TUNNEL_LOW_WATER:
            self._drained()

    def _drained(self) -> None:
        """Below the low-water mark: senders and relays waiting for room go on."""
        self._writable.set()
        if self.mux is not None and self.mux.drain_waiters:
            self.mux.drained()

    @property
    def congested(self) -> bool:
        return self._out_bytes > TUNNEL_HIGH_WATER

    async def wait_writable(self) -> None:
        """Backpressure for tunnel data: wait while too much is queued for this peer."""
        while self._out_bytes > TUNNEL_HIGH_WATER and not self._done.is_set():
            if self._writable.is_set():  # one event for every waiter: a new one each would leave the others asleep
                self._writable = trio.Event()
            await self._writable.wait()

    def down(self) -> None:
        """The core closed the link: fail its streams, stop reading, send what is left."""
        if self.mux is not None:
            self.mux.fail_all(self.link.session.closed.describe() if self.link.session.closed else "closed")
        self._writable.set()
        self.is_down = True
        self._done.set()
        self._readable.set()
        self._inbox_space.set()

    async def run(self) -> None:
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._deliverer)
                await self._done.wait()
                # Closed: give the NOTIFICATION a bounded chance to leave, then hang up.
                with trio.move_on_after(FLUSH_ON_CLOSE_S):
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

    async def _until_wanted(self) -> None:
        """Wait while the peer's UPDATEs have outrun its bucket: its bytes wait in the kernel (TCP pushes back)."""
        while not self.core.wants_data(self.link) and not self._done.is_set():
            self._readable = trio.Event()
            self.daemon.paused.add(self)
            await self._readable.wait()

    async def _reader(self) -> None:
        fd = self._fd
        clock = trio.lowlevel.current_clock()  # its own method: two calls fewer than trio.current_time()
        drained = False  # the last read took less than it asked: the socket was empty then
        while not self.is_down:
            held = self._delay_s or self._inbox  # in arrival order, even when a reload took the delay away
            if not held and not self.core.wants_data(self.link):  # (asked here first: no coroutine when it does)
                await self._until_wanted()  # over a delay the deliverer waits for this instead
            if self.is_down:
                return
            bucket = self.link.session.inbound
            # (tokens at the burst: full whatever the time, no clock reading and no refill to compute)
            full = bucket.tokens >= bucket.burst or bucket.level(clock.current_time()) >= bucket.burst
            size = RECEIVE_CHUNK if full else PACED_CHUNK
            data = await self._read(fd, size, wait_first=drained)
            drained = 0 < len(data) < size
            if held or self._inbox:
                await self._hold(data)
            else:
                self.core.receive_data(self.link, data, clock.current_time())
                self.daemon.received(self)
            if not data:
                return

    @staticmethod
    async def _read(fd: int, size: int, *, wait_first: bool = False) -> bytes:
        """What the peer sent next, ``b""`` when it closed or the connection broke: read at once, waiting
        only when nothing is there (trio's ``receive_some`` does the same through ~25 more calls).
        ``wait_first``: the last read emptied the socket, so wait for it to be readable before reading
        (a read that finds nothing is a system call and an exception on every message at low rates)."""
        if not wait_first:
            try:
                data = os.read(fd, size)  # the socket is non-blocking (trio's)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()  # it was there: others run first, as trio's does
                return data
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
                return os.read(fd, size)
            except BlockingIOError:
                continue
            except (trio.ClosedResourceError, OSError):
                return b""

    async def _hold(self, data: bytes) -> None:
        """Keep what was read until the emulated one-way delay has passed; read ahead at most
        ``DELAY_INBOX_BYTES`` (then the kernel's buffers and TCP push back, as without a delay)."""
        self._inbox.append((trio.current_time() + self._delay_s, data))
        self._inbox_bytes += len(data)
        self._inbox_ready.set()
        while self._inbox_bytes > DELAY_INBOX_BYTES and not self._done.is_set():
            self._inbox_space = trio.Event()
            await self._inbox_space.wait()

    async def _deliverer(self) -> None:
        """Hand held bytes to the core when their delay has passed (one precise timer, no spinning)."""
        while not self._done.is_set():
            while not self._inbox:
                self._inbox_ready = trio.Event()
                await self._inbox_ready.wait()
            due, data = self._inbox[0]
            if due > trio.current_time():
                await sleep_until_precisely(due)
            await self._until_wanted()
            if self._done.is_set():
                return
            self._inbox.popleft()
            self._inbox_bytes -= len(data)
            self._inbox_space.set()
            self.core.receive_data(self.link, data, trio.current_time())
            self.daemon.received(self)
            if not data:
                return

    async def _writer(self) -> None:
        while True:
            while not self._out:
                self._out_ready = trio.Event()
                await self._out_ready.wait()
            # Everything queued goes in one write (up to WRITE_BATCH bytes): streams that queued
            # records meanwhile share one system call instead of one each.
            chunks = [self._out.popleft()]
            size = len(chunks[0])
            while self._out and size + len(self._out[0]) <= WRITE_BATCH:
                chunks.append(self._out.popleft())
                size += len(chunks[-1])
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._out_bytes -= size
            # Sending from here on: what the relays woken below queue goes after this batch (their
            # flush would otherwise write it first, and a record out of order ends the session).
            self._sending = True
            if self._out_bytes <= TUNNEL_LOW_WATER:
                self._drained()
            try:
                await self.stream.send_all(data)
                self._sending = False
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._sending = False
                self._out.clear()
                self._out_bytes = 0
                self.core.receive_data(self.link, b"", trio.current_time())
                self.daemon.pump()
                self._out_ready.set()
                return
            if not self._out:
                self._out_ready.set()

    def enqueue(self, data: bytes, *, wake: bool = True) -> None:
        """Queue bytes for the peer; ``wake``: the writer sends them (else the caller flushes)."""
        if not data:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if wake:
            self._out_ready.set()
        else:
            self.daemon.held.add(self)  # flushed by the caller, or at the end of the reader's step
        # (max_peer_send_buffer is above the high-water mark: config.least_send_buffer; looked up past it only)
        if (self._out_bytes > TUNNEL_HIGH_WATER and self._out_bytes > self.daemon.config.gateway.max_peer_send_buffer
                and not self._done.is_set()):
            # The peer does not read: drop the session rather than buffer without bound.
            self._out.clear()
            self._out_bytes = 0
            self.core.close(self.link, Code.CEASE, CeaseSub.OUT_OF_RESOURCES, "send buffer full: peer is not reading")
            self.daemon.pump()


class _Instances:
    """Our own instances as the core reads them: the data plane's meters and health."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def readings(self, now: float) -> Mapping[str, Reading]:
        dp = self.d.dataplane
        out = {}
        for iid, meter in dp.meters.items():
            meter.expire(now)
            out[iid] = (round(meter.load(now), 3), round(meter.bounded_load(now), 3), round(meter.base_us))
            if self.d.workers is not None and iid not in self.d.registrations.registry.entries:  # workers call them
                out[iid] = self.d.workers.advertised(iid, meter.capacity, meter.base_us)
        # The core looks every 50 ms: the data plane's suppressed-line counts go out on the same beat.
        dp.flush_log_counts()
        return out

    def healthy(self, iid: str) -> bool:
        return self.d.dataplane.health(iid).healthy

    def own_us(self, stage: str, now: float) -> int:
        return self.d.dataplane.own.us(stage, now)


class CoreShell:
    """What a process driving a sans-IO core over peer connections does with the core's outputs (the
    daemon's gateway core; a worker's data channels, cpnd/channelio.py): bytes to each link's
    Connection, events to ``_on_event``, frames queued in a reader's step written at its end, and
    the core's one timer."""

    CONNECTION = "connection"  # what its connections are called in logs
    _where = ""  # said after "a bad tunnel frame" in logs
    core: Any
    nursery: trio.Nursery | None
    conns: dict[Any, Connection]
    paused: set[Connection]
    held: set[Connection]
    _pumping: bool
    _wake: trio.Event

    def pump(self) -> None:
        """Hand the core's outputs to the shell: bytes to their connections, events to their handlers."""
        if self._pumping:
            return  # the outer call goes on until nothing is left
        self._pumping = True
        core = self.core
        try:
            while True:
                links = core.links_with_data()
                if not links and not core.has_events():
                    break
                for link in links:
                    conn = self.conns.get(link)
                    data = core.data_to_send(link)
                    if conn is not None:
                        conn.enqueue(data)
                for event in core.events():
                    self._on_event(event)
        finally:
            self._pumping = False
        if core.timer_dirty:
            core.timer_dirty = False
            self._wake.set()
        if self.paused:
            for conn in [c for c in self.paused if c._done.is_set() or core.wants_data(c.link)]:
                self.paused.discard(conn)
                conn._readable.set()

    def flush_held(self) -> None:
        while self.held:
            self.held.pop().flush()

    def received(self, conn: Connection) -> None:
        """After the core took what ``conn`` read: its tunnel records to the Mux (those that came before
        any session event, straight from the session), then the core's outputs, then what that queued."""
        s = conn.link.session
        if s.tunnel_in:
            records, s.tunnel_in = s.tunnel_in, []
            mux = conn.mux
            if mux is not None:
                for payload in records:  # _tunnel_record, inline for every record
                    if conn.is_down:
                        break
                    try:
                        mux.handle(payload)
                    except ProtocolError as exc:
                        self._bad_frame(conn, exc)
                        break
        self.pump()
        self.flush_held()

    def _on_event(self, event: object) -> None:
        raise NotImplementedError

    def _tunnel_data(self, event: TunnelData, where: str = "") -> None:
        """A tunnel record (as a core event) for its connection's Mux."""
        conn = self.conns.get(event.link)
        if conn is not None:
            self._tunnel_record(conn, event.payload, where)

    def _tunnel_record(self, conn: Connection, payload: bytes, where: str = "") -> bool:
        """A tunnel record for ``conn``'s Mux; a bad frame ends that session (then False)."""
        if conn.mux is None or conn.is_down:
            return True
        try:
            conn.mux.handle(payload)
        except ProtocolError as exc:
            self._bad_frame(conn, exc, where)
            return False
        return True

    def _bad_frame(self, conn: Connection, exc: ProtocolError, where: str = "") -> None:
        """A bad tunnel frame ends its session."""
        log.warning("%s: peer %s sent a bad tunnel frame%s: %s", self.core.id, conn.link.session.peer_id,
                    where or self._where, exc)
        self.core.close(conn.link, exc.code, exc.subcode, exc.detail)

    async def _timer_loop(self) -> None:
        """The core's one timer: sleep until it is due (or moved earlier), fire it, pump its outputs."""
        core = self.core
        while True:
            core.handle_timer(trio.current_time())
            self.pump()
            self._wake = trio.Event()
            core.timer_dirty = False
            at = core.get_timer()
            with trio.move_on_at(math.inf if at is None else at):
                await self._wake.wait()

    async def _dial(self, dial: Dial) -> None:
        try:
            with trio.fail_after(dial.timeout_s):
                stream = await trio.open_tcp_stream(dial.address.host, dial.address.port)
        except (OSError, trio.TooSlowError) as exc:
            self.core.dial_failed(dial.peer_id, f"connect {dial.address}: {getattr(exc, 'strerror', None) or 'timed out'}",
                                  trio.current_time())
            self.pump()
            return
        link = self.core.connected(dial.peer_id, trio.current_time())
        if link is None:  # the peer dialled us meanwhile
            await stream.aclose()
            self.pump()
            return
        await self._run_connection(Connection(self, stream, link))

    async def _run_connection(self, conn: Connection) -> None:
        self.conns[conn.link] = conn
        self.pump()
        try:
            await conn.run()
        except Exception:  # a bug must cost this connection, never the process (run's clean-up has told the core)
            log.exception("%s: %s %s failed", self.core.id, self.CONNECTION, conn.link.remote)

    def _connection_gone(self, conn: Connection) -> None:
        self.conns.pop(conn.link, None)
        self.paused.discard(conn)
        self.held.discard(conn)
        self.core.link_gone(conn.link, trio.current_time())
        self.pump()


class Daemon(CoreShell):
    """One gateway's process: its core, the data plane, and the sockets of both."""

    def __init__(self, config: Config) -> None:
        g = config.gateway
        # Per-origin sequence numbers start from the wall clock so a restarted gateway
        # still outranks what it advertised before (protocol-spec/routing.md).
        self.core = Gateway(config, _Instances(self), 0.0, seq=time_ns() // 1000)
        self.conns: dict[Link, Connection] = {}
        self.paused: set[Connection] = set()  # readers waiting for the core to want bytes again
        # Connections with frames queued from a step that did not write them: a reader's step writes
        # them at its end (what a transit relayed, in one write), a task's own flush before that.
        self.held: set[Connection] = set()
        self.started_at = 0.0
        self.tunnel_bytes = BufferAccount()  # tunnel DATA held for every peer together
        self.listen_port: int | None = None
        self.metrics_port: int | None = None
        self.nursery: trio.Nursery | None = None
        self._wake = trio.Event()  # the core's timer may have moved earlier
        self._pumping = False
        self.metrics = Metrics(g.id, self.status)
        self.dataplane = DataPlane(self, HttpLimits(
            max_body_bytes=g.max_body_bytes, header_timeout_s=g.http_header_timeout_ms / 1000,
            idle_timeout_s=g.http_idle_timeout_ms / 1000, max_clients=g.max_http_clients,
            max_clients_per_ip=g.max_http_clients_per_ip, h2_max_streams=g.http2_max_streams,
        ))
        self.clients = ClientTable.from_config(config)  # [[clients]]: keys and quotas at the ingress
        self.registrations = Registrations(self)  # instances that join by cpnctl register or HTTP
        self.workers = Workers(self) if g.workers > 1 else None  # users served by N processes (README, "Workers")
        if self.workers is not None:  # workers: fed the Loc-RIB as it changes, handed peers' streams for our instances
            self.core.observe = self.workers.rib_changed

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def id(self) -> str:
        return self.core.id

    @property
    def rib(self) -> Rib:
        return self.core.rib

    @property
    def stats(self) -> collections.Counter[str]:
        return self.core.stats

    # ---- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .control import serve_control

        g = self.config.gateway
        # Signals are ours from the first instant to the last: a second SIGTERM during
        # the drain must not fall back to the default action and skip the clean-up.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            self.started_at = trio.current_time()
            self.core.start(self.started_at)  # our routes; the dials wait for the timer loop
            self._fit_descriptors()
            listeners = await open_listeners("listen", g.listen.host, g.listen.port, str(g.listen))
            self.listen_port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await nursery.start(serve_control, self, g.control_socket)
                if self.workers is not None:
                    await nursery.start(self.workers.run)
                elif g.http_listen is not None:
                    await nursery.start(self.dataplane.serve)
                if g.https_listen is not None and self.workers is None:
                    await nursery.start(functools.partial(self.dataplane.serve, tls=True))
                await nursery.start(self.registrations.run)
                if g.metrics_listen is not None:
                    self.metrics_port = await nursery.start(serve_metrics, self.metrics, g.metrics_listen)
                for listener in listeners:
                    nursery.start_soon(serve_accepting, listener, functools.partial(self._accept, nursery), self.edge_event,
                                       "peering")
                nursery.start_soon(self._edge_log_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._memory_loop)
                nursery.start_soon(self._health_loop)
                log.info("%s up: peers on %s, http on %s%s, metrics on %s, control socket %s; %d peers, %d local instances",
                         self.id, attrs.evolve(g.listen, port=self.listen_port),
                         attrs.evolve(g.http_listen, port=self.dataplane.http_port) if g.http_listen else "-",
                         f", https on {attrs.evolve(g.https_listen, port=self.dataplane.https_port)}" if g.https_listen else "",
                         attrs.evolve(g.metrics_listen, port=self.metrics_port) if g.metrics_listen else "-",
                         g.control_socket, len(self.core.peers), len(self.rib.local))
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
        conns = list(self.conns.values())
        for c in conns:
            if restarting:
                self.core.close(c.link, Code.CEASE, CeaseSub.RESTARTING, "gateway restarting: keep my routes")
            else:
                self.core.close(c.link, Code.CEASE, CeaseSub.ADMIN_SHUTDOWN, "gateway shutting down")
        self.pump()
        with trio.move_on_after(FLUSH_ON_CLOSE_S + 0.1):
            for c in conns:
                await c.flushed.wait()

    def reload(self, trigger: str = "cpnctl reload") -> str:
        """Re-read the config file and apply it, logging what changed (or why not); the summary.

        Sessions whose peer entry did not change are untouched, in-flight requests too.
        Raises ConfigError (nothing applied) for an invalid file or a change that needs a restart.
        """
        try:
            new = load_config(self.config.source)
            self.core.check_reload(new)
        except ConfigError as exc:
            log.error("%s: %s: new config refused, the old one keeps running: %s", self.id, trigger, exc)
            raise
        new = self.registrations.reconfigure(new)  # registered instances stay
        self.clients.reconfigure(new.clients, new.gateway)
        self.dataplane.reconfigure(new)  # first: the core's new routes read the new instances' health
        summary = self.core.reload(new, trio.current_time())
        if self.workers is not None:
            self.workers.reload()
        self.pump()
        log.info("%s: %s: %s", self.id, trigger, summary)
        return summary

    def apply_registry(self, changed: Iterable[str]) -> None:
        """Registered instances joined, changed or left (cpnd/registration.py): the instance half of a
        reload, re-advertising only those that ``changed``."""
        config = self.registrations.registry.merge(self.config)
        self.dataplane.reconfigure(config)  # first: the core's new routes read the new instances' health
        self.core.instances_changed(config, changed, trio.current_time())
        self.pump()

    def health_changed(self, iid: str, healthy: bool) -> None:
        """An instance went down or came back (the data plane's health checks): the core re-advertises."""
        self.core.health_changed(iid, healthy, trio.current_time())
        self.pump()

    # ---- the core's timer and outputs

    def _on_event(self, event: object) -> None:
        if isinstance(event, TunnelData):
            self._tunnel_data(event)
        elif isinstance(event, LinkUp):
            conn = self.conns.get(event.link)
            s = event.link.session
            if conn is not None and s.tunnel_enabled and event.link.peer is not None:
                ours = s.config.tunnel
                assert ours is not None
                settings = mux_settings(ours, s.peer_tunnel, LARGE_DATA_CAP in s.agreed_caps,
                                        timed_load=GATEWAY_TIME_CAP in s.agreed_caps)
                on_open = self.workers.on_peer_stream if self.workers is not None else self.dataplane.on_stream  # workers
                conn.mux = Mux(conn, event.link.peer.config.id, event.link.initiated, on_open, settings, self.tunnel_bytes)
                s.tunnel_direct = True  # its records go straight to the Mux from now on (received)
                conn.mux.sealer = stream_sealer(self.rib, self.config, s.agreed_caps, event.link.peer.config.id)
                if self.workers is not None:  # workers: a sealed stream to us is opened by its owner worker
                    self.workers.adopt(conn.mux)
        elif isinstance(event, LinkDown):
            conn = self.conns.get(event.link)
            if conn is not None:
                conn.down()
        elif isinstance(event, Dial):
            assert self.nursery is not None
            self.nursery.start_soon(self._dial, event)

    # ---- connections

    def established_conn(self, peer_id: str) -> Connection | None:
        link = self.core.established_link(peer_id)
        return self.conns.get(link) if link is not None else None

    def _accept(self, nursery: trio.Nursery, stream: trio.SocketStream, *, sorted_out: bool = False) -> None:
        """A pre-auth slot for an inbound connection (the oldest pending one's, if need be), and its task."""
        if not sorted_out and self.workers is not None and self.workers.fd_socks:  # workers: a peer's data channel?
            nursery.start_soon(self.workers.sort_out, stream, functools.partial(self._accept, nursery, sorted_out=True))
            return
        try:
            source = stream.socket.getpeername()[0]
        except OSError:
            stream.socket.close()  # it went away already
            return
        link = self.core.accept(source, _peername(stream), trio.current_time())
        conn = self.conns[link] = Connection(self, stream, link)  # before any pump: its bytes and events are its own
        nursery.start_soon(self._run_connection, conn)

    # ---- status

    def status(self) -> Status:
        """This gateway now, for the control socket and the metrics endpoint."""
        now = trio.current_time()
        core, dp = self.core, self.dataplane
        instances = []
        for svc in self.config.services:
            for inst in svc.instances:
                meter = dp.meters[inst.id]
                load, bload, comp, inflight = meter.load(now), meter.bounded_load(now), meter.base_us, meter.inflight
                if self.workers is not None and inst.id not in self.registrations.registry.entries:  # the workers' reports
                    load, bload, comp = self.workers.advertised(inst.id, meter.capacity, meter.base_us)
                    inflight = self.workers.inflight(inst.id)
                instances.append(InstanceStatus(
                    service=svc.path, instance=inst.id, url=inst.url, healthy=dp.health(inst.id).healthy,
                    load=load, bounded_load=bload, compute_latency_ms=comp / 1000,
                    capacity=inst.capacity, price=inst.price, inflight=inflight, refused=meter.refused))
        gauges = {
            "routes_withheld": core.routes_withheld,
            "tunnel_streams": sum(len(c.mux.streams) for c in self.conns.values() if c.mux is not None),
            "http_clients": dp.clients + (self.workers.clients if self.workers is not None else 0),
            "http_clients_idle": dp.slots.idle,  # no whole request head yet: may be taken back
            "http_clients_max": dp.slots.limit,  # max_http_clients, as fitted to the descriptor limit
            "preauth_connections": len(core.preauth),
            "pooled_instance_connections": sum(len(q) for q in dp.pool.values()),
        }
        # This gateway's own processing per request by stage, as measured now and as its routes carry it
        # (protocol-spec/selection.md, "Own time"; routing.md, "Gateway time").
        times = {f"own_{stage}_ms": round(dp.own.us(stage, now) / 1000, 3) for stage in Stage.ALL}
        times |= {"advertised_egress_ms": round(self.rib.egress_us / 1000, 3),
                  "advertised_transit_ms": round(self.rib.transit_us / 1000, 3)}
        trust = self.rib.trust
        if trust is not None:  # origin validation's work: signatures made and checked (cache hits cost none)
            times |= {"origin_signs": self.rib.signer.signs if self.rib.signer else 0, "origin_verifies": trust.verifies,
                      "origin_verify_cache_hits": trust.cache_hits, "certificates": len(trust.certs)}
        return Status(
            id=self.id, uptime_s=round(now - self.started_at, 3),
            ports={"listen": self.listen_port, "http_listen": dp.http_port, "https_listen": dp.https_port,
                   "metrics_listen": self.metrics_port},
            peers=tuple(core.peer_status(now)), routes=len(self.rib), paths=core.paths, services=len(self.rib.by_service),
            instances=tuple(instances), gauges=gauges, session_totals=dict(core.session_totals()),
            stats=dict(core.stats + self.rib.counters), times=times,
            http=dict(dp.stats + self.workers.stats() if self.workers is not None else dp.stats),
            workers=self._workers_status(now),
            clients={cid: {r: st.counts[r] for r in ("allowed", "forbidden", "rate_limited")}
                     for cid, st in self.clients.states.items()},
            client_totals=dict(self.clients.counts), registered_instances=len(self.registrations.registry))

    def _workers_status(self, now: float) -> list[dict[str, Any]]:
        """The processes serving users (this one alone when ``workers`` is 1)."""
        if self.workers is not None:
            return self.workers.status()
        dp = self.dataplane
        return [{"index": 0, "pid": os.getpid(), "alive": True, "restarts": 0, "up_s": round(now - self.started_at, 3),
                 "http_clients": dp.clients, "inflight": dp.inflight, "requests": dp.stats["requests"],
                 "report_age_ms": 0}]

    def estimate(self, key: Key, best: Best) -> View:
        """What the ingress expects of a request to ``key`` now (``show routes``)."""
        return self.dataplane.estimate(key, best)

    def edge_event(self, kind: str, line: str) -> None:
        """A failed accept or a refusal (peering, control): in full when the first of a spell, else counted."""
        if self.core.edge_tally.note(kind, trio.current_time()):
            log.warning("%s: %s (more are counted: one line a second)", self.id, line)

    # ---- chores

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

    async def _memory_loop(self) -> None:
        """After a burst of tunnel buffering has drained, hand the freed memory back (once a second at most)."""
        while True:
            await trio.sleep(TRIM_CHECK_S)
            peak = self.tunnel_bytes.take_peak()
            if peak >= TRIM_AFTER_BYTES and self.tunnel_bytes.buffered <= peak // 4 and release_free_memory():
                self.stats["memory_trims"] += 1

    async def _edge_log_loop(self) -> None:
        """Once a second, the lines that sum up floods at the edges (peering, HTTP, metrics)."""
        while True:
            await trio.sleep(1.0)
            line = self.core.edge_tally.flush(trio.current_time())
            if line:
                log.warning("%s: %s", self.id, line)
            self.dataplane.flush_edge_log()
            self.metrics.flush_edge_log()

    def _fit_descriptors(self) -> None:
        """Raise the descriptor limit to the hard one; fit the pending handshakes and then
        max_http_clients under it, with a reserve for everything else."""
        from .control import MAX_CLIENTS as CONTROL_CLIENTS

        before, nofile = raise_nofile_limit()
        self.core.nofile = nofile
        if nofile != before:
            log.info("%s: descriptor limit (RLIMIT_NOFILE) raised from %d to %d", self.id, before, nofile)
        g = self.config.gateway
        preauth = self.core.preauth
        preauth.limit = preauth_budget(nofile, g.max_preauth_connections)
        if preauth.limit < g.max_preauth_connections:
            log.warning("%s: max_preauth_connections lowered from %d to %d: a quarter of the descriptor limit (%d)",
                        self.id, g.max_preauth_connections, preauth.limit, nofile)
        local = sum(len(s.instances) for s in self.config.services)
        reserve = descriptor_reserve(peers=len(self.core.peers), preauth=preauth.limit, local_instances=local,
                                     pool_idle_per_instance=self.dataplane.limits.pool_idle_per_instance,
                                     control_clients=CONTROL_CLIENTS, metrics_clients=METRICS_CLIENTS)
        budget = http_client_budget(nofile, reserve, local)
        if (g.http_listen or g.https_listen) is not None and budget < g.max_http_clients:
            log.warning("%s: max_http_clients lowered from %d to %d: the descriptor limit is %d and %d are kept for "
                        "peers, handshakes, instances, control and metrics (raise LimitNOFILE / ulimit -n)",
                        self.id, g.max_http_clients, budget, nofile, reserve)
            self.dataplane.slots.limit = budget


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

