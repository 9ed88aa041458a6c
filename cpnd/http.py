"""The data plane: HTTP ingress, transit relay, egress to instances (trio + h11).

ingress (user's HTTP/1.1, per-request ``select``) -> tunnel streams hop by hop ->
egress (URL-PATH -> the instance's real URL, keep-alive pool) -> and back.
Every HTTP message is parsed and serialised with h11; a transit gateway relays
stream bytes without parsing HTTP.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
from http import HTTPStatus
import logging
import os
import random
import re
import select
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

from .admission import Slot, SlotTable, Tally
from .aio import open_listeners, open_nursery, serve_accepting
from .loglimit import LogLimiter
from .preface import H2_REFUSAL, sniff_preface
from .config import Config, InstanceConfig, ServiceConfig
from .names import service_label
from .rib import Key
from .health import HealthTracker
from .load import InstanceMeter, LatencyCorrection, OwnTimes, SendAccount, Stage
from .rib import Best
from .select import (
    BadHeader,
    BoundDamping,
    Candidate,
    Constraints,
    TtlCache,
    candidates,
    choose,
    View,
    expected_us,
    explain_none,
    ingress_view,
    match_service,
    no_live_instance,
    parse_constraints,
    pinned_first,
    rank,
    slack_us,
    within_bound,
)
from .streams import Abandon, ByteStream, StreamReset, TunnelStream, _Inbox
from .tunnel import EXT_FLAG_IDEMPOTENT, NO_BUDGET, ExtHeader, ResetCode

if TYPE_CHECKING:
    from .host import DataPlaneHost as Daemon  # issue 18: what the data plane needs of the daemon, not the daemon

log = logging.getLogger("cpnd.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_REPLAY_BYTES = 1024 * 1024
RECEIVE_CHUNK = 256 * 1024  # a bulk body in fewer, larger pieces (each one costs an h11 cycle)
MAX_ATTEMPTS = 3
PIPE_HIGH_WATER = 256 * 1024
ERROR_LOG_PER_S = 50
ATTEMPT_LOG_PER_S = 10  # lines about a failed attempt (a refusal, say) that another candidate may still serve
RESPONSE_HOLD_BYTES = 64 * 1024  # responses up to this size reach the user whole or not at all
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
              b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"expect"}
IDEMPOTENT = {b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"}


@attrs.frozen
class HttpLimits:
    max_body_bytes: int = 100 * 1024 * 1024
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    body_idle_timeout_s: float = 60.0
    max_clients: int = 4096
    max_clients_per_ip: int = 256
    instance_connect_timeout_s: float = 2.0
    pool_idle_per_instance: int = 32


class HttpError(Exception):
    """A gateway-made error response: status and the contract's JSON body."""

    def __init__(self, status: int, error: str, detail: str, *, close: bool = False) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.close = close  # the request's framing cannot be trusted: end the connection after this
        self.service = ""  # for metrics, once known


def _h11_reason(exc: h11.ProtocolError) -> str:
    """h11's message without the buffer reprs it appends (``illegal request line: bytearray(b'SM')``)."""
    return re.split(r":\s*(?:bytearray\()?b['\"]", str(exc), maxsplit=1)[0]


def _reset_error(exc: StreamReset) -> HttpError:
    if exc.code == ResetCode.DEADLINE:
        return HttpError(504, "deadline_exceeded", exc.text or "the request's deadline passed")
    if exc.code == ResetCode.REFUSED:
        return HttpError(503, "no_capacity", exc.text or "every candidate instance refused the request")
    name = ResetCode(exc.code).name.lower() if exc.code in ResetCode._value2member_map_ else str(exc.code)
    return HttpError(502, "bad_gateway", f"{name}: {exc.text}")


def _combine(failures: list[HttpError]) -> HttpError:
    """One answer for all failed attempts: 504 if the deadline passed, 503 if all refused, else 502."""
    if not failures:
        return HttpError(502, "bad_gateway", "no candidate could be tried")
    if any(f.status == 504 for f in failures):
        return next(f for f in failures if f.status == 504)
    if all(f.status == 503 for f in failures):
        return HttpError(503, "no_capacity", "; ".join(f.detail for f in failures))
    return HttpError(502, "bad_gateway", "; ".join(f.detail for f in failures if f.status == 502))


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


def _framing(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The framing header to re-send: Content-Length, or chunked if the original was."""
    for n, v in headers:
        if n.lower() == b"content-length":
            return [(b"content-length", v)]
    for n, _ in headers:
        if n.lower() == b"transfer-encoding":
            return [(b"transfer-encoding", b"chunked")]
    return []


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length h11 validated, or None (chunked, or until close)."""
    for n, v in headers:
        if n.lower() == b"content-length":
            return int(v)
    return None


def translate_target(target: bytes, service: str, instance_url: str) -> bytes:
    """Replace the service prefix of ``target`` by the instance URL's path; keep the rest and the query."""
    path, sep, query = target.partition(b"?")
    rest = path[len(service.encode()):]
    base = urllib.parse.urlsplit(instance_url)
    base_path = (base.path or "/").encode()
    if rest:
        new = base_path.rstrip(b"/") + rest
    else:
        new = base_path
    if base.query:
        query = base.query.encode() + (b"&" + query if query else b"")
        sep = b"?"
    return new + sep + query


@functools.lru_cache(maxsize=1024)
def _instance_address(url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header) of an instance URL; parsed once, not per request."""
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80, u.netloc.encode()


def check_target(target: bytes) -> str:
    """The path of an origin-form target, refusing what could escape the advertised path."""
    if not target.startswith(b"/"):
        raise HttpError(400, "bad_request", "only origin-form request targets (/path?query) are accepted")
    path = target.split(b"?", 1)[0]
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "bad_request", "request target is not ASCII") from None
    low = text.lower()
    if any(seg in (".", "..") for seg in text.split("/")) or "%2e" in low or "%2f" in low or "%5c" in low or "\\" in text:
        raise HttpError(400, "bad_request", "dot segments and encoded '.', '/' or '\\' are refused in the path")
    return text


# ---------------------------------------------------------------- local pipes


class PipeEnd:
    """One end of an in-process byte stream, for requests to our own instances."""

    def __init__(self) -> None:
        self.inbox = _Inbox()
        self.buffered = 0
        self.drained = trio.Event()
        self.other: PipeEnd = self
        self.load_report: tuple[float, float, int, int | None] | None = None
        self.sent_end = False
        self.abandon = Abandon()

    def cancel_on_abandon(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the other end resets (the ingress gave up)."""
        self.abandon.add(scope)

    @property
    def closed(self) -> bool:
        """Reset, or both directions ended."""
        return self.inbox.reset is not None or (self.sent_end and self.inbox.ended and not self.inbox.chunks)

    def report_load(self, load: float, bload: float, compute_us: float, instance_us: float | None = None) -> None:
        self.other.load_report = (load, bload, int(compute_us), None if instance_us is None else int(instance_us))

    async def receive(self) -> Any:
        """The next chunk (or event, for LocalEvents); ``b""`` at the end."""
        item = await self.inbox.pop()
        if isinstance(item, bytes):
            return item  # b"": the other end is done
        data, size = item
        self.buffered -= size
        self.drained.set()
        return data

    def receive_nowait(self) -> Any:
        """The next queued chunk or event, else None (nothing there yet: it would block)."""
        if not self.inbox.chunks:
            return None
        data, size = self.inbox.chunks.popleft()
        self.buffered -= size
        self.drained.set()
        return data

    async def send(self, data: bytes, end: bool = False) -> None:
        await self.send_event(data or None, len(data), end)

    async def send_event(self, item: Any, size: int, end: bool) -> None:
        """Queue ``item`` (``size`` bytes of payload, for the high-water mark); ``None`` queues nothing."""
        o = self.other
        if self.inbox.reset is not None:
            raise self.inbox.reset
        while o.buffered > PIPE_HIGH_WATER and o.inbox.reset is None:
            o.drained = trio.Event()
            await o.drained.wait()
        if item is not None:
            o.buffered += size
            o.inbox.push((item, size))
        if end:
            self.sent_end = True
            o.inbox.ended = True
            o.inbox.event.set()

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        self.other.inbox.fail(StreamReset(code, delivered, text))
        self.inbox.fail(StreamReset(code, delivered, "reset locally: " + text))
        self.drained.set()
        self.other.drained.set()
        self.other.abandon.fire()


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a, b = PipeEnd(), PipeEnd()
    a.other, b.other = b, a
    return a, b


class LocalEvents:
    """H11Stream's interface over a PipeEnd that carries h11 events, not bytes.

    A request to one of our own instances needs no wire format between our ingress and
    our egress: passing the events saves a serialise and a parse each way. Both sides
    already hold validated events (the user's request, the instance's response).
    """

    def __init__(self, end: PipeEnd) -> None:
        self.end = end

    async def send(self, event: Any, *, end: bool = False) -> None:
        await self.end.send_event(event, len(event.data) if isinstance(event, h11.Data) else 0, end)

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        for i, event in enumerate(events):
            await self.send(event, end=end and i == len(events) - 1)

    async def next_event(self) -> Any:
        event = await self.end.receive()
        return h11.ConnectionClosed() if isinstance(event, bytes) else event

    def next_event_nowait(self) -> Any:
        """The next event if one is queued, else None."""
        return self.end.receive_nowait()


# ---------------------------------------------------------------- HTTP/1.1 over a byte stream


class H11Stream:
    """An h11 connection over a trio stream or a tunnel ByteStream."""

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER], transport: Any, *, tunnel: bool = False) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.transport = transport
        self.tunnel = tunnel
        self.head_since = 0.0  # when the first byte of the request head being read came

    async def send(self, event: Any, *, end: bool = False) -> None:
        data = self.conn.send(event) or b""
        if self.tunnel:
            await self.transport.send(data, end=end)
        elif data:
            await self.transport.send_all(data)

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        """Several events in one write (one system call for a whole small response); empties ``events``
        (their bodies are in the write: a blocked write must not hold two copies)."""
        data = b"".join(self.conn.send(e) or b"" for e in events)
        events.clear()
        if self.tunnel:
            await self.transport.send(data, end=end)
        elif data:
            await self.transport.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.tunnel:
                data = await self.transport.receive()
            else:
                data = await self.transport.receive_some(RECEIVE_CHUNK)
            self.conn.receive_data(data)

    def next_event_nowait(self) -> Any:
        """The next event if what was received already holds it, else None."""
        event = self.conn.next_event()
        return None if event is h11.NEED_DATA else event


