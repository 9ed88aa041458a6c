"""What a user connection speaks, from its first bytes, before h11 sees them (sans-IO).

The one place that tells HTTP/1.x from an HTTP/2 prior-knowledge preface or a TLS
ClientHello on a plain port; an HTTP/2 ingress would take over its "h2" answer.
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
TLS_HANDSHAKE = 0x16  # a TLS record of type handshake (a ClientHello); no HTTP method starts with it
# Our answer to an HTTP/2 client with prior knowledge (RFC 9113 sections 3.4, 6.8): the server
# preface (an empty SETTINGS frame), then GOAWAY, last stream 0, HTTP_1_1_REQUIRED (0xd).
_H2_REFUSAL_TEXT = b"HTTP/2 prior knowledge is not supported on this port: use HTTP/1.1"
H2_REFUSAL = (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
              + (8 + len(_H2_REFUSAL_TEXT)).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
              + b"\x00\x00\x00\x00" + (0xD).to_bytes(4, "big") + _H2_REFUSAL_TEXT)


def sniff_preface(data: bytes) -> str | None:
    """``"h2"``, ``"tls"``, ``""`` (too few bytes to tell yet) or None (HTTP/1.x, as far as we can tell)."""
    if data[:1] == bytes([TLS_HANDSHAKE]):
        return "tls"
    if data[:len(H2_PREFACE)] == H2_PREFACE[:len(data)]:
        return "h2" if len(data) >= len(H2_PREFACE) else ""
    return None
