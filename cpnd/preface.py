"""What a user connection speaks, from its first bytes, before h11 sees them (sans-IO).

The one place that tells HTTP/1.x from an HTTP/2 prior-knowledge preface (served by
h2edge.py) or a TLS ClientHello on a plain port.
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
TLS_HANDSHAKE = 0x16  # a TLS record of type handshake (a ClientHello); no HTTP method starts with it


def sniff_preface(data: bytes) -> str | None:
    """``"h2"``, ``"tls"``, ``""`` (too few bytes to tell yet) or None (HTTP/1.x, as far as we can tell)."""
    if data[:1] == bytes([TLS_HANDSHAKE]):
        return "tls"
    if data[:len(H2_PREFACE)] == H2_PREFACE[:len(data)]:
        return "h2" if len(data) >= len(H2_PREFACE) else ""
    return None
