"""HTTP/2 at the ingress: one connection's streams, each a request routed on its own.

``H2Server`` takes any trio stream whose client sent the HTTP/2 connection preface (prior
knowledge on ``http_listen``; ALPN ``h2`` on ``https_listen`` hooks in the same way). Every
stream is presented to the planner and attempts as the h11 user connection they know
(``H2Stream``), so both protocols share one code path: the request's body is acknowledged
to the client's flow control only as it is taken (by the tunnel, an instance), responses are
sent within the client's windows, trailers flow, and gateway-made errors become gRPC
statuses for gRPC clients (grpcmap.py).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import h11
import trio
from h2.errors import ErrorCodes

from .errors import HttpError
from .grpcmap import grpc_error_fields, is_grpc, request_head, response_fields, trailer_fields
from .h1 import error_response
from .heads import MAX_HEADER_BYTES
from .limits import TokenBucket
from .pending import NOW
from .h2io import CONNECTION_WINDOW, RECEIVE_CHUNK, STREAM_WINDOW, H2Inbox, H2Wire, h2_error_name
from .rib import Key
from .streams import StreamReset

if TYPE_CHECKING:
    from .admission import Slot, SlotTable
    from .plane import Plane


class Users(Protocol):
    """What an HTTP/2 connection needs of the users' side of the ingress (cpnd/users.py)."""

    p: Plane
    draining: bool
    h2_servers: set[H2Server]
    slots: SlotTable

    async def _request(self, client: Any, req: h11.Request, pinned: dict[str, Key]) -> None: ...

    def edge_event(self, kind: str, line: str, stat: str = ...) -> None: ...

    def hung_up(self, source: str, n: int = 1) -> None: ...

log = logging.getLogger("cpnd.http")


class _States:
    """The part of h11's Connection that attempts.py and users.py read of a user's side."""

    they_are_waiting_for_100_continue = False

    def __init__(self, ended: bool) -> None:
        self.our_state: Any = h11.SEND_RESPONSE
        self.their_state: Any = h11.DONE if ended else h11.SEND_BODY


class H2Stream:
    """One HTTP/2 stream as the user connection attempts.py and relay.py expect (H11Stream's methods)."""

    trailers = True  # the upstream's trailers reach this user (relay_response)
    hangup = None  # no hangups.Hangup: a stream the user resets, or a connection it closes, cancels ``scope``
    tunnel_extra = ((b"te", b"trailers"),)  # tunnel.md: the egress keeps trailers for this request
    later = NOW  # its accounting runs at once (cpnd/pending.py: pending work is an HTTP/1.1 connection's)

    def __init__(self, server: H2Server, inbox: H2Inbox, grpc: bool, ended: bool) -> None:
        self.server = server
        self.inbox = inbox
        self.grpc = grpc
        self.conn = _States(ended)
        self.source = server.source  # the user's address, as an H11Stream's (Forwarded)
        self.scope = trio.CancelScope()
        self.head_since = trio.current_time()

    def next_event_nowait(self) -> Any:
        event = self.inbox.next_event_nowait()
        if isinstance(event, h11.EndOfMessage):
            self.conn.their_state = h11.DONE
        return event

    async def next_event(self) -> Any:
        event = await self.inbox.next_event()
        if isinstance(event, h11.EndOfMessage):
            self.conn.their_state = h11.DONE
        return event

    async def send(self, event: Any, *, end: bool = False) -> None:
        await self.send_all([event])

    async def send_all(self, events: list[Any], *, end: bool = False) -> None:
        """h11 response events as HEADERS, DATA and trailers; a head followed by the end is one HEADERS
        frame with END_STREAM (gRPC's trailers-only form)."""
        wire, sid = self.server.wire, self.inbox.sid
        todo, events[:] = list(events), []
        for i, event in enumerate(todo):
            self._check()
            if isinstance(event, h11.Response):
                last = i + 1 < len(todo) and isinstance(todo[i + 1], h11.EndOfMessage) and not todo[i + 1].headers
                wire.h2.send_headers(sid, response_fields(event.status_code, event.headers), end_stream=last)
                self.conn.our_state = h11.DONE if last else h11.SEND_BODY
                if last:
                    break
            elif isinstance(event, h11.Data):
                await wire.send_data(self.inbox, event.data)
            elif isinstance(event, h11.EndOfMessage):
                if event.headers:
                    wire.h2.send_headers(sid, trailer_fields(event.headers), end_stream=True)
                else:
                    wire.h2.end_stream(sid)
                self.conn.our_state = h11.DONE
            # InformationalResponse (100 Continue): HTTP/2 clients do not wait for one
        if self.conn.our_state is h11.DONE:
            await wire.written()  # the request ends when its answer is on the wire (a drain waits for no more)
        else:
            wire.kick()  # written by the writer's next round, with the rest of the response if it comes by then

    async def send_error(self, exc: HttpError, *, head: bool = False) -> None:
        """A gateway-made error: a trailers-only gRPC status for gRPC clients, else the JSON response
        (``head``: to a HEAD request, its head alone: DATA there is a protocol error for the client)."""
        self._check()
        h2c = self.server.wire.h2
        if self.grpc:
            h2c.send_headers(self.inbox.sid, grpc_error_fields(exc), end_stream=True)
        else:
            resp, body = error_response(exc)
            h2c.send_headers(self.inbox.sid, response_fields(resp.status_code, resp.headers), end_stream=head)
            if not head:
                h2c.send_data(self.inbox.sid, body, end_stream=True)  # under the initial window (tens of bytes)
        self.conn.our_state = h11.DONE
        await self.server.wire.written()

    def _check(self) -> None:
        if self.inbox.reset_code is not None or self.server.wire.broken is not None:
            raise trio.BrokenResourceError("the client reset the stream")
        if self.conn.our_state is h11.DONE:
            raise h11.LocalProtocolError("response already complete")


