"""The control process's side of ``[gateway] workers = N``: the shared listeners, N worker
processes (cpnd/worker.py) kept running, and what they report (cpnd/fleet.py).

Each worker gets its own SO_REUSEPORT socket on http_listen (and https_listen), opened here and
kept open here, so the kernel spreads new connections over the workers and a worker that dies
loses none that were still queued: its replacement accepts them from the same socket.

With peers, each worker also gets a channel (cpnd/handoff.py): the Loc-RIB is fed to it, its
streams for peers' instances come back on it to be relayed on our sessions, and peers' streams for
our instances go to a worker on it, so that every call to our instances is made within a worker's share.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import trio

from .aio import ListenError
from .config import Address
from .fleet import MAX_REPORT_BYTES, MAX_SIBLING_KEYS, REPORT_INTERVAL_S, Report, WorkerState, loads
from .histogram import Latencies, add_latencies
from .gateway import session_config
from .handoff import LOW_WATER, Channel, PartSealer, owner, pass_on, peek_hello, relay_sealer, still_sealed
from .ribfeed import FeedOut, add_sends, others_message, relay_total
from .streams import TunnelStream
from .tunnel import SEALED_CAP, ResetCode

if TYPE_CHECKING:
    from .config import Config


class Daemon(Protocol):
    """What the workers' supervisor needs of the control process's daemon."""

    id: str
    config: Config
    stats: collections.Counter[str]
    metrics: Any  # its requests counter takes the workers' counts
    dataplane: Any  # its users' ports, as the workers' listeners bound them; transit for the workers' streams
    core: Any  # the gateway core: its RIB and sessions, fed to the workers
    registrations: Any  # registered instances: known to this process only
    tunnel_bytes: Any  # streams.BufferAccount of every tunnel's buffered bytes
    nursery: trio.Nursery | None

log = logging.getLogger("cpnd.workers")

RESPAWN_PAUSE_S = 1.0  # a worker that dies within this of its start is restarted only after it (a crash loop)
PEEK_S = 0.1  # how long an inbound connection's first frame is waited for before it is accepted as ever
FEED_POLL_S = 0.25  # a worker hears of a session up or down at most this late (route changes: at once)
BACKLOG = 1024


def reuseport_sockets(what: str, addr: Address, n: int) -> list[socket.socket]:
    """``n`` listening sockets on ``addr`` (port 0: one the OS picks, the same for all), SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    port, out = addr.port, []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr.host, port))
            s.listen(BACKLOG)
            port = s.getsockname()[1]
    except OSError as exc:
        for s in out:
            s.close()
        raise ListenError(what, str(addr), exc.strerror or str(exc)) from None
    return out


