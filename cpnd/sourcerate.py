"""Requests per source address at the ingress, and requests it abandons (sans-IO; time is an input).

``max_requests_per_ip_per_s`` (off unless set): a token bucket per user address (an IPv6 one by its
/64, as the fair shares and the failed-key limiter count them), ``max_requests_per_ip_burst`` deep,
in a table of at most MAX_SOURCES addresses (the one that asked least recently is forgotten first:
it comes back with a full bucket, as a new address would). A request over it is answered 429
``rate_limited`` with a Retry-After before any work is done for it, as nginx's ``limit_req`` and
Envoy's local rate limit do. Only users' own requests are counted: a peer's tunnelled requests
never come this way (a peer is not one address of users; its own session bounds hold it).

``max_abandoned_per_ip_per_s`` (on by default: 50 a second, bursts of 500): the requests one address
may abandon (its user hangs up while the request is served). Each abandoned one takes a token from
its address's bucket; while the bucket is empty, every request from that address is answered 429
``rate_limited`` at once, as wrong keys are (clients.SourceLimiter). Sending requests and hanging up
on them costs the gateways and instances as much as waiting for the answers, and serves nobody;
users that take their answers are never counted, whatever their rate, so a proxy for many users is
refused only if its users abandon more than that between them.
"""

from __future__ import annotations

import collections

from .clients import SourceLimiter, source_key
from .limits import TokenBucket

MAX_SOURCES = 65_536  # addresses remembered (~200 bytes each): far more than ever ask within a burst


class SourceRates:
    """One token bucket per source address, bounded; ``rate`` and ``burst`` as configured (a reload
    retunes the buckets it has, keeping their levels)."""

    def __init__(self, rate: float, burst: float, max_sources: int = MAX_SOURCES) -> None:
        self.rate, self.burst = rate, burst
        self.max_sources = max_sources
        self.buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()  # least recent first
        self.forgotten = 0  # addresses dropped to stay within max_sources

    def retune(self, rate: float, burst: float) -> None:
        if (rate, burst) != (self.rate, self.burst):
            self.rate, self.burst = rate, burst
            for bucket in self.buckets.values():
                bucket.retune(rate, burst)

    def wait(self, source: str, now: float) -> float:
        """0 if a request from ``source`` may go now (a token is taken); else the seconds until it may."""
        key = source_key(source)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
            if len(self.buckets) > self.max_sources:
                self.buckets.popitem(last=False)
                self.forgotten += 1
        else:
            self.buckets.move_to_end(key)
        if bucket.take(1, now):
            return 0.0
        return max(1e-6, bucket.ready_at(1, now) - now)


def abandon_limiter(rate: float, burst: int, old: SourceLimiter | None) -> SourceLimiter | None:
    """The limiter of abandoned requests for a (re)loaded config: ``old`` retuned (its buckets kept),
    a new one, or None (off)."""
    if not rate:
        return None
    if old is None:
        return SourceLimiter(rate, burst, MAX_SOURCES)
    old.retune(rate, burst, MAX_SOURCES)
    return old
