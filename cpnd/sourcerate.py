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

from .clients import SourceLimiter

MAX_SOURCES = 65_536  # addresses remembered (~200 bytes each): far more than ever ask within a burst


def limiter(rate: float, burst: float, old: SourceLimiter | None) -> SourceLimiter | None:
    """A per-address limit for a (re)loaded config (clients.SourceLimiter: a bucket per address, at most
    MAX_SOURCES, the least recent forgotten first): ``old`` retuned (its buckets' levels kept), a new
    one, or None (``rate`` 0: off)."""
    if not rate:
        return None
    if old is None:
        return SourceLimiter(rate, burst, MAX_SOURCES)
    old.retune(rate, burst, MAX_SOURCES)
    return old
