"""Route limits between peers (sans-IO): how fast a gateway takes route entries from one peer.

Each side announces what it takes in its LIMITS message (``wire.Limits``; protocol-spec/routing.md,
"Route limits"); the receiver enforces it, the sender honours the peer's. ``TokenBucket`` is the
pace both sides count with; time is an input (seconds from any monotonic clock).
"""

from __future__ import annotations

import math

import attrs

# What a peer that announces no limits (no route-limits capability) is assumed to take:
# the default max_routes_per_peer every cpn/1 gateway enforced before LIMITS existed.
DEFAULT_PEER_ROUTES = 10_000
_NEVER = -math.inf


@attrs.define(on_setattr=attrs.setters.NO_OP)  # checked at creation and in retune: level() runs on every read
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full. ``charge`` may go below zero
    (what was already read must be counted); ``take`` only spends what is there."""

    rate: float = attrs.field(validator=attrs.validators.gt(0))
    burst: float = attrs.field(validator=attrs.validators.gt(0))
    tokens: float = attrs.field(default=attrs.Factory(lambda self: self.burst, takes_self=True))
    at: float = -math.inf

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (a clock that steps back refills nothing)."""
        at = self.at
        if now > at:
            if at != _NEVER:
                tokens = self.tokens + (now - at) * self.rate
                self.tokens = tokens if tokens < self.burst else self.burst  # (min() is a call: every read asks)
            self.at = now
        return self.tokens

    def take(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens if there are that many; else spend none."""
        if self.level(now) < n:
            return False
        self.tokens -= n
        return True

    def charge(self, n: float, now: float) -> None:
        """Spend ``n`` tokens whatever the level (the work was already done)."""
        self.level(now)
        self.tokens -= n

    def ready_at(self, n: float, now: float) -> float:
        """When ``n`` tokens (at most ``burst``) will be there."""
        need = min(n, self.burst) - self.level(now)
        return now if need <= 0 else now + need / self.rate

    def retune(self, rate: float, burst: float) -> None:
        """New rate and burst (a reload); the level is kept, capped at the new burst."""
        if not (rate > 0 and burst > 0):
            raise ValueError(f"rate and burst must be > 0, got {rate} and {burst}")
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)
