"""Worker processes of one gateway (``[gateway] workers = N``), sans-IO: what each worker may use
of the gateway's bounds, and the reports they send to the control process.

The control process (cpnd/workers.py) keeps the peer sessions and the RIB; each worker (cpnd/worker.py)
serves users on the shared listeners and calls our instances itself. Every bound that must hold for
the gateway as a whole is split into N equal, fixed shares (``worker_config``), so no worker can
overrun an instance whatever the others do: no lease is ever rebalanced, hence never in flight.
Nothing here imports trio.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs
import msgpack

from .config import Config
from .histogram import MAX_SERVICES, ROW, Latencies, add_latencies
from .load import InstanceMeter

# Instances per report whose sends are relayed to the other workers (the busiest): at most ~100 KB
# of a report (a key is at most 256 + 2 x 64 bytes), beside its other contents, under MAX_REPORT_BYTES.
MAX_SIBLING_KEYS = 256
REPORT_INTERVAL_S = 0.25  # how often a worker reports: the control's view of its load is at most this old
MAX_REPORT_BYTES = 1 << 20  # a report larger than this is a bug: the control stops reading that worker


def share(value: float, n: int) -> float:
    """One worker's share of a gateway-wide rate (capacity, a client's rate)."""
    return value / n


def int_share(value: int, n: int) -> int:
    """One worker's share of a gateway-wide count, at least 1 (a bound below N is held as 1 per worker)."""
    return max(1, value // n)


def worker_config(config: Config, n: int) -> Config:
    """The config one of ``n`` workers runs with: every instance's capacity and max_inflight, every
    client's rate and the user connection bounds split in ``n`` shares, so their sum holds the bound."""
    if n == 1:
        return config
    services = tuple(attrs.evolve(s, instances=tuple(
        attrs.evolve(i, capacity=share(i.capacity, n), max_inflight=int_share(i.max_inflight, n)) for i in s.instances))
        for s in config.services)
    clients = tuple(attrs.evolve(c, rate=None if c.rate is None else share(c.rate, n), burst=max(1.0, share(c.burst, n)))
                    for c in config.clients)
    g = config.gateway
    gateway = attrs.evolve(g, max_http_clients=int_share(g.max_http_clients, n),
                           max_http_clients_per_ip=int_share(g.max_http_clients_per_ip, n),
                           max_requests_per_ip_per_s=share(g.max_requests_per_ip_per_s, n),  # (0, off, stays 0)
                           max_requests_per_ip_burst=None if g.max_requests_per_ip_burst is None
                           else int_share(g.max_requests_per_ip_burst, n),
                           max_abandoned_per_ip_per_s=share(g.max_abandoned_per_ip_per_s, n),
                           max_abandoned_per_ip_burst=int_share(g.max_abandoned_per_ip_burst, n))
    return attrs.evolve(config, gateway=gateway, services=services, clients=clients)


def hold_predecessors_share(meters: dict[str, InstanceMeter], now: float) -> None:
    """A replacement worker starts with its share of every instance used up for one second and the
    admission guard: what its dead predecessor admitted in its last second is unknown (reports are up
    to 0.25 s old), and the share must hold across the two. After that no window can hold requests of both."""
    for m in meters.values():
        m.used_up(now)


@attrs.frozen
class InstanceLoad:
    """What one worker counted of one instance over the last second."""

    arrivals: int = attrs.field(validator=attrs.validators.ge(0))  # admitted
    bounded: int = attrs.field(validator=attrs.validators.ge(0))  # latency-bound demand, admitted or not
    inflight: int = attrs.field(validator=attrs.validators.ge(0))
    base_us: float = 0.0  # its compute time as this worker measures it (load.InstanceMeter.base_us)


def _latency(obj: Any) -> Latencies:
    """A report's histogram rows, checked: one row per service, a count per bucket and the sum."""
    if not isinstance(obj, dict) or len(obj) > MAX_SERVICES + 1:
        raise ValueError("latency: not a map of at most MAX_SERVICES services")
    out = {str(k): [*(int(x) for x in v[:-1]), float(v[-1])] for k, v in obj.items()}
    if any(len(row) != ROW for row in out.values()):
        raise ValueError(f"latency: rows of {ROW} numbers expected")
    return out


@attrs.frozen
class Report:
    """A worker's state, sent every REPORT_INTERVAL_S; counters are cumulative since the worker started."""

    pid: int
    clients: int  # user connections open
    inflight: int  # requests in flight
    stats: dict[str, int]  # the data plane's counters (status_json's "http")
    requests: dict[tuple[str, str, int], int]  # answered, by (service, instance, status)
    loads: dict[str, InstanceLoad]
    latency: Latencies = attrs.field(factory=dict)  # its histogram's counts (cpnd/histogram.py)
    # Its sends to peers' instances over the last second (load.SendAccount.own_rates): relayed to the
    # other workers, so each one's estimate counts every worker's sends (ribfeed.SIBLINGS).
    sends: dict[tuple[str, str, str], int] = attrs.field(factory=dict)

    def encode(self) -> bytes:
        return msgpack.packb({"pid": self.pid, "clients": self.clients, "inflight": self.inflight, "stats": self.stats,
                              "requests": [[s, i, st, n] for (s, i, st), n in self.requests.items()],
                              "loads": {k: [v.arrivals, v.bounded, v.inflight, v.base_us] for k, v in self.loads.items()},
                              "latency": self.latency, "sends": [[*k, n] for k, n in self.sends.items()]})

    @classmethod
    def decode(cls, obj: Any) -> Report:
        """From a decoded msgpack object; ValueError if it is not a report."""
        try:
            return cls(pid=int(obj["pid"]), clients=int(obj["clients"]), inflight=int(obj["inflight"]),
                       stats={str(k): int(v) for k, v in obj["stats"].items()},
                       requests={(str(s), str(i), int(st)): int(n) for s, i, st, n in obj["requests"]},
                       loads={str(k): InstanceLoad(int(a), int(b), int(f), float(c)) for k, (a, b, f, c) in obj["loads"].items()},
                       latency=_latency(obj.get("latency", {})),
                       sends={(str(a), str(b), str(c)): int(n) for a, b, c, n in obj.get("sends", [])[:MAX_SIBLING_KEYS]})
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a worker report: {exc}") from None


@attrs.define
class WorkerState:
    """One worker slot as the control process sees it: the process in it now and its last report."""

    index: int
    pid: int | None = None
    started_at: float = -math.inf
    restarts: int = 0
    report: Report | None = None
    reported_at: float = -math.inf
    # Counters of processes that ended in this slot, so the totals never go back when one is replaced.
    past_stats: collections.Counter[str] = attrs.field(factory=collections.Counter)
    past_requests: collections.Counter[tuple[str, str, int]] = attrs.field(factory=collections.Counter)
    past_latency: Latencies = attrs.field(factory=dict)

    def started(self, pid: int, now: float) -> None:
        self.pid, self.started_at = pid, now

    def ended(self) -> None:
        """Its process is gone: keep its counts, forget its gauges."""
        if self.report is not None:
            self.past_stats.update(self.report.stats)
            self.past_requests.update(self.report.requests)
            add_latencies(self.past_latency, self.report.latency)
        self.pid, self.report = None, None

    def stats(self) -> collections.Counter[str]:
        out = collections.Counter(self.past_stats)
        if self.report is not None:
            out.update(self.report.stats)
        return out

    def latencies(self) -> Latencies:
        out: Latencies = {}
        add_latencies(out, self.past_latency)
        if self.report is not None:
            add_latencies(out, self.report.latency)
        return out

    def requests(self) -> collections.Counter[tuple[str, str, int]]:
        out = collections.Counter(self.past_requests)
        if self.report is not None:
            out.update(self.report.requests)
        return out

    def status(self, now: float) -> dict[str, Any]:
        """``show status --json``'s entry for this worker."""
        r = self.report
        return {"index": self.index, "pid": self.pid, "alive": self.pid is not None, "restarts": self.restarts,
                "up_s": round(now - self.started_at, 3) if self.pid is not None else None,
                "http_clients": r.clients if r else 0, "inflight": r.inflight if r else 0,
                "requests": self.stats()["requests"],
                "report_age_ms": round((now - self.reported_at) * 1000) if r else None}


def loads(workers: list[WorkerState], iid: str) -> tuple[int, int, int, float | None]:
    """An instance's admitted arrivals and latency-bound demand over the last second, its requests
    in flight (summed over the workers' latest reports) and the lowest compute time one measured."""
    a = b = f = 0
    base: float | None = None
    for w in workers:
        if w.report is not None and iid in w.report.loads:
            v = w.report.loads[iid]
            a, b, f = a + v.arrivals, b + v.bounded, f + v.inflight
            base = v.base_us if base is None else min(base, v.base_us)
    return a, b, f, base
