"""Bounded logging: a flood of one kind of line costs a few lines a second and a count."""

from __future__ import annotations

import logging


class LogLimiter:
    """At most ``per_s`` lines a second of one kind; beyond that they are counted, and the count is
    logged once the second is over (a flood costs a bounded number of lines)."""

    def __init__(self, per_s: int, kind: str, logger: logging.Logger) -> None:
        self.per_s = per_s
        self.log = logger
        self.kind = kind
        self.window = -1e9
        self.count = 0
        self.suppressed = 0

    def flush(self, gateway: str, now: float) -> None:
        """Once the second is over, log how many lines it suppressed (called on each line and by a timer)."""
        if now - self.window >= 1.0:
            if self.suppressed:
                self.log.warning("%s: %d more %s lines suppressed in the last second", gateway, self.suppressed, self.kind)
            self.window, self.count, self.suppressed = now, 0, 0

    def allow(self, gateway: str, now: float) -> bool:
        self.flush(gateway, now)
        if self.count >= self.per_s:
            self.suppressed += 1
            return False
        self.count += 1
        return True
