"""The egress: our own instances: admission, the keep-alive pool, health probes, and the call itself.

A request for one of our instances comes down a tunnel stream, an in-process pipe, or (the
whole request in hand at the ingress) straight from the user's connection; the identifier is
rewritten to the instance's real URL and its response relayed back.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import math
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio

from . import forwarded, tlsstream
from .aio import cancel_precisely_at, open_nursery
from .clients import source_key
from .config import Config, InstanceConfig, ServiceConfig
from .h1 import H11Stream, Headers, content_length, instance_address, next_event_within, \
    readable, replace_host, rewrite_headers, translate_target
from .errors import HttpError
from .fairshare import FULL, Shares
from .heads import MAX_HEADER_BYTES, check_target
from .h2up import H2Pool
from .health import HealthTracker
from .load import Hold, InstanceMeter, Stage
from .names import service_label
from .inprocess import LocalEvents, PipeEnd
from .plane import Plane
from .relay import Cut, Sink, StreamSink, relay_response, relay_whole
from .streams import ByteStream, StreamReset
from .tls import InstanceTls
from .tunnel import EXT_FLAG_YIELDS, NO_BUDGET, ExtHeader, ResetCode
from .whole import Whole, request_head

log = logging.getLogger("cpnd.http")


@attrs.define
class _PoolEntry:
    stream: trio.abc.Stream  # a SocketStream, or an SSLStream over one (https instances)
    conn: h11.Connection
    ic: H11Stream  # the two as one, kept with them (not made anew a request: it holds nothing of one)


class _Inline:
    """Stands in for a nursery when there is nothing to run beside the caller (the common case)."""

    async def __aenter__(self) -> _Inline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def party_of(origin: forwarded.Origin | None, via: str | None) -> str:
    """Whom a request is for, in fair shares and compute samples: the user's address (an IPv6 one by its
    /64); for one tunnelled from the peer ``via``, the user and ingress its head names within that peer,
    so that a gateway can name only users under its own session (selection.md, "Admission")."""
    user = source_key(origin.client) if origin is not None else ""
    if via is None:
        return user
    return f"{via}|{origin.ingress}|{user}" if origin is not None else f"{via}||"


def user_gone(sink: Sink) -> bool:
    """Whether a call that ended unanswered did so because its user hung up (fairshare: an abandoning
    party has no share of a full instance): the ingress reset its stream CANCEL, or our own user's
    watch saw it close. A cut at the bound (DEADLINE) or a lost session is not the user's doing."""
    if isinstance(sink, StreamSink):
        return getattr(sink.stream, "peer_reset_code", None) == ResetCode.CANCEL
    return sink.abandoned