async def next_event_within(stream: H11Stream | LocalEvents, timeout_s: float) -> Any:
    """The stream's next event, TooSlowError after ``timeout_s``; no timer when it is already here."""
    event = stream.next_event_nowait()
    if event is not None:
        return event
    with trio.fail_after(timeout_s):
        return await stream.next_event()


class _Inline:
    """Stands in for a nursery when there is nothing to run beside the caller (the common case)."""

    def __init__(self) -> None:
        self.cancel_scope = trio.CancelScope()

    async def __aenter__(self) -> _Inline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


@attrs.define
class _AttemptState:
    sent_head: bool = False  # once the user has the head, a failure can only cut the connection
    # For the end-to-end estimate (trio clock): when the request went upstream and its response
    # head came back (a tunnelled attempt); the instance's time to its response head (as the
    # egress measured it: ours, or told in LOAD); when the head left for the user.
    sent_at: float | None = None
    upstream_head_at: float | None = None
    instance_s: float | None = None
    head_at: float | None = None
    whole: bool = False  # the whole request went in one write: no time waiting for the user's upload


class _StreamSink:
    """Where the egress sends an instance's response: back down the (tunnel or pipe) stream."""

    def __init__(self, rx: H11Stream | LocalEvents, stream: ByteStream) -> None:
        self.rx = rx
        self.stream = stream
        self.head_at: float | None = None  # when the response head went back down the stream

    async def send(self, event: Any, *, end: bool = False) -> None:
        await self.rx.send(event, end=end)
        if self.head_at is None and isinstance(event, h11.Response):
            self.head_at = trio.current_time()

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        head = isinstance(events[0], h11.Response)
        await self.rx.send_all(events, end=end)
        if head and self.head_at is None:
            self.head_at = trio.current_time()

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        self.stream.reset(code, delivered, text)

    def report_load(self, meter: InstanceMeter, instance_s: float | None = None) -> None:
        now = trio.current_time()
        self.stream.report_load(meter.load(now), meter.bounded_load(now), meter.base_us,
                                None if instance_s is None else instance_s * 1_000_000)


