"""The egress's HTTP/2 to ``http2 = true`` instances: h2c (prior knowledge) over one pooled
connection per instance address, a stream per request; the response comes back as h11 events
for the same relay as an HTTP/1.1 instance's, trailers included."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

import h2.events
import h2.exceptions
import h11
import trio
from h2.errors import ErrorCodes

from . import tlsstream
from .aio import open_nursery
from .config import InstanceConfig
from .grpcmap import trailer_fields, upstream_request_fields
from .h1 import content_length, next_event_within, rewrite_headers
from .h2io import RECEIVE_CHUNK, H2Inbox, H2Wire
from .relay import Cut, Sink, UserSink, relay_response
from .streams import StreamReset
from .tls import InstanceTls
from .tunnel import ResetCode

if TYPE_CHECKING:
    from .h1 import H11Stream
    from .load import Hold, InstanceMeter
    from .inprocess import LocalEvents
    from .plane import Plane


class EgressSide(Protocol):
    """What an HTTP/2 instance call needs of the egress (cpnd/egress.py)."""

    p: Plane
    meters: dict[str, InstanceMeter]

    def health_result(self, iid: str, ok: bool) -> None: ...


log = logging.getLogger("cpnd.http")


class H2Client:
    """One HTTP/2 connection to an instance; its reader and writer run in the gateway's nursery."""

    def __init__(self, transport: trio.SocketStream) -> None:
        self.wire = H2Wire(transport, client_side=True)
        self.wire.h2.initiate_connection()  # the preface first, whatever a stream queues before run() starts
        self.closed = False

    async def run(self) -> None:
        self.wire.kick()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.wire.writer)
                while not self.closed:
                    data = await self.wire.transport.receive_some(RECEIVE_CHUNK)
                    if not data:
                        break
                    for event in self.wire.h2.receive_data(data):
                        self._on_event(event)
                    self.wire.kick()
                nursery.cancel_scope.cancel()
        except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("HTTP/2 connection to an instance ended: %s", exc)
        finally:
            self.closed = True
            self.wire.fail_all(ErrorCodes.CANCEL)
            with trio.CancelScope(shield=True):
                await self.wire.transport.aclose()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            inbox = self.wire.inboxes.get(event.stream_id)
            if inbox is not None:
                inbox.push(_response(event))
        elif isinstance(event, (h2.events.DataReceived, h2.events.TrailersReceived, h2.events.StreamEnded,
                                h2.events.StreamReset)):
            self.wire.on_stream_event(event)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.wire.on_window(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True  # GOAWAY: no new streams here (those below its last id may still finish)

    def open(self, fields: list[tuple[bytes, bytes]], body: list[Any]) -> tuple[H2Inbox, bool]:
        """A new stream with ``fields`` sent, and ``body`` with them when it is the whole request and fits
        the windows (one write: a small call costs the instance one read); whether it went. h2's errors
        (too many streams, closed) propagate."""
        h2c = self.wire.h2
        sid = h2c.get_next_available_stream_id()
        whole = bool(body) and isinstance(body[-1], h11.EndOfMessage)
        size = sum(len(e.data) for e in body if isinstance(e, h11.Data))
        if whole and not body[-1].headers and size == 0:
            h2c.send_headers(sid, fields, end_stream=True)
        elif whole and size <= min(h2c.outbound_flow_control_window, h2c.remote_settings.initial_window_size,
                                   h2c.max_outbound_frame_size):
            h2c.send_headers(sid, fields)
            data = b"".join(e.data for e in body if isinstance(e, h11.Data))
            if body[-1].headers:
                if data:
                    h2c.send_data(sid, data)
                h2c.send_headers(sid, trailer_fields(body[-1].headers), end_stream=True)
            else:
                h2c.send_data(sid, data, end_stream=True)
        else:
            h2c.send_headers(sid, fields)
            whole = False
        inbox = self.wire.inboxes[sid] = H2Inbox(self.wire, sid)
        self.wire.kick()
        return inbox, whole


def _response(event: h2.events.ResponseReceived) -> Any:
    """The instance's response head as h11's; a trailers-only one (gRPC's errors) with a zero length,
    so that it travels whole and reaches an HTTP/2 user as one HEADERS frame again."""
    status = 0
    headers = []
    for n, v in event.headers:
        if n == b":status":
            status = int(v)
        elif not n.startswith(b":"):
            headers.append((n, v))
    if event.stream_ended is not None and not any(n == b"content-length" for n, _ in headers):
        headers.append((b"content-length", b"0"))
    try:
        return h11.Response(status_code=status, headers=headers)
    except h11.LocalProtocolError:
        return h11.ConnectionClosed()  # unrelayable: the relay treats it as a failed instance


class H2Pool:
    """The egress's HTTP/2 connections, one per instance address."""

    def __init__(self, egress: EgressSide) -> None:
        self.egress = egress
        self.p = egress.p
        self.conns: dict[tuple[Any, ...], H2Client] = {}
        self._connecting: dict[tuple[Any, ...], trio.Lock] = {}

    async def client(self, host: str, port: int, tls: InstanceTls | None) -> H2Client:
        key = (host, port) if tls is None else (host, port, *tls.pool_key)
        lock = self._connecting.setdefault(key, trio.Lock())
        async with lock:  # one connection per address, however many requests arrive at once
            client = self.conns.get(key)
            if client is None or client.closed:
                # h2c for http://, h2 by ALPN for https:// (verified like any https instance)
                stream = await tlsstream.open_instance(host, port, tls, self.p.limits.instance_connect_timeout_s)
                if tls is not None and stream.selected_alpn_protocol() != "h2":
                    await trio.aclose_forcefully(stream)
                    raise tlsstream.InstanceTlsError("TLS handshake done, but the instance did not agree to HTTP/2 (ALPN h2)")
                client = self.conns[key] = H2Client(stream)
                nursery = self.p.gw.nursery
                assert nursery is not None
                nursery.start_soon(client.run)
        return client

    async def exchange(self, first: list[Any], rx: H11Stream | LocalEvents | None, sink: Sink, inst: InstanceConfig,
                       host: str, port: int, netloc: bytes, deadline: float | None, hold: Hold | None = None) -> float | None:
        """Egress._exchange for an HTTP/2 instance: the time to its response head, or None (``sink`` told why).
        The call stops when its stream is abandoned, or its user hangs up (UserSink: only an HTTP/1.1 one is watched)."""
        if isinstance(sink, UserSink) and sink.client.hangup is None:
            return await self._exchange(first, rx, sink, inst, host, port, netloc, deadline, hold)
        with trio.CancelScope() as abandoned:
            sink.cancel_on_abandon(abandoned)
            return await self._exchange(first, rx, sink, inst, host, port, netloc, deadline, hold)
        return None  # abandoned: a quiet end

    async def _connected(self, sink: Sink, inst: InstanceConfig, host: str, port: int, tls: InstanceTls | None,
                         deadline: float | None) -> H2Client | None:
        """The instance's connection (kept or new), or None with the sink told why (unreachable, too late)."""
        # A user's own request with a bound (no tunnel, no far end to cut it): the connect is cut at it too.
        with trio.move_on_at(deadline if deadline is not None and sink.hold_until is not None else math.inf):
            try:
                return await self.client(host, port, tls)
            except (OSError, trio.TooSlowError) as exc:
                self.egress.health_result(inst.id, False)
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or "connect timed out"
                sink.reset(ResetCode.INSTANCE_UNREACHABLE, False, f"{inst.id} at {host}:{port}: {why}")
                return None
        sink.reset(ResetCode.DEADLINE, False, f"{inst.id} at {host}:{port}: no connection within the deadline")
        return None

    async def _exchange(self, first: list[Any], rx: H11Stream | LocalEvents | None, sink: Sink, inst: InstanceConfig,
                        host: str, port: int, netloc: bytes, deadline: float | None, hold: Hold | None) -> float | None:
        eg = self.egress
        tls = tlsstream.instance_tls(inst)
        client = await self._connected(sink, inst, host, port, tls, deadline)
        if client is None:
            return None
        req, body = first[0], first[1:]
        first.clear()
        complete = bool(body) and isinstance(body[-1], h11.EndOfMessage) or rx is None
        try:
            scheme = b"http" if tls is None else b"https"
            inbox, sent = client.open(upstream_request_fields(req.method, req.target, netloc, scheme, req.headers), body)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamIDTooLowError) as exc:
            client.closed = True  # a new connection for the next request
            sink.reset(ResetCode.REFUSED, False, f"{inst.id}: HTTP/2 connection cannot open a stream: {exc}")
            return None
        up = _H2Upload(client.wire, inbox, [] if sent else body, None if complete else rx, eg.p.limits.body_idle_timeout_s)
        eg.meters[inst.id].sent(hold, up.done_at)  # capacity: the head is queued (load.SlotHolds)
        head_after: float | None = None
        idle_s = eg.p.limits.body_idle_timeout_s
        try:
            async with open_nursery() as nursery:
                if not up.finished:
                    nursery.start_soon(up.run)
                with trio.CancelScope(deadline=deadline if deadline is not None else math.inf) as scope:
                    ev = await inbox.next_event()
                    if not isinstance(ev, h11.Response):
                        raise OSError("instance ended the stream before responding")
                    eg.health_result(inst.id, True)
                    head_after = max(0.0, trio.current_time() - up.done_at)
                    if inst.id in eg.meters:  # else it left (deregistered) since the call began: it ends all the same
                        sink.report_load(eg.meters[inst.id], head_after)
                    headers = rewrite_headers(ev.headers, drop_cpn=True, extra=[
                        (b"cpn-instance", inst.id.encode()), (b"cpn-origin", eg.p.gw.id.encode())])
                    response = h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason, _parsed=True)
                    await relay_response(inbox, response, content_length(ev.headers), sink, scope, idle_s)
                if scope.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    if head_after is None:
                        sink.reset(ResetCode.DEADLINE, up.delivered, f"{inst.id} did not answer within the deadline")
                        return None
                    raise OSError(f"response body idle for {idle_s:g} s")
                if not up.finished:
                    nursery.cancel_scope.cancel()  # answered before the whole request went up
        except (OSError, trio.BrokenResourceError, h2.exceptions.ProtocolError, Cut) as exc:
            if head_after is None:
                sink.reset(ResetCode.INSTANCE_FAILED, up.delivered, f"{inst.id}: {exc}")
            else:
                sink.reset(ResetCode.INSTANCE_FAILED, True, f"{inst.id} failed mid-response: {exc}")
        finally:
            # A cancelled call (the ingress reset its stream), an error, an early answer: the
            # instance's stream is reset too, so the instance stops working on it.
            client.wire.inboxes.pop(inbox.sid, None)
            inbox.discard()
            if not (inbox.ended and up.finished):
                client.wire.reset(inbox.sid, ErrorCodes.CANCEL)
        return head_after


