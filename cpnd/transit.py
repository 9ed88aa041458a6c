"""Transit: a stream for another gateway's instance relayed to the next hop, bytes only (no HTTP parsing).

A relay has no task of its own: what arrives on one stream is moved on to the other from the
step that received it (the peer connection's reader), as far as the other's windows take it;
the rest waits in the stream it came on, and moves when credit comes back. One sweeper task
ends relays that stay idle, as the ingress and the egress do with theirs.
"""

from __future__ import annotations

import logging

import trio

from .load import Stage
from .plane import Plane
from .streams import StreamReset, TunnelStream
from .tunnel import NO_BUDGET, ExtHeader, ResetCode

log = logging.getLogger("cpnd.transit")

SWEEP_S = 1.0  # how often idle relays are looked for


class Transit:
    """Relays streams whose origin is another gateway, by their extension header alone."""

    def __init__(self, plane: Plane) -> None:
        self.p = plane
        self.relays: set[Relay] = set()
        self._sweeping = False

    def relay(self, inbound: TunnelStream, ext: ExtHeader, opened_at: float) -> None:
        """Open the next hop's stream for ``inbound`` and start moving bytes (StreamReset: refused)."""
        rib = self.p.gw.rib
        key = rib.lookup_target(ext.label, ext.origin, ext.instance)
        best = rib.loc.get(key) if key else None
        if best is None or best.route.peer is None:
            raise StreamReset(ResetCode.NO_ROUTE, False, f"{self.p.gw.id} has no route to {ext.origin}/{ext.instance}")
        nxt = best.route.peer
        if nxt == inbound.peer or ext.hop_limit <= 1:
            raise StreamReset(ResetCode.HOP_LIMIT, False, f"hop limit reached at {self.p.gw.id}")
        conn = self.p.gw.established_conn(nxt)
        if conn is None or conn.mux is None:
            raise StreamReset(ResetCode.NO_ROUTE, False, f"{self.p.gw.id} has no session to {nxt}")
        budget = ext.budget_us
        if budget != NO_BUDGET:
            budget -= rib.link_cost_us.get(nxt, 0) // 2
            if budget <= 0:
                raise StreamReset(ResetCode.DEADLINE, False, f"deadline passed at {self.p.gw.id}")
        # Its request, or a RESET, follows from this step, or the reader writes it at the step's end.
        outbound = conn.mux.open(ext.onward(budget), soon=True)
        assert isinstance(outbound, TunnelStream)  # a transit's outbound is never sealed by it
        outbound.relay_to = inbound  # LOAD frames go back as they come
        self.p.stats["relayed"] += 1
        relay = Relay(self, inbound, outbound, opened_at, self.p.now())
        self.relays.add(relay)
        self.p.begin()
        if not self._sweeping:
            assert self.p.gw.nursery is not None
            self._sweeping = True
            self.p.gw.nursery.start_soon(self._sweep)
        relay.moved(inbound)  # what came with the OPEN

    def _done(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.discard(relay)
            self.p.end()

    async def _sweep(self) -> None:
        """End relays where neither side moved for body_idle_timeout_s; ends when none are left."""
        try:
            while self.relays:
                await trio.sleep(SWEEP_S)
                now = trio.current_time()
                idle_s = self.p.limits.body_idle_timeout_s
                for relay in [r for r in self.relays if now - r.last_move > idle_s]:
                    relay.end(ResetCode.CANCEL, True, f"relay at {self.p.gw.id} idle for {idle_s:g} s")
        finally:
            self._sweeping = False


class Relay:
    """One relayed stream pair: ``inbound`` from the previous hop, ``outbound`` to the next."""

    def __init__(self, transit: Transit, inbound: TunnelStream, outbound: TunnelStream, opened_at: float,
                 forwarded_at: float) -> None:
        self.transit = transit
        self.inbound, self.outbound = inbound, outbound
        self.opened_at, self.forwarded_at = opened_at, forwarded_at
        self.last_move = forwarded_at
        self.pending: dict[TunnelStream, bytes] = {}  # taken from a stream, not yet taken by the other
        self.timed = False
        self.finished = False
        # A side reset after its END: (it, why); what it completed goes on whole, then the reset (tunnel.md).
        self.reset_after_end: tuple[TunnelStream, ResetCode, bool, str] | None = None
        inbound.relay = outbound.relay = self

    def _other(self, stream: TunnelStream) -> TunnelStream:
        return self.outbound if stream is self.inbound else self.inbound

    def moved(self, src: TunnelStream) -> None:
        """``src`` received DATA (or its end): pass on what the other side's windows take."""
        if self.finished:
            return
        try:
            self._pump(src)
        except StreamReset as exc:
            code = ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL
            self.end(code, exc.delivered, exc.text)
            return
        except Exception:  # runs in the peer connection's reader: a bug must cost one stream, never the session
            log.exception("%s: relay of stream %s from %s failed", self.transit.p.gw.id, self.inbound.id,
                          self.inbound.peer)
            self.end(ResetCode.INTERNAL, True, "internal error")
            return
        after = self.reset_after_end
        if after is not None and self._other(after[0]).sent_end:
            self.end(*after[1:])
        elif self.inbound.closed and self.outbound.closed:
            self._finish()

    def credited(self, dst: TunnelStream) -> None:
        """``dst`` may send again (stream or connection credit, the connection drained)."""
        self.moved(self._other(dst))

    def reset_by(self, stream: TunnelStream, exc: StreamReset) -> None:
        """One side was reset (by its peer, its session's loss or us): the other hears why."""
        if self.finished:
            return
        code = ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL
        if stream.complete and self.reset_after_end is None:  # e.g. a response, then the egress stops the upload
            self.reset_after_end = (stream, code, exc.delivered, exc.text)
            self.moved(stream)
            return
        self.end(code, exc.delivered, exc.text)

    def end(self, code: ResetCode, delivered: bool, text: str) -> None:
        """Reset both sides (the one already closed hears nothing) and forget the relay."""
        if self.finished:
            return
        self._finish()
        for stream in (self.inbound, self.outbound):
            if not stream.closed:
                stream.reset(code, delivered, text)

    def _finish(self) -> None:
        self.finished = True
        self.pending.clear()
        self.transit._done(self)

    def _pump(self, src: TunnelStream) -> None:
        dst = self.outbound if src is self.inbound else self.inbound  # (_other, inline: every move)
        while not dst.closed and not dst.sent_end:  # src's end passes on once (a WINDOW after it moves nothing)
            if dst.mux.conn.congested:
                dst.mux.wait_drained(dst)
                return
            data = self.pending.pop(src, None) if self.pending else None  # (usually empty: no call)
            if data is None:
                data = src.receive_nowait()
                if data is None:
                    return  # nothing waiting
            end = not data or src.at_end  # the last bytes and the end in one frame
            sent = dst.send_nowait(data, end=end)
            if sent < len(data) or (end and not dst.sent_end):
                self.pending[src] = data[sent:]
                return  # the rest when dst has credit again
            src.pass_on()
            self._progress(src)
            if end:
                if data:
                    src.receive_nowait()  # take the end as well: the stream closes
                return

    def _progress(self, src: TunnelStream) -> None:
        now = self.transit.p.now()
        self.last_move = now
        if src is self.outbound and not self.timed:
            # Our own time on this stream: all of it up to the response's first bytes going back,
            # less the wait for the next hop (selection.md, "Estimate").
            self.timed = True
            own_s = (now - self.opened_at) - (now - self.forwarded_at)
            self.transit.p.own.add(Stage.TRANSIT, now, own_s * 1_000_000)