class _UserSink:
    """The user's own connection as the egress's sink: a local instance answers the user directly.

    What would reset a stream is kept for the ingress, which retries or answers the
    error as it would for a tunnelled attempt.
    """

    def __init__(self, client: H11Stream, state: _AttemptState) -> None:
        self.client = client
        self.state = state
        self.status = 0
        self.failure: StreamReset | None = None

    async def send(self, event: Any, *, end: bool = False) -> None:
        await self.send_all([event], end=end)

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        if isinstance(events[0], h11.Response):
            self.status = events[0].status_code
        self.state.sent_head = True
        head = isinstance(events[0], h11.Response)
        try:
            await self.client.send_all(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamReset(ResetCode.CANCEL, True, f"user connection lost: {exc}") from None
        if head:
            self.state.head_at = trio.current_time()

    def reset(self, code: ResetCode, delivered: bool, text: str = "") -> None:
        if self.failure is None:
            self.failure = StreamReset(code, delivered, text)

    def report_load(self, meter: InstanceMeter, instance_s: float | None = None) -> None:
        pass  # the ingress reads its own instances' meters directly


def error_response(exc: HttpError) -> tuple[h11.Response, bytes]:
    body = json.dumps({"error": exc.error, "detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")]
    return h11.Response(status_code=exc.status, headers=headers, reason=HTTPStatus(exc.status).phrase.encode()), body


# ---------------------------------------------------------------- request body, replayable


class BodySource:
    """The client's request body, read once, kept (up to a bound) for a retry."""

    def __init__(self, client: H11Stream, limits: HttpLimits) -> None:
        self.client = client
        self.limits = limits
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.replayable = True
        self.consumed = False
        self._pending: Any = None  # an event take_buffered read but left for iterate() (too big to keep)

    async def iterate(self) -> AsyncIterator[bytes]:
        if self.consumed and not self.replayable:
            raise RuntimeError("body already streamed and too large to replay")
        self.consumed = True
        for chunk in list(self.chunks):
            yield chunk
        if self._pending is not None:
            event, self._pending = self._pending, None
            chunk = self._take(event)
            if chunk is not None:
                yield chunk
        while not self.done:
            chunk = self._take(await next_event_within(self.client, self.limits.body_idle_timeout_s))
            if chunk is not None:
                yield chunk

    def take_buffered(self) -> bool:
        """Take in what of the body has already arrived, without waiting; True if that is all of it.

        A small request usually arrives whole with its head: it then goes upstream in one
        write, with no task to stream it.
        """
        while not self.done and self._pending is None:
            event = self.client.next_event_nowait()
            if event is None:
                return False
            if self.replayable and isinstance(event, h11.Data) and self.size + len(event.data) > MAX_REPLAY_BYTES:
                # Taking it would drop the replay copy of what nobody has sent yet: iterate() takes it.
                self._pending = event
                return False
            self._take(event)
        return self.done

    def whole(self) -> bytes:
        """The body, once ``take_buffered`` said it is all here."""
        return b"".join(self.chunks)

    def _take(self, event: Any) -> bytes | None:
        if isinstance(event, h11.Data):
            self.size += len(event.data)
            if self.size > self.limits.max_body_bytes:
                raise HttpError(413, "body_too_large", f"request body exceeds {self.limits.max_body_bytes} bytes",
                                close=True)
            if self.replayable:
                self.chunks.append(event.data)
                if self.size > MAX_REPLAY_BYTES:
                    self.replayable = False
                    self.chunks = []
            return event.data
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            return None
        raise HttpError(400, "bad_request", f"unexpected {type(event).__name__} in request body")


# ---------------------------------------------------------------- the data plane


@attrs.define
class _PoolEntry:
    stream: trio.SocketStream
    conn: h11.Connection


class DataPlane:
    """Ingress, transit and egress for one gateway."""

    def __init__(self, daemon: Daemon, limits: HttpLimits = HttpLimits()) -> None:
        self.d = daemon
        self.limits = limits
        self.rng = random.Random()
        self.pool: dict[tuple[str, int], collections.deque[_PoolEntry]] = {}
        self.meters: dict[str, InstanceMeter] = {}
        self._health: dict[str, HealthTracker] = {}
        self._vouched: dict[str, float] = {}  # when a request last reached each instance
        self._error_lines = LogLimiter(ERROR_LOG_PER_S, "error", log)
        self._attempt_lines = LogLimiter(ATTEMPT_LOG_PER_S, "failed-attempt", log)
        self.ttl = TtlCache(daemon.config.gateway.dns_ttl_s)
        self.damping = BoundDamping()
        self.own = OwnTimes()  # our own processing per request, by stage (protocol-spec/selection.md, "Own time")
        self.correction = LatencyCorrection()  # per instance, at this ingress; its quantile is set by reconfigure
        self.reconfigure(daemon.config)
        self.account = SendAccount()
        # Users' connections: one still waiting for a whole request head is taken back for a
        # newcomer before the newcomer is refused (see _next_request).
        self.slots = SlotTable(limits.max_clients, limits.max_clients_per_ip)
        self.edge_tally = Tally()  # refusals and accept errors: one log line a second
        self.inflight = 0
        self.draining = False
        self._idle = trio.Event()
        self._accepting = trio.CancelScope()
        self.http_port: int | None = None
        self.stats: collections.Counter[str] = collections.Counter()

    def flush_log_counts(self) -> None:
        """Log the counts of suppressed lines once their second is over, even when no more lines come."""
        now = trio.current_time()
        self._error_lines.flush(self.d.id, now)
        self._attempt_lines.flush(self.d.id, now)

    @property
    def clients(self) -> int:
        return len(self.slots)

    def health(self, iid: str) -> HealthTracker:
        tracker = self._health.get(iid)
        if tracker is None:
            g = self.d.config.gateway
            tracker = self._health[iid] = HealthTracker(g.health_failures, g.health_successes,
                                                        hold_down_s=g.health_interval_ms / 1000)
        return tracker

    def _health_result(self, iid: str, ok: bool) -> None:
        now = trio.current_time()
        if ok:
            self._vouched[iid] = now
        if self.health(iid).result(ok, now):
            self.d.health_changed(iid, self.health(iid).healthy)

    async def probe(self, inst: InstanceConfig) -> None:
        """Active check: a TCP connect, or GET ``health_path`` answered below 500."""
        now = trio.current_time()
        interval = self.d.config.gateway.health_interval_ms / 1000
        if self.health(inst.id).healthy and now - self._vouched.get(inst.id, -1e9) < interval:
            return  # real traffic proved it alive since the last probe
        u = urllib.parse.urlsplit(inst.url)
        ok = False
        with trio.move_on_after(min(2.0, interval)):
            try:
                stream = await trio.open_tcp_stream(u.hostname or "127.0.0.1", u.port or 80)
            except OSError:
                stream = None
            if stream is not None:
                async with stream:
                    if inst.health_path is None:
                        ok = True
                    else:
                        conn = H11Stream(h11.CLIENT, stream)
                        try:
                            await conn.send(h11.Request(method="GET", target=inst.health_path,
                                                        headers=[("host", u.netloc), ("connection", "close")]))
                            await conn.send(h11.EndOfMessage())
                            event = await conn.next_event()
                            ok = isinstance(event, h11.Response) and event.status_code < 500
                        except (h11.ProtocolError, trio.BrokenResourceError, OSError):
                            ok = False
        self._health_result(inst.id, ok)

    def reconfigure(self, config: Config) -> None:
        """Take the (re)loaded services: meters of instances that stay keep their history."""
        self.local: dict[tuple[int, str], tuple[ServiceConfig, InstanceConfig]] = {
            (service_label(s.path), i.id): (s, i) for s in config.services for i in s.instances
        }
        meters = {}
        for _, inst in self.local.values():
            m = self.meters.get(inst.id) or InstanceMeter(inst.capacity, int(inst.compute_latency_ms * 1000))
            m.capacity = inst.capacity
            m.hint_us = inst.compute_latency_ms * 1000
            meters[inst.id] = m
        self.meters = meters
        self.ttl.ttl_s = config.gateway.dns_ttl_s
        self.correction.quantile = config.gateway.latency_quantile

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept users until ``stop_accepting``; their connections then run on until done."""
        addr = self.d.config.gateway.http_listen
        assert addr is not None
        listeners = await open_listeners("http_listen", addr.host, addr.port, str(addr))
        self.http_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as handlers:
            with self._accepting:
                task_status.started()
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(serve_accepting, listener, functools.partial(self._admit_client, handlers),
                                             self.edge_event, "http")
            for listener in listeners:
                await listener.aclose()

    def edge_event(self, kind: str, line: str, stat: str = "accept_errors") -> None:
        """A refusal or an accept error: logged in full when the first of a spell, else counted."""
        self.stats[stat] += 1
        if self.edge_tally.note(kind, trio.current_time()):
            log.warning("%s: %s (more are counted: one line a second)", self.d.id, line)

    def flush_edge_log(self) -> None:
        """Called once a second: the line summing up a flood's refusals, if any."""
        line = self.edge_tally.flush(trio.current_time())
        if line:
            log.warning("%s: %s", self.d.id, line)

    def _admit_client(self, handlers: trio.Nursery, stream: trio.SocketStream) -> None:
        """A slot for a new user (one waiting for a head gives its own, if need be), or the door at once."""
        try:
            source = stream.socket.getpeername()[0]
        except OSError:
            stream.socket.close()  # it went away already
            return
        adm = self.slots.admit(source)
        for victim in adm.evicted:
            if victim.owner is not None:
                victim.owner.cancel()  # the scope of its idle wait: it closes quietly (else it sees held False)
            self.edge_event("http connections reclaimed (no whole head yet)",
                            f"http: connection from {victim.source} waiting for a request head closed for a new user "
                            f"({_bound_name(adm.reason)})",
                            "idle_reclaimed")
        if adm.slot is None:
            # Closed before any byte is read: cheaper than a task, and nothing to reset.
            stream.socket.close()
            self.edge_event(f"http connections refused at {_bound_name(adm.reason)}",
                            f"http: connection from {source} refused: {_bound_name(adm.reason)} "
                            f"({self.slots.limit if adm.reason == 'limit' else self.slots.per_source}) reached",
                            f"refused_{_bound_name(adm.reason)}")
            return
        handlers.start_soon(self._client, stream, adm.slot)

    def stop_accepting(self) -> None:
        """Graceful shutdown: no new users, no new requests on kept-alive connections."""
        self.draining = True
        self._accepting.cancel()

    async def drained(self) -> None:
        """Return once no request is in flight here (ingress, transit or egress)."""
        while self.inflight:
            self._idle = trio.Event()
            await self._idle.wait()

    def _begin(self) -> None:
        self.inflight += 1

    def _end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def on_stream(self, stream: TunnelStream) -> None:
        """A peer opened a stream to us: egress if we are the origin, else relay."""
        if self.draining:  # not delivered: the ingress tries elsewhere
            stream.reset(ResetCode.REFUSED, False, f"{self.d.id} is shutting down")
            return
        assert self.d.nursery is not None
        self.d.nursery.start_soon(self._incoming, stream, trio.current_time())

    # ---- ingress

    async def _client(self, transport: trio.SocketStream, slot: Slot) -> None:
        client = H11Stream(h11.SERVER, transport)
        pinned: dict[str, Key] = {}
        try:
            if not await self._http1_only(client, slot):
                return
            while True:
                event = await self._next_request(client, slot)
                if not isinstance(event, h11.Request):
                    break  # idle too long, taken back for a newcomer, closed, or not a request
                await self._request(client, event, pinned)
                # Another request only after a complete exchange both ways (a response cut short,
                # a body left unread or MUST_CLOSE end the connection).
                if client.conn.our_state is not h11.DONE or client.conn.their_state is not h11.DONE or self.draining:
                    break
                client.conn.start_next_cycle()
                client.head_since = trio.current_time()  # pipelined bytes of the next head: its clock starts now
        except h11.RemoteProtocolError as exc:
            error = HttpError(exc.error_status_hint, "bad_request" if exc.error_status_hint < 431 else "headers_too_large",
                              f"malformed HTTP/1.1 request: {_h11_reason(exc)}", close=True)
            self._log_error(None, error)
            await self._send_error_quietly(client, error)
        except HttpError as exc:  # a head that did not come whole in time
            self.stats[f"error_{exc.status}"] += 1
            self._log_error(None, exc)
            await self._send_error_quietly(client, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, trio.TooSlowError, StreamReset) as exc:
            log.info("%s: client connection ended: %s", self.d.id, _ended(exc))
        except Exception:  # a bug must cost this client its connection, never the daemon
            log.exception("%s: HTTP client connection failed", self.d.id)
        finally:
            self.slots.release(slot)
            with trio.CancelScope(shield=True):
                await transport.aclose()

    @contextlib.contextmanager
    def _waiting(self, slot: Slot) -> Iterator[None]:
        """While a connection waits for a whole head, its slot may be taken back for a newcomer
        (the one waiting longest goes first), which cancels what runs here."""
        scope = trio.CancelScope()
        slot.owner = scope
        self.slots.set_idle(slot, True)
        try:
            with scope:
                yield
        finally:
            self.slots.set_idle(slot, False)

    async def _first_bytes(self, client: H11Stream) -> bytes | None:
        """The first bytes of a next head (idle until then, at most ``idle_timeout_s``: None); starts its clock."""
        with trio.move_on_after(self.limits.idle_timeout_s) as idle:
            data = await client.transport.receive_some(RECEIVE_CHUNK)
        if idle.cancelled_caught:
            return None
        client.head_since = trio.current_time()
        return data

    async def _http1_only(self, client: H11Stream, slot: Slot) -> bool:
        """Read the connection's first bytes into h11, unless they are not HTTP/1.x: an HTTP/2
        preface gets GOAWAY HTTP_1_1_REQUIRED, a TLS ClientHello a plain 400; one log line, then
        False (close). A later HTTP/2 ingress takes over the "h2" case here."""
        transport = client.transport
        data: bytes | None = None
        if slot.held:
            with self._waiting(slot):
                data = await self._first_bytes(client)
                with trio.move_on_at(client.head_since + self.limits.header_timeout_s):
                    while data and sniff_preface(data) == "":
                        chunk = await transport.receive_some(RECEIVE_CHUNK)
                        data += chunk
                        if not chunk:
                            break
        if data is None or not slot.held:
            return False  # idle, or taken back for a newcomer
        kind = sniff_preface(data) if data else None
        if not kind:
            client.conn.receive_data(data)  # HTTP/1.x, too little to tell, or b"": closed, h11's EOF
            return True
        if self._error_lines.allow(self.d.id, trio.current_time()):
            what = ("an HTTP/2 prior-knowledge preface: answered GOAWAY HTTP_1_1_REQUIRED" if kind == "h2"
                    else "a TLS ClientHello: answered 400 (this port speaks plain HTTP)")
            log.info("%s: %s sent %s and closed", self.d.id, _peer(transport), what,
                     extra={"cpn": {"event": "not_http1", "protocol": kind, "client": _peer(transport)}})
        with trio.move_on_after(1.0):
            try:
                if kind == "h2":
                    await transport.send_all(H2_REFUSAL)
                else:
                    await self._send_error_quietly(client, HttpError(
                        400, "bad_request", "this port speaks plain HTTP, not TLS: use http://", close=True))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return False

    async def _next_request(self, client: H11Stream, slot: Slot) -> Any:
        """The next request head; anything else (None included) ends the connection quietly.

        Between requests (no byte of the next head yet) the connection is idle: closed after
        ``idle_timeout_s``. From the first byte of a head, the whole head must come within
        ``header_timeout_s`` (h11 stays IDLE until it is whole, so its state cannot tell these
        apart): else 408. Until a whole head is in, its slot may be taken back for a newcomer:
        a slow head holds no more than an idle connection.
        """
        event = client.next_event_nowait()
        if event is not None:
            return event
        if not slot.held:
            return None  # taken back before this task first ran
        timed_out = False
        with self._waiting(slot):
            if not client.conn.trailing_data[0]:
                data = await self._first_bytes(client)
                if data is None:
                    return None
                client.conn.receive_data(data)
                event = client.next_event_nowait()
            if event is None:
                with trio.move_on_at(client.head_since + self.limits.header_timeout_s) as head:
                    event = await client.next_event()
                timed_out = head.cancelled_caught
        if not slot.held:
            return None  # taken back for a newcomer (whatever came meanwhile is dropped with it)
        if timed_out:
            raise HttpError(408, "request_timeout", f"request head not complete within {self.limits.header_timeout_s:g} s"
                            " of its first byte", close=True)
        return event


    async def _send_error_quietly(self, client: H11Stream, exc: HttpError) -> None:
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            resp, body = error_response(exc)
            if exc.close or (client.conn.their_state is h11.SEND_BODY and not await _drain(client)):
                # The rest of the body is not worth reading: say we close, or the client
                # would send its next request into a socket we are closing (a reset).
                resp = h11.Response(status_code=resp.status_code, reason=resp.reason,
                                    headers=[*resp.headers, (b"connection", b"close")])
            await client.send(resp)
            await client.send(h11.Data(data=body))
            await client.send(h11.EndOfMessage())
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _request(self, client: H11Stream, req: h11.Request, pinned: dict[str, Key]) -> None:
        self.stats["requests"] += 1
        t0 = trio.current_time()
        self._begin()
        try:
            await self._request_counted(client, req, pinned, t0)
        finally:
            self._end()

    def _log_error(self, req: h11.Request | None, exc: HttpError) -> None:
        """One line per gateway-made error, at most ERROR_LOG_PER_S a second (a flood costs one line a second).

        ``req`` None: the connection never carried a request h11 could parse.
        """
        if not self._error_lines.allow(self.d.id, trio.current_time()):
            return
        method = req.method.decode("ascii", "replace") if req is not None else "-"
        target = req.target.decode("ascii", "replace")[:200] if req is not None else "-"
        log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "%s: %s %s -> %d %s: %s", self.d.id,
                method, target, exc.status, exc.error, exc.detail,
                extra={"cpn": {"event": "http_error", "status": exc.status, "error": exc.error,
                               "service": exc.service or None, "target": target}})

    async def _request_counted(self, client: H11Stream, req: h11.Request, pinned: dict[str, Key], t0: float) -> None:
        try:
            service, instance, status = await self._route(client, req, pinned, t0)
            self.d.metrics.observe(service, instance, status, trio.current_time() - t0)
        except HttpError as exc:
            self.stats[f"error_{exc.status}"] += 1
            self.d.metrics.observe(exc.service, None, exc.status, None)
            self._log_error(req, exc)
            if client.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                # If the body was not read to its end, _client closes the connection after this.
                await self._send_error_quietly(client, exc)
            else:
                raise trio.BrokenResourceError(str(exc)) from None

    def _plan(self, req: h11.Request, pinned: dict[str, Key]) -> tuple[str, Constraints, list[Candidate]]:
        # h11 bounds only what it must buffer; a head that arrived whole is checked here.
        if len(req.target) + sum(len(n) + len(v) + 4 for n, v in req.headers) > MAX_HEADER_BYTES:
            raise HttpError(431, "headers_too_large", f"request head exceeds {MAX_HEADER_BYTES} bytes", close=True)
        path = check_target(req.target)
        try:
            cons = parse_constraints(req.headers)
        except BadHeader as exc:
            raise HttpError(400, "bad_header", str(exc)) from None
        framing = {n.lower() for n, _ in req.headers} & {b"content-length", b"transfer-encoding"}
        if len(framing) == 2:
            raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding: ambiguous framing refused",
                            close=True)
        service = match_service(self.d.rib.by_service, path)
        if service is None:
            raise HttpError(404, "no_such_service", f"no service matches {path}")
        cands = candidates(self.d.rib, service, self.estimate,
                           bounded=cons.max_latency_us is not None and self.d.config.gateway.selection == "per-request")
        mode = self.d.config.gateway.selection
        now = trio.current_time()
        ranked = rank(cands, cons, self.damping if mode == "per-request" else None, now)
        if mode == "per-request":
            # Latency-bound requests go first-fit in rank order: packing them tight leaves
            # whole instances to flexible traffic. Flexible ones are split at random.
            if cons.max_latency_us is None and self.account.refusals:
                ranked = [attrs.evolve(c, fill=max(c.fill, 1.0)) if self.account.holds_flexible(c.key, now) else c
                          for c in ranked]
            ranked = choose(ranked, cons.prefer, self.rng, split=cons.max_latency_us is None)
        elif mode == "per-connection":
            ranked = pinned_first(ranked, pinned.get(service), cands)
        elif mode == "dns-ttl":
            ranked = pinned_first(ranked, self.ttl.get(service, cons, now), cands)
        if not ranked:
            if not cands:  # known, but every instance is down or reachable only through stale paths
                raise HttpError(503, "no_instance", no_live_instance(self.d.rib, service))
            raise HttpError(503, "no_instance", f"no instance of {service} meets the request's constraints "
                            f"({len(cands)} live): {explain_none(cands, cons)}")
        if mode == "per-connection":
            pinned[service] = ranked[0].key
        elif mode == "dns-ttl" and self.ttl.get(service, cons, now) is None:
            self.ttl.put(service, cons, ranked[0].key, now)
        return service, cons, ranked

    def estimate(self, key: Key, best: Best) -> View:
        """What this ingress assumes of an instance now (select.ingress_view)."""
        return ingress_view(self.d.rib, key, best, trio.current_time(), own=self.own, account=self.account,
                            correction=self.correction, meter=self.meters[key[2]] if key[1] == self.d.id else None)

    def observed(self, cand: Candidate, cons: Constraints, state: _AttemptState, start: float, t0: float) -> None:
        """An attempt's response head left for the user: what it took against the estimate, our own
        share of it, and whether it came after the request's bound (counted ``late``). Only a request
        that was whole in hand when it went upstream counts: an upload's pace is the user's."""
        if state.head_at is None or not state.whole:
            return  # nothing to learn from: a response time that includes the user's own upload
        now = trio.current_time()
        took = state.head_at - start
        # A request slow by its nature (a long job) says nothing about the path or the gateways.
        instance_us = None if state.instance_s is None else int(state.instance_s * 1_000_000)
        self.correction.observe(cand.key, now, took * 1_000_000, expected_us(cand, instance_us))
        if cand.next_hop is None and state.instance_s is not None:
            self.own.add(Stage.LOCAL, now, (took - state.instance_s) * 1_000_000)
        elif cand.next_hop is not None and state.sent_at is not None and state.upstream_head_at is not None:
            self.own.add(Stage.INGRESS, now, (took - (state.upstream_head_at - state.sent_at)) * 1_000_000)
        if cons.max_latency_us is not None and (state.head_at - t0) * 1_000_000 > cons.max_latency_us:
            self.stats["late"] += 1  # a defect of the estimate: served, but after the bound

    async def _route(self, client: H11Stream, req: h11.Request, pinned: dict[str, Key], t0: float) -> tuple[str, str, int]:
        """Serve one request whose head came at ``t0``; (service, instance, status) of the answer, or HttpError."""
        service, cons, ranked = self._plan(req, pinned)
        try:
            return await self._forward(client, req, service, cons, ranked, t0)
        except HttpError as exc:
            exc.service = service
            raise

    async def _forward(self, client: H11Stream, req: h11.Request, service: str, cons: Constraints,
                       ranked: list[Candidate], t0: float) -> tuple[str, str, int]:
        deadline = trio.current_time() + cons.timeout_s
        body = BodySource(client, self.limits)
        if client.conn.they_are_waiting_for_100_continue:
            await client.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        headers = filter_headers(req.headers, drop_cpn=True) + _framing(req.headers)
        if not any(n.lower() == b"host" for n, _ in headers):
            # HTTP/1.0 allows none; the tunnel speaks HTTP/1.1, which needs one (the egress sets the instance's).
            headers.append((b"host", self.d.id.encode()))
        idempotent = req.method in IDEMPOTENT
        failures: list[HttpError] = []
        started = t0  # the bound runs from the request head's arrival
        # The baselines emulate network-layer schemes: what they chose is final, no retries.
        per_request = self.d.config.gateway.selection == "per-request"
        max_attempts = MAX_ATTEMPTS if per_request else 1
        flexible = per_request and cons.max_latency_us is None
        remaining = list(ranked)
        while remaining:
            cand = remaining.pop(0)
            if len(failures) >= max_attempts or (failures and not body.replayable):
                break
            if failures and not within_bound(cand, cons, int((trio.current_time() - started) * 1_000_000)):
                continue
            if trio.current_time() >= deadline:
                raise HttpError(504, "deadline_exceeded", f"no response within {cons.timeout_s:g} s")
            try:
                attempt_at = trio.current_time()
                elapsed_us = int((attempt_at - started) * 1_000_000)
                state = _AttemptState()
                status = await self._attempt(client, req, headers, body, cand, cons, deadline, idempotent, elapsed_us,
                                             state)
                self.observed(cand, cons, state, started if not failures else attempt_at, t0)
                return service, cand.instance, status
            except StreamReset as exc:
                failures.append(_reset_error(exc))
                retry = (not exc.delivered or idempotent) and exc.code != ResetCode.DEADLINE
                more = retry and bool(remaining) and len(failures) < max_attempts and body.replayable
                if self._attempt_lines.allow(self.d.id, trio.current_time()):
                    log.info("%s: %s %s via %s/%s failed: %s%s", self.d.id, req.method.decode("ascii", "replace"),
                             service, cand.origin, cand.instance, exc, "; trying the next candidate" if more else "")
                if not retry:
                    break
                self.stats["retries"] += 1
                if flexible:
                    if exc.code == ResetCode.REFUSED and cand.next_hop is not None:  # our own: the meter is exact
                        self.account.refused_flexible(cand.key, cand.capacity, trio.current_time())
                    # A retry is split like a first try: all of them on the next in rank
                    # order would swing that instance's load with the refusals.
                    remaining = choose(remaining, cons.prefer, self.rng)
        raise _combine(failures)

    def _open_upstream(self, cand: Candidate, ext: ExtHeader) -> ByteStream:
        if cand.next_hop is None:
            near, far = pipe()
            assert self.d.nursery is not None
            self.d.nursery.start_soon(self._serve_stream, far, ext, "local")
            return near  # carries h11 events (LocalEvents), not bytes
        conn = self.d.established_conn(cand.next_hop)
        if conn is None or conn.mux is None:
            raise StreamReset(ResetCode.NO_ROUTE, False, f"no session to next hop {cand.next_hop}")
        return conn.mux.open(ext)

    async def _attempt(self, client: H11Stream, req: h11.Request, headers: list[tuple[bytes, bytes]], body: BodySource,
                       cand: Candidate, cons: Constraints, deadline: float, idempotent: bool, elapsed_us: int,
                       state: _AttemptState) -> int:
        """One try on ``cand``; the response status, or StreamReset when it failed before a response."""
        budget = max(0, int((deadline - trio.current_time()) * 1_000_000))
        slack = NO_BUDGET
        if self.d.config.gateway.selection == "per-request":
            left = slack_us(cand, cons, elapsed_us)
            slack = NO_BUDGET if left is None else min(NO_BUDGET - 1, left)
        if cand.next_hop is None and body.take_buffered() and body.replayable:
            return await self._attempt_local(client, req, headers, body, cand, deadline, budget, slack, state)
        ext = ExtHeader(cand.label, cand.origin, cand.instance, os.urandom(16), cons.qos, 16,
                        min(budget, NO_BUDGET - 1), EXT_FLAG_IDEMPOTENT if idempotent else 0, slack)
        head = h11.Request(method=req.method, target=req.target, headers=headers)  # before a stream exists
        up_raw = self._open_upstream(cand, ext)
        up: H11Stream | LocalEvents = LocalEvents(up_raw) if isinstance(up_raw, PipeEnd) else H11Stream(h11.CLIENT, up_raw, tunnel=True)
        self.account.sent(cand.key, trio.current_time())
        try:
            if body.take_buffered() and body.replayable:
                # The whole request is here (or kept from an earlier try): it goes upstream in
                # one write, and no task streams it.
                body.consumed = True
                data = body.whole()
                await up.send_all([head, *([h11.Data(data=data)] if data else []), h11.EndOfMessage()], end=True)
                state.sent_at = trio.current_time()
                state.whole = True
                return await self._read_response(client, up, up_raw, cons, deadline, state)
            async with open_nursery() as nursery:
                state.sent_at = trio.current_time()
                nursery.start_soon(self._upload, up, up_raw, head, body)
                status = await self._read_response(client, up, up_raw, cons, deadline, state)
                if not body.done:
                    nursery.cancel_scope.cancel()  # answered before reading the whole body
            return status
        except (h11.ProtocolError) as exc:
            up_raw.reset(ResetCode.BAD_REQUEST, True, str(exc))
            if not state.sent_head:
                raise HttpError(502, "bad_gateway", f"bad response from upstream: {exc}") from None
            raise trio.BrokenResourceError(str(exc)) from None
        except StreamReset:
            if state.sent_head:
                raise trio.BrokenResourceError("upstream reset mid-response") from None
            raise
        finally:
            # Every way out leaves the stream closed: a response that came before the whole
            # request went up, an error, a cancellation (the far end stops waiting too).
            if not up_raw.closed:
                up_raw.reset(ResetCode.CANCEL, True, "ingress done with the stream")
            self.account.finished(cand.key)
            if up_raw.load_report is not None:  # fresh from the instance's gateway, refusals included
                load, bload, comp, instance_us = up_raw.load_report
                self.account.heard(cand.key, load, bload, comp, trio.current_time())
                state.instance_s = None if instance_us is None else instance_us / 1_000_000

    @staticmethod
    async def _upload(up: H11Stream | LocalEvents, up_raw: ByteStream, head: h11.Request, body: BodySource) -> None:
        """Stream the user's request upstream as it arrives (the response may come first)."""
        try:
            await up.send(head)
            async for chunk in body.iterate():
                await up.send(h11.Data(data=chunk))
            await up.send(h11.EndOfMessage(), end=True)
        except StreamReset:
            pass  # the download side reports what happened
        except HttpError:
            up_raw.reset(ResetCode.CANCEL, True, "client request failed")
            raise

    def _admit(self, inst: InstanceConfig, budget_us: int, slack_us: int) -> str | None:
        """Admission for one request to our instance ``inst`` (NO_BUDGET: none given): None,
        or why it is refused (counted)."""
        meter = self.meters[inst.id]
        if meter.inflight >= inst.max_inflight:  # a stuck instance cannot pin every stream and socket
            refusal: str | None = f"{inst.max_inflight} requests in flight (its max_inflight)"
        else:
            refusal = meter.admit(trio.current_time(), None if budget_us == NO_BUDGET else budget_us,
                                  None if slack_us == NO_BUDGET else slack_us)
        if refusal is None:
            return None
        self.stats["admission_rejects"] += 1
        return f"{inst.id}: {refusal}"

    async def _attempt_local(self, client: H11Stream, req: h11.Request, headers: list[tuple[bytes, bytes]],
                             body: BodySource, cand: Candidate, deadline: float, budget_us: int, slack_us: int,
                             state: _AttemptState) -> int:
        """One try on one of our own instances, the whole request in hand: the ingress calls it
        itself (no stream, no task); admission and errors as for a tunnelled request."""
        found = self.local.get((cand.label, cand.instance))
        if found is None:
            raise StreamReset(ResetCode.NO_SUCH_INSTANCE, False, f"{self.d.id} has no instance {cand.instance}")
        service, inst = found
        refusal = self._admit(inst, budget_us, slack_us)
        if refusal is not None:
            raise StreamReset(ResetCode.REFUSED, False, refusal)
        body.consumed = True
        data = body.whole()
        sink = _UserSink(client, state)
        state.whole = True
        self.account.sent(cand.key, trio.current_time())
        try:
            state.instance_s = await self._serve_instance(sink, service, inst, req.method, req.target, headers,
                                       [*([h11.Data(data=data)] if data else []), h11.EndOfMessage()], None, deadline,
                                       filtered=True)
            if sink.failure is not None:
                raise sink.failure
        except StreamReset as exc:
            if state.sent_head:
                raise trio.BrokenResourceError(str(exc)) from None
            raise
        finally:
            self.account.finished(cand.key)
        self.stats[f"status_{sink.status // 100}xx"] += 1
        return sink.status

    async def _read_response(self, client: H11Stream, up: H11Stream | LocalEvents, up_raw: ByteStream, cons: Constraints,
                             deadline: float, state: _AttemptState) -> int:
        """Pass the upstream's response on to the user; its status."""
        event = up.next_event_nowait()
        if event is None:
            with trio.move_on_at(deadline):
                event = await up.next_event()
            if event is None:
                up_raw.reset(ResetCode.DEADLINE, True, "ingress deadline passed")
                raise HttpError(504, "deadline_exceeded", f"no response within {cons.timeout_s:g} s")
        idle_s = self.limits.body_idle_timeout_s
        while isinstance(event, h11.InformationalResponse):
            event = await up.next_event()
        if isinstance(event, h11.ConnectionClosed):
            raise StreamReset(ResetCode.INSTANCE_FAILED, True, "upstream closed before responding")
        assert isinstance(event, h11.Response)
        state.upstream_head_at = trio.current_time()
        head = event
        response = h11.Response(status_code=head.status_code, reason=head.reason,
                                headers=filter_headers(head.headers, drop_cpn=False) + _framing(head.headers))
        # A small response of known length is gathered whole before the user sees its head:
        # if the upstream fails meanwhile, the user still gets a clean error (or a retry)
        # instead of a response cut short. Streams and large bodies flow through as they come.
        length = _content_length(head.headers)
        held: list[bytes] | None = [] if length is not None and length <= RESPONSE_HOLD_BYTES else None
        if held is None:
            await client.send(response)
            state.sent_head = True
            state.head_at = trio.current_time()
        # One scope for the whole body, pushed back as data flows (at most once a second: a
        # timer per chunk cost a tenth of a bulk transfer's CPU). Neither side moving for
        # body_idle_timeout_s ends it, a user that stopped reading included.
        idle = trio.CancelScope(deadline=trio.current_time() + idle_s)
        with idle:
            while True:
                event = up.next_event_nowait()
                if event is None:
                    event = await up.next_event()
                if isinstance(event, h11.Data):
                    if held is not None:
                        held.append(event.data)
                    else:
                        await client.send(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    events: list[Any] = [h11.EndOfMessage()]
                    if held is not None:  # the whole response now, in one write
                        events = [response, *([h11.Data(data=b"".join(held))] if held else []), *events]
                    state.sent_head = True
                    await client.send_all(events)
                    if held is not None:
                        state.head_at = trio.current_time()
                    break
                elif held is not None:
                    raise StreamReset(ResetCode.INSTANCE_FAILED, True, "upstream ended mid-response")
                else:
                    raise trio.BrokenResourceError("upstream ended mid-response")
                now = trio.current_time()
                if idle.deadline - now < idle_s - 1.0:
                    idle.deadline = now + idle_s
        if idle.cancelled_caught:
            raise trio.TooSlowError(f"response body idle for {idle_s:g} s")
        self.stats[f"status_{head.status_code // 100}xx"] += 1
        return head.status_code

    # ---- transit and egress

    async def _incoming(self, stream: TunnelStream, opened_at: float) -> None:
        assert stream.ext is not None
        await self._serve_stream(stream, stream.ext, f"stream {stream.id} from {stream.peer}", opened_at)

    async def _serve_stream(self, stream: ByteStream, ext: ExtHeader, what: str, opened_at: float | None = None) -> None:
        """Egress if we are the origin, else relay; nothing that goes wrong escapes. ``opened_at``:
        when a peer's OPEN came (our own processing is measured from there; None: our own pipe)."""
        self._begin()
        try:
            if ext.origin == self.d.id:
                with trio.CancelScope() as abandoned:  # the instance call stops when the stream is abandoned
                    stream.cancel_on_abandon(abandoned)
                    await self._egress(stream, ext, opened_at)
            elif isinstance(stream, TunnelStream):
                await self._relay(stream, ext, opened_at)
            else:
                stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{ext.origin} is not this gateway")
        except StreamReset as exc:  # the other end's (then the stream is closed), or one of ours to send
            stream.reset(ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL,
                         exc.delivered, exc.text)
        except Exception:  # a bug must cost one request, never the daemon
            log.exception("%s: %s failed", self.d.id, what)
            stream.reset(ResetCode.INTERNAL, True, "internal error")
        finally:
            if not stream.closed:  # e.g. answered before the whole request came: stop the sender
                stream.reset(ResetCode.CANCEL, True, f"{self.d.id} is done with the stream")
            self._end()

    async def _relay(self, inbound: TunnelStream, ext: ExtHeader, opened_at: float | None = None) -> None:
        key = self.d.rib.lookup_target(ext.label, ext.origin, ext.instance)
        best = self.d.rib.loc.get(key) if key else None
        if best is None or best.route.peer is None:
            inbound.reset(ResetCode.NO_ROUTE, False, f"{self.d.id} has no route to {ext.origin}/{ext.instance}")
            return
        nxt = best.route.peer
        if nxt == inbound.peer or ext.hop_limit <= 1:
            inbound.reset(ResetCode.HOP_LIMIT, False, f"hop limit reached at {self.d.id}")
            return
        conn = self.d.established_conn(nxt)
        if conn is None or conn.mux is None:
            inbound.reset(ResetCode.NO_ROUTE, False, f"{self.d.id} has no session to {nxt}")
            return
        budget = ext.budget_us
        if budget != NO_BUDGET:
            budget -= self.d.rib.link_cost_us.get(nxt, 0) // 2
            if budget <= 0:
                inbound.reset(ResetCode.DEADLINE, False, f"deadline passed at {self.d.id}")
                return
        outbound = conn.mux.open(attrs.evolve(ext, hop_limit=ext.hop_limit - 1, budget_us=budget))
        outbound.relay_to = inbound
        self.stats["relayed"] += 1
        forwarded_at = trio.current_time()

        def first_back(received_at: float, sent_at: float) -> None:
            # Our own time on this stream: all of it up to the response's first bytes going back,
            # less the wait for the next hop (selection.md, "Estimate").
            if opened_at is not None:
                self.own.add(Stage.TRANSIT, sent_at, ((sent_at - opened_at) - (received_at - forwarded_at)) * 1_000_000)

        # Neither side moving for body_idle_timeout_s ends the relay, as at the ingress and egress.
        idle_s = self.limits.body_idle_timeout_s
        async with open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + idle_s
            nursery.start_soon(_pump, inbound, outbound, nursery.cancel_scope, idle_s)
            nursery.start_soon(_pump, outbound, inbound, nursery.cancel_scope, idle_s, first_back)
        for end in (inbound, outbound):
            if not end.closed:
                end.reset(ResetCode.CANCEL, True, f"relay at {self.d.id} idle for {idle_s:g} s")

    async def _egress(self, stream: ByteStream, ext: ExtHeader, opened_at: float | None = None) -> None:
        found = self.local.get((ext.label, ext.instance))
        if found is None:
            stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{self.d.id} has no instance {ext.instance} of label {ext.label}")
            return
        service, inst = found
        rx: H11Stream | LocalEvents = LocalEvents(stream) if isinstance(stream, PipeEnd) else H11Stream(h11.SERVER, stream, tunnel=True)
        deadline = trio.current_time() + ext.budget_us / 1_000_000 if ext.budget_us != NO_BUDGET else None
        try:
            event = await next_event_within(rx, self.limits.header_timeout_s)
        except h11.RemoteProtocolError as exc:
            stream.reset(ResetCode.BAD_REQUEST, False, str(exc))
            return
        except trio.TooSlowError:
            stream.reset(ResetCode.BAD_REQUEST, False, f"no request head within {self.limits.header_timeout_s:g} s")
            return
        if not isinstance(event, h11.Request):
            stream.reset(ResetCode.BAD_REQUEST, False, "expected an HTTP request")
            return
        path = event.target.split(b"?", 1)[0].decode("ascii", "replace")
        if match_service({service.path}, path) != service.path:
            stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{path} is not under {service.path}")
            return
        sink = _StreamSink(rx, stream)
        refusal = self._admit(inst, ext.budget_us, ext.slack_us)
        if refusal is not None:
            sink.report_load(self.meters[inst.id])
            sink.reset(ResetCode.REFUSED, False, refusal)
            return
        # What of the request body came with its head; all of it, usually.
        rest: list[Any] = []
        while not (rest and isinstance(rest[-1], h11.EndOfMessage)):
            try:
                ev = rx.next_event_nowait()
            except h11.RemoteProtocolError as exc:
                stream.reset(ResetCode.BAD_REQUEST, False, str(exc))
                return
            if ev is None:
                break
            if not isinstance(ev, (h11.Data, h11.EndOfMessage)):
                stream.reset(ResetCode.BAD_REQUEST, False, "tunnelled request ended early")
                return
            rest.append(ev)
        served = await self._serve_instance(sink, service, inst, event.method, event.target, event.headers,
                                            rest, rx, deadline)
        if served is not None and sink.head_at is not None and opened_at is not None:
            self.own.add(Stage.EGRESS, sink.head_at, (sink.head_at - opened_at - served) * 1_000_000)

    async def _serve_instance(self, sink: _StreamSink | _UserSink, service: ServiceConfig, inst: InstanceConfig,
                              method: bytes, target: bytes, headers_in: Iterable[tuple[bytes, bytes]], rest: list[Any],
                              rx: H11Stream | LocalEvents | None, deadline: float | None, *,
                              filtered: bool = False) -> float | None:
        """Rewrite an admitted request for the instance, call it, and account what it took: the
        instance's time to its response head (s), or None.

        ``rest`` is what of the body is already here; ``rx`` streams the remainder (None: all here).
        ``filtered``: the headers are already stripped of hop-by-hop and CPN-* ones, framing re-added.
        """
        meter = self.meters[inst.id]
        host, port, netloc = _instance_address(inst.url)
        if not filtered:
            headers_in = list(headers_in)
            headers_in = filter_headers(headers_in, drop_cpn=True) + _framing(headers_in)
        headers = [(b"host", netloc), *((n, v) for n, v in headers_in if n.lower() != b"host")]
        request = h11.Request(method=method, target=translate_target(target, service.path, inst.url), headers=headers)
        load_at_arrival = meter.load(trio.current_time())
        served: float | None = None
        first = [request, *rest]
        rest.clear()  # the body's pieces live on in ``first`` only, until they are written
        try:
            served = await self._call_instance(first, rx, sink, inst, host, port, deadline)
        finally:
            if served is None:
                meter.abandoned()
            else:
                meter.done(trio.current_time(), served * 1_000_000, load_at_arrival)
        return served

    async def _connect(self, host: str, port: int) -> _PoolEntry:
        idle = self.pool.get((host, port))
        while idle:
            entry = idle.pop()
            if entry.conn.our_state is h11.IDLE and not _readable(entry.stream):
                return entry
            # The instance closed it while idle (or sent junk): never send into it.
            await entry.stream.aclose()
        with trio.fail_after(self.limits.instance_connect_timeout_s):
            s = await trio.open_tcp_stream(host, port)
        return _PoolEntry(s, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES))

    async def _call_instance(self, first: list[Any], rx: H11Stream | LocalEvents | None, sink: _StreamSink | _UserSink,
                             inst: InstanceConfig, host: str, port: int, deadline: float | None) -> float | None:
        """Forward to the instance and stream its answer to ``sink``; the time to its response head, or None."""
        uploaded_at = trio.current_time()  # compute latency counts from the end of the upload
        head_after: float | None = None
        try:
            entry = await self._connect(host, port)
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                # Our descriptors ran out, not the instance: refused (tried elsewhere), never a health failure.
                sink.reset(ResetCode.REFUSED, False, f"{self.d.id} is out of descriptors")
                return None
            self._health_result(inst.id, False)
            sink.reset(ResetCode.INSTANCE_UNREACHABLE, False, f"{inst.id} at {host}:{port}: {'connect timed out' if isinstance(exc, trio.TooSlowError) else exc.strerror or exc}")
            return None
        ic = H11Stream(h11.CLIENT, entry.stream)
        ic.conn = entry.conn
        delivered = False
        responded = False
        complete = isinstance(first[-1], h11.EndOfMessage)
        try:
            async with (_Inline() if complete else open_nursery()) as nursery:
                async def upload() -> None:
                    nonlocal delivered, uploaded_at
                    await ic.send_all(first)
                    delivered = True
                    while not complete:
                        assert rx is not None
                        try:
                            ev = await next_event_within(rx, self.limits.body_idle_timeout_s)
                        except trio.TooSlowError:
                            raise StreamReset(ResetCode.CANCEL, True,
                                              f"request body idle for {self.limits.body_idle_timeout_s:g} s") from None
                        if isinstance(ev, h11.Data):
                            await ic.send(ev)
                        elif isinstance(ev, h11.EndOfMessage):
                            await ic.send(ev)
                            break
                        else:
                            raise StreamReset(ResetCode.BAD_REQUEST, True, "tunnelled request ended early")
                    uploaded_at = trio.current_time()

                if complete:
                    await upload()  # one write, no task
                else:
                    nursery.start_soon(upload)
                with trio.move_on_at(deadline if deadline is not None else float("inf")) as cs:
                    ev = await ic.next_event()
                    while isinstance(ev, h11.InformationalResponse):
                        ev = await ic.next_event()
                if cs.cancelled_caught:
                    sink.reset(ResetCode.DEADLINE, delivered, f"{inst.id} did not answer within the deadline")
                    nursery.cancel_scope.cancel()
                    await entry.stream.aclose()
                    return None
                if not isinstance(ev, h11.Response):
                    raise OSError("instance closed the connection before responding")
                responded = True
                self._health_result(inst.id, True)
                head_after = max(0.0, trio.current_time() - uploaded_at)
                sink.report_load(self.meters[inst.id], head_after)
                headers = filter_headers(ev.headers, drop_cpn=True) + _framing(ev.headers)
                headers += [(b"cpn-instance", inst.id.encode()), (b"cpn-origin", self.d.id.encode())]
                response = h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)
                # A small response goes back whole, in one frame: the instance is next door.
                length = _content_length(ev.headers)
                held: list[Any] | None = [response] if length is not None and length <= RESPONSE_HOLD_BYTES else None
                if held is None:
                    await sink.send(response)
                # Neither the instance nor the receiving side moving for body_idle_timeout_s
                # ends the exchange (one scope, pushed back at most once a second).
                idle_s = self.limits.body_idle_timeout_s
                with trio.CancelScope(deadline=trio.current_time() + idle_s) as idle:
                    while True:
                        ev = await ic.next_event()
                        if isinstance(ev, h11.Data):
                            if held is not None:
                                held.append(ev)
                            else:
                                await sink.send(ev)
                        elif isinstance(ev, h11.EndOfMessage):
                            if held is not None:
                                await sink.send_all([*held, ev], end=True)
                            else:
                                await sink.send(ev, end=True)
                            break
                        else:
                            raise OSError("instance closed the connection mid-response")
                        now = trio.current_time()
                        if idle.deadline - now < idle_s - 1.0:
                            idle.deadline = now + idle_s
                if idle.cancelled_caught:
                    raise OSError(f"response body idle for {idle_s:g} s")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            await entry.stream.aclose()
            if not responded:
                sink.reset(ResetCode.INSTANCE_FAILED, delivered, f"{inst.id}: {exc}")
            else:
                sink.reset(ResetCode.INSTANCE_FAILED, True, f"{inst.id} failed mid-response: {exc}")
            return head_after
        except StreamReset:
            await entry.stream.aclose()
            raise
        if entry.conn.our_state is h11.DONE and entry.conn.their_state is h11.DONE:
            entry.conn.start_next_cycle()
            idle = self.pool.setdefault((host, port), collections.deque())
            if len(idle) < self.limits.pool_idle_per_instance:
                idle.append(entry)
                return head_after
        await entry.stream.aclose()
        return head_after


