"""Client keys and quotas at the ingress (sans-IO): who may call which service, how fast.

``ClientTable.check(headers, service, source, now)`` -> ``Verdict``: 401 ``unauthorized`` (no
or an unknown ``Authorization: Bearer`` key), 403 ``forbidden`` (a service the client may not
call), 429 ``rate_limited`` with a Retry-After (its token bucket is empty, or its source address
failed too often), or allowed, with the headers to forward (``Authorization`` taken out: the key
never leaves the ingress). Time is an input; nothing here does I/O. With no ``[[clients]]``
configured the table is inactive and the data plane never calls it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import ipaddress
import math
import secrets
from collections.abc import Iterable, Sequence

import attrs

from .config import ClientConfig, Config, GatewayConfig
from .limits import TokenBucket

Headers = Sequence[tuple[bytes, bytes]]
KEY_PREFIX = "cpn_"


def new_key() -> str:
    """A fresh random API key: 256 bits, URL-safe (``cpnctl hash-key``)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str | bytes) -> str:
    """The hex SHA-256 that ``[[clients]] api_key_sha256`` and ``[[registrars]] token_sha256`` hold."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def bearer(headers: Headers) -> bytes | None:
    """The token of the one ``Authorization: Bearer <token>`` header; None if absent, repeated or another scheme."""
    return split_bearer(headers)[0]


def split_bearer(headers: Headers) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
    """``bearer(headers)`` and the headers without Authorization, in one pass (this runs per request)."""
    found, rest = [], []
    for n, v in headers:
        if n.lower() == b"authorization":
            found.append(v)
        else:
            rest.append((n, v))
    if len(found) != 1:
        return None, rest
    scheme, _, token = found[0].strip().partition(b" ")
    token = token.strip()
    return (token if scheme.lower() == b"bearer" and token and b" " not in token else None), rest


def under(service: str, prefixes: Iterable[str] | None) -> bool:
    """Whether ``service`` is one of ``prefixes`` or below one on whole segments (None, "/": everything)."""
    if prefixes is None:
        return True
    return any(p == "/" or service == p or service.startswith(p + "/") for p in prefixes)


# Parsing an IPv6 address costs ~80 calls, and the egress keys each request's fair share by it at
# admission and at its end: the same few addresses come again and again (cached, bounded).
@functools.lru_cache(maxsize=4096)
def source_key(source: str) -> str:
    """What failures are counted by: the address, or for IPv6 its /64 (one host holds a whole /64)."""
    if ":" not in source:
        return source
    try:
        addr = ipaddress.IPv6Address(source.split("%", 1)[0])
    except ValueError:
        return source
    if addr.ipv4_mapped is not None:  # an IPv4 user on a dual-stack listener: its own address, not ::ffff:0:0/64
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


class KeyIndex:
    """Secrets by their SHA-256, looked up without a timing signal about the stored ones.

    The lookup hashes the presented token first, so the dict probe depends only on a digest the
    caller cannot steer towards a stored one (that would take a preimage); the hit is then
    confirmed with ``hmac.compare_digest``, constant time over the 32 bytes.
    """

    def __init__(self, entries: Iterable[tuple[bytes, object]]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, object]] = {d: (d, owner) for d, owner in entries}

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, token: bytes) -> object | None:
        digest = hashlib.sha256(token).digest()
        hit = self._by_digest.get(digest)
        return hit[1] if hit is not None and hmac.compare_digest(hit[0], digest) else None


@attrs.define
class SourceLimiter:
    """Failed authentications per source address: a token bucket each, in a table of at most
    ``max_sources`` (the least recently failed is forgotten first). A source whose bucket is empty
    is refused before its key is even looked at, so guessing keys costs ``rate`` tries a second."""

    rate: float
    burst: float
    max_sources: int
    buckets: collections.OrderedDict[str, TokenBucket] = attrs.field(factory=collections.OrderedDict)
    forgotten: int = 0  # sources dropped to stay within max_sources

    def retry_after(self, source: str, now: float) -> float | None:
        """Seconds until ``source`` may try again, or None: it may now."""
        bucket = self.buckets.get(source_key(source))
        if bucket is None or bucket.level(now) >= 1:
            return None
        return bucket.ready_at(1, now) - now

    def failed(self, source: str, now: float) -> None:
        self._bucket(source).charge(1, now)

    def take(self, source: str, now: float) -> float:
        """For a limit on every request (sourcerate.py): 0.0 if one from ``source`` may go now (a token is
        taken), else the seconds until it may; asking makes ``source`` the most recent either way."""
        bucket = self._bucket(source)
        return 0.0 if bucket.take(1, now) else max(1e-6, bucket.ready_at(1, now) - now)

    def _bucket(self, source: str) -> TokenBucket:
        """``source``'s bucket (a new one full, the least recent forgotten to make room), most recent last."""
        key = source_key(source)
        bucket = self.buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            while len(self.buckets) >= self.max_sources:
                self.buckets.popitem(last=False)
                self.forgotten += 1
        self.buckets[key] = bucket
        return bucket

    def retune(self, rate: float, burst: float, max_sources: int) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        for b in self.buckets.values():
            b.retune(rate, burst)
        while len(self.buckets) > max_sources:
            self.buckets.popitem(last=False)
            self.forgotten += 1


