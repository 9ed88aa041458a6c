"""What a user's request head must be before it is routed: its size, its target, its framing (sans-IO)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

from .errors import HttpError

MAX_HEADER_BYTES = 64 * 1024
# Fields that hold for one connection, not the message: a relay drops them (and Expect, answered by us).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
              b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"expect"}
_RAW, _LOW, _VALUE = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)  # of h11's items


# A keep-alive user asks for the same few targets again and again: the verdicts on short ones are kept
# (bounded: at most CHECKED_TARGETS of at most CHECKED_TARGET_BYTES), a refusal is never kept.
CHECKED_TARGETS = 1024
CHECKED_TARGET_BYTES = 256


def check_target(target: bytes) -> str:
    """The path of an origin-form target, refusing what could escape the advertised path."""
    if len(target) <= CHECKED_TARGET_BYTES:
        return _checked(target)
    return _check(target)


def _check(target: bytes) -> str:
    if not target.startswith(b"/"):
        raise HttpError(400, "bad_request", "only origin-form request targets (/path?query) are accepted")
    path = target.split(b"?", 1)[0]
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "bad_request", "request target is not ASCII") from None
    low = text.lower()
    # A "." or ".." segment: the path starts with "/", so every segment has one before it.
    ended = text + "/"
    # ("..;" too: servlet containers (Tomcat, Jetty) drop a segment's ";parameters" before resolving
    # dot segments: /svc/..;/admin, sent on as /v1/..;/admin, was /admin to such an instance.)
    if "/./" in ended or "/../" in ended or "/..;" in text or "/.;" in text or "%2e" in low or "%2f" in low \
            or "%5c" in low or "\\" in text:
        raise HttpError(400, "bad_request", "dot segments and encoded '.', '/' or '\\' are refused in the path")
    return text


_checked = functools.lru_cache(maxsize=CHECKED_TARGETS)(_check)


def split_head(target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The routable path of a request head and its CPN-* fields (names lowercase), in one pass over
    the fields, or the HttpError the head deserves (431, 400)."""
    full = getattr(headers, "_full_items", None)
    if full is not None:  # h11's own (raw, lowercase, value) items: walked in C, no Python step per field
        size = len(target) + sum(map(len, map(_RAW, full))) + sum(map(len, map(_VALUE, full))) + 4 * len(full)
        names = list(map(_LOW, full))
        framing = (b"content-length" in names) | (b"transfer-encoding" in names) << 1
        cpn = [] if b"\ncpn-" not in b"\n" + b"\n".join(names) else \
            [(low, value) for low, value in zip(names, map(_VALUE, full)) if low[:4] == b"cpn-"]
    else:
        size = len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
        framing = 0  # 1: Content-Length seen, 2: Transfer-Encoding seen
        cpn = []
        for low, value in [(n.lower(), v) for n, v in headers]:
            if low[:4] == b"cpn-":
                cpn.append((low, value))
            elif low == b"content-length":
                framing |= 1
            elif low == b"transfer-encoding":
                framing |= 2
    # h11 bounds only what it must buffer; a head that arrived whole is checked here.
    if size > MAX_HEADER_BYTES:
        raise HttpError(431, "headers_too_large", f"request head exceeds {MAX_HEADER_BYTES} bytes", close=True)
    path = check_target(target)
    if framing == 3:
        raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding: ambiguous framing refused",
                        close=True)
    return path, cpn