def _peer(transport: trio.SocketStream) -> str:
    try:
        host, port = transport.socket.getpeername()[:2]
    except OSError:
        return "a client"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ended(exc: BaseException) -> str:
    """Why a user connection ended early, in words (h11's own messages name its internal states)."""
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return f"the client went away ({exc})" if str(exc) else "the client went away"
    if isinstance(exc, trio.TooSlowError):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, StreamReset):
        return f"the upstream reset the response: {exc.text}"
    return "the exchange could not be completed (the client broke off mid-response)"


DRAIN_LIMIT = 64 * 1024
DRAIN_TIMEOUT_S = 1.0


async def _drain(client: H11Stream) -> bool:
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


def _readable(stream: trio.SocketStream) -> bool:
    """An idle keep-alive connection that is readable has been closed by the other end.

    poll, not select: with the descriptor limit raised, descriptors above 1023 are common
    and select() refuses them (every pooled connection would look closed).
    """
    try:
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _bound_name(reason: str) -> str:
    return "max_http_clients_per_ip" if reason == "per_source" else "max_http_clients"


async def _pump(src: TunnelStream, dst: TunnelStream, scope: trio.CancelScope, idle_s: float,
                first: Callable[[float, float], None] | None = None) -> None:
    """Copy one direction of a relayed stream, passing RESETs on; progress pushes ``scope``'s deadline.
    ``first`` hears when the first bytes came and when they went on."""
    try:
        while True:
            data = await src.receive()
            if first is not None:
                received_at = trio.current_time()
            if not data:
                await dst.send(b"", end=True)
                return
            await dst.send(data)
            if first is not None:
                first(received_at, trio.current_time())
                first = None
            now = trio.current_time()
            if scope.deadline - now < idle_s - 1.0:  # at most once a second
                scope.deadline = now + idle_s
    except StreamReset as exc:
        code = ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL
        for end in (src, dst):  # the end that failed is closed already: only the other hears
            end.reset(code, exc.delivered, exc.text)
        scope.cancel()
