"""The data plane of one gateway, assembled: ingress (users.py, attempts.py), transit, egress.

ingress (the user's HTTP/1.1, a plan per request) -> tunnel streams hop by hop (transit
relays bytes) -> egress (URL-PATH -> the instance's real URL, keep-alive pool) -> and back.
"""

from __future__ import annotations

import collections
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio

from .attempts import Attempts
from .config import Config
from .egress import Egress
from .load import InstanceMeter, OwnTimes
from .inprocess import PipeEnd
from .plane import Gateway, HttpLimits, Plane
from .planner import Planner
from .rib import Best, Key
from .selection import TtlCache, View, ingress_view
from .streams import ByteStream, StreamReset, TunnelStream
from .transit import Transit
from .tunnel import ExtHeader, ResetCode
from .users import Users

__all__ = ["DataPlane", "HttpLimits"]

log = logging.getLogger("cpnd.http")

IDLE_STREAM_TASKS = 64  # stream tasks kept parked for the next streams (the others end after theirs)


class StreamTasks:
    """The tasks that serve streams: each serves one stream after another, parked in between, so
    that a stream is handed to a waiting task (one reschedule) where a task of its own would be
    spawned and reaped (trio's spawn, the new task's first step and its exit: ~330 bytecodes a
    request at the egress, bench/dataplane.py --opcodes). ``serve`` must not raise but to cancel."""

    def __init__(self, serve: Callable[..., Awaitable[None]]) -> None:
        self._serve = serve
        self._idle: list[trio.lowlevel.Task] = []  # parked, the last to park first out

    def start(self, nursery: trio.Nursery, *args: Any) -> None:
        """Serve ``args`` in a parked task, else in a new one in ``nursery``."""
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(args))
        else:
            nursery.start_soon(self._run, args, name="stream")

    async def _run(self, args: tuple[Any, ...]) -> None:
        task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:  # cancelled while parked (the nursery is closing): gone
            self._idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            await self._serve(*args)
            if len(self._idle) >= IDLE_STREAM_TASKS:
                return
            args = ()  # (the stream served is not kept while parked)
            self._idle.append(task)
            args = await trio.lowlevel.wait_task_rescheduled(abort)


