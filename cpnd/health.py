"""Instance health with hysteresis and flap damping (sans-IO; time is an input).

Passive results (requests that could not reach the instance) and active probes feed
one tracker per instance. ``failures`` consecutive failures take it down; it comes back
after ``successes`` consecutive successes, but not before a hold-down that doubles with
every recent flap (like BGP route flap damping), so a flapping instance cannot churn
the network.
"""

from __future__ import annotations

import collections

import attrs

FLAP_MEMORY_S = 300.0
MAX_HOLD_DOWN_S = 120.0


@attrs.define
class HealthTracker:
    failures: int = 3
    successes: int = 2
    hold_down_s: float = 1.0
    healthy: bool = True
    _fail_run: int = 0
    _ok_run: int = 0
    _down_at: float = 0.0
    _flaps: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=64))

    def hold_down(self, now: float) -> float:
        """How long the instance stays down at least, given its recent flaps."""
        while self._flaps and self._flaps[0] <= now - FLAP_MEMORY_S:
            self._flaps.popleft()
        return min(MAX_HOLD_DOWN_S, self.hold_down_s * 2 ** max(0, len(self._flaps) - 1))

    def result(self, ok: bool, now: float) -> bool:
        """Record one probe or request outcome; True when ``healthy`` changed."""
        if ok:
            self._fail_run, self._ok_run = 0, self._ok_run + 1
            if not self.healthy and self._ok_run >= self.successes and now - self._down_at >= self.hold_down(now):
                self.healthy = True
                return True
        else:
            self._ok_run, self._fail_run = 0, self._fail_run + 1
            if self.healthy and self._fail_run >= self.failures:
                self.healthy = False
                self._down_at = now
                self._flaps.append(now)
                return True
        return False