@attrs.frozen
class Verdict:
    """What to do with one request: ``status`` 0 lets it through with ``headers`` (the key taken out)."""

    status: int = 0
    error: str = ""
    detail: str = ""
    retry_after_s: int | None = None  # for 429: whole seconds, at least 1 (RFC 9110, 10.2.3)
    client: str | None = None
    headers: Headers = ()


@attrs.define
class ClientState:
    """One client's bucket and counters; kept across reloads while its id stays."""

    config: ClientConfig
    bucket: TokenBucket | None
    counts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    last_seen: float | None = None


def _bucket(c: ClientConfig) -> TokenBucket | None:
    return None if c.rate is None else TokenBucket(c.rate, c.burst)


def _retry(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


class ClientTable:
    """Every configured client, its key index, buckets and counters, and the per-source failure limiter."""

    def __init__(self, clients: Sequence[ClientConfig] = (), gateway: GatewayConfig | None = None) -> None:
        g = gateway
        self.failures = SourceLimiter(g.auth_failures_per_s if g else 1.0, g.auth_failures_burst if g else 20,
                                      g.max_auth_failure_sources if g else 4096)
        self.states: dict[str, ClientState] = {}
        self.index = KeyIndex(())
        self.counts: collections.Counter[str] = collections.Counter()  # unauthorized, source_blocked
        self.reconfigure(clients, gateway)

    @classmethod
    def from_config(cls, config: Config) -> ClientTable:
        return cls(config.clients, config.gateway)

    @property
    def active(self) -> bool:
        """Whether any client is configured: only then is a key required."""
        return bool(self.states)

    def reconfigure(self, clients: Sequence[ClientConfig], gateway: GatewayConfig | None = None) -> None:
        """Take a (re)loaded ``[[clients]]`` list: clients that stay keep their bucket level and counters."""
        old = self.states
        self.states = {}
        for c in clients:
            st = old.get(c.id)
            if st is None:
                st = ClientState(c, _bucket(c))
            else:
                if c.rate is None or st.bucket is None:
                    st.bucket = _bucket(c)
                else:
                    st.bucket.retune(c.rate, c.burst)
                st.config = c
            self.states[c.id] = st
        self.index = KeyIndex((st.config.api_key_sha256, st) for st in self.states.values())
        if gateway is not None:
            self.failures.retune(gateway.auth_failures_per_s, gateway.auth_failures_burst, gateway.max_auth_failure_sources)

    def check(self, headers: Headers, service: str, source: str, now: float) -> Verdict:
        """The verdict on one request for ``service`` (or the path, when no service matches) from ``source``."""
        wait = self.failures.retry_after(source, now)
        if wait is not None:
            self.counts["source_blocked"] += 1
            return Verdict(429, "rate_limited", "too many failed authentications from this address", _retry(wait))
        token, rest = split_bearer(headers)
        if token is None:
            self.counts["unauthorized"] += 1
            return Verdict(401, "unauthorized", "this gateway requires a client key: Authorization: Bearer <key>")
        st = self.index.find(token)
        if not isinstance(st, ClientState):
            self.failures.failed(source, now)  # a wrong key is a guess: those are what the limiter paces
            self.counts["unauthorized"] += 1
            return Verdict(401, "unauthorized", "unknown client key")
        st.last_seen = now
        cid = st.config.id
        if not under(service, st.config.services):
            st.counts["forbidden"] += 1
            return Verdict(403, "forbidden", f"client {cid} may not call {service}", client=cid)
        if st.bucket is not None and not st.bucket.take(1, now):
            st.counts["rate_limited"] += 1
            return Verdict(429, "rate_limited", f"client {cid} is over its rate ({st.config.rate:g} requests/s, "
                           f"burst {st.config.burst:g})", _retry(st.bucket.ready_at(1, now) - now), client=cid)
        st.counts["allowed"] += 1
        return Verdict(client=cid, headers=rest)

    def rows(self, now: float) -> list[dict[str, object]]:
        """``cpnctl show clients --json``: one object per client."""
        return [{
            "id": cid, "services": list(st.config.services) if st.config.services is not None else ["/"],
            "rate": st.config.rate, "burst": st.config.burst if st.config.rate is not None else None,
            "tokens": round(st.bucket.level(now), 3) if st.bucket is not None else None,
            "allowed": st.counts["allowed"], "forbidden": st.counts["forbidden"], "rate_limited": st.counts["rate_limited"],
            "last_seen_s": round(now - st.last_seen, 3) if st.last_seen is not None else None,
        } for cid, st in sorted(self.states.items())]
