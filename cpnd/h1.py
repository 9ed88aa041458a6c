"""HTTP/1.1 messages over byte streams with h11, and the header rules every role shares."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import operator
import os
import re
import select
import urllib.parse
from collections.abc import Collection, Iterable
from http import HTTPStatus
from typing import Any

import h11
import trio
from h11._headers import Headers, normalize_and_validate  # h11's own header list: see rewrite_headers

from .errors import HttpError
from .heads import HOP_BY_HOP
from .whole import answer_as_is, awaits_answer, new_connection, read_whole_awaited, request_bytes, request_events, \
    whole_bytes, wrote_whole
from .pending import NOW

RECEIVE_CHUNK = 256 * 1024  # a bulk body in fewer, larger pieces (each one costs an h11 cycle)
RESPONSE_HOLD_BYTES = 64 * 1024  # responses up to this size reach the user whole or not at all
IDEMPOTENT = {b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"}
DRAIN_LIMIT = 64 * 1024
DRAIN_TIMEOUT_S = 1.0


def h11_reason(exc: h11.ProtocolError) -> str:
    """h11's message without the buffer reprs it appends (``illegal request line: bytearray(b'SM')``)."""
    return re.split(r":\s*(?:bytearray\()?b['\"]", str(exc), maxsplit=1)[0]



def filter_headers(headers: Iterable[tuple[bytes, bytes]], *, drop_cpn: bool) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and those the Connection header names), and optionally CPN-*."""
    headers = list(headers)
    # Connection may name only hop-by-hop headers: Host (and the framing, re-added apart) stay.
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")} - {b"host"}
    out = []
    for n, v in headers:
        ln = n.lower()
        if ln in HOP_BY_HOP or ln in named or (drop_cpn and ln.startswith(b"cpn-")):
            continue
        out.append((n, v))
    return out


def framing(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The framing header to re-send: Content-Length, or chunked if the original was."""
    for n, v in headers:
        if n.lower() == b"content-length":
            return [(b"content-length", v)]
    for n, _ in headers:
        if n.lower() == b"transfer-encoding":
            return [(b"transfer-encoding", b"chunked")]
    return []


FRAMING = (b"content-length", b"transfer-encoding")
_DROP = HOP_BY_HOP - set(FRAMING)
_KEEP_NAMED = {b"host", *FRAMING}  # a Connection header naming these does not drop them
# Of h11's (raw, lowercase, value) items
_RAW, _NAME, _VALUE = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
_IS_CPN = operator.methodcaller("startswith", b"cpn-")
_AS_ITEM = operator.itemgetter(0, 0, 1)  # (name, value) -> h11's (raw, lowercase, value) of a lowercase name


def rewrite_headers(headers: Headers | Iterable[tuple[bytes, bytes]], *, drop_cpn: bool, host: bytes | None = None,
                    default_host: bytes | None = None, drop: Collection[bytes] = (),
                    extra: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
    """The headers to relay: ``filter_headers`` and ``framing`` in one pass, those named in ``drop``
    (lowercase) out, Host set to ``host`` (or ``default_host`` if there is none), ``extra``
    (lowercase, valid) appended.

    Headers h11 parsed are valid already: they are filtered as h11 holds them and the result goes
    into an event built with ``_parsed=True``, without validating every header again (a third of
    a proxy's h11 cost). Anything else takes the checked path.
    """
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return Headers(_rewrite_parsed(full, drop_cpn, host, default_host, drop, extra))
    pairs = list(headers)  # type: ignore[arg-type]
    out = normalize_and_validate(filter_headers(pairs, drop_cpn=drop_cpn) + framing(pairs))._full_items
    out = [item for item in out if item[1] not in drop]
    if host is not None:
        out = [(b"host", b"host", host), *(item for item in out if item[1] != b"host")]
    elif default_host is not None and not any(item[1] == b"host" for item in out):
        out = [*out, (b"host", b"host", default_host)]
    out += map(_AS_ITEM, extra)
    return Headers(out)


def _rewrite_parsed(full: list[tuple[bytes, bytes, bytes]], drop_cpn: bool, host: bytes | None,
                    default_host: bytes | None, drop: Collection[bytes],
                    extra: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes, bytes]]:
    """``rewrite_headers`` of h11's own (raw, lowercase, value) items, the walks over them done in C
    (``map``, ``compress``, set and list lookups): two rewrites a request at each gateway, and a
    comprehension per rule, then one Python loop over the fields, cost 550, then 370 bytecodes a
    local request at saturation."""
    names = list(map(_NAME, full))
    gone = _DROP.union(drop)
    if host is not None:
        gone.add(b"host")  # replaced below
    if drop_cpn and b"\ncpn-" in b"\n" + b"\n".join(names):
        gone.update(itertools.compress(names, map(_IS_CPN, names)))
    if b"connection" in names:
        # Connection may name only hop-by-hop headers: Host (and the framing, re-added apart) stay.
        named = b",".join(itertools.compress(map(_VALUE, full), map(b"connection".__eq__, names))).lower()
        gone.update(set(map(bytes.strip, named.split(b","))) - _KEEP_NAMED)
    if b"content-length" in names and b"transfer-encoding" in names:
        gone.add(b"transfer-encoding")  # as framing(): the length wins
    out = list(itertools.compress(full, map(operator.not_, map(gone.__contains__, names))))
    if host is not None:
        out.insert(0, (b"host", b"host", host))
    elif default_host is not None and (b"host" not in names or b"host" in gone):
        out.append((b"host", b"host", default_host))
    out += map(_AS_ITEM, extra)
    return out


