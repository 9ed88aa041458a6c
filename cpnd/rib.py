"""Routing information base (sans-IO): Adj-RIB-In per peer, Loc-RIB, Adj-RIB-Out.

A route is one path to one instance, keyed by (service, origin, instance). Best path
is an ordered chain of comparators (protocol-spec/routing.md, "Best path"); instance
attributes (load, price, ...) come from the freshest sequence number among all paths,
since they belong to the origin, not to the path.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from .errors import CeaseSub, Code, ProtocolError, UpdateSub
from .names import service_label
from .wire import RouteAdv, Update, Withdrawal, shared

Key = tuple[str, str, str]  # (service, origin, instance)
MAX_LATENCY_US = 0xFFFFFFFF


# Link cost hysteresis: a new filtered RTT replaces the advertised link cost only when it
# moves by more than this, so measurement noise never churns the network.
LINK_COST_MIN_CHANGE_US = 100
LINK_COST_MIN_CHANGE_FRAC = 0.05


def link_cost_after(current_us: int | None, rtt_s: float) -> int | None:
    """The new link cost for a filtered RTT, or None when the change is not material."""
    new = max(1, int(rtt_s * 1_000_000))
    if current_us is None:
        return new
    if abs(new - current_us) > max(LINK_COST_MIN_CHANGE_US, LINK_COST_MIN_CHANGE_FRAC * current_us):
        return new
    return None


class BestReason(enum.Enum):
    """Which comparator decided the best path (shown by ``cpnctl show routes``)."""

    ONLY = "only-path"
    LOCAL = "local"
    NOT_STALE = "not-stale"
    LATENCY = "lowest-latency"
    HOPS = "fewest-hops"
    NEXT_HOP = "lowest-next-hop"


@attrs.frozen
class Route:
    """One path as held in a RIB: what was advertised, by whom, and when."""

    adv: RouteAdv
    peer: str | None  # None for our own instances
    received_at: float
    stale: bool = False  # kept through the peer's graceful restart, not yet re-advertised

    @property
    def next_hop(self) -> str | None:
        return self.peer


_UNSET = object()


@attrs.frozen
class Best:
    route: Route
    latency_us: int
    fresh: RouteAdv  # the candidate with the highest seq: source of instance attributes
    reason: BestReason
    fresh_at: float = 0.0  # when the fresh attributes arrived here
    # export()'s answer, made once for every peer (their Adj-RIB-Outs share it); _UNSET until asked.
    exported: Any = attrs.field(default=_UNSET, eq=False, repr=False)


def _by_local(a: Route, la: int, b: Route, lb: int) -> Route | None:
    if (a.peer is None) != (b.peer is None):
        return a if a.peer is None else b
    return None


def _by_not_stale(a: Route, la: int, b: Route, lb: int) -> Route | None:
    # A stale path's next hop is down: any live path is better, whatever its latency.
    return None if a.stale == b.stale else (b if a.stale else a)


def _by_latency(a: Route, la: int, b: Route, lb: int) -> Route | None:
    return None if la == lb else (a if la < lb else b)


def _by_hops(a: Route, la: int, b: Route, lb: int) -> Route | None:
    ha, hb = len(a.adv.path), len(b.adv.path)
    return None if ha == hb else (a if ha < hb else b)


def _by_next_hop(a: Route, la: int, b: Route, lb: int) -> Route | None:
    na, nb = (a.peer or "").encode(), (b.peer or "").encode()
    return None if na == nb else (a if na < nb else b)


Comparator = Callable[[Route, int, Route, int], "Route | None"]
# The order here is the order documented in protocol-spec/routing.md (a test checks).
BEST_PATH_CHAIN: tuple[tuple[BestReason, Comparator], ...] = (
    (BestReason.LOCAL, _by_local),
    (BestReason.NOT_STALE, _by_not_stale),
    (BestReason.LATENCY, _by_latency),
    (BestReason.HOPS, _by_hops),
    (BestReason.NEXT_HOP, _by_next_hop),
)


def compare(a: Route, la: int, b: Route, lb: int) -> tuple[Route, BestReason]:
    """The better of two paths to the same instance, and the comparator that decided."""
    for reason, cmp in BEST_PATH_CHAIN:
        winner = cmp(a, la, b, lb)
        if winner is not None:
            return winner, reason
    return a, BestReason.NEXT_HOP  # identical peers cannot both hold a key


class Rib:
    """All paths this gateway knows, and the best one per instance."""

    def __init__(self, local_id: str, *, max_routes_per_peer: int = 10_000) -> None:
        self.local_id = local_id
        self.max_routes_per_peer = max_routes_per_peer
        self.local: dict[Key, Route] = {}
        self.adj_in: dict[str, dict[Key, Route]] = {}
        self.link_cost_us: dict[str, int] = {}
        self.loc: dict[Key, Best] = {}
        self.by_service: dict[str, set[Key]] = {}
        self.by_label: dict[int, set[str]] = {}  # the services in by_service, by label (tunnel lookups)
        self.stale_until: dict[str, float] = {}  # peers in graceful restart: when their stale routes go

    # ---- inputs

    def set_local(self, advs: Iterable[RouteAdv], now: float) -> set[Key]:
        """Replace our own instances with ``advs`` (path ``(local_id,)``, latency 0)."""
        new = {a.key: a for a in advs}
        changed = set(self.local) | set(new)
        keep = {k: r for k, r in self.local.items() if k in new and r.adv == new[k]}
        self.local = {k: keep.get(k) or Route(a, None, now) for k, a in new.items()}
        return self._recompute(changed)

    def apply_update(self, peer: str, update: Update, now: float) -> set[Key]:
        """Apply one UPDATE from ``peer``; withdrawals first, then advertisements."""
        table = self.adj_in.setdefault(peer, {})
        for adv in update.adv:
            if adv.path[0] != peer:
                raise ProtocolError(Code.UPDATE, UpdateSub.BAD_PATH, f"path {list(adv.path)} from {peer!r} does not start with it")
        withdrawn = {w.key for w in update.wd}
        fresh_keys = {a.key for a in update.adv if a.key not in table or a.key in withdrawn}
        if len(table) - len(withdrawn & table.keys()) + len(fresh_keys) > self.max_routes_per_peer:
            raise ProtocolError(Code.CEASE, CeaseSub.MAX_ROUTES, f"{peer!r} exceeded {self.max_routes_per_peer} routes")
        changed: set[Key] = set()
        for key in withdrawn:
            if table.pop(key, None) is not None:
                changed.add(key)
        for adv in update.adv:
            if self.local_id in adv.path:
                # Loop: the path already went through us. Like BGP, treat as withdrawn.
                if table.pop(adv.key, None) is not None:
                    changed.add(adv.key)
                continue
            table[adv.key] = Route(adv, peer, now)
            changed.add(adv.key)
        return self._recompute(changed)

    def peer_down(self, peer: str) -> set[Key]:
        """Forget everything learned from ``peer``."""
        table = self.adj_in.pop(peer, {})
        self.link_cost_us.pop(peer, None)
        self.stale_until.pop(peer, None)
        return self._recompute(set(table))

    def peer_stale(self, peer: str, until: float) -> set[Key]:
        """``peer`` went down but announced a graceful restart: keep its routes, marked stale, until ``until``."""
        table = self.adj_in.get(peer, {})
        for key, r in table.items():
            table[key] = attrs.evolve(r, stale=True)
        self.stale_until[peer] = until
        return self._recompute(set(table))

    def end_of_rib(self, peer: str) -> set[Key]:
        """``peer`` sent its whole table again: what it did not re-advertise is gone."""
        if self.stale_until.pop(peer, None) is None:
            return set()
        table = self.adj_in.get(peer, {})
        gone = {k for k, r in table.items() if r.stale}
        for key in gone:
            del table[key]
        return self._recompute(gone)

    def expire_stale(self, now: float) -> set[Key]:
        """Drop the stale routes of every peer whose restart window has passed."""
        changed: set[Key] = set()
        for peer in [p for p, until in self.stale_until.items() if until <= now]:
            changed |= self.end_of_rib(peer)
        return changed

    def set_link_cost(self, peer: str, cost_us: int) -> set[Key]:
        """Set the measured cost (smoothed RTT, µs) of the link to ``peer``."""
        if self.link_cost_us.get(peer) == cost_us:
            return set()
        self.link_cost_us[peer] = cost_us
        return self._recompute(set(self.adj_in.get(peer, {})))

    # ---- outputs

    def path_latency_us(self, route: Route) -> int:
        if route.peer is None:
            return 0
        return min(MAX_LATENCY_US, route.adv.latency_us + self.link_cost_us.get(route.peer, 0))

    def candidates(self, key: Key) -> list[Route]:
        out = [self.local[key]] if key in self.local else []
        out += [t[key] for t in self.adj_in.values() if key in t]
        return out

    def export(self, peer: str, key: Key) -> RouteAdv | None:
        """What we advertise to ``peer`` for ``key``: None means withdraw (split horizon included)."""
        best = self.loc.get(key)
        if best is None or peer in best.route.adv.path:
            return None
        if best.exported is not _UNSET:
            return best.exported  # type: ignore[no-any-return]
        r, f = best.route, best.fresh
        path = r.adv.path if r.peer is None else shared((self.local_id, *r.adv.path))
        # One record for every peer we tell (their Adj-RIB-Outs share it), not one each.
        adv = None if len(path) > 32 else attrs.evolve(f, path=path, latency_us=best.latency_us)  # None: MAX_PATH_LEN
        object.__setattr__(best, "exported", adv)
        return adv

    def lookup_target(self, label: int, origin: str, instance: str) -> Key | None:
        """The key a tunnel's extension header names (label, origin, instance), if we route it."""
        for service in self.by_label.get(label, ()):  # one service, unless two hash alike
            if (service, origin, instance) in self.loc:
                return (service, origin, instance)
        return None

    def routes(self, service: str | None = None) -> Iterator[tuple[Route, int, bool]]:
        """Every path we hold as (route, path latency µs, is best), optionally for one service."""
        keys = sorted(self.by_service.get(service, ())) if service is not None else sorted(self.loc)
        for key in keys:
            best = self.loc[key]
            for r in sorted(self.candidates(key), key=lambda r: (r.peer or "")):
                yield r, self.path_latency_us(r), r is best.route

    def __len__(self) -> int:
        return len(self.loc)

    # ---- internals

    def _recompute(self, keys: Iterable[Key]) -> set[Key]:
        changed: set[Key] = set()
        for key in keys:
            new = self._select(key)
            old = self.loc.get(key)
            if new == old:
                continue
            changed.add(key)
            if new is None:
                del self.loc[key]
                svc = self.by_service.get(key[0])
                if svc is not None:
                    svc.discard(key)
                    if not svc:
                        del self.by_service[key[0]]
                        label = service_label(key[0])
                        self.by_label[label].discard(key[0])
                        if not self.by_label[label]:
                            del self.by_label[label]
            else:
                self.loc[key] = new
                if key[0] not in self.by_service:
                    self.by_service[key[0]] = set()
                    self.by_label.setdefault(service_label(key[0]), set()).add(key[0])
                self.by_service[key[0]].add(key)
        return changed

    def _select(self, key: Key) -> Best | None:
        cands = self.candidates(key)
        if not cands:
            return None
        best, best_lat, reason = cands[0], self.path_latency_us(cands[0]), BestReason.ONLY
        fresh = cands[0]
        for r in cands[1:]:
            lat = self.path_latency_us(r)
            best, reason = compare(best, best_lat, r, lat)
            best_lat = self.path_latency_us(best)
            if r.adv.seq > fresh.adv.seq:
                fresh = r
        if self.local.get(key) is not None:
            fresh = self.local[key]  # our own instance: nobody else knows it better
        return Best(best, best_lat, fresh.adv, reason, fresh.received_at)


