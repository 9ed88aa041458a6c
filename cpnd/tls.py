"""TLS at the edge (sans-IO): the ingress's server context, the egress's client contexts, loaded
with errors that name the config key, and TLS failures told in words.

Nothing here touches a socket: cpnd/tlsstream.py runs the handshakes (trio's ``SSLStream``
over these contexts). A reload builds new contexts from the files (a renewed certificate
is served from the next handshake on); connections that are up keep theirs.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

ALPN_HTTP1 = "http/1.1"
# What the ingress offers in ALPN, in its order of preference (DESIGN.md section 6): the
# connection's first bytes then pick the server (an HTTP/2 preface goes to cpnd/h2edge.py).
SERVER_ALPN: tuple[str, ...] = ("h2", ALPN_HTTP1)
CLIENT_ALPN: tuple[str, ...] = (ALPN_HTTP1,)  # to instances; ``http2 = true`` ones: H2_ALPN
H2_ALPN: tuple[str, ...] = ("h2",)
# TLS 1.2 suites: forward-secret AEAD only (Mozilla's "intermediate" profile); TLS 1.3's are all
# AEAD and not set by this string.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
EXPIRY_WARNING = datetime.timedelta(days=14)  # ACME renews at 30 days left: 14 means renewal is failing
MAX_PEM_BYTES = 1024 * 1024  # a certificate chain or a CA bundle larger than this is not what was meant


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot serve; ``key`` is the config key that named it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _read(path: Path, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(key, f"{path} is over {MAX_PEM_BYTES} bytes")
    return data


def _certificates(path: Path, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path, key))
    except ValueError:
        certs = []
    if not certs:
        raise TlsFileError(key, f"{path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    return certs


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _expiry(cert: x509.Certificate) -> datetime.datetime:
    after = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    return after if after is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


@attrs.frozen
class ServerTls:
    """The ingress's context and what it serves, for the log line at start and reload."""

    context: ssl.SSLContext = attrs.field(eq=False)
    subject: str
    expires: datetime.datetime

    def expiring(self, now: datetime.datetime) -> bool:
        """Expired, or expiring within EXPIRY_WARNING: the log line about it is a warning."""
        return self.expires - now < EXPIRY_WARNING

    def describe(self, now: datetime.datetime) -> str:
        left = self.expires - now
        state = f"EXPIRED {(-left).days} days ago" if left.total_seconds() < 0 else f"expires in {left.days} days"
        return f"certificate {self.subject}, {state} ({self.expires:%Y-%m-%d %H:%M} UTC)"


def server_context(cert_file: Path, key_file: Path) -> ServerTls:
    """The context ``https_listen`` serves with; TlsFileError naming ``tls_cert_file`` or ``tls_key_file``."""
    certs = _certificates(cert_file, "tls_cert_file")
    try:
        key = serialization.load_pem_private_key(_read(key_file, "tls_key_file"), password=None)
    except TypeError:
        raise TlsFileError("tls_key_file", f"{key_file}: the key is encrypted (a passphrase cannot be asked for)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError("tls_key_file", f"{key_file}: no PEM private key in it (-----BEGIN PRIVATE KEY-----)") from None
    if _spki(key.public_key()) != _spki(certs[0].public_key()):
        raise TlsFileError("tls_key_file", f"{key_file}: does not match the certificate in tls_cert_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols(list(SERVER_ALPN))
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:  # e.g. a key type this OpenSSL cannot serve with
        raise TlsFileError("tls_cert_file", f"{cert_file}: OpenSSL refused it: {getattr(exc, 'reason', None) or exc}") from None
    return ServerTls(ctx, certs[0].subject.rfc4514_string() or "(empty subject)", _expiry(certs[0]))


def client_context(ca_file: Path | None, alpn: tuple[str, ...] = CLIENT_ALPN) -> ssl.SSLContext:
    """A context verifying instances against ``ca_file`` (PEM), or the system's CAs when None, offering ``alpn``."""
    if ca_file is not None:
        _certificates(ca_file, "tls_ca_file")  # a clear error before OpenSSL's
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError("tls_ca_file", f"{ca_file}: OpenSSL refused it: {getattr(exc, 'reason', None) or exc}") from None
    _harden(ctx)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


@attrs.frozen
class InstanceTls:
    """How the egress verifies one https instance: its context and the name it must present."""

    context: ssl.SSLContext = attrs.field(eq=False)
    server_name: str  # sent in SNI (unless an IP address) and checked against the certificate
    ca_file: Path | None

    @property
    def pool_key(self) -> tuple[str, str]:
        """Connections made with different trust are never shared (part of the pool key)."""
        return (self.server_name, str(self.ca_file))


class ClientContexts:
    """One client context per CA file and protocol (the system's CAs: ~25 ms to load), shared by the
    instances using it; ``h2``: ALPN offers HTTP/2 alone (``http2 = true`` instances)."""

    def __init__(self) -> None:
        self._by_ca: dict[tuple[Path | None, bool], ssl.SSLContext] = {}

    def get(self, ca_file: Path | None, *, h2: bool = False) -> ssl.SSLContext:
        ctx = self._by_ca.get((ca_file, h2))
        if ctx is None:
            ctx = self._by_ca[(ca_file, h2)] = client_context(ca_file, H2_ALPN if h2 else CLIENT_ALPN)
        return ctx


def handshake_failure(exc: BaseException, server_name: str) -> str:
    """A failed TLS handshake with an instance, in words (the egress's 502 detail and log line)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        return f"TLS certificate of {server_name!r} not trusted: {why}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "wrong version number" in reason or "record layer failure" in reason or "packet length too long" in reason:
            return f"TLS handshake failed: {reason} (does the instance speak plain http:// on that port?)"
        if "eof" in reason:
            return "TLS handshake failed: the instance closed the connection (is it an https:// server?)"
        return f"TLS handshake failed: {reason}"
    return f"TLS handshake failed: {exc or type(exc).__name__}"
