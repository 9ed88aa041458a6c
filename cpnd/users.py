"""Users' connections at the ingress: admission, request heads under their timeouts, errors, and
one request at a time handed to its plan and attempts."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import h11
import trio

from . import tlsstream
from .admission import Slot, SlotTable, Tally
from .aio import open_listeners, serve_accepting
from .attempts import Attempts
from .clients import SourceLimiter
from .config import GatewayConfig
from .errors import HttpError
from .heads import check_target
from .grpcmap import wants_trailers
from .h2edge import H2Server, H2Stream
from .h1 import H11Stream, drain, error_response, h11_reason, receive_some
from .hangups import UserGone, hangups
from .plane import HttpLimits, Plane
from .planner import Planner
from .preface import sniff_preface
from .rib import Key
from .selection import match_service
from .sourcerate import limiter
from .streams import StreamReset
from .tls import ServerTls

log = logging.getLogger("cpnd.http")
_H11_ERRORS = {431: "headers_too_large", 501: "not_implemented"}  # h11 error_status_hint -> README error code

# Request heads a connection may take as they are already in (no wait, hence no checkpoint) before
# one wait, or pipelined ones before a checkpoint: a user sending requests back to back still lets
# the other tasks run this often.
QUICK_HEADS = 8


class Users:
    """The users' side of one gateway's ingress."""

    def __init__(self, plane: Plane, planner: Planner, attempts: Attempts) -> None:
        self.p = plane
        self.planner = planner
        self.attempts = attempts
        limits = plane.limits
        # Users' connections: one still waiting for a whole request head is taken back for a
        # newcomer before the newcomer is refused (see _next_request).
        self.slots = SlotTable(limits.max_clients, limits.max_clients_per_ip)
        self.edge_tally = Tally()  # refusals and accept errors: one log line a second
        self.draining = False
        self._accepting: list[trio.CancelScope] = []  # one per listener set (http_listen, https_listen)
        self.h2_servers: set[H2Server] = set()
        self.http_port: int | None = None
        self.https_port: int | None = None
        self.tls_server: ServerTls | None = None  # https_listen's context (set by reconfigure)
        # workers (cpnd/workers.py): listeners opened by the control process, by tls; used instead of opening ours
        self.inherited: dict[bool, list[trio.SocketListener]] = {}
        self.source_rates: SourceLimiter | None = None  # max_requests_per_ip_per_s (rate_sources); None: off
        self.abandons: SourceLimiter | None = None  # max_abandoned_per_ip_per_s (rate_sources); None: off

    @property
    def limits(self) -> HttpLimits:
        return self.p.limits

    async def serve(self, *, tls: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept users (``tls``: on https_listen) until ``stop_accepting``; their connections then run on until done."""
        g = self.p.gw.config.gateway
        addr = g.https_listen if tls else g.http_listen
        assert addr is not None
        listeners = self.inherited.pop(tls, None) or await open_listeners("https_listen" if tls else "http_listen",
                                                                         addr.host, addr.port, str(addr))
        if tls:
            self.https_port = listeners[0].socket.getsockname()[1]
        else:
            self.http_port = listeners[0].socket.getsockname()[1]
        accepting = trio.CancelScope()
        self._accepting.append(accepting)
        async with trio.open_nursery() as handlers:
            with accepting:
                task_status.started()
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(serve_accepting, listener,
                                             functools.partial(self._admit_client, handlers, tls=tls),
                                             self.edge_event, "https" if tls else "http")
            for listener in listeners:
                await listener.aclose()

    def edge_event(self, kind: str, line: str, stat: str = "accept_errors") -> None:
        """A refusal or an accept error: logged in full when the first of a spell, else counted."""
        self.p.stats[stat] += 1
        if self.edge_tally.note(kind, trio.current_time()):
            log.warning("%s: %s (more are counted: one line a second)", self.p.gw.id, line)

    def flush_edge_log(self) -> None:
        """Called once a second: the line summing up a flood's refusals, if any."""
        line = self.edge_tally.flush(trio.current_time())
        if line:
            log.warning("%s: %s", self.p.gw.id, line)

    def _admit_client(self, handlers: trio.Nursery, stream: trio.SocketStream, *, tls: bool = False) -> None:
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
        handlers.start_soon(self._client, stream, adm.slot, tls)

    def stop_accepting(self) -> None:
        """Graceful shutdown: no new users, no new requests on kept-alive connections."""
        self.draining = True
        for scope in self._accepting:
            scope.cancel()
        for server in list(self.h2_servers):  # HTTP/2 connections: GOAWAY, their streams finish
            server.drain()

    async def _client(self, transport: trio.SocketStream, slot: Slot, tls: bool = False) -> None:
        client = H11Stream(h11.SERVER, transport)
        client.source = slot.source  # for Forwarded
        pinned: dict[str, Key] = {}
        try:
            if tls:  # the handshake, under the bounds of a request head (cpnd/tlsstream.py)
                secured = await tlsstream.accept(self, transport, slot)
                if secured is None:
                    return
                client.transport = secured
            if not await self._http1_only(client, slot):
                return
            await self._requests(client, slot, pinned)
        except h11.RemoteProtocolError as exc:
            # h11's hint: 400, 431 (a head too long), or 501 (a transfer coding other than chunked, or
            # several: RFC 9112 section 6.1), which was answered as headers_too_large.
            error = HttpError(exc.error_status_hint, _H11_ERRORS.get(exc.error_status_hint, "bad_request"),
                              f"malformed HTTP/1.1 request: {h11_reason(exc)}", close=True)
            self._log_error(None, error)
            await self._send_error_quietly(client, error)
        except HttpError as exc:  # a head that did not come whole in time
            self.p.stats[f"error_{exc.status}"] += 1
            self._log_error(None, exc)
            await self._send_error_quietly(client, exc)
        except UserGone as exc:  # counted, and at DEBUG: a user abandoning requests must not flood the log
            self.hung_up(client.source)
            log.debug("%s: %s", self.p.gw.id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, trio.TooSlowError, StreamReset) as exc:
            log.info("%s: client connection ended: %s", self.p.gw.id, _ended(exc))
        except Exception:  # a bug must cost this client its connection, never the daemon
            log.exception("%s: HTTP client connection failed", self.p.gw.id)
        finally:
            client.later.run()  # what its last answer left to do (cpnd/pending.py), however it ended
            self.slots.release(slot)
            if client.hangup is not None and (watch := hangups()) is not None:
                watch.unwatch(client.hangup)  # before the socket closes: its number is reused at once
            with trio.CancelScope(shield=True):
                await transport.aclose()

    @contextlib.contextmanager
    def _waiting(self, slot: Slot) -> Iterator[trio.CancelScope]:
        """The one scope of a wait for a whole head: idle until its first byte (``idle_timeout_s``),
        then ``header_timeout_s`` from there (``_head_started``). Meanwhile its slot may be taken
        back for a newcomer (the one waiting longest goes first), which cancels the scope too."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.p.limits.idle_timeout_s)
        slot.owner = scope
        self.slots.set_idle(slot, True)
        try:
            with scope:
                yield scope
        finally:
            self.slots.set_idle(slot, False)

    def _head_started(self, client: H11Stream, scope: trio.CancelScope) -> None:
        """The first bytes of a head came: its clock starts."""
        client.head_since = trio.current_time()
        scope.deadline = client.head_since + self.p.limits.header_timeout_s

    async def _http1_only(self, client: H11Stream, slot: Slot) -> bool:
        """Read the connection's first bytes into h11, unless they are not HTTP/1.x: an HTTP/2
        preface is served by h2edge.py, a TLS ClientHello gets a plain 400 and one log line;
        then False (close)."""
        transport = client.transport
        data: bytes | None = None
        if slot.held:
            with self._waiting(slot) as scope:
                data = await receive_some(transport)
                self._head_started(client, scope)
                while data and sniff_preface(data) == "":  # maybe a preface: read on (within the head's time)
                    chunk = await receive_some(transport)
                    data += chunk
                    if not chunk:
                        break
        if data is None or not slot.held:
            return False  # idle, or taken back for a newcomer
        kind = sniff_preface(data) if data else None
        if not kind:
            client.take(data)  # HTTP/1.x, too little to tell, or b"": closed, h11's EOF
            return True
        if kind == "h2":  # HTTP/2 with prior knowledge: its own connection handler (h2edge.py)
            await H2Server(self, transport, _peer(transport), slot).serve(data)
            return False
        if self.p.error_lines.allow(self.p.gw.id, trio.current_time()):
            log.info("%s: %s sent a TLS ClientHello: answered 400 (this port speaks plain HTTP) and closed",
                     self.p.gw.id, _peer(transport),
                     extra={"cpn": {"event": "not_http1", "protocol": kind, "client": _peer(transport)}})
        with trio.move_on_after(1.0):
            await self._send_error_quietly(client, HttpError(
                400, "bad_request", "this port speaks plain HTTP, not TLS: use http://", close=True))
        return False

    async def _requests(self, client: H11Stream, slot: Slot, pinned: dict[str, Key]) -> None:
        """One request at a time until the connection ends; HttpError(408) for a head not whole in time.

        Every wait for a head is under one scope per connection (``_HeadWait``), not one per request.
        """
        event: Any = None
        # What each answer leaves to do runs once the next request has gone upstream, or before any
        # other task's step, or as the connection ends (_client): never on the user's path (cpnd/pending.py).
        client.later = self.p.pending.later()
        while True:
            wait = _HeadWait()
            with wait.scope:
                slot.owner = wait.scope  # a newcomer taking the slot back cancels it (only while it waits: idle)
                while True:
                    if event is None:
                        event = await self._next_request(client, slot, wait)
                    if not isinstance(event, h11.Request):
                        return  # idle too long, taken back for a newcomer, closed, or not a request
                    if wait.scope.cancel_called:
                        break  # its time ran out as the head came whole: the request is served under a new scope
                    await self._request(client, event, pinned, wait.head_at)
                    event = None
                    wait.head_at = None
                    # Another request only after a complete exchange both ways (a response cut short,
                    # a body left unread or MUST_CLOSE end the connection).
                    if client.conn.our_state is not h11.DONE or client.conn.their_state is not h11.DONE or self.draining:
                        return
                    client.start_next_cycle()
                    wait.cycle_ended = True  # pipelined bytes of the next head: its clock starts now (_next_request)
            if wait.scope.cancelled_caught:
                if wait.started and slot.held:
                    raise HttpError(408, "request_timeout", f"request head not complete within "
                                    f"{self.p.limits.header_timeout_s:g} s of its first byte", close=True)
                return  # idle for idle_timeout_s, or taken back for a newcomer: closed quietly

    async def _next_request(self, client: H11Stream, slot: Slot, wait: _HeadWait) -> Any:
        """The next request head under ``wait``'s timeouts (``_HeadWait``); anything else (None included)
        ends the connection quietly. Its deadline is back to none once the head is here."""
        event = client.next_event_nowait()
        if event is not None:
            # Pipelined: the head was read with the last ones. An answer that needs no wait (an error,
            # a 429) is written without one too (H11Stream._write), so a client pipelining such requests
            # would hold the loop for as many as one read brings (thousands): every other user of the
            # gateway waited until it stopped. QUICK_HEADS in a row, then the others run.
            wait.quick += 1
            if wait.quick >= QUICK_HEADS:
                wait.quick = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            return event
        if not slot.held:
            return None  # taken back before this task first ran
        scope = wait.scope
        cycle_ended, wait.cycle_ended = wait.cycle_ended, False
        event = self._head_in_already(client, wait)
        if event is not None:
            return event
        self.slots.set_idle(slot, True)
        try:
            if client.conn.trailing_data[0]:  # pipelined: the head's clock runs since the last response
                if cycle_ended:  # it ended in this step: now is then
                    client.head_since = trio.current_time()
                wait.started = True
                scope.deadline = client.head_since + self.p.limits.header_timeout_s
            else:
                wait.started = False
                scope.deadline = trio.current_time() + self.p.limits.idle_timeout_s
                data = await receive_some(client.transport, empty=wait.empty)
                wait.started = True
                client.head_since = trio.current_time()
                client.take(data)
                event = client.next_event_nowait()
                if event is None:  # the head's clock matters only while we wait for the rest of it
                    scope.deadline = client.head_since + self.p.limits.header_timeout_s
                else:
                    wait.head_at = client.head_since  # whole in this step: when it came (_request's t0)
            if event is None:
                event = await client.next_event()
        finally:
            self.slots.set_idle(slot, False)
        scope.deadline = math.inf
        if not slot.held:
            return None  # taken back for a newcomer (whatever came meanwhile is dropped with it)
        return event

    @staticmethod
    def _head_in_already(client: H11Stream, wait: _HeadWait) -> Any:
        """The next head if the socket holds it whole already, read without a wait, else None."""
        # A loaded connection's next head is often in already (sent as our answer went out): taken at
        # once, it needs no idle deadline set and reset, no idle slot and no trio receive (its checkpoint
        # was a task step a request at saturation). A head that is not whole yet is waited for, its clock
        # started now; QUICK_HEADS in a row, then one wait (a checkpoint: the count starts again).
        wait.empty = False
        if wait.quick >= QUICK_HEADS or client.conn.trailing_data[0]:
            wait.quick = 0
            return None
        if not client.receive_nowait():
            wait.quick = 0
            wait.empty = True  # (nothing there, or a broken socket: the wait says so) read after a wait
            return None
        wait.quick += 1
        wait.started = True
        client.head_since = trio.current_time()
        event = client.next_event_nowait()
        if event is not None:
            wait.head_at = client.head_since
        return event

    async def _send_error_quietly(self, client: H11Stream, exc: HttpError, method: bytes = b"") -> None:
        """``exc`` as the response, in one write (``method``: the request's; a HEAD's response has no body)."""
        if isinstance(client, H2Stream):  # an HTTP/2 stream answers in its own framing (a gRPC status for gRPC)
            with contextlib.suppress(trio.BrokenResourceError, h11.ProtocolError):
                await client.send_error(exc, head=method == b"HEAD")
            return
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            resp, body = error_response(exc)
            if exc.close:  # the rest is not read: say we close (a next request sent into the socket would reset it)
                resp = h11.Response(status_code=resp.status_code, reason=resp.reason,
                                    headers=[*resp.headers, (b"connection", b"close")])
            await client.send_all([resp, h11.EndOfMessage()] if method == b"HEAD" else [resp, h11.Data(data=body), h11.EndOfMessage()])
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _rest_of_body_quietly(self, client: H11Stream, exc: HttpError) -> None:
        """After an error answered while the request's body was still coming (the answer never waits for
        it: a 504 at a latency bound would leave up to DRAIN_TIMEOUT_S late), read the rest if it is small
        and soon, so that the connection goes on; else it ends (_requests: their side is not done)."""
        if isinstance(client, H2Stream) or exc.close or client.conn.our_state is not h11.DONE \
                or client.conn.their_state is not h11.SEND_BODY:
            return
        with contextlib.suppress(h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            await drain(client)

    async def _request(self, client: H11Stream, req: h11.Request, pinned: dict[str, Key], t0: float | None = None) -> None:
        """Serve one request whose head came whole at ``t0`` (None: now); a gateway-made error is answered."""
        self.p.stats["requests"] += 1
        if t0 is None:
            t0 = trio.current_time()
        self.p.begin()
        try:
            service, instance, status, ended_at = await self._route(client, req, pinned, t0)
            client.later.defer(self.p.gw.metrics.observe, service, instance, status, ended_at - t0)
        except HttpError as exc:
            self.p.stats[f"error_{exc.status}"] += 1
            # The user's answer first: its clock runs (a 504 at the bound), the log line and metrics can wait.
            if client.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    await self._send_error_quietly(client, exc, req.method)
                finally:
                    self._counted_error(req, exc)
                # If the body is not read to its end, _requests ends the connection after this.
                await self._rest_of_body_quietly(client, exc)
            else:
                self._counted_error(req, exc)
                raise trio.BrokenResourceError(str(exc)) from None
        finally:
            self.p.end()

    def _log_error(self, req: h11.Request | None, exc: HttpError) -> None:
        """One line per gateway-made error, at most ERROR_LOG_PER_S a second (a flood costs one line a second).

        ``req`` None: the connection never carried a request h11 could parse.
        """
        if not self.p.error_lines.allow(self.p.gw.id, trio.current_time()):
            return
        method = req.method.decode("ascii", "replace") if req is not None else "-"
        target = req.target.decode("ascii", "replace")[:200] if req is not None else "-"
        log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "%s: %s %s -> %d %s: %s", self.p.gw.id,
                method, target, exc.status, exc.error, exc.detail,
                extra={"cpn": {"event": "http_error", "status": exc.status, "error": exc.error,
                               "service": exc.service or None, "target": target}})

    def _counted_error(self, req: h11.Request, exc: HttpError) -> None:
        self.p.gw.metrics.observe(exc.service, None, exc.status, None)
        self._log_error(req, exc)

    async def _route(self, client: H11Stream, req: h11.Request, pinned: dict[str, Key],
                     t0: float) -> tuple[str, str, int, float]:
        """Serve one request whose head came at ``t0`` (this step: the plan is made at ``t0`` too):
        (service, instance, status) of the answer and when its attempt ended, or HttpError."""
        if self.source_rates is not None:  # max_requests_per_ip_per_s (cpnd/sourcerate.py): 429 before any work
            self._source_gate(client, t0)
        if self.abandons is not None and self.abandons.buckets:  # max_abandoned_per_ip_per_s: the same
            self._abandon_gate(client, t0)
        if self.p.gw.clients.active:  # cpnd/clients.py: 401/403/429; the key never goes on
            req = self._client_gate(client, req, t0)
        plan = self.planner.plan(req.method, req.target, req.headers, pinned, t0, t0)
        if isinstance(client, H11Stream):  # HTTP/1.1 users get the upstream's trailers if they ask (TE: trailers)
            client.trailers = wants_trailers(req.headers) and req.http_version == b"1.1"
            if client.hangup is None and (watch := hangups()) is not None:  # its close ends the attempts (hangups.py)
                client.hangup = watch.watch(tlsstream.raw_socket(client.transport))
        try:
            instance, status, ended_at = await self.attempts.forward(client, req, plan)
        except HttpError as exc:
            exc.service = plan.service
            raise
        return plan.service, instance, status, ended_at

    def rate_sources(self, g: GatewayConfig) -> None:
        """(Re)configure ``max_requests_per_ip_per_s`` and ``max_abandoned_per_ip_per_s``: buckets a
        reload keeps (retuned), or none when off."""
        self.abandons = limiter(g.max_abandoned_per_ip_per_s, g.max_abandoned_per_ip_burst, self.abandons)
        burst = g.max_requests_per_ip_burst or max(1, math.ceil(g.max_requests_per_ip_per_s))
        self.source_rates = limiter(g.max_requests_per_ip_per_s, burst, self.source_rates)

    def hung_up(self, source: str, n: int = 1) -> None:
        """``n`` requests of ``source`` ended because their user hung up: counted, and charged to its
        address (``max_abandoned_per_ip_per_s``)."""
        self.p.stats["user_abandoned"] += n
        if self.abandons is not None and source:
            now = trio.current_time()
            for _ in range(min(n, 1000)):  # (an HTTP/2 connection's streams: http2_max_streams at most)
                self.abandons.failed(source, now)

    def _abandon_gate(self, client: H11Stream, now: float) -> None:
        """HttpError 429 while its address has abandoned too many requests (``max_abandoned_per_ip_per_s``)."""
        abandons = self.abandons
        assert abandons is not None
        wait = abandons.retry_after(client.source, now)
        if wait is not None:
            self.p.stats["rate_limited_abandons"] += 1
            exc = HttpError(429, "rate_limited", f"this address abandoned too many requests (over "
                            f"{abandons.rate:g} a second, burst {abandons.burst:g}: max_abandoned_per_ip_per_s)")
            exc.headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            raise exc

    def _source_gate(self, client: H11Stream, now: float) -> None:
        """HttpError 429 for a request over its address's rate (``max_requests_per_ip_per_s``)."""
        rates = self.source_rates
        assert rates is not None
        wait = rates.take(client.source, now)
        if wait:
            self.p.stats["rate_limited_per_ip"] += 1
            exc = HttpError(429, "rate_limited", f"this address is over its request rate ({rates.rate:g} requests/s, "
                            f"burst {rates.burst:g}: max_requests_per_ip_per_s)")
            exc.headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            raise exc

    def _client_gate(self, client: H11Stream, req: h11.Request, now: float) -> h11.Request:
        """The ``[[clients]]`` verdict on a request at ``now``: an HttpError, or the request without its key."""
        gw = self.p.gw
        path = check_target(req.target)
        v = gw.clients.check(req.headers, match_service(gw.rib.by_service, path) or path, client.source, now)
        if v.status:
            exc = HttpError(v.status, v.error, v.detail)
            if v.retry_after_s is not None:
                exc.headers.append((b"retry-after", str(v.retry_after_s).encode()))
            if v.status == 401:
                exc.headers.append((b"www-authenticate", b'Bearer realm="cpn"'))
            raise exc
        # h11 validated these headers when it parsed them: _parsed skips doing it again (2.5x cheaper).
        return h11.Request(method=req.method, target=req.target, headers=list(v.headers),
                           http_version=req.http_version, _parsed=True)


