"""One data-plane worker process (``[gateway] workers = N``): users on the listeners the control
process hands it, planned over its own RIB of our instances, called with its share of their bounds.

Started by cpnd/workers.py as ``python -m cpnd.worker CONFIG INDEX N HTTP_FD HTTPS_FD REPORT_FD RESTARTED CHANNEL_FD
HANDED_FD`` (-1: no such listener, or no peers; RESTARTED 1: it replaces one that died); reports its counts on REPORT_FD
every fleet.REPORT_INTERVAL_S. With peers, CHANNEL_FD is its channel to the control process (cpnd/handoff.py): the
Loc-RIB comes in on it, and streams for peers go out on it until the worker's own data channels to them are up
(cpnd/channelio.py); on HANDED_FD come the peers' data channels the control process hands it (SCM_RIGHTS). SIGTERM drains it (drain_timeout_ms), SIGHUP re-reads
the config; it drains and ends too when the control process is gone (its report pipe or channel breaks).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .channelio import ChannelIO
from .clients import ClientTable
from .config import Config, load_config
from .dataplane import DataPlane, HttpLimits
from .errors import ConfigError
from .fleet import MAX_SIBLING_KEYS, REPORT_INTERVAL_S, InstanceLoad, Report, hold_predecessors_share, worker_config
from .histogram import LatencyHistogram
from .gateway import session_config
from .handoff import Channel, PartSealer, owner, pass_on, still_sealed, worker_sealer
from .names import service_label
from .rib import Rib
from .ribfeed import Mirror, read_siblings
from .seal import Opener
from .wire import RouteAdv

log = logging.getLogger("cpnd.worker")

SNAPSHOT_WAIT_S = 5.0  # at most this long without users at start, for the control's RIB snapshot



class _Counts:
    """What the data plane observes per request, counted for the control process's metrics."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency = LatencyHistogram()

    def observe(self, service: str, instance: str | None, status: int, seconds: float | None) -> None:
        key = (service, instance or "", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None:
            self.latency.observe(service, seconds)

    def edge_event(self, kind: str, line: str) -> None:
        pass


class WorkerGateway:
    """The ``plane.Gateway`` a worker's data plane serves: our own instances, and with peers the
    control's Loc-RIB mirrored (cpnd/ribfeed.py), reached through its channel to the control process."""

    def __init__(self, config: Config, index: int, n: int) -> None:
        self.index, self.n = index, n
        self.config = worker_config(config, n)
        self.id = config.gateway.id
        self.rib = Rib(self.id)
        self.nursery: trio.Nursery | None = None
        self.metrics = _Counts()
        self.clients = ClientTable.from_config(self.config)
        self.mirror = Mirror()
        self.data_channels = ChannelIO(self.config, self.rib, n=n, on_stream=self._handed, owns=self.owns) if config.peers else None
        self._synced = trio.Event()
        self.channel: Channel | None = None
        g = self.config.gateway
        self.dataplane = DataPlane(self, HttpLimits(
            max_body_bytes=g.max_body_bytes, header_timeout_s=g.http_header_timeout_ms / 1000,
            idle_timeout_s=g.http_idle_timeout_ms / 1000, max_clients=g.max_http_clients,
            max_clients_per_ip=g.max_http_clients_per_ip,
        ))

    def established_conn(self, peer: str) -> Any:
        """Our data channel to ``peer``, else the channel to the control process, which relays to
        ``peer`` while its session is up; ``peer`` our own id: an instance registered at the control
        process (ribfeed.Mirror.apply), which serves it as its egress (the only process calling it)."""
        if peer == self.id:
            ch = self.channel
            if ch is None or ch.done.is_set():
                return None
            self.dataplane.stats["streams_to_registered"] += 1
            return ch
        if peer not in self.mirror.peers:
            return None
        direct = self.data_channels.conn(peer) if self.data_channels is not None else None
        if direct is not None:
            self.dataplane.stats["streams_on_data_channels"] += 1
            return direct
        ch = self.channel
        if ch is None or ch.done.is_set():
            return None
        self.dataplane.stats["streams_via_control"] += 1
        return ch

    def _on_rib(self, payload: bytes) -> None:
        self.mirror.apply(self.rib, payload, trio.current_time())
        if self.rib.opener is None and self.mirror.xk is not None:  # peers' sealed streams to our instances
            self.rib.opener = Opener(X25519PrivateKey.from_private_bytes(self.mirror.xk))
        if self.data_channels is not None:
            self.data_channels.want(self.mirror.peers)
        if self.mirror.synced:
            self._synced.set()

    def _on_siblings(self, payload: bytes) -> None:
        self.dataplane.stats["sibling_updates"] += 1
        self.dataplane.plane.account.siblings(read_siblings(payload), trio.current_time())  # type: ignore[arg-type]

    def health_changed(self, iid: str, healthy: bool) -> None:
        log.warning("%s/worker %d: instance %s is %s", self.id, self.index, iid, "healthy again" if healthy else "unhealthy")
        self.set_local()

    def set_local(self) -> None:
        self.rib.set_local([RouteAdv(
            service=s.path, instance=i.id, origin=self.id, seq=1, label=service_label(s.path), path=(self.id,),
            latency_us=0, capacity=i.capacity, load=0.0, price=i.price, compute_us=int(i.compute_latency_ms * 1000),
            bload=0.0, down=not self.dataplane.health(i.id).healthy, gateway_us=self.rib.egress_us,
        ) for s in self.config.services for i in s.instances], trio.current_time())

    def reload(self) -> None:
        try:
            config = load_config(self.config.source)
        except ConfigError as exc:
            log.warning("%s/worker %d: reload refused: %s", self.id, self.index, exc)
            return
        self.config = worker_config(config, self.n)
        self.dataplane.reconfigure(self.config)
        if self.data_channels is not None:  # peers added, changed or removed: their channels follow
            self.data_channels.core.reconfigure(self.config)
            self.data_channels.config = self.config
            self.data_channels.want(self.mirror.peers)
        self.clients.reconfigure(self.config.clients, self.config.gateway)
        self.set_local()
        self.mirror.unshadow(self.rib)  # an id the file gave up may be the control's now (registered)

    def report(self) -> Report:
        now = trio.current_time()
        dp = self.dataplane
        loads = {}
        for iid, m in dp.meters.items():
            m.expire(now)
            loads[iid] = InstanceLoad(m.arrivals.count(now), m.bounded.count(now), m.inflight, m.base_us)
        stats = dict(dp.stats)
        if self.data_channels is not None:  # data channels established since the worker started, ours and peers'
            stats.update(self.data_channels.core.stats)
        sealed = ("sealed_streams_out", "sealed_streams_in", "sealed_epochs_out", "sealed_exchanges_in")
        stats.update({k: self.rib.counters[k] for k in sealed if self.rib.counters[k]})
        return Report(pid=os.getpid(), clients=dp.clients, inflight=dp.inflight, stats=stats,
                      requests=dict(self.metrics.requests), loads=loads,
                      latency={k: list(v) for k, v in self.metrics.latency.by_service.items()},
                      sends=dp.plane.account.own_rates(now, MAX_SIBLING_KEYS))  # type: ignore[arg-type]

    async def run(self, http_fd: int, https_fd: int, report_fd: int, restarted: bool, channel_fd: int = -1,
                  handed_fd: int = -1) -> None:
        if restarted:
            hold_predecessors_share(self.dataplane.meters, trio.current_time())
        users = self.dataplane.users
        users.inherited = {tls: [trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))]
                           for tls, fd in ((False, http_fd), (True, https_fd)) if fd >= 0}
        report = trio.lowlevel.FdStream(report_fd)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            self.set_local()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if self.data_channels is not None:
                    nursery.start_soon(self.data_channels.run)
                if channel_fd >= 0:  # users are served once the RIB snapshot is in (bounded: a wedged control)
                    nursery.start_soon(self._channel, channel_fd)
                    with trio.move_on_after(SNAPSHOT_WAIT_S):
                        while not self.mirror.synced:
                            self._synced = trio.Event()
                            await self._synced.wait()
                if handed_fd >= 0:  # with the snapshot in: the peers' sessions and our sealing key are known
                    nursery.start_soon(self._take_handed, handed_fd)
                for tls in list(users.inherited):
                    await nursery.start(functools.partial(self.dataplane.serve, tls=tls))
                nursery.start_soon(self._report_loop, report)
                nursery.start_soon(self._health_loop)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self.reload()
                        continue
                    break
                self.dataplane.stop_accepting()
                with trio.move_on_after(self.config.gateway.drain_timeout_ms / 1000):
                    await self.dataplane.drained()
                nursery.cancel_scope.cancel()

    async def _channel(self, fd: int) -> None:
        """Run the channel to the control process; once it breaks the control process is gone: drain."""
        g = self.config.gateway
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
        ch = self.channel = Channel(stream, "control", initiator=True, on_open=self._handed,
                                    limits=session_config(self.config).tunnel, max_buffer=g.max_peer_send_buffer,
                                    on_rib=self._on_rib, on_siblings=self._on_siblings)
        ch.mux.sealer = PartSealer(worker_sealer(self.id, self.rib, lambda: self.mirror.peers, g.seal_streams),
                                   lambda: self.rib.opener, self.owns)
        await ch.run()
        log.warning("%s/worker %d: the channel to the control process is gone: draining", self.id, self.index)
        os.kill(os.getpid(), signal.SIGTERM)

    async def _take_handed(self, fd: int) -> None:
        """Peers' data channels the control process hands us (SCM_RIGHTS, one descriptor a message)."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        with sock:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not msg and not fds:
                    return  # the control process is gone (its report pipe says so too)
                for fd_in in fds:
                    assert self.data_channels is not None
                    self.data_channels.accept(socket.socket(fileno=fd_in))

    def owns(self, ext: Any) -> bool:
        """A sealed stream to us that this worker opens: one of its instances, its share of the keys."""
        return ext.instance in self.dataplane.meters and owner(ext.eph, ext.request_id, self.n) == self.index

    def _handed(self, stream: Any) -> None:
        """A peer's stream (handed over by the control process, or on a peer's data channel handed to
        us): served as its egress or transit; one for an instance registered at the control process
        (not in our config) goes there, the only process that calls it."""
        self.dataplane.stats["handed_streams"] += 1
        ext, ch = stream.ext, self.channel
        if (ext is not None and ext.origin == self.id and (ext.instance not in self.dataplane.meters or still_sealed(stream))
                and ch is not None and not ch.done.is_set() and self.nursery is not None):
            self.dataplane.stats["passed_to_control"] += 1
            self.nursery.start_soon(pass_on, self.dataplane.plane, stream, ch.mux, self.dataplane.limits.body_idle_timeout_s,
                                    "the control process")
            return
        self.dataplane.on_stream(stream)

    async def _report_loop(self, out: trio.lowlevel.FdStream) -> None:
        while True:
            try:
                await out.send_all(self.report().encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The control process is gone (however it died): drain and end, as on SIGTERM.
                log.warning("%s/worker %d: the control process is gone: draining", self.id, self.index)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            await trio.sleep(REPORT_INTERVAL_S)
            self.dataplane.flush_log_counts()

    async def _health_loop(self) -> None:
        """Each worker checks the instances it has not seen answer lately (egress.probe skips the others)."""
        while True:
            interval_ms = self.config.gateway.health_interval_ms
            await trio.sleep(interval_ms / 1000 if interval_ms else 1.0)
            if interval_ms:
                async with trio.open_nursery() as nursery:
                    for s in self.config.services:
                        for i in s.instances:
                            nursery.start_soon(self.dataplane.probe, i)


def main(argv: list[str]) -> int:
    path, index, n, http_fd, https_fd, report_fd, restarted, channel_fd, handed_fd = argv
    from .main import set_process_name, setup_logging

    set_process_name(b"cpnd-worker")
    try:
        config = load_config(path)  # edited since the gateway started: the control process restarts us later
    except ConfigError as exc:
        print(f"cpnd worker {index}: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.gateway.log_level, config.gateway.log_format)
    trio.run(WorkerGateway(config, int(index), int(n)).run, int(http_fd), int(https_fd), int(report_fd),
             restarted == "1", int(channel_fd), int(handed_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
