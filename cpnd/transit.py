"""Transit: a stream for another gateway's instance relayed to the next hop, bytes only (no HTTP parsing)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from .aio import open_nursery
from .load import Stage
from .plane import Plane
from .streams import StreamReset, TunnelStream
from .tunnel import NO_BUDGET, ExtHeader, ResetCode


class Transit:
    """Relays streams whose origin is another gateway, by their extension header alone."""

    def __init__(self, plane: Plane) -> None:
        self.p = plane

    async def relay(self, inbound: TunnelStream, ext: ExtHeader, opened_at: float | None = None) -> None:
        key = self.p.gw.rib.lookup_target(ext.label, ext.origin, ext.instance)
        best = self.p.gw.rib.loc.get(key) if key else None
        if best is None or best.route.peer is None:
            inbound.reset(ResetCode.NO_ROUTE, False, f"{self.p.gw.id} has no route to {ext.origin}/{ext.instance}")
            return
        nxt = best.route.peer
        if nxt == inbound.peer or ext.hop_limit <= 1:
            inbound.reset(ResetCode.HOP_LIMIT, False, f"hop limit reached at {self.p.gw.id}")
            return
        conn = self.p.gw.established_conn(nxt)
        if conn is None or conn.mux is None:
            inbound.reset(ResetCode.NO_ROUTE, False, f"{self.p.gw.id} has no session to {nxt}")
            return
        budget = ext.budget_us
        if budget != NO_BUDGET:
            budget -= self.p.gw.rib.link_cost_us.get(nxt, 0) // 2
            if budget <= 0:
                inbound.reset(ResetCode.DEADLINE, False, f"deadline passed at {self.p.gw.id}")
                return
        outbound = conn.mux.open(attrs.evolve(ext, hop_limit=ext.hop_limit - 1, budget_us=budget))
        outbound.relay_to = inbound
        self.p.stats["relayed"] += 1
        forwarded_at = trio.current_time()

        def first_back(received_at: float, sent_at: float) -> None:
            # Our own time on this stream: all of it up to the response's first bytes going back,
            # less the wait for the next hop (selection.md, "Estimate").
            if opened_at is not None:
                self.p.own.add(Stage.TRANSIT, sent_at, ((sent_at - opened_at) - (received_at - forwarded_at)) * 1_000_000)

        # Neither side moving for body_idle_timeout_s ends the relay, as at the ingress and egress.
        idle_s = self.p.limits.body_idle_timeout_s
        async with open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + idle_s
            nursery.start_soon(_pump, inbound, outbound, nursery.cancel_scope, idle_s)
            nursery.start_soon(_pump, outbound, inbound, nursery.cancel_scope, idle_s, first_back)
        for end in (inbound, outbound):
            if not end.closed:
                end.reset(ResetCode.CANCEL, True, f"relay at {self.p.gw.id} idle for {idle_s:g} s")


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
