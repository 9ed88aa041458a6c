"""What the data plane's parts share: their limits, counters, meters and the gateway they serve."""

from __future__ import annotations

import collections
import logging
from typing import Any, Protocol

import attrs
import trio

from .config import Config
from .load import LatencyCorrection, OwnTimes, SendAccount
from .loglimit import LogLimiter
from .pending import Pending
from .rib import Rib

log = logging.getLogger("cpnd.http")

ERROR_LOG_PER_S = 50
ATTEMPT_LOG_PER_S = 10  # lines about a failed attempt (a refusal, say) that another candidate may still serve


@attrs.frozen
class HttpLimits:
    max_body_bytes: int = 100 * 1024 * 1024
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    body_idle_timeout_s: float = 60.0
    max_clients: int = 4096
    max_clients_per_ip: int = 256
    instance_connect_timeout_s: float = 2.0
    pool_idle_per_instance: int = 32
    h2_max_streams: int = 100  # concurrent streams on one HTTP/2 user connection (http2_max_streams)


class Gateway(Protocol):
    """The daemon as the data plane sees it."""

    id: str
    config: Config
    rib: Rib
    nursery: trio.Nursery | None
    metrics: Any
    clients: Any  # cpnd/clients.py's ClientTable

    def established_conn(self, peer: str) -> Any: ...

    def health_changed(self, iid: str, healthy: bool) -> None: ...


class Plane:
    """State every part of one gateway's data plane reads or counts into."""

    def __init__(self, gw: Gateway, limits: HttpLimits) -> None:
        self.gw = gw
        self.limits = limits
        self.stats: collections.Counter[str] = collections.Counter()
        self.own = OwnTimes()  # our own processing per request, by stage (protocol-spec/selection.md, "Own time")
        self.correction = LatencyCorrection()  # per instance, at this ingress
        self.account = SendAccount()
        self.error_lines = LogLimiter(ERROR_LOG_PER_S, "error", log)
        self.attempt_lines = LogLimiter(ATTEMPT_LOG_PER_S, "failed-attempt", log)
        self.inflight = 0  # requests here: ingress, transit or egress
        self.pending = Pending()  # user connections' accounting after their answers (cpnd/pending.py)
        self._idle = trio.Event()

    def now(self) -> float:
        """``trio.current_time()`` in one call, not three (the egress and the transit read it per request).
        The first reading puts this run's clock's own method in its place: no call of ours after it."""
        clock = trio.lowlevel.current_clock()
        self.now = clock.current_time  # type: ignore[method-assign]
        return clock.current_time()

    def begin(self) -> None:
        self.inflight += 1

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request is in flight here."""
        while self.inflight:
            self._idle = trio.Event()
            await self._idle.wait()