class DataPlane:
    """Ingress, transit and egress for one gateway; what the daemon, control and metrics see of them."""

    def __init__(self, gw: Gateway, limits: HttpLimits = HttpLimits()) -> None:
        self.gw = gw
        self._rib, self._id = gw.rib, gw.id  # read per candidate per request: the daemon's are properties
        self.plane = Plane(gw, limits)
        self.egress = Egress(self.plane)
        self.transit = Transit(self.plane)
        self.planner = Planner(gw.rib, self._estimate, self.plane.account, self.plane.own, self.plane.correction,
                               ttl=TtlCache(gw.config.gateway.dns_ttl_s))
        self.attempts = Attempts(self.plane, self.planner, self.egress, self._serve_local)
        self.users = Users(self.plane, self.planner, self.attempts)
        self._streams = StreamTasks(self._serve_stream)
        self.reconfigure(gw.config)

    # ---- what others read

    @property
    def limits(self) -> HttpLimits:
        return self.plane.limits

    @property
    def stats(self) -> collections.Counter[str]:
        return self.plane.stats

    @property
    def own(self) -> OwnTimes:
        return self.plane.own

    @property
    def inflight(self) -> int:
        return self.plane.inflight

    @property
    def meters(self) -> dict[str, InstanceMeter]:
        return self.egress.meters

    @property
    def pool(self) -> dict[tuple[str, int], Any]:
        return self.egress.pool

    @property
    def slots(self) -> Any:
        return self.users.slots

    @property
    def clients(self) -> int:
        return len(self.users.slots)

    @property
    def http_port(self) -> int | None:
        return self.users.http_port

    @property
    def https_port(self) -> int | None:
        return self.users.https_port

    def health(self, iid: str) -> Any:
        return self.egress.health(iid)

    def estimate(self, key: Key, best: Best) -> View:
        """What this ingress assumes of an instance now (select.ingress_view)."""
        return self._estimate(key, best, trio.current_time())

    def _estimate(self, key: Key, best: Best, now: float) -> View:
        p = self.plane
        return ingress_view(self._rib, key, best, now, own=p.own, account=p.account, correction=p.correction,
                            # One of ours this process does not call (a worker's view of an instance registered
                            # at the control process) is estimated as a peer's is: from its advertisement.
                            meter=self.egress.meters.get(key[2]) if key[1] == self._id else None)

    # ---- what the daemon drives

    def reconfigure(self, config: Config) -> None:
        self.egress.reconfigure(config)
        self.planner.mode = config.gateway.selection
        self.planner.ttl.ttl_s = config.gateway.dns_ttl_s
        self.plane.correction.quantile = config.gateway.latency_quantile
        self.users.tls_server = config.tls  # a reload serves the re-read certificate from the next handshake on
        self.users.rate_sources(config.gateway)  # max_requests_per_ip_per_s: on, retuned, or off
        if config.tls is not None:
            now = datetime.datetime.now(datetime.timezone.utc)
            log.log(logging.WARNING if config.tls.expiring(now) else logging.INFO, "%s: https: serving %s", self.gw.id,
                    config.tls.describe(now))

    async def serve(self, *, tls: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.users.serve(tls=tls, task_status=task_status)

    def stop_accepting(self) -> None:
        self.users.stop_accepting()

    async def drained(self) -> None:
        await self.plane.drained()

    async def probe(self, inst: Any) -> None:
        await self.egress.probe(inst)

    def flush_log_counts(self) -> None:
        """Log the counts of suppressed lines once their second is over, even when no more lines come."""
        now = trio.current_time()
        self.plane.error_lines.flush(self.gw.id, now)
        self.plane.attempt_lines.flush(self.gw.id, now)

    def flush_edge_log(self) -> None:
        self.users.flush_edge_log()

    def on_stream(self, stream: TunnelStream) -> None:
        """A peer opened a stream to us: egress if we are the origin, else relay."""
        if self.users.draining:  # not delivered: the ingress tries elsewhere
            stream.reset(ResetCode.REFUSED, False, f"{self.gw.id} is shutting down")
            return
        assert self.gw.nursery is not None and stream.ext is not None
        if stream.ext.origin != self._id:  # a transit: relayed from this step, no task (transit.py)
            try:
                self.transit.relay(stream, stream.ext, self.plane.now())
            except StreamReset as exc:
                stream.reset(ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL,
                             exc.delivered, exc.text)
            except Exception:  # a bug must cost one request, never the daemon
                log.exception("%s: relaying stream %s from %s failed", self.gw.id, stream.id, stream.peer)
                stream.reset(ResetCode.INTERNAL, True, "internal error")
            return
        self._streams.start(self.gw.nursery, stream, stream.ext, self.plane.now(), stream.peer)

    def _serve_local(self, far: PipeEnd, ext: ExtHeader) -> None:
        assert self.gw.nursery is not None
        self._streams.start(self.gw.nursery, far, ext, None)

    async def _serve_stream(self, stream: ByteStream, ext: ExtHeader, opened_at: float | None,
                            via: str | None = None) -> None:
        """Egress if we are the origin, else relay; nothing that goes wrong escapes. ``opened_at``:
        when a peer's OPEN came (our own processing is measured from there; None: our own pipe);
        ``via``: the peer it came from (None: our own pipe)."""
        self.plane.begin()
        try:
            if ext.origin == self._id:
                await self.egress.serve(stream, ext, opened_at, via)  # the instance call stops if the stream is abandoned
            else:
                stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{ext.origin} is not this gateway")
        except StreamReset as exc:  # the other end's (then the stream is closed), or one of ours to send
            stream.reset(ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL,
                         exc.delivered, exc.text)
        except Exception:  # a bug must cost one request, never the daemon
            # (named here, not per request: a tunnel stream from ``via``, else our own pipe)
            what = "local" if via is None else f"stream {getattr(stream, 'id', '?')} from {via}"
            log.exception("%s: %s failed", self.gw.id, what)
            stream.reset(ResetCode.INTERNAL, True, "internal error")
        finally:
            if not stream.closed:  # e.g. answered before the whole request came: stop the sender
                stream.reset(ResetCode.CANCEL, True, f"{self.gw.id} is done with the stream")
            self.plane.end()