class _H2Upload:
    """The request body to an HTTP/2 instance: what is here, then the rest as it comes, trailers last."""

    def __init__(self, wire: H2Wire, inbox: H2Inbox, body: list[Any], rx: Any, idle_s: float) -> None:
        self.wire = wire
        self.inbox = inbox
        self.body = body
        self.rx = rx
        self.idle_s = idle_s
        self.finished = not body and rx is None  # the whole request went with the head
        self.delivered = True  # the head went with the stream's opening
        self.done_at = trio.current_time()

    async def run(self) -> None:
        try:
            await self._run()
        except (h2.exceptions.StreamClosedError, trio.BrokenResourceError):
            # The instance answered and closed the stream (RST_STREAM NO_ERROR, RFC 9113 section
            # 8.1) before taking the whole request, or reset it: the response side tells which.
            self.finished = True

    async def _run(self) -> None:
        for event in self.body:
            await self._send(event)
        self.body = []
        while not self.finished and self.rx is not None:
            try:
                ev = await next_event_within(self.rx, self.idle_s)
            except trio.TooSlowError:
                raise StreamReset(ResetCode.CANCEL, True, f"request body idle for {self.idle_s:g} s") from None
            if not isinstance(ev, (h11.Data, h11.EndOfMessage)):
                raise StreamReset(ResetCode.BAD_REQUEST, True, "tunnelled request ended early")
            await self._send(ev)
        self.done_at = trio.current_time()

    async def _send(self, event: Any) -> None:
        if isinstance(event, h11.Data):
            await self.wire.send_data(self.inbox, event.data)
        elif isinstance(event, h11.EndOfMessage):
            if event.headers:
                self.wire.h2.send_headers(self.inbox.sid, trailer_fields(event.headers), end_stream=True)
            else:
                self.wire.h2.end_stream(self.inbox.sid)
            self.finished = True
            self.wire.kick()