def replace_host(headers: Headers, host: bytes, *, drop: Collection[bytes] = (),
                 extra: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
    """``headers`` (as ``rewrite_headers`` made them) with Host set to ``host``, those named in ``drop``
    out and ``extra`` (lowercase, valid) appended."""
    return Headers([(b"host", b"host", host),
                    *(item for item in headers._full_items if item[1] != b"host" and item[1] not in drop),
                    *map(_AS_ITEM, extra)])


def content_length(headers: Headers | Iterable[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length h11 validated, or None (chunked, or until close)."""
    full = getattr(headers, "_full_items", None)
    if full is not None:  # h11's own: names lowercase already, walked in C
        names = list(map(_NAME, full))
        return int(full[names.index(b"content-length")][2]) if b"content-length" in names else None
    for n, v in headers:
        if n.lower() == b"content-length":
            return int(v)
    return None


def translate_target(target: bytes, service: str, instance_url: str) -> bytes:
    """Replace the service prefix of ``target`` by the instance URL's path; keep the rest and the query."""
    path, sep, query = target.partition(b"?")
    cut, base_path, stem, base_query = _target_base(service, instance_url)
    rest = path[cut:]
    new = stem + rest if rest else base_path
    if base_query:
        query = base_query + (b"&" + query if query else b"")
        sep = b"?"
    return new + sep + query


@functools.lru_cache(maxsize=1024)
def _target_base(service: str, instance_url: str) -> tuple[int, bytes, bytes, bytes]:
    """What ``translate_target`` takes of the service and the instance URL (worked out once, not per request):
    the prefix's length, the URL's path, that path without its trailing slashes, and its query."""
    base = urllib.parse.urlsplit(instance_url)
    base_path = (base.path or "/").encode()
    return len(service.encode()), base_path, base_path.rstrip(b"/"), base.query.encode()


@functools.lru_cache(maxsize=1024)
def instance_address(url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header) of an instance URL; parsed once, not per request."""
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80), u.netloc.encode()


def error_response(exc: HttpError) -> tuple[h11.Response, bytes]:
    body = json.dumps({"error": exc.error, "detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *exc.headers]
    return h11.Response(status_code=exc.status, headers=headers, reason=HTTPStatus(exc.status).phrase.encode()), body



class H11Stream:
    """An h11 connection over a trio stream or a tunnel ByteStream."""

    hangup: Any = None  # a user's connection: its hangups.Hangup once it forwards a request (watched for its close)
    on_block: Any = None  # called before a write waits for the socket (relay.py: a held answer's idle time)
    # Defaults at class level, set on the instance when they change (a stream per request at the egress)
    head_since = 0.0  # when the first byte of the request head being read came
    source = ""  # a user's connection: its peer address (for Forwarded)
    trailers = False  # the request being served said TE: trailers: the upstream's trailers reach the user
    _writing = False  # a write is waiting for the socket: the next one queues behind it, in trio
    later: Any = NOW  # a user's connection: its pending work (cpnd/pending.py); else the accounting runs at once
    _ready: list[Any] | None = None  # events read whole around h11 (a request: ``take``; an answer: read_whole), the next last

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER], transport: Any, *, tunnel: bool = False,
                 conn: h11.Connection | None = None) -> None:
        # ``conn``: a kept-alive connection's (a new h11.Connection is ~8 calls)
        self.conn = new_connection(role) if conn is None else conn
        self.transport = transport
        self.tunnel = tunnel

    @property
    def tunnel_extra(self) -> tuple[tuple[bytes, bytes], ...]:
        """Fields the ingress adds to the tunnelled request: TE: trailers when the user takes them (tunnel.md)."""
        return ((b"te", b"trailers"),) if self.trailers else ()

    async def send(self, event: Any, *, end: bool = False) -> None:
        data = self.conn.send(event) or b""
        if self.tunnel:
            await self.transport.send(data, end=end)
        elif data:
            await self._write(data)

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        """Several events in one write (one system call for a whole small response); empties ``events``
        (their bodies are in the write: a blocked write must not hold two copies)."""
        # A whole response or plain request of known length: written as h11 would, without its machinery
        # per event (whole_bytes, request_bytes: ~1,000-2,000 bytecodes a message); else by h11.
        data = (whole_bytes if type(events[0]) is h11.Response else request_bytes)(self.conn, events) \
            if type(events[-1]) is h11.EndOfMessage else None
        if data is None:
            # (In C: a generator here was ~14 bytecodes an event; filter drops the None of a ConnectionClosed)
            data = b"".join(filter(None, map(self.conn.send, events)))
        events.clear()
        if self.tunnel:
            await self.transport.send(data, end=end)
        elif data:
            await self._write(data)

    async def send_whole(self, data: bytes) -> None:
        """Write ``data``, a response ``whole_response`` took whole, on a ``whole_writable`` connection
        as it came (h11's state moved as its ``send`` of it would)."""
        wrote_whole(self.conn)
        await self._write(data)

    def whole_request_nowait(self) -> list[Any] | None:
        """A tunnel stream's request whole in its first chunk, read around h11 (``request_events``);
        else None, with what came fed to h11 as ``next_event_nowait`` would."""
        receive_nowait = getattr(self.transport, "receive_nowait", None)
        if not self.tunnel or receive_nowait is None:
            return None
        data = receive_nowait()
        if data is None:
            return None
        events = request_events(self.conn, data) if data else None
        if events is None:
            self.conn.receive_data(data)
        return events

    async def _write(self, data: bytes) -> None:
        """Write to a plain socket at once when it takes it all: trio's send_all would then still
        yield to the scheduler (a task step and a loop pass per write, on every hop). What the
        socket does not take, a TLS stream and a broken socket go through trio's send_all."""
        sock = getattr(self.transport, "socket", None)
        if sock is not None and not self._writing:
            try:
                n = os.write(sock.fileno(), data)  # trio's sockets are non-blocking
            except OSError:
                n = 0  # full, or broken: send_all waits, or says so its own way
            if n == len(data):
                return
            data = data[n:]
        if self.on_block is not None:
            self.on_block()
        self._writing = True
        try:
            await self.transport.send_all(data)
        finally:
            self._writing = False

    def take(self, data: bytes) -> None:
        """Received bytes into h11; a whole plain request read around it instead (``request_events``),
        its events then given by ``next_event`` and ``next_event_nowait``."""
        # (A body at most DRAIN_LIMIT: one left unread by an error answer is what ``drain`` would read,
        # and the connection goes on as it would; a larger one unread ends it, read by h11 as ever.)
        events = request_events(self.conn, data, DRAIN_LIMIT) if data else None
        if events is None:
            self.conn.receive_data(data)
        else:
            events.reverse()
            self._ready = events

    def start_next_cycle(self) -> None:
        """h11's, for the next request (what was read whole of this one and left unread goes)."""
        self._ready = None
        self.conn.start_next_cycle()

    async def next_event(self) -> Any:
        if self._ready:
            return self._ready.pop()
        conn = self.conn
        # An instance's answer awaited, nothing of it in yet: h11 would say NEED_DATA (~120 bytecodes),
        # and the first read may hold it whole (read_whole), as most do.
        awaited = conn.our_role is h11.CLIENT and not self.tunnel and awaits_answer(conn)
        while True:
            if not awaited:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
            if self.tunnel:
                data = await self.transport.receive()
            else:
                data = await receive_some(self.transport)
                if awaited:
                    awaited = False
                    first = self._first_read(data)
                    if first is not None:
                        return first
                    continue
            conn.receive_data(data)

    async def answer(self, extra: bytes) -> Any:
        """``next_event`` for an instance's answer an egress passes on (to our own user, or down a
        stream): the first read holding it whole as it may be passed on comes as a Whole, rewritten
        (whole.answer_as_is, ``extra`` its added field lines); anything else as h11's events, read as
        ``next_event`` reads."""
        conn = self.conn
        if self._ready or self.tunnel or conn.our_role is not h11.CLIENT or not awaits_answer(conn):
            return await self.next_event()
        data = await receive_some(self.transport)
        whole = answer_as_is(conn, data, extra)
        if whole is not None:
            return whole
        return self._first_read(data) or await self.next_event()

    def _first_read(self, data: bytes) -> Any:
        """An awaited answer's first read: its first event if it came whole (read_whole_awaited: the rest
        ready), else None, the bytes given to h11."""
        read = read_whole_awaited(self.conn, data)
        if read is not None:
            self._ready = read
            return read.pop()
        self.conn.receive_data(data)
        return None

    def receive_nowait(self) -> bool:
        """Whatever a plain socket holds already, into h11, without waiting and without trio's
        receive (a checkpoint: a task step and a loop pass, even with the bytes there); True if
        anything came (or the end). False for nothing yet, a broken socket (the wait says so its
        own way), a TLS stream or a tunnel stream."""
        sock = getattr(self.transport, "socket", None)
        if sock is None or self.tunnel:
            return False
        try:
            data = os.read(sock.fileno(), RECEIVE_CHUNK)  # trio's sockets are non-blocking
        except OSError:
            return False
        self.take(data)
        return True

    def next_event_nowait(self) -> Any:
        """The next event if what was received already holds it, else None. A tunnel stream's
        chunks already queued count as received (a request's head arrives with its OPEN)."""
        if self._ready:
            return self._ready.pop()
        event = self.conn.next_event()
        if event is h11.NEED_DATA and self.tunnel:
            receive_nowait = getattr(self.transport, "receive_nowait", None)
            data = receive_nowait() if receive_nowait is not None else None
            if data is not None:
                self.conn.receive_data(data)
                event = self.conn.next_event()
        return None if event is h11.NEED_DATA else event


_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})  # trio's: the socket was closed (by us)


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """What trio's SocketStream raises for ``exc`` (its ``_translate_socket_errors_to_stream_errors``)."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive_some(transport: Any, *, empty: bool = False) -> bytes:
    """``transport.receive_some(RECEIVE_CHUNK)``; from a plain socket without the ~25 calls trio makes
    around its read (a conflict detector, an error-translating context manager, the socket's
    wrapper and its async context manager): what is there is read at once, then a checkpoint, as
    trio's; when nothing is there, a wait for it. Trio's semantics and errors (Cancelled before the
    read if the scope is, ClosedResourceError, BrokenResourceError). A TLS stream reads its own way.
    ``empty``: the caller found nothing there in this step (``H11Stream.receive_nowait``): it waits at
    once (a read finding nothing again was a system call and an exception)."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return await transport.receive_some(RECEIVE_CHUNK)
    fd = sock.fileno()
    if not empty:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(fd, RECEIVE_CHUNK)  # trio's sockets are non-blocking
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from (None if exc.errno in _CLOSED_ERRNOS else exc)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()  # it was there: others run first, as in trio's
            return data
    while True:
        await trio.lowlevel.wait_readable(fd)  # ClosedResourceError if the socket is closed meanwhile
        try:
            # Its number read again: closed by another task after it woke us, its number may be a new
            # socket's already (-1 from a closed socket: EBADF, ClosedResourceError, as trio's).
            return os.read(sock.fileno(), RECEIVE_CHUNK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise _stream_error(exc) from (None if exc.errno in _CLOSED_ERRNOS else exc)


async def next_event_within(stream: Any, timeout_s: float) -> Any:
    """The stream's next event, TooSlowError after ``timeout_s``; no timer when it is already here."""
    event = stream.next_event_nowait()
    if event is not None:
        return event
    with trio.fail_after(timeout_s):
        return await stream.next_event()


async def drain(client: H11Stream) -> bool:
    """Read (and drop) what is left of a request body we will not forward, if it is small."""
    seen = 0
    with trio.move_on_after(DRAIN_TIMEOUT_S):
        while client.conn.their_state is h11.SEND_BODY:
            event = await client.next_event()
            if isinstance(event, h11.Data):
                seen += len(event.data)
                if seen > DRAIN_LIMIT:
                    return False
            elif not isinstance(event, h11.EndOfMessage):
                return False
        return True
    return False


def readable(stream: trio.abc.Stream) -> bool:
    """An idle keep-alive connection that is readable has been closed by the other end.

    poll, not select: with the descriptor limit raised, descriptors above 1023 are common
    and select() refuses them (every pooled connection would look closed).
    """
    try:
        poller = select.poll()
        poller.register(getattr(stream, "transport_stream", stream).socket.fileno(), select.POLLIN)  # TLS: its socket
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True