class Egress:
    """Our own instances, as this gateway's egress serves them."""

    def __init__(self, plane: Plane) -> None:
        self.p = plane
        self.pool: dict[tuple[Any, ...], collections.deque[_PoolEntry]] = {}
        self.meters: dict[str, InstanceMeter] = {}
        self.local: dict[tuple[int, str], tuple[ServiceConfig, InstanceConfig]] = {}
        self._health: dict[str, HealthTracker] = {}
        self._vouched: dict[str, float] = {}  # when a request last reached each instance
        self.shares: dict[str, Shares] = {}  # each user's admissions per instance, for its fair share
        self._pool_keys: set[tuple[Any, ...]] = set()  # the addresses of our instances now: only theirs are pooled
        self.h2 = H2Pool(self)

    def reconfigure(self, config: Config) -> None:
        """Take the (re)loaded services: meters of instances that stay keep their history."""
        self.local = {(service_label(s.path), i.id): (s, i) for s in config.services for i in s.instances}
        meters = {}
        for _, inst in self.local.values():
            m = self.meters.get(inst.id) or InstanceMeter(inst.capacity, int(inst.compute_latency_ms * 1000))
            m.capacity = inst.capacity
            m.set_hint(inst.compute_latency_ms * 1000)  # shown at once: an instance out of every bound gets no next sample
            m.holds.guard_s = config.gateway.admission_guard_ms / 1000
            meters[inst.id] = m
        self.meters = meters
        self.shares = {iid: self.shares[iid] if iid in self.shares else Shares() for iid in meters}  # one per meter
        # What was kept for instances no longer ours goes with them (registered ones come and go, at
        # addresses of their own: an idle connection kept per address ever seen would use up descriptors).
        self._pool_keys = {_pool_key(*instance_address(i.url)[:2], tlsstream.instance_tls(i)) for _, i in self.local.values()}
        for key in [k for k in self.pool if k not in self._pool_keys]:
            for entry in self.pool.pop(key):
                tlsstream.raw_socket(entry.stream).close()
        for table in (self._health, self._vouched):
            for iid in [k for k in table if k not in meters]:
                del table[iid]

    # ---- health

    def health(self, iid: str) -> HealthTracker:
        tracker = self._health.get(iid)
        if tracker is None:
            g = self.p.gw.config.gateway
            tracker = self._health[iid] = HealthTracker(g.health_failures, g.health_successes,
                                                        hold_down_s=g.health_interval_ms / 1000)
        return tracker

    def health_result(self, iid: str, ok: bool, now: float | None = None) -> None:
        """A probe's or a call's verdict on an instance (``now``: the caller's clock reading, if it has one)."""
        now = trio.current_time() if now is None else now
        if ok:
            self._vouched[iid] = now
        tracker = self._health.get(iid)
        if tracker is None:
            tracker = self.health(iid)
        if tracker.result(ok, now):
            self.p.gw.health_changed(iid, tracker.healthy)

    async def probe(self, inst: InstanceConfig) -> None:
        """Active check: a TCP connect, or GET ``health_path`` answered below 500."""
        now = trio.current_time()
        interval = self.p.gw.config.gateway.health_interval_ms / 1000
        if self.health(inst.id).healthy and now - self._vouched.get(inst.id, -1e9) < interval:
            return  # real traffic proved it alive since the last probe
        ok = False
        with trio.move_on_after(min(2.0, interval)):
            ok = await _check(inst, min(2.0, interval))
        self.health_result(inst.id, ok)

    # ---- admission

    def admit(self, inst: InstanceConfig, budget_us: int, slack_us: int, party: str, now: float,
              yields: bool = False) -> str | None:
        """Admission for one request to ``inst`` (NO_BUDGET: none given) for ``party`` (its user, as
        ``party_of`` names it) at ``now``, ``yields`` if its ingress had room for it elsewhere
        (EXT_FLAG_YIELDS): None, or why it is refused (counted)."""
        meter = self.meters[inst.id]
        shares = self.shares[inst.id]
        if meter.inflight >= inst.max_inflight:  # a stuck instance cannot pin every stream and socket
            refusal: str | None = f"{inst.max_inflight} requests in flight (its max_inflight)"
        else:
            held = meter.holds.held(now)  # (asked once: the meter's own admission takes it too)
            # A bounded request's share is split among the bounded users alone only while flexible
            # requests are refused for the bounds' latency (fairshare.py: a bound any request may claim).
            bounded = slack_us != NO_BUDGET
            bounded_only = bounded and held + 1 > FULL * inst.capacity and meter.shut_to_flexible(now)
            refusal = shares.refuse(party, held, inst.capacity, now, bounded, bounded_only, yields) or meter.admit(
                now, None if budget_us == NO_BUDGET else budget_us, None if slack_us == NO_BUDGET else slack_us, held)
        if yields:
            self.p.stats["admission_yielding"] += 1  # (shown: a peer's flag, seen where it takes effect)
        if refusal is None:
            shares.admitted(party)
            return None
        self.p.stats["admission_rejects"] += 1
        return f"{inst.id}: {refusal}"

    # ---- a stream for one of our instances

    async def serve(self, stream: ByteStream, ext: ExtHeader, opened_at: float | None, via: str | None = None) -> None:
        """A request down a tunnel stream from the peer ``via``, or down a pipe (None): read its head,
        admit it, call the instance."""
        where = (ext.label, ext.instance)
        found = self.local.get(where)
        if found is None:
            stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{self.p.gw.id} has no instance {ext.instance} of label {ext.label}")
            return
        service, inst = found
        rx: H11Stream | LocalEvents = LocalEvents(stream) if isinstance(stream, PipeEnd) else H11Stream(h11.SERVER, stream, tunnel=True)
        now = self.p.now()  # one reading for this step: the head is here with the OPEN, usually
        deadline = now + ext.budget_us / 1_000_000 if ext.budget_us != NO_BUDGET else None
        try:
            method, target, headers, origin, rest, waited = await self._head(rx, service, instance_address(inst.url)[2])
        except StreamReset as exc:
            stream.reset(ResetCode(exc.code), exc.delivered, exc.text)
            return
        if waited:
            now = self.p.now()
        if where not in self.local:  # it left while the head came (deregistered)
            stream.reset(ResetCode.NO_SUCH_INSTANCE, False, f"{self.p.gw.id} has no instance {ext.instance} now")
            return
        sink = StreamSink(rx, stream)
        party = party_of(origin, via)
        refusal = self.admit(inst, ext.budget_us, ext.slack_us, party, now, bool(ext.flags & EXT_FLAG_YIELDS))
        if refusal is not None:
            sink.report_load(self.meters[inst.id], now=now)
            sink.reset(ResetCode.REFUSED, False, refusal)
            return
        served = await self.call(sink, service, inst, method, target, headers, origin, rest, rx, deadline, now, party,
                                 for_instance=True)
        if served is not None and sink.head_at is not None and opened_at is not None:
            self.p.own.add(Stage.EGRESS, sink.head_at, (sink.head_at - opened_at - served) * 1_000_000)

    async def _head(self, rx: H11Stream | LocalEvents, service: ServiceConfig,
                    netloc: bytes) -> tuple[bytes, bytes, Headers, forwarded.Origin | None, list[Any], bool]:
        """The tunnelled request's method, target, headers as the instance gets them (hop-by-hop and CPN-*
        ones dropped, Host ``netloc``, Forwarded ours), the user's address as the ingress saw it, what of its
        body came with it (all of it, usually), and whether we waited for the head; StreamReset(BAD_REQUEST
        or NO_SUCH_INSTANCE) for what cannot be served."""
        timeout_s = self.p.limits.header_timeout_s
        try:
            # (A tunnel stream's request is usually whole in its first chunk: read around h11's machinery.)
            events = rx.whole_request_nowait() if type(rx) is H11Stream else None
            if events is not None:
                event, rest, waited = events[0], events[1:], False
                _check_under(event.target, service)
            else:
                event = rx.next_event_nowait()
                waited = event is None
                if waited:
                    event = await next_event_within(rx, timeout_s)
                if not isinstance(event, h11.Request):
                    raise StreamReset(ResetCode.BAD_REQUEST, False, "expected an HTTP request")
                _check_under(event.target, service)
                _check_framing(event)  # (what request_events reads whole has neither)
                rest = _body_so_far(rx)
        except h11.RemoteProtocolError as exc:
            raise StreamReset(ResetCode.BAD_REQUEST, False, str(exc)) from None
        except trio.TooSlowError:
            raise StreamReset(ResetCode.BAD_REQUEST, False, f"no request head within {timeout_s:g} s") from None
        origin = forwarded.read_parsed(event.headers._full_items)  # (h11's own items: names lowercase already)
        # The instance's headers in one pass (call's replace_host is for headers filtered elsewhere)
        headers = rewrite_headers(event.headers, drop_cpn=True, host=netloc, drop=forwarded.REPLACED,
                                  extra=origin.instance_headers if origin is not None else ())
        return event.method, event.target, headers, origin, rest, waited

    async def call(self, sink: Sink, service: ServiceConfig, inst: InstanceConfig, method: bytes, target: bytes,
                   headers: Headers, origin: forwarded.Origin | None, rest: list[Any],
                   rx: H11Stream | LocalEvents | None, deadline: float | None, now: float, party: str, *,
                   for_instance: bool = False) -> float | None:
        """Call an admitted request's instance and account what it took: the instance's time to its
        response head (s), or None. ``headers`` are already filtered (hop-by-hop, CPN-*); ``origin``
        is who the instance is told it serves (Forwarded); ``rest`` is what of the body is here,
        ``rx`` streams the remainder (None: all here); ``now``: the clock as the request was admitted;
        ``party``: whom it is for, as admitted (``party_of``); ``for_instance``: ``headers`` are the
        instance's already (Host, Forwarded: the tunnelled request's, rewritten in one pass)."""
        meter = self.meters[inst.id]
        # Capacity: this request's slot, held until its answer (load.SlotHolds); and the load it came at,
        # as its admission counted it.
        hold, load_at_arrival = meter.take_admitted(now)
        host, port, netloc = instance_address(inst.url)
        if not for_instance:
            headers = replace_host(headers, netloc, drop=forwarded.REPLACED,
                                   extra=origin.instance_headers if origin is not None else ())
        first = [request_head(method, translate_target(target, service.path, inst.url), headers), *rest]
        rest.clear()  # the body's pieces live on in ``first`` only, until they are written
        served: float | None = None
        try:
            if inst.http2:  # h2c to the instance, one pooled connection (h2up.py)
                served = await self.h2.exchange(first, rx, sink, inst, host, port, netloc, deadline, hold)
            else:
                served = await self._exchange(first, rx, sink, inst, host, port, deadline, hold)
        finally:
            end = self.p.now()
            meter.ended()  # (at once: a next request's admission counts what is in flight)
            shares = self.shares.get(inst.id)  # (None: gone with its instance, a reload meanwhile)
            # What the call taught, with the times read now: off the user's path (cpnd/pending.py).
            sink.later.defer(_answered, meter, shares, end, served, load_at_arrival, hold, party,
                             served is None and shares is not None and user_gone(sink))
        return served

    def _kept(self, key: tuple[Any, ...]) -> _PoolEntry | None:
        """The newest idle kept-alive connection at ``key`` still fit to send into, or None."""
        idle = self.pool.get(key)
        while idle:
            entry = idle.pop()
            if entry.conn.our_state is h11.IDLE and not readable(entry.stream):
                return entry
            # The instance closed it while idle (or sent junk): never send into it.
            tlsstream.raw_socket(entry.stream).close()
        return None

    async def _connected(self, sink: Sink, inst: InstanceConfig, host: str, port: int,
                         tls: InstanceTls | None) -> _PoolEntry | None:
        """A new connection to the instance, or None once the sink has been told why not."""
        try:
            # Connect (and a verified TLS handshake) before the request's instance time starts.
            s = await tlsstream.open_instance(host, port, tls, self.p.limits.instance_connect_timeout_s)
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
            return _PoolEntry(s, conn, H11Stream(h11.CLIENT, s, conn=conn))
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                # Our descriptors ran out, not the instance: refused (tried elsewhere), never a health failure.
                sink.reset(ResetCode.REFUSED, False, f"{self.p.gw.id} is out of descriptors")
                return None
            if isinstance(exc, tlsstream.InstanceTlsError) and self.p.error_lines.allow(self.p.gw.id, trio.current_time()):
                log.warning("%s: instance %s at %s:%d: %s", self.p.gw.id, inst.id, host, port, exc.strerror)
            self.health_result(inst.id, False)
            why = "connect timed out" if isinstance(exc, trio.TooSlowError) else exc.strerror or exc
            sink.reset(ResetCode.INSTANCE_UNREACHABLE, False, f"{inst.id} at {host}:{port}: {why}")
            return None

    async def _exchange(self, first: list[Any], rx: H11Stream | LocalEvents | None, sink: Sink,
                        inst: InstanceConfig, host: str, port: int, deadline: float | None,
                        hold: Hold | None = None) -> float | None:
        """Forward to the instance and relay its answer to ``sink``; the time to its response head, or None.

        One scope for the whole call: the stream's abandonment ends it quietly (``sink.cancel_on_abandon``),
        the request's deadline bounds it up to the response head (the connect and the upload too: a
        stream's ingress would abandon it then; a user's own with a bound has no one else to cut it),
        then the idle time the body. (The deadline is the scope's from the start: a deadline set is
        a fifth of a scope's cost in trio.)"""
        head_after: float | None = None
        bound = deadline if sink.hold_until is not None else None
        tls = tlsstream.instance_tls(inst)
        key = _pool_key(host, port, tls)
        entry = self._kept(key)  # (a kept-alive one, as most calls have, without a coroutine)
        with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            sink.cancel_on_abandon(scope)
            if entry is None:
                entry = await self._connected(sink, inst, host, port, tls)
                if entry is None:
                    return None
            ic = entry.ic
            up = _Upload(ic, first, rx, self.p.limits.body_idle_timeout_s, self.meters[inst.id], hold, self.p.now)
            try:
                async with (_Inline() if up.complete else open_nursery()) as nursery:
                    if up.complete:
                        await up.run()  # one write, no task
                        sink.later.run()  # the instance has it: the user's last answer's accounting, meanwhile
                    else:
                        nursery.start_soon(up.run)
                    # (An answer that comes whole goes on rewritten in its bytes, to a user or down a stream.)
                    ev = await _response_head(ic, scope, bound,
                                              _answer_lines(inst.id, self.p.gw.id) if sink.takes_whole() else None)
                    if scope.cancel_called:  # the deadline passed in the step that brought the head: it
                        await trio.lowlevel.checkpoint()  # stands (a relay in a cancelled scope fails midway)
                    if type(ev) is not Whole and not isinstance(ev, h11.Response):
                        raise OSError("instance closed the connection before responding")
                    now = self.p.now()  # one reading for this step: health, load report, the relay's idle time
                    self.health_result(inst.id, True, now)
                    head_after = max(0.0, now - up.done_at)
                    if inst.id in self.meters:  # else it left (deregistered) since the call began: it ends all the same
                        sink.report_load(self.meters[inst.id], head_after, now)
                    await self._relay(ev, ic, sink, inst, scope, now)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, Cut) as exc:
                await entry.stream.aclose()
                _instance_failed(sink, inst, exc, head_after, up.delivered)
                return head_after
            except StreamReset:
                await entry.stream.aclose()
                raise
        if scope.cancelled_caught:
            return await self._cut_short(sink, inst, f"{host}:{port}", entry, head_after, entry is not None and up.delivered)
        assert entry is not None
        self._pool(key, entry)
        return head_after

    async def _relay(self, ev: Any, ic: H11Stream, sink: Sink, inst: InstanceConfig, scope: trio.CancelScope,
                     now: float) -> None:
        """The instance's answer, its head ``ev`` or the whole of it (a Whole, for a sink that ``takes_whole``),
        relayed to ``sink``, ``scope`` its idle time from ``now``."""
        idle_s = self.p.limits.body_idle_timeout_s
        if type(ev) is Whole:
            await relay_whole(ev, sink, scope, idle_s, now)  # type: ignore[arg-type]  (a UserSink or a StreamSink)
            return
        headers = rewrite_headers(ev.headers, drop_cpn=True, extra=_answer_fields(inst.id, self.p.gw.id))
        response = h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason, _parsed=True)
        await relay_response(ic, response, content_length(ev.headers), sink, scope, idle_s, now=now)

    async def _cut_short(self, sink: Sink, inst: InstanceConfig, where: str, entry: _PoolEntry | None,
                         head_after: float | None, delivered: bool) -> float | None:
        """A call's scope was cancelled: the stream abandoned, or the deadline passed (connecting, before
        the head, or the body idle too long). The connection goes; the sink is told; ``_exchange``'s result."""
        if sink.abandoned:  # the stream was abandoned: nothing to tell
            if entry is not None:
                await entry.stream.aclose()
            return None
        if entry is None:  # the deadline passed while connecting
            sink.reset(ResetCode.DEADLINE, False, f"{inst.id} at {where}: no connection within the deadline")
            return None
        if head_after is None:
            sink.reset(ResetCode.DEADLINE, delivered, f"{inst.id} did not answer within the deadline")
            await entry.stream.aclose()
            return None
        await entry.stream.aclose()
        sink.reset(ResetCode.INSTANCE_FAILED, True, f"{inst.id} failed mid-response: response body idle for "
                   f"{self.p.limits.body_idle_timeout_s:g} s")
        return head_after

    def _pool(self, key: tuple[Any, ...], entry: _PoolEntry) -> None:
        """Keep a connection whose exchange completed both ways, nothing of the instance's left unread,
        for the next request, if there is room."""
        conn = entry.conn
        # Bytes past the answer (a HEAD's or a 204's body, a wrong length, a second answer) would be
        # the next request's answer, another user's: such a connection goes (h11 keeps them for a
        # next cycle; _kept's readable() sees only the socket's).
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn._receive_buffer \
                and key in self._pool_keys:
            entry.ic.start_next_cycle()
            idle = self.pool.get(key)
            if idle is None:
                idle = self.pool[key] = collections.deque()
            if len(idle) < self.p.limits.pool_idle_per_instance:
                idle.append(entry)
                return
        tlsstream.raw_socket(entry.stream).close()  # no TLS close_notify: the instance sees the connection end