class Workers:
    """N worker processes serving the gateway's users; restarted when they die, stopped on shutdown."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        daemon.metrics.more_latencies = self.latencies  # /metrics' histogram counts the workers' requests too
        self.n = daemon.config.gateway.workers
        self.slots = [WorkerState(i) for i in range(self.n)]
        self.socks: dict[bool, list[socket.socket]] = {}
        self.procs: dict[int, trio.Process] = {}
        self.stopping = False
        self._running = 0
        self._done = trio.Event()
        self.channels: dict[int, Channel] = {}  # with peers: each live worker's channel, by slot
        self.fd_socks: dict[int, socket.socket] = {}  # with peers: where peers' data channels go to each worker
        self._peeking = 0  # inbound connections whose first frame we wait for (sort_out)
        self._rib_event = trio.Event()  # set (and replaced) when the Loc-RIB changed: the feeds wake
        self._feeds: dict[int, FeedOut] = {}
        self._rr = itertools.count()
        self._told_sends = False  # the last relay had sends: the next one says if they stopped

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the listeners, start the workers; return once all have ended after ``stop``."""
        g = self.d.config.gateway
        users = self.d.dataplane.users
        if g.http_listen is not None:
            self.socks[False] = reuseport_sockets("http_listen", g.http_listen, self.n)
            users.http_port = self.socks[False][0].getsockname()[1]
        if g.https_listen is not None:
            self.socks[True] = reuseport_sockets("https_listen", g.https_listen, self.n)
            users.https_port = self.socks[True][0].getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                for st in self.slots:
                    self._running += 1
                    nursery.start_soon(self._supervise, st)
                nursery.start_soon(self._relay_loop)
                task_status.started()
        finally:
            for socks in self.socks.values():
                for s in socks:
                    s.close()
            self._done.set()

    def stop(self) -> None:
        """Drain every worker (each stops accepting, finishes its requests, exits)."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)

    async def drained(self) -> None:
        await self._done.wait()

    def reload(self) -> None:
        """Workers re-read the config file (services, clients); restart-only keys stay as they were."""
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)

    async def _supervise(self, st: WorkerState) -> None:
        try:
            while not self.stopping:
                await self._one(st)
                if self.stopping:
                    break
                st.restarts += 1
                self.d.stats["worker_restarts"] += 1
                log.warning("%s: worker %d ended; restarting it", self.d.id, st.index)
                if trio.current_time() - st.started_at < RESPAWN_PAUSE_S:
                    await trio.sleep(RESPAWN_PAUSE_S)
        finally:
            self._running -= 1

    async def _one(self, st: WorkerState) -> None:
        """Run one process in ``st`` until it ends, reading its reports."""
        fds = {tls: socks[st.index].fileno() for tls, socks in self.socks.items()}
        r, w = os.pipe()
        # The channel: the Loc-RIB fed to the worker, and its streams to peers and to instances
        # registered here (the control process calls those: README, "Workers").
        ours, theirs = socket.socketpair()
        # Peers' data channels are handed over on a socket of their own (SCM_RIGHTS), one connection a message.
        fd_ours, fd_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if self.d.config.peers else (None, None)
        try:
            argv = [sys.executable, "-m", "cpnd.worker", str(self.d.config.source), str(st.index), str(self.n),
                    str(fds.get(False, -1)), str(fds.get(True, -1)), str(w), "1" if st.restarts else "0",
                    str(theirs.fileno()), str(fd_theirs.fileno() if fd_theirs is not None else -1)]
            extra = tuple(s.fileno() for s in (theirs, fd_theirs) if s is not None)
            proc = await trio.lowlevel.open_process(argv, pass_fds=(*fds.values(), w, *extra))
        except BaseException:
            os.close(r)
            for s in (ours, fd_ours):
                if s is not None:
                    s.close()
            raise
        finally:
            os.close(w)
            for s in (theirs, fd_theirs):
                if s is not None:
                    s.close()
        if fd_ours is not None:
            fd_ours.setblocking(False)
            self.fd_socks[st.index] = fd_ours
        self.procs[st.index] = proc
        st.started(proc.pid, trio.current_time())
        if self.stopping:
            proc.send_signal(signal.SIGTERM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_channel, st, ours)
                async with trio.lowlevel.FdStream(r) as reports:
                    await self._read(st, reports)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:  # we are cancelled: the daemon is going down
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            if fd_ours is not None:
                self.fd_socks.pop(st.index, None)
                fd_ours.close()
            del self.procs[st.index]
            st.ended()

    # ---- with peers: the channels

    async def _run_channel(self, st: WorkerState, sock: socket.socket) -> None:
        """The control's end of one worker's channel: its streams relayed as a transit's, the RIB fed to it."""
        g = self.d.config.gateway
        ch = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), f"worker{st.index}", initiator=False,
                     on_open=self._from_worker, limits=session_config(self.d.config).tunnel,
                     max_buffer=g.max_peer_send_buffer, account=self.d.tunnel_bytes)
        rib = self.d.core.rib
        if rib.opener is not None:
            ch.mux.sealer = relay_sealer(self.d.id, rib.opener, self._registered)
        self.channels[st.index] = ch
        self._feeds[st.index] = FeedOut()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed, ch, self._feeds[st.index])
                await ch.run()
                nursery.cancel_scope.cancel()
        finally:
            self.channels.pop(st.index, None)
            self._feeds.pop(st.index, None)

    def rib_changed(self, keys: set[Any], now: float) -> None:
        """The core's Loc-RIB changed (``Gateway.observe``): every worker is told, as it reads."""
        for feed in self._feeds.values():
            feed.mark(keys)
        event, self._rib_event = self._rib_event, trio.Event()
        event.set()

    def peers(self) -> dict[str, bool]:
        """The peers with an established session, and whether it takes sealed streams."""
        out = {}
        for pid in self.d.core.peers:
            link = self.d.core.established_link(pid)
            if link is not None:
                out[pid] = SEALED_CAP in link.session.agreed_caps
        return out

    async def _feed(self, ch: Channel, feed: FeedOut) -> None:
        """Send the worker the Loc-RIB (a snapshot, then what changed) as fast as it reads, never
        more than LOW_WATER queued: the backlog is the set of changed keys, bounded by the RIB."""
        rib = self.d.core.rib
        while not ch.done.is_set():
            changed = self._rib_event  # taken first: a change while we send sets this one
            xk = rib.opener.key.private_bytes_raw() if rib.opener is not None else None
            while (data := feed.take(rib, self.peers(), trio.current_time(), xk=xk)) is not None:
                ch.send_rib(data)
                while ch.queued > LOW_WATER and not ch.done.is_set():
                    ch.drained = trio.Event()
                    await ch.drained.wait()
            with trio.move_on_after(FEED_POLL_S):
                await changed.wait()

    async def sort_out(self, stream: trio.SocketStream, accept: Callable[[trio.SocketStream], None]) -> None:
        """Wait (up to PEEK_S, at most max_preauth_connections at once) for an inbound connection's
        first frame without taking it: a peer's data channel goes to a worker, anything else to ``accept``."""
        if self._peeking >= self.d.config.gateway.max_preauth_connections:
            accept(stream)
            return
        self._peeking += 1
        try:
            hello = None
            with trio.move_on_after(PEEK_S):
                while True:
                    await trio.lowlevel.wait_readable(stream.socket)
                    hello, complete = peek_hello(stream.socket.fileno())
                    if complete:
                        break
                    await trio.sleep(PEEK_S / 10)  # part of a frame: what is there stays readable
        except (OSError, trio.ClosedResourceError):
            hello = None
        finally:
            self._peeking -= 1
        if hello is None or not self._take_channel(stream, hello):
            accept(stream)

    def _take_channel(self, stream: trio.SocketStream, hello: Any) -> bool:
        """A HELLO with `dc` from a configured peer: hand its socket to a worker (round robin),
        which runs the handshake and the data channel itself (no process between the peer's worker
        and ours). False: not one, or no worker takes it: the daemon accepts it as ever."""
        if self.stopping or not self.fd_socks or not hello.data or hello.id not in self.d.core.peers:
            return False
        live = sorted(self.fd_socks)
        for k in range(len(live)):
            slot = live[(next(self._rr) + k) % len(live)]
            try:
                socket.send_fds(self.fd_socks[slot], [b"c"], [stream.socket.fileno()], socket.MSG_DONTWAIT)
            except OSError:  # that worker is gone or not reading: the next one
                continue
            self.d.stats["data_channels_handed"] += 1
            stream.socket.close()  # the worker has its own descriptor of the connection now
            return True
        return False

    def _registered(self, ext: Any) -> bool:
        return ext.instance in self.d.registrations.registry.entries

    def adopt(self, mux: Any) -> None:
        """A peer session's Mux (the daemon's LinkUp): a sealed stream for one of our instances is
        opened by its owner worker only (handoff.owner), so the replay window it meets is one."""
        rib = self.d.core.rib
        if mux.sealer is not None:
            mux.sealer = PartSealer(mux.sealer, lambda: rib.opener, self._registered)

    def _from_worker(self, stream: TunnelStream) -> None:
        """A stream a worker opened on its channel: towards a peer (relayed as a transit), or a peer's
        sealed stream for our instances that worker does not own (to the owner)."""
        if still_sealed(stream) and stream.ext is not None and stream.ext.origin == self.d.id:
            self.on_peer_stream(stream)
            return
        self.d.dataplane.on_stream(stream)

    def on_peer_stream(self, stream: TunnelStream) -> None:
        """A peer's stream (the daemon's muxes call this): for one of our instances, handed to a
        worker (its share of the instance's bounds admits it); anything else as without workers."""
        ext = stream.ext
        live = [i for i, ch in self.channels.items() if not ch.done.is_set()]
        if (self.stopping or ext is None or ext.origin != self.d.id or self.d.nursery is None
                or ext.instance in self.d.registrations.registry.entries):  # registered: this process alone calls it
            self.d.dataplane.on_stream(stream)
            return
        if not live:  # our instances are called from workers only: no share of them is this process's
            stream.reset(ResetCode.REFUSED, False, f"{self.d.id}: no worker to take it now")
            return
        if still_sealed(stream):  # its owner opens it, whichever session or channel it came on
            slot = owner(ext.eph, ext.request_id, self.n)  # type: ignore[arg-type]
            if slot not in live:
                stream.reset(ResetCode.REFUSED, False, f"{self.d.id}: its worker is not up now")
                return
        else:
            slot = self._pick(live, ext.instance)
        self.d.nursery.start_soon(self._hand, stream, self.channels[slot])

    def _pick(self, live: list[int], iid: str) -> int:
        """The worker that admitted the fewest requests to ``iid`` in its last reported second (in turn when even)."""
        start = next(self._rr)
        order = [live[(start + k) % len(live)] for k in range(len(live))]

        def admitted(i: int) -> int:
            r = self.slots[i].report
            return r.loads[iid].arrivals if r is not None and iid in r.loads else 0

        return min(order, key=admitted)

    async def _hand(self, stream: TunnelStream, ch: Channel) -> None:
        self.d.stats["handed_to_workers"] += 1
        await pass_on(self.d.dataplane.plane, stream, ch.mux, self.d.dataplane.limits.body_idle_timeout_s, ch.name)

    async def _read(self, st: WorkerState, reports: trio.lowlevel.FdStream) -> None:
        unpacker = msgpack.Unpacker(max_buffer_size=MAX_REPORT_BYTES, strict_map_key=False)
        while data := await reports.receive_some(65536):
            try:
                unpacker.feed(data)
                for obj in unpacker:
                    self._take(st, Report.decode(obj))
            except (ValueError, msgpack.UnpackException) as exc:  # a bug in the worker: its counts stop here
                log.error("%s: worker %d sent a bad report (%s); no more are read", self.d.id, st.index, exc)
                while await reports.receive_some(65536):
                    pass
                return

    def _take(self, st: WorkerState, report: Report) -> None:
        """A worker's report: its per-request counts go into our metrics as the increments since the last."""
        before = st.report.requests if st.report is not None else {}
        metrics = self.d.metrics
        for key, n in report.requests.items():
            if n > before.get(key, 0):
                service, instance, status = key
                metrics.requests.labels(service, instance, str(status)).inc(n - before.get(key, 0))
        st.report, st.reported_at = report, trio.current_time()

    async def _relay_loop(self) -> None:
        # Once a report interval, not on every report: relayed on each, N workers cost each one
        # N - 1 messages an interval, and the control N x (N - 1) sums of N reports.
        while not self.stopping:
            await trio.sleep(REPORT_INTERVAL_S)
            self._relay_sends()

    def _relay_sends(self) -> None:
        """Tell each worker what the others send where (their last reports), so that each one's
        estimate of a peer's instance counts every worker's sends (load.SendAccount.siblings)."""
        sends = {st.index: st.report.sends for st in self.slots if st.report is not None}
        if not any(sends.values()) and not self._told_sends:
            return  # nothing sent, nothing sent before: the workers know
        self._told_sends = any(sends.values())
        # Ours too: `show routes --json` estimates as the workers do (the control process serves no users).
        everyone = add_sends(sends.values())  # added up once, for us and (its busiest) for the workers
        self.d.dataplane.plane.account.siblings(everyone, trio.current_time())
        total = relay_total(everyone, MAX_SIBLING_KEYS)  # each worker's share is it less its own
        for st in self.slots:
            ch = self.channels.get(st.index)
            if ch is None or ch.queued > LOW_WATER:
                continue  # a worker that does not read has the older counts until it does
            ch.send_rib(others_message(total, sends.get(st.index, {})))

    # ---- what status, metrics and the load loop read

    def status(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [st.status(now) for st in self.slots]

    def latencies(self) -> Latencies:
        """Every worker's latency histogram, those that ended in each slot included."""
        out: Latencies = {}
        for st in self.slots:
            add_latencies(out, st.latencies())
        return out

    def stats(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for st in self.slots:
            out.update(st.stats())
        return out

    @property
    def clients(self) -> int:
        return sum(st.report.clients for st in self.slots if st.report is not None)

    def inflight(self, iid: str) -> int:
        return loads(self.slots, iid)[2]

    def advertised(self, iid: str, capacity: float, base_us: float) -> tuple[float, float, float]:
        """An instance's (load, bounded load, compute µs) to advertise, from every worker's report."""
        arrivals, bounded, _, base = loads(self.slots, iid)
        return round(arrivals / capacity, 3), round(bounded / capacity, 3), round(base if base is not None else base_us)