class _HeadWait:
    """A user connection's one cancel scope for its waits for request heads, its deadline set per
    wait (a scope per request cost ~50 function calls, a deadline change ~15).

    Between requests (no byte of the next head yet) the connection is idle: closed after
    ``idle_timeout_s``. From the first byte of a head, the whole head must come within
    ``header_timeout_s`` (h11 stays IDLE until it is whole, so its state cannot tell these
    apart): else 408. Until a whole head is in, its slot may be taken back for a newcomer: a
    slow head holds no more than an idle connection. Each ends the scope (``_requests`` answers).
    ``started``: the head waited for had its first byte (then a timeout is a 408, else a quiet
    close). The clock is read once a step (4 calls a reading): ``cycle_ended`` and ``head_at``
    carry a step's reading on."""

    __slots__ = ("scope", "started", "cycle_ended", "head_at", "quick", "empty")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.started = False
        self.cycle_ended = False  # an exchange ended in this step: a pipelined head's clock starts now
        self.head_at: float | None = None  # the head waited for came whole in the step that read this
        self.quick = 0  # heads taken in a row without a wait (pipelined, or receive_nowait)
        self.empty = False  # receive_nowait found nothing in this step: the next read waits first


def _peer(transport: trio.abc.Stream) -> str:
    try:
        host, port = tlsstream.raw_socket(transport).getpeername()[:2]
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


def _bound_name(reason: str) -> str:
    return "max_http_clients_per_ip" if reason == "per_source" else "max_http_clients"

