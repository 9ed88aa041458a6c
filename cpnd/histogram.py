"""Request latencies by service, counted per bucket as Prometheus histograms count them.

Every process that serves users keeps one (the control process and each worker); a worker's counts
travel in its reports (cpnd/fleet.py), and the control process adds them to its own for /metrics
(prometheus_client's Histogram cannot take another process's counts).
"""

from __future__ import annotations

import bisect

MAX_SERVICES = 4096  # services come from the RIB; past this, one unlabelled row
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
Latencies = dict[str, list[float]]  # service -> a count per bucket (the last: over every bound), then the sum
ROW = len(LATENCY_BUCKETS) + 2


def _row() -> list[float]:
    return [0] * (ROW - 1) + [0.0]  # counts stay ints: a worker's report is small in msgpack


class LatencyHistogram:
    """Request latencies by service, counted per bucket: what a worker reports and the control
    process adds to its own (prometheus_client's Histogram cannot take another process's counts)."""

    def __init__(self) -> None:
        self.by_service: Latencies = {}

    def observe(self, service: str, seconds: float) -> None:
        row = self.by_service.get(service)
        if row is None:
            if len(self.by_service) >= MAX_SERVICES:  # beyond the bound, counted unlabelled
                row = self.by_service.setdefault("", _row())
            else:
                row = self.by_service[service] = _row()
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds


def add_latencies(into: Latencies, more: Latencies) -> None:
    """Add ``more`` (a snapshot of another histogram's counts) into ``into``."""
    for service, row in more.items():
        mine = into.setdefault(service, _row())
        for i, v in enumerate(row[:len(mine)]):
            mine[i] += v

