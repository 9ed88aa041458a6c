"""The ingress's attempts: one request tried on the candidates its plan gives, until one answers.

An attempt goes through a tunnel stream to the next hop, or to one of our own instances
(in one call when the whole request is in hand, else through an in-process pipe); its
response is relayed to the user (relay.py).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Any

import h11
import trio

from . import forwarded
from .aio import cancel_precisely_at, open_nursery
from .body import BodySource
from .clients import source_key
from .errors import HttpError
from .egress import Egress
from .h1 import H11Stream, Headers, content_length, rewrite_headers
from .hangups import UserGone
from .inprocess import LocalEvents, PipeEnd, pipe
from .whole import request_head
from .plane import Plane
from .planner import Attempt, Plan, Planner
from .relay import Cut, UserSink, Whole, first_event, relay_response, relay_whole
from .selection import Candidate
from .streams import ByteStream, StreamReset
from .tunnel import EXT_FLAG_IDEMPOTENT, EXT_FLAG_YIELDS, ExtHeader, ResetCode

log = logging.getLogger("cpnd.http")

ServeLocal = Callable[[PipeEnd, ExtHeader], None]  # runs our egress on the far end of a pipe
STATUS_KEYS = tuple(f"status_{n}xx" for n in range(10))  # by status // 100 (h11: three digits), made once
# h11's events are frozen: one EndOfMessage serves every request (its __init__ made a Headers each time).
END = h11.EndOfMessage()


class Attempts:
    """Forwarding for one gateway's ingress."""

    def __init__(self, plane: Plane, planner: Planner, egress: Egress, serve_local: ServeLocal) -> None:
        self.p = plane
        self.planner = planner
        self.egress = egress
        self.serve_local = serve_local
        self.ids = random.Random(os.urandom(16))

    async def forward(self, client: H11Stream, req: h11.Request, plan: Plan) -> tuple[str, int, float]:
        """Serve ``req`` on the first candidate that answers: (its instance, the status, when the attempt
        ended), or HttpError."""
        body = BodySource(client, self.p.limits)
        if client.conn.they_are_waiting_for_100_continue:
            await client.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        # HTTP/1.0 allows no Host; the tunnel speaks HTTP/1.1, which needs one (the egress sets the instance's).
        # The user's own Forwarded headers go; the egress learns who the user is from CPN-Client.
        me = self.p.gw.id
        headers = rewrite_headers(req.headers, drop_cpn=True, default_host=me.encode(), drop=forwarded.REPLACED,
                                  extra=(*forwarded.tunnel_pair(client.source, me), *client.tunnel_extra))  # TE: trailers (tunnel.md)
        while (cand := plan.next(start := trio.current_time(), replayable=body.replayable)) is not None:
            attempt = Attempt(bound_at=plan.bound_at)
            if cand.probe:
                self.p.stats["bound_probes"] += 1  # out of the bound by our correction alone: tried to learn
            try:
                status = await self._attempt(client, req, headers, body, cand, plan, attempt, start)
            except StreamReset as exc:
                now = trio.current_time()
                text = exc.text
                if exc.code == ResetCode.DEADLINE and plan.cut_at is not None and now >= plan.cut_at:
                    self.p.stats["bound_cut"] += 1  # answered 504 at the bound instead of a late 200
                    self.planner.missed(cand, attempt, plan.t0 if not plan.failures else start, now, client.source or None)
                    text = f"{_bound_text(plan)}: {exc.text}"
                go_on = plan.failed(cand, exc.code, exc.delivered, text, now)
                if self.p.attempt_lines.allow(self.p.gw.id, now):
                    more = "; trying the next candidate" if go_on and plan.more(body.replayable) else ""
                    log.info("%s: %s %s via %s/%s failed: %s%s", self.p.gw.id, req.method.decode("ascii", "replace"),
                             plan.service, cand.origin, cand.instance, exc, more)
                if not go_on:
                    break
                self.p.stats["retries"] += 1
                continue
            # The bound runs from the head's arrival; a retry's own time from its start. Learnt off the
            # user's path (cpnd/pending.py).
            assert attempt.ended_at is not None
            client.later.defer(self._observed, plan, cand, attempt, plan.t0 if not plan.failures else start)
            return cand.instance, status, attempt.ended_at
        raise plan.error()

    def _observed(self, plan: Plan, cand: Candidate, attempt: Attempt, start: float) -> None:
        """An answered attempt, for the estimates (Planner.observed); counted if it left after its bound."""
        assert attempt.ended_at is not None
        if self.planner.observed(plan, cand, attempt, start, attempt.ended_at):
            self.p.stats["late"] += 1

    def _open_upstream(self, cand: Candidate, ext: ExtHeader, soon: bool) -> ByteStream:
        if cand.next_hop is None:
            near, far = pipe()
            self.serve_local(far, ext)
            return near  # carries h11 events (LocalEvents), not bytes
        conn = self.p.gw.established_conn(cand.next_hop)
        if conn is None or conn.mux is None:
            raise StreamReset(ResetCode.NO_ROUTE, False, f"no session to next hop {cand.next_hop}")
        return conn.mux.open(ext, soon=soon)

    async def _attempt(self, client: H11Stream, req: h11.Request, headers: Headers, body: BodySource,
                       cand: Candidate, plan: Plan, attempt: Attempt, now: float) -> int:
        """One try on ``cand`` starting ``now``: the response's status, or StreamReset when it failed
        before a response reached the user."""
        budget, slack = plan.budget_us(now), plan.slack_us(cand, now)
        if cand.next_hop is None and body.take_buffered() and body.replayable:
            return await self._attempt_local(client, req, headers, body, cand, plan, budget, slack, attempt, now)
        # The request id is for logs: a PRNG seeded from the system's (no system call per request);
        # randbytes' own body, without its Python call.
        flags = (EXT_FLAG_IDEMPOTENT if plan.idempotent else 0) | (EXT_FLAG_YIELDS if plan.yields(body.replayable) else 0)
        ext = ExtHeader(cand.label, cand.origin, cand.instance, self.ids.getrandbits(128).to_bytes(16, "little"), plan.cons.qos, 16, budget,
                        flags, slack)
        # Built before a stream exists (nothing to leak if it fails); the headers are h11's own, checked.
        head = request_head(req.method, req.target, headers)
        whole = body.take_buffered() and body.replayable
        up_raw = self._open_upstream(cand, ext, soon=whole)  # the whole request follows it at once
        up: H11Stream | LocalEvents = LocalEvents(up_raw) if isinstance(up_raw, PipeEnd) else H11Stream(h11.CLIENT, up_raw, tunnel=True)
        self.p.account.sent(cand.key, now)
        hangup = client.hangup
        if hangup is not None:
            hangup.arm(up_raw)  # the user's close resets the stream (hangups.py): the far end stops the call
        try:
            if whole:
                # The whole request is here (or kept from an earlier try): it goes upstream in
                # one write, and no task streams it.
                body.consumed = True
                data = body.whole()
                events = [head, *([h11.Data(data)] if data else []), END]
                await up.send_all(events, end=True)
                attempt.sent_at = trio.current_time()
                attempt.whole = True
                client.later.run()  # the next hop has it: the user's last answer's accounting, meanwhile
                return await self._response(client, up, up_raw, plan, attempt)
            async with open_nursery() as nursery:  # (the upload's task: its first step runs ``client.later``)
                attempt.sent_at = trio.current_time()
                nursery.start_soon(_upload, up, up_raw, head, body)
                status = await self._response(client, up, up_raw, plan, attempt)
                if not body.done:
                    nursery.cancel_scope.cancel()  # answered before reading the whole body
            return status
        except h11.ProtocolError as exc:
            if hangup is not None and hangup.gone:  # (its body cut short by the close)
                raise _gone(req, cand) from None
            up_raw.reset(ResetCode.BAD_REQUEST, True, str(exc))
            if not attempt.sent_head:
                raise HttpError(502, "bad_gateway", f"bad response from upstream: {exc}") from None
            raise trio.BrokenResourceError(str(exc)) from None
        except StreamReset as exc:
            if hangup is not None and hangup.gone:  # no retry, no sample for the estimates
                raise _gone(req, cand) from None
            if exc.code == ResetCode.DEADLINE and not up_raw.closed:  # cut at the bound: the far end is told so
                up_raw.reset(ResetCode.DEADLINE, True, exc.text)
            if attempt.sent_head:
                raise trio.BrokenResourceError("upstream reset mid-response") from None
            raise
        finally:
            if hangup is not None:
                hangup.target = None
            self._ended(cand, up_raw, attempt, client)

    def _ended(self, cand: Candidate, up_raw: ByteStream, attempt: Attempt, client: H11Stream) -> None:
        """An attempt through a stream ended, however: the stream closed, our accounts told (what the
        far end reported, off the user's path: cpnd/pending.py)."""
        # Every way out leaves the stream closed: a response that came before the whole
        # request went up, an error, a cancellation (the far end stops waiting too).
        if not up_raw.closed:
            up_raw.reset(ResetCode.CANCEL, True, "ingress done with the stream")
        self.p.account.finished(cand.key)
        attempt.ended_at = trio.current_time()
        if up_raw.load_report is not None:  # fresh from the instance's gateway, refusals included
            load, bload, comp, instance_us = up_raw.load_report
            client.later.defer(self.p.account.heard, cand.key, load, bload, comp, attempt.ended_at)
            attempt.instance_s = None if instance_us is None else instance_us / 1_000_000

    async def _attempt_local(self, client: H11Stream, req: h11.Request, headers: Headers, body: BodySource,
                             cand: Candidate, plan: Plan, budget_us: int, slack_us: int, attempt: Attempt,
                             now: float) -> int:
        """One try on one of our own instances, the whole request in hand: the ingress calls it
        itself (no stream, no task); admission and errors as for a tunnelled request."""
        found = self.egress.local.get((cand.label, cand.instance))
        if found is None:
            raise StreamReset(ResetCode.NO_SUCH_INSTANCE, False, f"{self.p.gw.id} has no instance {cand.instance}")
        service, inst = found
        party = source_key(client.source)
        refusal = self.egress.admit(inst, budget_us, slack_us, party, now, plan.yields(body.replayable))
        if refusal is not None:
            raise StreamReset(ResetCode.REFUSED, False, refusal)
        body.consumed = True
        data = body.whole()
        sink = UserSink(client, attempt)
        hangup = client.hangup  # armed by the call (sink.cancel_on_abandon)
        attempt.whole = True
        self.p.account.sent(cand.key, now)
        try:
            attempt.instance_s = await self.egress.call(
                sink, service, inst, req.method, req.target, headers, forwarded.origin_at(client.source, self.p.gw.id),
                [*([h11.Data(data)] if data else []), END], None, plan.cut_deadline(), now, party)
            if sink.failure is not None:
                raise sink.failure
            if hangup is not None and hangup.gone and client.conn.our_state is not h11.DONE:
                raise _gone(req, cand)  # the call was cancelled (UserSink.cancel_on_abandon)
        except StreamReset as exc:
            if hangup is not None and hangup.gone:
                raise _gone(req, cand) from None
            if attempt.sent_head:
                raise trio.BrokenResourceError(str(exc)) from None
            raise
        finally:
            if hangup is not None:
                hangup.target = None
            self.p.account.finished(cand.key)
            attempt.ended_at = trio.current_time()
        self.p.stats[STATUS_KEYS[sink.status // 100]] += 1
        return sink.status

    async def _response(self, client: H11Stream, up: H11Stream | LocalEvents, up_raw: ByteStream, plan: Plan,
                        attempt: Attempt) -> int:
        """Pass the upstream's response on to the user; its status. One scope: the request's deadline
        for the head, then the idle time for the body."""
        idle_s = self.p.limits.body_idle_timeout_s
        event: Any = None
        cut = plan.cut_deadline()
        with trio.CancelScope(deadline=cut) as scope:
            # A bound is cut when the user's clock says so: trio's own timer fires up to ~2 ms late.
            with cancel_precisely_at(scope, None if plan.cut_at is None else cut):
                event = await first_event(up, client)  # (a Whole: the response as it came, for the user as it is)
                while isinstance(event, h11.InformationalResponse):
                    event = await up.next_event()
            if not scope.cancel_called:
                await self._relay(client, up, event, scope, attempt, idle_s)
        if scope.cancel_called and isinstance(event, (h11.Response, h11.ConnectionClosed, Whole)) and attempt.upstream_head_at is None:
            # The cut came in the step that brought the head (the timer's task ran first): the head came
            # in time, and is relayed in a scope of its own (a cancelled scope stays cancelled: in it,
            # the relay would fail at its first wait, and the user would lose the connection).
            with trio.CancelScope() as scope:
                await self._relay(client, up, event, scope, attempt, idle_s)
        if scope.cancelled_caught:
            if attempt.upstream_head_at is None:
                up_raw.reset(ResetCode.DEADLINE, True, "ingress deadline passed")
                if plan.cut_at is not None and plan.cut_at <= plan.deadline:
                    raise StreamReset(ResetCode.DEADLINE, True, "no response head by then")
                raise HttpError(504, "deadline_exceeded", f"no response within {plan.cons.timeout_s:g} s")
            raise trio.TooSlowError(f"response body idle for {idle_s:g} s")
        self.p.stats[STATUS_KEYS[event.status_code // 100]] += 1
        return event.status_code

    async def _relay(self, client: H11Stream, up: H11Stream | LocalEvents, event: Any, scope: trio.CancelScope,
                     attempt: Attempt, idle_s: float) -> None:
        """Relay the response whose head ``event`` came to the user, ``scope`` now its idle timer."""
        if isinstance(event, h11.ConnectionClosed):
            raise StreamReset(ResetCode.INSTANCE_FAILED, True, "upstream closed before responding")
        attempt.upstream_head_at = now = trio.current_time()
        if type(event) is Whole:
            await relay_whole(event, UserSink(client, attempt), scope, idle_s, now)
            return
        assert isinstance(event, h11.Response)
        response = h11.Response(status_code=event.status_code, reason=event.reason, _parsed=True,
                                headers=rewrite_headers(event.headers, drop_cpn=False))
        try:
            await relay_response(up, response, content_length(event.headers), UserSink(client, attempt), scope,
                                 idle_s, trailers=client.trailers, now=now)  # HTTP/2, or TE: trailers
        except Cut as exc:
            if exc.held:  # the user has seen nothing: a clean error, or a retry
                raise StreamReset(ResetCode.INSTANCE_FAILED, True, "upstream ended mid-response") from None
            raise trio.BrokenResourceError("upstream ended mid-response") from None


def _gone(req: h11.Request, cand: Candidate) -> UserGone:
    return UserGone(f"{req.method.decode('ascii', 'replace')} {req.target[:200].decode('ascii', 'replace')}: the user "
                    f"closed its connection while {cand.origin}/{cand.instance} served it: the attempt ended")


def _bound_text(plan: Plan) -> str:
    bound_ms = (plan.bound_at or plan.t0) - plan.t0
    return f"no response head within the request's latency bound ({bound_ms * 1000:g} ms)"


async def _upload(up: H11Stream | LocalEvents, up_raw: ByteStream, head: h11.Request, body: BodySource) -> None:
    """Stream the user's request upstream as it arrives (the response may come first)."""
    try:
        await up.send(head)
        async for chunk in body.iterate():
            await up.send(h11.Data(data=chunk))
        await up.send(END, end=True)
    except StreamReset:
        pass  # the download side reports what happened
    except HttpError:
        up_raw.reset(ResetCode.CANCEL, True, "client request failed")
        raise