class AdjRibOut:
    """What one peer has been told, and the keys that may need telling again (paced)."""

    def __init__(self, peer: str, min_interval_s: float, *, down_ok: bool = True) -> None:
        self.peer = peer
        self.min_interval_s = min_interval_s
        # Whether the peer offered instance-down: if not, a route whose instance is down is withdrawn instead.
        self.down_ok = down_ok
        self.sent: dict[Key, RouteAdv] = {}
        self.dirty: set[Key] = set()
        self._force: set[Key] = set()
        self.last_flush = -math.inf

    def mark(self, keys: Iterable[Key]) -> None:
        self.dirty.update(keys)

    def mark_all(self, rib: Rib) -> None:
        """Resend everything, even what the peer should already have (route refresh)."""
        self._force.update(rib.loc)
        self.dirty.update(rib.loc)

    def due(self, now: float) -> float | None:
        """When the next flush may happen, or None when nothing is pending."""
        if not self.dirty:
            return None
        return max(now, self.last_flush + self.min_interval_s)

    def flush(self, rib: Rib, now: float) -> tuple[list[RouteAdv], list[Withdrawal]]:
        """The advertisements and withdrawals that bring the peer up to date."""
        adv: list[RouteAdv] = []
        wd: list[Withdrawal] = []
        for key in sorted(self.dirty):
            want = rib.export(self.peer, key)
            if want is not None and want.down and not self.down_ok:
                want = None
            have = self.sent.get(key)
            if want == have and key not in self._force:
                continue
            if want is None:
                self.sent.pop(key, None)
                wd.append(Withdrawal(*key))
            else:
                self.sent[key] = want
                adv.append(want)
        self.dirty.clear()
        self._force.clear()
        if adv or wd:
            self.last_flush = now
        return adv, wd
