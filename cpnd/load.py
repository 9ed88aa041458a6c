"""Load and compute latency, measured and estimated (sans-IO; time is an input).

Service side: ``InstanceMeter`` measures what reaches each local instance and decides
admission; ``LoadPacer`` decides when a change is worth re-advertising. Ingress side:
``SendAccount`` remembers what this gateway itself sent where, so a little-stale
flooded load can be corrected by our own recent sends (protocol-spec/selection.md,
"Selection under stale state").
"""

from __future__ import annotations

import collections
import math
import statistics

import attrs

WINDOW_S = 1.0  # loads are requests over the last second, over capacity
MAX_EVENTS = 100_000  # bound on remembered timestamps per window


def load_factor(load: float) -> float:
    """The paper's f_d as a factor: 1 below 50 % load, rising linearly to 2 at 100 %."""
    return 1.0 + max(0.0, 2.0 * (load - 0.5))


class RateWindow:
    """Timestamps of events in a sliding window (bounded)."""

    def __init__(self, window_s: float = WINDOW_S, keep_s: float | None = None) -> None:
        self.window_s = window_s
        self.keep_s = keep_s if keep_s is not None else window_s
        self._times: collections.deque[float] = collections.deque(maxlen=MAX_EVENTS)

    def add(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.keep_s:
            self._times.popleft()

    def count(self, now: float, at: float | None = None) -> int:
        """Events in (at - window, at], ``at`` defaulting to now (must be within keep_s)."""
        self._trim(now)
        at = now if at is None else at
        lo = at - self.window_s
        return sum(1 for t in self._times if lo < t <= at)


class InstanceMeter:
    """One local instance as its service-side gateway sees it."""

    def __init__(self, capacity: float, compute_hint_us: int, *, samples: int = 32) -> None:
        self.capacity = capacity
        self.base_us = float(compute_hint_us)
        # The median of recent samples: one very slow request (a long generation, a
        # stalled instance) must not make the instance look slow for everyone.
        self._samples: collections.deque[float] = collections.deque(maxlen=samples)
        self.arrivals = RateWindow()
        self.inflight = 0
        self.refused = 0

    def load(self, now: float) -> float:
        return self.arrivals.count(now) / self.capacity

    def admit(self, now: float, budget_us: int | None) -> str | None:
        """None to admit (and count) a request, else why it is refused."""
        n = self.arrivals.count(now)
        if n + 1 > self.capacity:
            self.refused += 1
            return f"at capacity ({n} requests in the last second, capacity {self.capacity:g}/s)"
        if budget_us is not None:
            expect = self.base_us * load_factor((n + 1) / self.capacity)
            if expect > budget_us:
                self.refused += 1
                return f"expected compute {expect / 1000:.1f} ms exceeds the remaining {budget_us / 1000:.1f} ms"
        self.arrivals.add(now)
        self.inflight += 1
        return None

    def done(self, now: float, service_us: float, load_at_arrival: float) -> None:
        """A response head came back after ``service_us``: refine the base compute latency."""
        self.inflight = max(0, self.inflight - 1)
        if not math.isfinite(service_us) or service_us < 0:
            return
        self._samples.append(service_us / load_factor(load_at_arrival))
        self.base_us = statistics.median(self._samples)

    def abandoned(self) -> None:
        self.inflight = max(0, self.inflight - 1)


@attrs.define
class LoadPacer:
    """Re-advertise an instance's load only when it moved materially, at most once per interval."""

    min_interval_s: float = 0.2
    load_threshold: float = 0.05
    compute_threshold: float = 0.10
    refresh_s: float = 5.0
    last_at: float = -math.inf
    last_load: float = 0.0
    last_compute_us: float = 0.0

    def should_advertise(self, now: float, load: float, compute_us: float) -> bool:
        if now - self.last_at < self.min_interval_s:
            return False
        moved = (abs(load - self.last_load) >= self.load_threshold
                 or abs(compute_us - self.last_compute_us) > self.compute_threshold * max(self.last_compute_us, 100.0))
        stale = now - self.last_at >= self.refresh_s and (load != self.last_load or compute_us != self.last_compute_us)
        return moved or stale

    def advertised(self, now: float, load: float, compute_us: float) -> None:
        self.last_at, self.last_load, self.last_compute_us = now, load, compute_us


@attrs.frozen
class LoadReport:
    """An instance's load as told by its gateway (piggy-backed on a response)."""

    load: float
    compute_us: int
    at: float  # our clock, when it arrived


class SendAccount:
    """What this ingress sent to each instance recently, and the freshest load it heard."""

    def __init__(self, max_keys: int = 65536) -> None:
        self.sends: dict[object, RateWindow] = {}
        self.inflight: collections.Counter[object] = collections.Counter()
        self.reports: dict[object, LoadReport] = {}
        self.max_keys = max_keys

    def sent(self, key: object, now: float) -> None:
        if key not in self.sends and len(self.sends) >= self.max_keys:
            self.sends.pop(next(iter(self.sends)))
        self.sends.setdefault(key, RateWindow(keep_s=3 * WINDOW_S)).add(now)
        self.inflight[key] += 1

    def finished(self, key: object) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def heard(self, key: object, load: float, compute_us: int, now: float) -> None:
        if key not in self.reports and len(self.reports) >= self.max_keys:
            self.reports.pop(next(iter(self.reports)))
        self.reports[key] = LoadReport(load, compute_us, now)

    def estimate(self, key: object, capacity: float, flooded_load: float, flooded_at: float, now: float) -> float:
        """Load now: the freshest known load plus how much our own sending changed since then.

        Our own sends inside that measurement are already counted in it; only the change
        of our own rate since it was taken is added (it can be negative).
        """
        report = self.reports.get(key)
        if report is not None and report.at >= flooded_at:
            base, at = report.load, report.at
        else:
            base, at = flooded_load, flooded_at
        win = self.sends.get(key)
        if win is None or capacity <= 0:
            return base
        at = max(at, now - 2 * WINDOW_S)  # older than our memory: count all of our current rate
        delta = win.count(now) - win.count(now, at=at)
        return max(0.0, base + delta / capacity)