class _Upload:
    """The request to an instance: what is here in one write, the rest streamed as it comes."""

    delivered = False  # (set on the instance once written: a store fewer a request)

    def __init__(self, ic: H11Stream, first: list[Any], rx: H11Stream | LocalEvents | None, idle_s: float,
                 meter: InstanceMeter | None = None, hold: Hold | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.ic = ic
        self.clock = clock
        self.meter, self.hold = meter, hold  # capacity: the slot's guard runs from the write (load.SlotHolds)
        self.first = first
        self.rx = rx
        self.idle_s = idle_s
        self.complete = isinstance(first[-1], h11.EndOfMessage)
        # Compute latency counts from the end of the upload; a whole request's is set by run() before
        # anything reads it (no clock reading here), a streamed one's until then is now.
        self.done_at = 0.0 if self.complete else clock()

    async def run(self) -> None:
        await self.ic.send_all(self.first)
        self.delivered = True
        now = self.clock()
        if self.meter is not None:
            self.meter.sent(self.hold, now)
        if self.complete:
            self.done_at = now
            return
        while not self.complete:
            assert self.rx is not None
            try:
                ev = await next_event_within(self.rx, self.idle_s)
            except trio.TooSlowError:
                raise StreamReset(ResetCode.CANCEL, True, f"request body idle for {self.idle_s:g} s") from None
            if not isinstance(ev, (h11.Data, h11.EndOfMessage)):
                raise StreamReset(ResetCode.BAD_REQUEST, True, "tunnelled request ended early")
            await self.ic.send(ev)
            self.complete = isinstance(ev, h11.EndOfMessage)
        self.done_at = self.clock()


def _check_under(target: bytes, service: ServiceConfig) -> None:
    """StreamReset(BAD_REQUEST) for a tunnelled target the ingress would have refused from its user (one
    that could escape the instance's path: dot segments, encoded '/', '.' or '\\', not origin-form), and
    StreamReset(NO_SUCH_INSTANCE) for one outside ``service``'s path."""
    # A peer's stream comes from no ingress of ours: its target is checked as a user's would be (else
    # /svc/../admin reached the instance as /v1/../admin, outside its URL's path). (check_target keeps
    # its verdicts on short targets: one C call a request, as the split it replaces.)
    try:
        path = check_target(target)
    except HttpError as exc:
        raise StreamReset(ResetCode.BAD_REQUEST, False, exc.detail) from None
    # (match_service({service.path}, path) == service.path, without its loop and set)
    if path != service.path and not path.startswith(service.path + "/"):
        raise StreamReset(ResetCode.NO_SUCH_INSTANCE, False, f"{path} is not under {service.path}")


def _check_framing(event: h11.Request) -> None:
    """StreamReset(BAD_REQUEST) for a tunnelled request the ingress would have refused from its user: a
    CONNECT, or both Content-Length and Transfer-Encoding."""
    # h11 reads such a request as chunked, and the instance's copy keeps the length (rewrite_headers): a
    # body of another length made our own h11 refuse to write it, reported as the instance's failure
    # (instance-failed) with its kept-alive connection closed. A CONNECT's 2xx would switch the instance's
    # connection away from HTTP.
    if event.method == b"CONNECT":
        raise StreamReset(ResetCode.BAD_REQUEST, False, "CONNECT is not relayed")
    names = [item[1] for item in event.headers._full_items]  # (h11's own: lowercase)
    if b"content-length" in names and b"transfer-encoding" in names:
        raise StreamReset(ResetCode.BAD_REQUEST, False,
                          "both Content-Length and Transfer-Encoding: ambiguous framing refused")


def _body_so_far(rx: H11Stream | LocalEvents) -> list[Any]:
    """What of a tunnelled request's body has come with its head (all of it, usually), as events;
    StreamReset(BAD_REQUEST) for anything else."""
    rest: list[Any] = []
    while True:
        ev = rx.next_event_nowait()
        if ev is None:
            return rest
        # (type, not isinstance: on h11's ABCs a failed isinstance is a call)
        if type(ev) is not h11.EndOfMessage and type(ev) is not h11.Data:
            raise StreamReset(ResetCode.BAD_REQUEST, False, "tunnelled request ended early")
        rest.append(ev)
        if type(ev) is h11.EndOfMessage:
            return rest


async def _response_head(ic: H11Stream, scope: trio.CancelScope, bound: float | None, as_is: bytes | None) -> Any:
    """The instance's first event past any 1xx: its response head, or what ended the connection; or,
    ``as_is`` given (the answer's added field lines), the whole answer as our own user gets it if it
    came so (H11Stream.answer: a Whole); ``scope`` cut precisely at ``bound`` (None: no timer here)."""
    if bound is None:  # a stream's sink: the ingress keeps the user's bound
        ev = await (ic.next_event() if as_is is None else ic.answer(as_is))
        while type(ev) is h11.InformationalResponse:  # (isinstance on h11's ABCs: a call when false)
            ev = await ic.next_event()
        return ev
    with cancel_precisely_at(scope, bound):  # a user's own sink with a bound (the ingress calling its own instance)
        ev = await (ic.next_event() if as_is is None else ic.answer(as_is))
        while type(ev) is h11.InformationalResponse:
            ev = await ic.next_event()
    return ev


def _answered(meter: InstanceMeter, shares: Shares | None, end: float, served: float | None, load_at_arrival: float,
              hold: Hold | None, party: str, gone: bool) -> None:
    """What a call that ended at ``end`` taught (``served``: the instance's time to its response head, s,
    or None): its sample and hold (InstanceMeter.answered), its party's share (``gone``: its user hung up)."""
    if served is not None:
        meter.answered(end, served * 1_000_000, load_at_arrival, hold, party)
    if shares is not None:
        shares.ended(party, end, gone)


@functools.lru_cache(maxsize=1024)
def _answer_lines(iid: str, gateway_id: str) -> bytes:
    """``_answer_fields`` as h11 writes them (a whole answer passed on in its bytes: whole.answer_as_is)."""
    return b"".join(b"%s: %s\r\n" % field for field in _answer_fields(iid, gateway_id))


@functools.lru_cache(maxsize=1024)
def _answer_fields(iid: str, gateway_id: str) -> tuple[tuple[bytes, bytes], ...]:
    """The fields an egress adds to its instance's answer (encoded once, not per request)."""
    return (b"cpn-instance", iid.encode()), (b"cpn-origin", gateway_id.encode())


def _pool_key(host: str, port: int, tls: InstanceTls | None) -> tuple[Any, ...]:
    """Idle connections are shared by instances at the same address with the same TLS trust."""
    return (host, port) if tls is None else (host, port, *tls.pool_key)


async def _check(inst: InstanceConfig, timeout_s: float) -> bool:
    """One probe: the instance accepts a connection (an https one: a verified TLS handshake too), and
    answers ``health_path`` below 500."""
    u = urllib.parse.urlsplit(inst.url)
    host, port, _ = instance_address(inst.url)
    try:
        stream = await tlsstream.open_instance(host, port, tlsstream.instance_tls(inst), timeout_s)
    except (OSError, trio.TooSlowError):
        return False
    async with stream:
        if inst.health_path is None:
            return True
        conn = H11Stream(h11.CLIENT, stream)
        try:
            await conn.send(h11.Request(method="GET", target=inst.health_path,
                                        headers=[("host", u.netloc), ("connection", "close")]))
            await conn.send(h11.EndOfMessage())
            event = await conn.next_event()
        except (h11.ProtocolError, trio.BrokenResourceError, OSError):
            return False
        return isinstance(event, h11.Response) and event.status_code < 500


def _instance_failed(sink: Sink, inst: InstanceConfig, exc: BaseException, head_after: float | None,
                     delivered: bool) -> None:
    """The instance's connection failed (or closed) during a call: the sink is reset with why."""
    what = "instance closed the connection mid-response" if isinstance(exc, Cut) else exc
    if head_after is None:
        sink.reset(ResetCode.INSTANCE_FAILED, delivered, f"{inst.id}: {what}")
    else:
        sink.reset(ResetCode.INSTANCE_FAILED, True, f"{inst.id} failed mid-response: {what}")
