"""HTTP/2 and gRPC at the edges, sans-IO: header translation between HTTP/2 fields and the h11
events the data plane relays, ``grpc-timeout``, and gateway-made errors as gRPC statuses.

The data plane stays one code path for both protocols: an HTTP/2 stream is presented as an
h11 request (its pseudo-headers as request line and Host), its response as h11 events
(trailers in ``EndOfMessage.headers``). README, "gRPC", documents the status mapping.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Iterable

from .errors import HttpError
from .selection import MAX_TIMEOUT_S

Fields = list[tuple[bytes, bytes]]

# Connection-specific fields HTTP/2 forbids (RFC 9113 section 8.2.2); TE only as "trailers".
H2_FORBIDDEN = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                          b"host"})
GRPC_TIMEOUT_UNITS_US = {b"H": 3600 * 1_000_000, b"M": 60 * 1_000_000, b"S": 1_000_000, b"m": 1000, b"u": 1,
                         b"n": 0.001}
_GRPC_TIMEOUT_RE = re.compile(rb"([0-9]{1,8})([HMSmun])")


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


# A gateway-made error (README, "Errors") as the status a gRPC client sees. By the contract's
# error name first, then by HTTP status as gRPC's own HTTP mapping does (doc/http-grpc-status-mapping.md).
GRPC_BY_ERROR = {
    "no_such_service": GrpcStatus.UNIMPLEMENTED,  # no gateway knows the service: it is not implemented anywhere
    "no_instance": GrpcStatus.UNAVAILABLE,  # known, but nothing up (or nothing meets the constraints): retryable
    "no_capacity": GrpcStatus.UNAVAILABLE,
    "bad_gateway": GrpcStatus.UNAVAILABLE,
    "deadline_exceeded": GrpcStatus.DEADLINE_EXCEEDED,
    "request_timeout": GrpcStatus.DEADLINE_EXCEEDED,
    "bad_header": GrpcStatus.INVALID_ARGUMENT,  # a malformed cpn-* metadata value
    "bad_request": GrpcStatus.INTERNAL,
    "body_too_large": GrpcStatus.RESOURCE_EXHAUSTED,
    "headers_too_large": GrpcStatus.RESOURCE_EXHAUSTED,
    "rate_limited": GrpcStatus.RESOURCE_EXHAUSTED,
    "unauthorized": GrpcStatus.UNAUTHENTICATED,
    "forbidden": GrpcStatus.PERMISSION_DENIED,
}
GRPC_BY_HTTP = {400: GrpcStatus.INTERNAL, 401: GrpcStatus.UNAUTHENTICATED, 403: GrpcStatus.PERMISSION_DENIED,
                404: GrpcStatus.UNIMPLEMENTED, 429: GrpcStatus.UNAVAILABLE, 502: GrpcStatus.UNAVAILABLE,
                503: GrpcStatus.UNAVAILABLE, 504: GrpcStatus.UNAVAILABLE}


def grpc_status_of(exc: HttpError) -> GrpcStatus:
    """The gRPC status a gateway-made error becomes for a gRPC client."""
    return GRPC_BY_ERROR.get(exc.error) or GRPC_BY_HTTP.get(exc.status, GrpcStatus.UNKNOWN)


def is_grpc(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """A gRPC request: ``content-type: application/grpc`` (or ``application/grpc+proto`` etc.)."""
    for n, v in fields:
        if n == b"content-type":
            return v.lower().startswith(b"application/grpc")
    return False


def wants_trailers(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request says ``TE: trailers`` (RFC 9110 section 10.1.4): its sender takes trailer fields."""
    full = getattr(fields, "_full_items", None)
    if full is not None:  # h11's own (lowercase names): walked without two calls a field (every request asks)
        return any(_takes_trailers(v) for _, n, v in full if n == b"te")
    return any(n.lower() == b"te" and _takes_trailers(v) for n, v in fields)


def _takes_trailers(te: bytes) -> bool:
    return b"trailers" in (t.split(b";")[0].strip() for t in te.lower().split(b","))


def grpc_timeout_us(value: bytes) -> int:
    """``grpc-timeout`` (up to 8 digits and a unit, gRPC's PROTOCOL-HTTP2.md) in µs; ValueError if malformed."""
    m = _GRPC_TIMEOUT_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError("grpc-timeout must be 1-8 digits and one of H M S m u n")
    return max(1, min(int(int(m.group(1)) * GRPC_TIMEOUT_UNITS_US[m.group(2)]), int(MAX_TIMEOUT_S * 1_000_000)))


def grpc_error_fields(exc: HttpError) -> Fields:
    """A trailers-only gRPC response (HEADERS with END_STREAM) for a gateway-made error."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", str(int(grpc_status_of(exc))).encode()),
            (b"grpc-message", grpc_message(f"{exc.error}: {exc.detail}")), (b"cpn-error", exc.error.encode())]


def grpc_message(text: str) -> bytes:
    """``grpc-message``'s percent-encoding (printable ASCII except ``%`` as is)."""
    return urllib.parse.quote(text[:1024], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def request_head(fields: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes, Fields]:
    """An HTTP/2 request's (method, target, HTTP/1.1 header fields): ``:authority`` becomes Host,
    ``grpc-timeout`` also a ``cpn-timeout`` (the request's deadline) unless one is given.
    ValueError for what RFC 9113 section 8.3 makes malformed (h2 checks most of it already)."""
    pseudo: dict[bytes, bytes] = {}
    out: Fields = []
    host: bytes | None = None
    timeout: bytes | None = None
    has_cpn_timeout = False
    for n, v in fields:
        if n.startswith(b":"):
            if n in pseudo:
                raise ValueError(f"{n.decode('ascii', 'replace')} repeated")
            pseudo[n] = v
            continue
        if n == b"host":
            host = v
            continue
        if n == b"grpc-timeout":
            timeout = v
        elif n == b"cpn-timeout":
            has_cpn_timeout = True
        out.append((n, v))
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    if method is None or path is None or method == b"CONNECT":
        raise ValueError("a request needs :method and :path (CONNECT is not served)")
    if not path.startswith(b"/"):
        raise ValueError(":path must be origin-form")
    authority = pseudo.get(b":authority", host)
    out.insert(0, (b"host", authority if authority else b"localhost"))
    if timeout is not None and not has_cpn_timeout:
        out.append((b"cpn-timeout", f"{grpc_timeout_us(timeout)}us".encode()))
    return method, path, out


def response_fields(status: int, headers: Iterable[tuple[bytes, bytes]]) -> Fields:
    """An h11 response head as HTTP/2 fields: ``:status`` first, connection-specific fields dropped."""
    return [(b":status", str(status).encode()), *trailer_fields(headers)]


def trailer_fields(headers: Iterable[tuple[bytes, bytes]]) -> Fields:
    """Header or trailer fields fit for HTTP/2: lowercase, connection-specific ones dropped."""
    return [(n.lower(), v) for n, v in headers if n.lower() not in H2_FORBIDDEN and n.lower() != b"te"]


def upstream_request_fields(method: bytes, target: bytes, authority: bytes, scheme: bytes,
                            headers: Iterable[tuple[bytes, bytes]]) -> Fields:
    """An h11 request as HTTP/2 fields for an ``http2 = true`` instance; ``te: trailers`` always (gRPC needs it)."""
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", target),
            *trailer_fields(headers), (b"te", b"trailers")]
