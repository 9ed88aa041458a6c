"""Identifiers: gateway and instance ids, service URL-PATHs and their numeric labels.

Shared by config, wire and selection so that all three accept exactly the same
names (protocol-spec/messages.md, "Identifiers").
"""

from __future__ import annotations

import functools
import hashlib
import re

MAX_ID_LEN = 64
MAX_SERVICE_LEN = 256

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# RFC 3986 pchar minus '%' escapes we would have to normalise; '/' separates segments.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


def id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid gateway/instance id, or None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    return _id_problem(value)


# Decoding an UPDATE checks the same few names over and over: remember the verdicts.
@functools.lru_cache(maxsize=8192)
def _id_problem(value: str) -> str | None:
    if not _ID_RE.fullmatch(value):
        return "must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
    return None


def service_problem(value: object) -> str | None:
    """Why ``value`` is not a valid service URL-PATH, or None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    return _service_problem(value)


@functools.lru_cache(maxsize=8192)
def _service_problem(value: str) -> str | None:
    if not value.startswith("/"):
        return "must start with '/'"
    if len(value) > MAX_SERVICE_LEN:
        return f"must be at most {MAX_SERVICE_LEN} characters"
    segments = value[1:].split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            return "must not have empty, '.' or '..' segments or a trailing '/'"
        if not _SEGMENT_RE.fullmatch(seg):
            return f"segment {seg!r} has characters outside RFC 3986 pchar (no '%', '?', '#')"
    return None


@functools.lru_cache(maxsize=8192)
def service_label(service: str) -> int:
    """The numeric label of a service: first 4 bytes of SHA-256 over it, top bit clear.

    Derived, not assigned, so every gateway computes the same label with no coordination.
    """
    digest = hashlib.sha256(b"cpn-label:" + service.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
