"""TLS streams of the data plane (trio): the ingress's handshake under the same bounds as a plain
connection's request head, and the egress's verified connections to https instances.

The contexts and the words for failures are cpnd/tls.py's; this module only moves bytes.
"""

from __future__ import annotations

import functools
import socket
import ssl
import urllib.parse
import contextlib
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .admission import Slot
from .preface import TLS_HANDSHAKE
from .tls import ClientContexts, InstanceTls, handshake_failure

if TYPE_CHECKING:
    from .config import InstanceConfig
    from .plane import HttpLimits
    from .tls import ServerTls


class Edge(Protocol):
    """What the handshake needs of the users' side of the ingress (cpnd/users.py)."""

    tls_server: ServerTls | None

    @property
    def limits(self) -> HttpLimits: ...

    def _waiting(self, slot: Slot) -> contextlib.AbstractContextManager[Any]: ...

    def edge_event(self, kind: str, line: str, stat: str = ...) -> None: ...

# A client that speaks plain HTTP to https_listen is told so (as nginx does), not left to a TLS
# alert it cannot read.
PLAIN_ON_TLS = (b'{"error": "bad_request", "detail": "this port speaks HTTPS (TLS): use https://"}')
PLAIN_ON_TLS_RESPONSE = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
                         b"connection: close\r\ncontent-length: " + str(len(PLAIN_ON_TLS)).encode() + b"\r\n\r\n"
                         + PLAIN_ON_TLS)


class InstanceTlsError(OSError):
    """The TLS handshake with an instance failed: an OSError, so the egress treats it as a failed
    connect (tried elsewhere, a health failure) and tells why in ``strerror``."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, detail)


_SYSTEM = ClientContexts()  # for https instances that came without a context of their own


def instance_tls(inst: InstanceConfig) -> InstanceTls | None:
    """How to reach ``inst`` over TLS: its configured trust, or, for an https instance made without one
    (not from the config file: registered, say), the system's CAs and the URL's host; None: plain http."""
    return inst.tls if inst.tls is not None else _default_tls(inst.url)


@functools.lru_cache(maxsize=1024)
def _default_tls(url: str) -> InstanceTls | None:
    u = urllib.parse.urlsplit(url)
    return InstanceTls(_SYSTEM.get(None), u.hostname or "", None) if u.scheme == "https" else None


def raw_socket(stream: Any) -> Any:
    """The socket under a plain or TLS stream (for peer names and idle checks)."""
    return getattr(stream, "transport_stream", stream).socket


async def _first_byte(raw: trio.SocketStream, idle_s: float) -> bytes | None:
    """The connection's first byte, peeked (left for the handshake to read); None after ``idle_s`` or EOF."""
    with trio.move_on_after(idle_s):
        try:
            return await raw.socket.recv(1, socket.MSG_PEEK) or None
        except OSError:
            return None
    return None


async def accept(dp: Edge, raw: trio.SocketStream, slot: Slot) -> trio.SSLStream[trio.SocketStream] | None:
    """The user's TLS stream once its handshake is done, or None (the caller closes ``raw``).

    As for a plain connection's request head: silence until the first byte is idle time
    (``http_idle_timeout_ms``), the handshake must then end within ``http_header_timeout_ms``,
    and until it has, the slot may be taken back for a newcomer (a slow handshake holds no more
    than an idle connection).
    """
    server = dp.tls_server
    if server is None or not slot.held:
        return None
    stream = trio.SSLStream(raw, server.context, server_side=True, https_compatible=True)
    failure = ""
    with dp._waiting(slot):
        first = await _first_byte(raw, dp.limits.idle_timeout_s)
        if first is None:
            return None
        if first[0] != TLS_HANDSHAKE:
            with trio.move_on_after(1.0):
                try:
                    await raw.send_all(PLAIN_ON_TLS_RESPONSE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            dp.edge_event("https connections that spoke plain HTTP",
                          f"https: {_source(raw)} sent plain HTTP to https_listen: answered 400", "tls_plain_http")
            return None
        with trio.move_on_after(dp.limits.header_timeout_s) as slow:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                failure = _server_failure(exc.__cause__)
    if not slot.held:
        return None  # taken back for a newcomer
    if slow.cancelled_caught:
        dp.edge_event("https TLS handshakes timed out",
                      f"https: TLS handshake from {_source(raw)} not done within {dp.limits.header_timeout_s:g} s "
                      "of its first byte: closed", "tls_handshake_timeouts")
        return None
    if failure:
        dp.edge_event("https TLS handshakes failed", f"https: TLS handshake from {_source(raw)} failed: {failure}",
                      "tls_handshake_failures")
        return None
    return stream


def _server_failure(cause: BaseException | None) -> str:
    if isinstance(cause, ssl.SSLError):
        return (cause.reason or str(cause)).lower().replace("_", " ")
    return "the client closed the connection" if cause is None else str(cause) or type(cause).__name__


def _source(raw: trio.SocketStream) -> str:
    try:
        host, port = raw.socket.getpeername()[:2]
    except OSError:
        return "a client"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_instance(host: str, port: int, tls: InstanceTls | None, timeout_s: float) -> trio.abc.Stream:
    """A connection to an instance, TLS verified when ``tls``: connect and handshake within ``timeout_s``
    (TooSlowError after), so a request's instance time starts only once it is up."""
    with trio.fail_after(timeout_s):
        raw = await trio.open_tcp_stream(host, port)
        if tls is None:
            return raw
        stream = trio.SSLStream(raw, tls.context, server_hostname=tls.server_name, https_compatible=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(raw)
            raise InstanceTlsError(handshake_failure(exc.__cause__ or exc, tls.server_name)) from None
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        return stream
