"""Who the instance is told it serves (sans-IO): ``Forwarded`` and ``X-Forwarded-For`` from what the
ingress saw (protocol-spec/tunnel.md, "Client address").

The ingress puts the user's address and its own id in the tunnelled request head as
``CPN-Client`` and ``CPN-Ingress``: a user can never set them (every ingress strips the
``CPN-*`` headers users send), so the egress may trust them as it trusts the stream. The
egress replaces whatever ``Forwarded`` / ``X-Forwarded-For`` came with the request by
``Forwarded: for=<client>;by=<ingress>`` (RFC 7239) and ``X-Forwarded-For: <client>``.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
from collections.abc import Iterable

import attrs

from .names import id_problem

CLIENT = b"cpn-client"
INGRESS = b"cpn-ingress"
FORWARDED = b"forwarded"
X_FORWARDED_FOR = b"x-forwarded-for"
REPLACED = frozenset({FORWARDED, X_FORWARDED_FOR, CLIENT, INGRESS})  # set by us only, whatever came


@attrs.frozen
class Origin:
    """The user's address (an IP address, canonical text) and the id of the ingress that saw it."""

    client: str
    ingress: str

    def forwarded(self) -> bytes:
        """RFC 7239 section 6: an IPv6 address goes in brackets, quoted."""
        node = f'"[{self.client}]"' if ":" in self.client else self.client
        return f"for={node};by={self.ingress}".encode()

    @functools.cached_property
    def instance_headers(self) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        return (FORWARDED, self.forwarded()), (X_FORWARDED_FOR, self.client.encode())


# Parsing an address costs microseconds and the same few come again and again (a user's
# connection carries many requests): the checks are cached (bounded), not repeated per request.
@functools.lru_cache(maxsize=4096)
def client_address(source: str) -> str | None:
    """The canonical text of a socket's peer address (an IPv4-mapped IPv6 one as IPv4); None if not an IP."""
    try:
        ip = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def at_ingress(headers: list[tuple[bytes, bytes]], source: str, ingress: str) -> list[tuple[bytes, bytes]]:
    """The tunnelled head's headers: the user's Forwarded / X-Forwarded-For out, CPN-Client and
    CPN-Ingress in (``headers`` has had the user's ``CPN-*`` removed already)."""
    out = [(n, v) for n, v in headers if n.lower() not in REPLACED]
    out += tunnel_pair(source, ingress)
    return out


@functools.lru_cache(maxsize=4096)
def tunnel_pair(source: str, ingress: str) -> tuple[tuple[bytes, bytes], ...]:
    client = client_address(source)
    return () if client is None else ((CLIENT, client.encode()), (INGRESS, ingress.encode()))


def read(headers: Iterable[tuple[bytes, bytes]]) -> Origin | None:
    """The Origin a tunnelled head carries: exactly one valid CPN-Client and one valid CPN-Ingress, else None
    (``read_parsed``'s rule, of plain (name, value) pairs)."""
    return read_parsed([(n, n.lower(), v) for n, v in headers])


_NAME = operator.itemgetter(1)  # of h11's (raw, lowercase, value) items


def read_parsed(full: list[tuple[bytes, bytes, bytes]]) -> Origin | None:
    """The Origin of a tunnelled head as h11 holds it, (raw, lowercase, value) items, walked in C (an
    egress reads every tunnelled head: a Python loop over its fields, and h11's raw_items list, were
    ~130 bytecodes)."""
    names = list(map(_NAME, full))
    if names.count(CLIENT) != 1 or names.count(INGRESS) != 1:
        return None
    return _origin(full[names.index(CLIENT)][2], full[names.index(INGRESS)][2])


def origin_at(source: str, ingress: str) -> Origin | None:
    """The Origin an ingress tells its own egress (a local instance: no tunnelled head to carry it)."""
    pair = tunnel_pair(source, ingress)
    return _origin(pair[0][1], pair[1][1]) if pair else None


@functools.lru_cache(maxsize=4096)
def _origin(client: bytes, ingress: bytes) -> Origin | None:
    try:
        addr, gid = client.decode("ascii"), ingress.decode("ascii")
    except UnicodeDecodeError:
        return None
    canonical = client_address(addr)
    if canonical is None or canonical != addr or id_problem(gid):
        return None
    return Origin(addr, gid)


def for_instance(headers: list[tuple[bytes, bytes]], origin: Origin | None) -> list[tuple[bytes, bytes]]:
    """The instance's headers: any Forwarded / X-Forwarded-For (and CPN-Client / CPN-Ingress) replaced
    by ours; with no Origin (an ingress that sends none) the user's are still removed, none added."""
    out = [(n, v) for n, v in headers if n.lower() not in REPLACED]
    if origin is not None:
        out += origin.instance_headers
    return out