class H2Server:
    """The ingress's side of one HTTP/2 connection."""

    def __init__(self, users: Users, transport: Any, peer: str, slot: Slot | None = None) -> None:
        self.users = users
        self.p = users.p
        self.transport = transport
        self.peer = peer  # for log lines
        self.slot = slot
        self.source = slot.source if slot is not None else ""  # the client's address
        self.wire = H2Wire(transport, client_side=False)
        self.streams: dict[int, H2Stream] = {}
        self.pinned: dict[str, Key] = {}  # per-connection selection pins, as on an HTTP/1.1 connection
        self.max_streams = self.p.limits.h2_max_streams
        # Streams the client resets (HTTP/2 "Rapid Reset", CVE-2023-44487: each costs us a request's
        # routing, none a concurrency slot): as many a second as may be open at once, beyond that
        # GOAWAY ENHANCE_YOUR_CALM.
        self.resets = TokenBucket(rate=float(self.max_streams), burst=float(2 * self.max_streams))
        self._reset_now: set[int] = set()  # streams the batch being read resets: not started at all
        self._idle = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()

    async def serve(self, received: bytes) -> None:
        """Serve the connection whose first bytes (the preface, maybe more) are ``received``; returns
        when it is over (the caller closes the transport)."""
        h2c = self.wire.h2
        h2c.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES})
        h2c.initiate_connection()
        # The stream bound as a change h2 enforces once acknowledged (a client past it then gets GOAWAY
        # PROTOCOL_ERROR); before that, _on_request refuses the streams over it one by one.
        h2c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.p.stats["h2_connections"] += 1
        self.users.h2_servers.add(self)
        try:
            await self._serve(received)
        finally:
            self.users.h2_servers.discard(self)

    async def _serve(self, received: bytes) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.wire.writer)
            self.wire.kick()
            await self._read(received)
            # Reading is over: streams still running finish (a client's GOAWAY lets them), then the last frames go.
            while self.streams and self.wire.broken is None:
                self._done = trio.Event()
                await self._done.wait()
            with trio.move_on_after(1.0):
                await self.wire.written()
            nursery.cancel_scope.cancel()

    async def _read(self, data: bytes) -> None:
        h2c = self.wire.h2
        idle_s = self.p.limits.idle_timeout_s
        while True:
            try:
                events = h2c.receive_data(data)
            except h2.exceptions.ProtocolError as exc:  # h2 has queued GOAWAY with the error's code
                self._log_bad(exc)
                self.wire.fail_all(ErrorCodes.CANCEL)
                self._cancel_all()
                return
            self._reset_now = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
            for event in events:
                if self._on_event(event):
                    return
            self.wire.kick()
            if self.users.draining and not self.streams:
                return  # drain() sent GOAWAY
            self._idle = trio.CancelScope(deadline=trio.current_time() + idle_s if not self.streams else math.inf)
            self._set_idle(not self.streams)
            try:
                with self._idle:
                    data = await self.transport.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # reset by the client: closed (not an error of ours, and no traceback per connection)
            finally:
                self._set_idle(False)
            if self.users.draining and not self.streams:
                return  # drain() sent GOAWAY
            if self._idle.cancelled_caught or (self.slot is not None and not self.slot.held):
                self.goaway(ErrorCodes.NO_ERROR)  # idle for idle_timeout_s, or its slot taken back for a newcomer
                return
            if not data:  # the client closed: nobody reads the responses
                self.users.hung_up(self.source, len(self.streams))  # (their attempts end: cancelled below)
                self.wire.fail_all(ErrorCodes.CANCEL)
                self._cancel_all()
                return

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY NO_ERROR naming the last stream we took (RFC 9113 section 6.8);
        the streams open finish, then the connection closes. Built by hand: once h2 has sent a
        GOAWAY it reads no more frames, and these streams still need theirs."""
        goaway = hyperframe.frame.GoAwayFrame(0)
        goaway.last_stream_id = self.wire.h2.highest_inbound_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        self.wire.send_raw(goaway.serialize())
        if not self.streams:
            self._idle.cancel()

    def _set_idle(self, idle: bool) -> None:
        """With no stream open the connection is idle: its slot may be taken back for a newcomer
        (users.py), which cancels the read."""
        if self.slot is not None and self.slot.held:
            self.slot.owner = self._idle if idle else None
            self.users.slots.set_idle(self.slot, idle)

    def goaway(self, code: int) -> None:
        try:
            self.wire.h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.wire.kick()

    def _on_event(self, event: Any) -> bool:
        """Dispatch one h2 event; True when the connection is over for reading."""
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, (h2.events.DataReceived, h2.events.TrailersReceived, h2.events.StreamEnded)):
            self.wire.on_stream_event(event)
        elif isinstance(event, h2.events.StreamReset):
            if not self.resets.take(1, trio.current_time()):
                return self._calm()
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self.p.stats["h2_streams_cancelled"] += 1
                self.wire.on_stream_event(event)
                stream.scope.cancel()  # its attempt's finally resets the tunnel stream (CANCEL)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.wire.on_window(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True  # the client's GOAWAY: no new streams; those open finish
        return False

    def _calm(self) -> bool:
        """A client resetting streams faster than its bucket allows: GOAWAY ENHANCE_YOUR_CALM, the
        streams it has open cancelled, no more reading (True)."""
        self.p.stats["h2_rapid_resets"] += 1
        self.users.edge_event("HTTP/2 connections closed for resetting streams too fast",
                              f"http: {self.peer} reset HTTP/2 streams faster than {self.max_streams}/s "
                              f"(http2_max_streams a second): GOAWAY ENHANCE_YOUR_CALM", "h2_rapid_resets_logged")
        self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self.wire.fail_all(ErrorCodes.CANCEL)
        self._cancel_all()
        return True

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if sid in self._reset_now:  # reset in the same read: nothing to route (the reset is counted)
            return
        if self.users.draining or len(self.streams) >= self.max_streams:
            # Over what we advertised (a client before our SETTINGS' ACK, or one ignoring it): this
            # stream only (RFC 9113 section 5.1.2), retryable elsewhere.
            self.p.stats["h2_refused_streams"] += 1
            self.wire.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        fields = list(event.headers)
        try:
            method, target, headers = request_head(fields)
            if event.stream_ended is None and not any(n == b"content-length" for n, _ in headers):
                headers.append((b"transfer-encoding", b"chunked"))  # a body of unknown length: chunked in the tunnel
            req = h11.Request(method=method, target=target, headers=headers)
        except (ValueError, h11.LocalProtocolError) as exc:
            self._log_bad(exc, stream=True)
            self.wire.reset(sid, ErrorCodes.PROTOCOL_ERROR)  # a malformed request (RFC 9113 section 8.1.1)
            return
        inbox = self.wire.inboxes[sid] = H2Inbox(self.wire, sid)
        if event.stream_ended is not None:
            inbox.ended = True
        stream = self.streams[sid] = H2Stream(self, inbox, is_grpc(fields), event.stream_ended is not None)
        assert self._nursery is not None
        self._set_idle(False)
        self._nursery.start_soon(self._stream, stream, req)

    async def _stream(self, stream: H2Stream, req: h11.Request) -> None:
        """One request, as users.py serves an HTTP/1.1 one; the stream closed whichever way it ends."""
        try:
            with stream.scope:
                await self.users._request(stream, req, self.pinned)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, StreamReset,
                h11.ProtocolError) as exc:
            if self.p.attempt_lines.allow(self.p.gw.id, trio.current_time()):
                log.info("%s: HTTP/2 stream %d of %s ended: %s", self.p.gw.id, stream.inbox.sid, self.peer, exc)
        except Exception:  # a bug costs this stream, never the connection or the daemon
            log.exception("%s: HTTP/2 stream failed", self.p.gw.id)
        finally:
            self._finish(stream)

    def _finish(self, stream: H2Stream) -> None:
        sid = stream.inbox.sid
        del self.streams[sid]
        self.wire.inboxes.pop(sid, None)
        if stream.inbox.reset_code is None:
            if stream.conn.our_state is not h11.DONE:
                self.wire.reset(sid, ErrorCodes.INTERNAL_ERROR)  # cut short mid-response: the client must know
            elif stream.conn.their_state is not h11.DONE:
                self.wire.reset(sid, ErrorCodes.NO_ERROR)  # answered before the whole request (RFC 9113 section 8.1)
        stream.inbox.discard()
        self.wire.kick()
        if not self.streams:
            self._idle.deadline = trio.current_time() + self.p.limits.idle_timeout_s
            self._set_idle(True)
            if self.users.draining:
                self._idle.cancel()  # the last stream of a draining connection: close it
            self._done.set()

    def _cancel_all(self) -> None:
        for stream in self.streams.values():
            stream.scope.cancel()

    def _log_bad(self, exc: Exception, *, stream: bool = False) -> None:
        self.p.stats["h2_protocol_errors"] += 1
        if self.p.error_lines.allow(self.p.gw.id, trio.current_time()):
            what = "stream reset (PROTOCOL_ERROR)" if stream else \
                f"GOAWAY {h2_error_name(getattr(exc, 'error_code', ErrorCodes.PROTOCOL_ERROR))}"
            log.info("%s: %s sent bad HTTP/2: %s: %s", self.p.gw.id, self.peer, exc, what,
                     extra={"cpn": {"event": "h2_error", "client": self.peer}})
