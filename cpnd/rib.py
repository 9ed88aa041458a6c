"""Routing information base (sans-IO): Adj-RIB-In per peer, Loc-RIB, Adj-RIB-Out.

A route is one path to one instance, keyed by (service, origin, instance). Best path
is an ordered chain of comparators (protocol-spec/routing.md, "Best path"); instance
attributes (load, price, ...) come from the freshest sequence number among all paths,
since they belong to the origin, not to the path.
"""

from __future__ import annotations

import collections
import enum
import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from .errors import CeaseSub, Code, ProtocolError, UpdateSub
from .load import STAGE_HINT_US
from .names import service_label
from .origin import Signer, Trust, Validation, covered
from .seal import Opener
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


# The same for a gateway's own processing time (`gw`, routing.md): it moves with the
# gateway's load, and a change of the transit time re-advertises every learned route, so
# only a change this large is re-advertised (the ingress's correction covers the rest).
GATEWAY_TIME_MIN_CHANGE_US = 250
GATEWAY_TIME_MIN_CHANGE_FRAC = 0.25


def gateway_time_after(current_us: int, measured_us: int) -> int | None:
    """The new advertised processing time for a measured one, or None when the change is not material."""
    if abs(measured_us - current_us) > max(GATEWAY_TIME_MIN_CHANGE_US, GATEWAY_TIME_MIN_CHANGE_FRAC * current_us):
        return min(MAX_LATENCY_US, max(0, measured_us))
    return None


class BestReason(enum.Enum):
    """Which comparator decided the best path (shown by ``cpnctl show routes``)."""

    ONLY = "only-path"
    LOCAL = "local"
    NOT_STALE = "not-stale"
    VALID = "valid-origin"
    PREFERENCE = "local-pref"
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
    validation: Validation = Validation.UNKNOWN  # origin validation (ours: valid); invalid ones are never held
    pref: int = 100  # the peer's local_pref: higher is preferred

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


def _by_validation(a: Route, la: int, b: Route, lb: int) -> Route | None:
    # An origin we could verify beats one we could not (RPKI's NotFound is kept, but less preferred).
    va, vb = a.validation is Validation.VALID, b.validation is Validation.VALID
    return None if va == vb else (a if va else b)


def _by_preference(a: Route, la: int, b: Route, lb: int) -> Route | None:
    return None if a.pref == b.pref else (a if a.pref > b.pref else b)


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
    (BestReason.VALID, _by_validation),
    (BestReason.PREFERENCE, _by_preference),
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
        self.import_limits: dict[str, int] = {}  # per peer: what its current session was told (LIMITS)
        self.local: dict[Key, Route] = {}
        self.adj_in: dict[str, dict[Key, Route]] = {}
        self.link_cost_us: dict[str, int] = {}
        self.loc: dict[Key, Best] = {}
        self.by_service: dict[str, set[Key]] = {}
        self.by_label: dict[int, set[str]] = {}  # the services in by_service, by label (tunnel lookups)
        self.stale_until: dict[str, float] = {}  # peers in graceful restart: when their stale routes go
        # Our own processing as advertised (routing.md, "Gateway time"): as the origin of our
        # instances (egress) and as a transit of the routes we pass on.
        self.egress_us = STAGE_HINT_US
        self.transit_us = STAGE_HINT_US
        # Origin validation and per-peer policy (routing.md, "Origin validation", "Policy"): None
        # / empty takes every route as before, unknown.
        self.trust: Trust | None = None
        self.signer: Signer | None = None
        self.opener: Opener | None = None  # our sealing key (tunnel.md, "Sealed streams"), published by the signer
        self.import_prefixes: dict[str, tuple[str, ...]] = {}  # per peer; absent: everything
        self.local_pref: dict[str, int] = {}  # per peer; absent: 100
        self.counters: collections.Counter[str] = collections.Counter()
        self.invalid_by_peer: collections.Counter[str] = collections.Counter()
        self.filtered_by_peer: collections.Counter[str] = collections.Counter()
        self.last_invalid: dict[str, str] = {}  # per peer: why its last invalid route was dropped

    # ---- inputs

    def set_local(self, advs: Iterable[RouteAdv], now: float) -> set[Key]:
        """Replace our own instances with ``advs`` (path ``(local_id,)``, latency 0)."""
        new = {a.key: a for a in advs}
        changed = set(self.local) | set(new)
        keep = {k: r for k, r in self.local.items() if k in new and r.adv == new[k]}
        self.local = {k: keep.get(k) or Route(a, None, now, validation=Validation.VALID) for k, a in new.items()}
        return self._recompute(changed)

    def apply_update(self, peer: str, update: Update, now: float) -> set[Key]:
        """Apply one UPDATE from ``peer``; withdrawals first, then advertisements."""
        table = self.adj_in.setdefault(peer, {})
        for adv in update.adv:
            if adv.path[0] != peer:
                raise ProtocolError(Code.UPDATE, UpdateSub.BAD_PATH, f"path {list(adv.path)} from {peer!r} does not start with it")
        withdrawn = {w.key for w in update.wd}
        fresh_keys = {a.key for a in update.adv if a.key not in table or a.key in withdrawn}
        held = len(table) - len(withdrawn & table.keys()) + len(fresh_keys)
        limit = self.import_limits.get(peer, self.max_routes_per_peer)
        if held > limit and peer in self.stale_until:
            # Routes kept through the peer's graceful restart are not its new session's: they
            # go at its End-of-RIB, and must not push what it sends now over the limit.
            readvertised = {a.key for a in update.adv}
            held -= sum(1 for k, r in table.items() if r.stale and k not in withdrawn and k not in readvertised)
        if held > limit:
            raise ProtocolError(Code.CEASE, CeaseSub.MAX_ROUTES, f"{peer!r} exceeded {limit} routes")
        changed: set[Key] = set()
        for key in withdrawn:
            if table.pop(key, None) is not None:
                changed.add(key)
        imports = self.import_prefixes.get(peer)
        pref = self.local_pref.get(peer, 100)
        loc = self.loc
        for adv in update.adv:
            held_best = loc.get(adv.key)
            if held_best is not None and adv.seq <= held_best.fresh.seq:
                # Nothing newer of the instance (a copy of news that came by another path, or a path
                # change alone): what flooding the same change through several peers costs us.
                self.counters["route_entries_old_seq"] += 1
            validation = Validation.UNKNOWN
            if self.local_id in adv.path:
                validation = Validation.INVALID  # loop: the path already went through us
            elif imports is not None and not covered(imports, adv.service):
                validation = Validation.INVALID  # not ours to take from this peer
                self.filtered_by_peer[peer] += 1
                self.counters["routes_filtered"] += 1
            elif self.trust is not None:
                validation = self._validate(peer, adv)
            if validation is Validation.INVALID:
                # Like BGP, treat as withdrawn: whatever the peer said before for this key is gone.
                if table.pop(adv.key, None) is not None:
                    changed.add(adv.key)
                continue
            table[adv.key] = Route(adv, peer, now, validation=validation, pref=pref)
            changed.add(adv.key)
        if self.trust is not None and self.trust.new_prefixes:
            changed |= self._revalidate(self.trust.take_new_prefixes())
        return self._recompute(changed)

    def _revalidate(self, prefixes: set[str]) -> set[Key]:
        """Authorisations for ``prefixes`` were learned: routes held under them from an origin no
        authorisation names are invalid now (routing.md, "Origin validation", rule 2), dropped."""
        assert self.trust is not None
        gone: set[Key] = set()
        for peer, table in self.adj_in.items():
            for key in [k for k in table if covered(prefixes, k[0])]:
                allowed = self.trust.authorised(key[0])
                if allowed is not None and key[1] not in allowed:
                    del table[key]
                    gone.add(key)
                    self.counters["routes_invalid"] += 1
                    self.invalid_by_peer[peer] += 1
                    self.last_invalid[peer] = f"{key[0]} {key[1]}/{key[2]}: {key[0]} is authorised to others (learned later)"
        return gone

    def _validate(self, peer: str, adv: RouteAdv) -> Validation:
        """Origin validation of one route; invalid (and unknown when not accepted) are counted."""
        assert self.trust is not None
        verdict = self.trust.validate(peer, adv)
        if verdict.state is Validation.INVALID:
            self.counters["routes_invalid"] += 1
            self.invalid_by_peer[peer] += 1
            self.last_invalid[peer] = f"{adv.service} {adv.origin}/{adv.instance}: {verdict.reason}"
        elif verdict.state is Validation.UNKNOWN and not self.trust.accept_unverified:
            self.counters["routes_unverified_dropped"] += 1
            return Validation.INVALID
        return verdict.state

    def peer_down(self, peer: str) -> set[Key]:
        """Forget everything learned from ``peer``."""
        table = self.adj_in.pop(peer, {})
        self.link_cost_us.pop(peer, None)
        self.import_limits.pop(peer, None)
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

    def set_gateway_times(self, egress_us: int, transit_us: int) -> set[Key]:
        """Set our own advertised processing times; the learned keys whose export changes with them.

        (Our own instances carry ``egress_us`` in their local routes: the caller re-sets those.)
        """
        if (egress_us, transit_us) == (self.egress_us, self.transit_us):
            return set()
        self.egress_us, self.transit_us = egress_us, transit_us
        changed = set()
        for key, best in self.loc.items():
            if best.route.peer is not None:
                object.__setattr__(best, "exported", _UNSET)  # the export adds transit_us
                changed.add(key)
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

    def path_gateway_us(self, route: Route) -> int:
        """The gateways' own processing beyond us on ``route`` (its transits and its origin), µs.

        A route without `gw` (from a peer without gateway-time) counts each of those gateways
        as taking what we take ourselves in that role.
        """
        gw = route.adv.gateway_us
        if gw is not None:
            return gw
        if route.peer is None:
            return self.egress_us
        return min(MAX_LATENCY_US, self.egress_us + self.transit_us * (len(route.adv.path) - 1))

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
        if len(path) > 32:
            adv = None  # MAX_PATH_LEN
        elif r.peer is None:
            adv = attrs.evolve(f, path=path, latency_us=best.latency_us)  # `gw`: our egress time, in our own route
            if self.signer is not None:
                adv = self.signer.sign(adv)  # once per change sent, shared by every peer (`oadj` is per peer)
        else:  # `gw` is a path attribute, like the latency: the best path's, plus our own as its transit
            gw = shared(min(MAX_LATENCY_US, self.path_gateway_us(r) + self.transit_us))  # few distinct values
            # The freshest attributes with their origin signature, and the best path's adjacency token.
            # A route that came without its certificate (sent once per session) goes on with the one we
            # hold for its origin: our peers may not have it (each session strips repeats again).
            cert = f.cert
            if cert is None and f.osig is not None and self.trust is not None:
                cert = self.trust.raw_by_origin.get(f.origin)
            adv = attrs.evolve(f, path=path, latency_us=best.latency_us, gateway_us=gw, oadj=r.adv.oadj, cert=cert)
            if adv.oadj is None and adv.osig is not None:
                adv = attrs.evolve(adv, osig=None, seal_key=None)  # a signature without its path's token does not verify
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
            self.put(key, new)
        return changed

    def put(self, key: Key, new: Best | None) -> None:
        """Set (None: remove) the best path of ``key`` and its indexes; a worker's mirror of the
        control process's Loc-RIB (cpnd/ribfeed.py) sets it directly."""
        if new is None:
            if self.loc.pop(key, None) is None:
                return
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

    def _select(self, key: Key) -> Best | None:
        cands = self.candidates(key)
        if not cands:
            return None
        best, best_lat, reason = cands[0], self.path_latency_us(cands[0]), BestReason.ONLY
        fresh = cands[0]
        # Of paths equally fresh (the same change flooded through several peers: the same values),
        # the one we took them from first stays: a later copy then changes nothing to pass on.
        held = self.loc.get(key)
        held_fresh = held.fresh if held is not None else None
        for r in cands[1:]:
            lat = self.path_latency_us(r)
            best, reason = compare(best, best_lat, r, lat)
            best_lat = self.path_latency_us(best)
            # Attributes come from the freshest verified path when there is one: a `seq` nobody
            # could verify never overrides what the origin signed (routing.md, "Origin validation").
            rank = (r.validation is Validation.VALID, r.adv.seq)
            fresh_rank = (fresh.validation is Validation.VALID, fresh.adv.seq)
            if rank > fresh_rank or (rank == fresh_rank and r.adv is held_fresh):
                fresh = r
        if self.local.get(key) is not None:
            fresh = self.local[key]  # our own instance: nobody else knows it better
        return Best(best, best_lat, fresh.adv, reason, fresh.received_at)


Rank = tuple[int, int, Key]  # (hops of the exported path, exported latency µs, key): lower goes first


def export_rank(adv: RouteAdv) -> Rank:
    """Which exported routes a peer's limit keeps first: our own instances (one hop), then
    fewer hops, then lower path latency, then the key (routing.md, "Route limits")."""
    return (len(adv.path), adv.latency_us, adv.key)


class _Worst:
    """A heap entry that puts the worst rank on top (heapq keeps the least first)."""

    __slots__ = ("rank",)

    def __init__(self, rank: Rank) -> None:
        self.rank = rank

    def __lt__(self, other: _Worst) -> bool:
        return other.rank < self.rank


class AdjRibOut:
    """What one peer has been told, the keys that may need telling again (paced, in bursts a
    budget at a time), and the routes the peer's limit makes us withhold (routing.md,
    "Sending" and "Route limits"). Never more than ``max_routes`` sent at once."""

    def __init__(self, peer: str, min_interval_s: float, *, max_routes: int | None = None, down_ok: bool = True,
                 gw_ok: bool = True, sig_ok: bool = False, adjacency: bytes | None = None,
                 export_prefixes: tuple[str, ...] | None = None) -> None:
        self.peer = peer
        self.min_interval_s = min_interval_s
        self.max_routes = max_routes
        # Whether the peer offered instance-down: if not, a route whose instance is down is withdrawn instead.
        self.down_ok = down_ok
        self.gw_ok = gw_ok  # whether the peer offered gateway-time: if not, routes go without `gw`
        # Whether the peer offered origin-sig (if not, routes go without osig, oadj, cert), and our
        # adjacency token for it (the `oadj` of our own routes); the services it may be told of.
        self.sig_ok = sig_ok
        self.adjacency = adjacency
        self.export_prefixes = export_prefixes
        self.certs_sent: dict[str, bytes] = {}  # per origin: the certificate this session carried already
        self.sent: dict[Key, RouteAdv] = {}
        self.dirty: set[Key] = set()
        self._force: set[Key] = set()
        self._refresh = False  # mark_all: every key, even unchanged, in the next burst
        self.last_flush = -math.inf
        self.bursts = 0
        # The burst under way: keys by priority (withdrawals, then fewest hops), each one decided
        # when its turn comes, from the RIB as it is then. Keys marked meanwhile wait for the next.
        self._plan: list[tuple[int, int, Key]] = []
        self._plan_force: set[Key] | None = set()  # None: the whole burst is forced (a refresh)
        # Withholding, set up once the limit is first reached: the rank of every key sent (a heap
        # with the worst on top) and of every key withheld (a heap with the best on top).
        self.withheld: dict[Key, Rank] = {}
        self.withheld_total = 0  # times a route was withheld on this session
        self._ranks: dict[Key, Rank] | None = None
        self._worst: list[_Worst] = []
        self._waiting: list[Rank] = []

    def mark(self, keys: Iterable[Key]) -> None:
        self.dirty.update(keys)

    def mark_all(self, rib: Rib) -> None:
        """Resend everything, even what the peer should already have (route refresh).
        O(1): a flood of ROUTE-REFRESH costs one pass, not one each."""
        self._refresh = True

    def due(self, now: float) -> float | None:
        """When the next flush may happen, or None when nothing is pending."""
        if self._plan:
            return now  # a burst under way goes on (at the pace of the flush budget)
        if not (self.dirty or self._refresh or self._promotable()):
            return None
        return max(now, self.last_flush + self.min_interval_s)

    @property
    def backlog(self) -> int:
        """Keys waiting to be looked at (a refresh counts as one: its size is the RIB's)."""
        return len(self._plan) + len(self.dirty) + self._refresh

    @property
    def initial_done(self) -> bool:
        """The first burst (the initial table) is out: End-of-RIB may follow."""
        return self.bursts > 0 and not self._plan

    def flush(self, rib: Rib, now: float, budget: int | None = None) -> tuple[list[RouteAdv], list[Withdrawal]]:
        """The advertisements and withdrawals that bring the peer up to date: at most ``budget``
        entries; what does not fit waits in the burst for the next call (``due`` is then now)."""
        if not self._plan:
            self._start_burst(rib)
        left = math.inf if budget is None else budget
        adv: list[RouteAdv] = []
        wd: list[Withdrawal] = []
        while self._plan and left > 0:
            key = heapq.heappop(self._plan)[2]
            left -= self._decide(rib, key, adv, wd, left)
        while left > 0 and self._promotable():
            used = self._promote(rib, adv, wd, left)
            if used < 0:
                break
            left -= used
        if adv or wd:
            self.last_flush = now  # the interval runs from what was sent: a flush of no-ops delays nothing
        return adv, wd

    # ---- internals

    def _start_burst(self, rib: Rib) -> None:
        keys: Iterable[Key] = (rib.loc.keys() | self.sent.keys()) if self._refresh else self.dirty
        self._plan_force = None if self._refresh else self._force
        self._plan = [_priority(rib, k) for k in keys]
        heapq.heapify(self._plan)
        self.dirty, self._force, self._refresh = set(), set(), False
        self.bursts += 1

    def _export(self, rib: Rib, key: Key) -> RouteAdv | None:
        want = rib.export(self.peer, key)
        if want is None or (want.down and not self.down_ok):
            return None
        if self.export_prefixes is not None and not covered(self.export_prefixes, want.service):
            return None
        if not self.gw_ok and want.gateway_us is not None:
            want = attrs.evolve(want, gateway_us=None)  # this peer's decoder does not know `gw`
        if not self.sig_ok:
            if want.osig is not None or want.oadj is not None or want.cert is not None or want.seal_key is not None:
                want = attrs.evolve(want, osig=None, oadj=None, cert=None, seal_key=None)  # nor these
        else:
            if len(want.path) == 1 and want.osig is not None:
                want = attrs.evolve(want, oadj=self.adjacency)  # our own instance: we send it to this peer
            if want.cert is not None and self.certs_sent.get(want.origin) == want.cert:
                want = attrs.evolve(want, cert=None)  # each origin's certificate once per session: the peer keeps it
        return want

    def _decide(self, rib: Rib, key: Key, adv: list[RouteAdv], wd: list[Withdrawal], left: float) -> int:
        """Bring ``key`` up to date; the entries that took."""
        want = self._export(rib, key)
        have = self.sent.get(key)
        if want is None:
            self.withheld.pop(key, None)
            if have is None:
                return 0
            self._unsend(key)
            wd.append(Withdrawal(*key))
            return 1
        if have is not None:
            if want == have and self._plan_force is not None and key not in self._plan_force:
                return 0
            self._send(key, want, adv)
            return 1
        limit = self.max_routes
        if limit is None or len(self.sent) < limit:
            self._send(key, want, adv)
            return 1
        rank = export_rank(want)
        self._start_ranking()
        worst = self._peek_worst()
        if worst is not None and rank < worst and left >= 2:
            self._evict(worst[2], adv, wd)
            self._send(key, want, adv)
            return 2
        self._withhold(key, rank)
        return 0

    def _promotable(self) -> bool:
        """A withheld route fits now: there is room, or it ranks before the worst one sent."""
        if not self.withheld or self.max_routes is None:
            return False
        best = self._peek_waiting()
        if best is None:
            return False
        if len(self.sent) < self.max_routes:
            return True
        worst = self._peek_worst()
        return worst is not None and best < worst

    def _promote(self, rib: Rib, adv: list[RouteAdv], wd: list[Withdrawal], left: float) -> int:
        """Send the best withheld route, in place of the worst sent one if need be; the entries
        that took, or -1 when the budget does not allow the swap."""
        best = self._peek_waiting()
        assert best is not None and self.max_routes is not None
        key = best[2]
        want = self._export(rib, key)
        if want is None:  # gone meanwhile: its change is marked, nothing to tell
            del self.withheld[key]
            return 0
        rank = export_rank(want)
        if rank != best:  # changed while it waited: it competes with its new rank
            self._withhold(key, rank, again=True)
            return 0
        if len(self.sent) < self.max_routes:
            self._send(key, want, adv)
            return 1
        if left < 2:
            return -1
        worst = self._peek_worst()
        assert worst is not None
        self._evict(worst[2], adv, wd)
        self._send(key, want, adv)
        return 2

    def _send(self, key: Key, want: RouteAdv, adv: list[RouteAdv]) -> None:
        if want.cert is not None:
            self.certs_sent[want.origin] = want.cert
        self.withheld.pop(key, None)
        self.sent[key] = want
        adv.append(want)
        if self._ranks is not None:
            rank = export_rank(want)
            if self._ranks.get(key) != rank:
                self._ranks[key] = rank
                heapq.heappush(self._worst, _Worst(rank))
                if len(self._worst) > 2 * len(self._ranks) + 64:  # drop outdated entries
                    self._worst = [_Worst(r) for r in self._ranks.values()]
                    heapq.heapify(self._worst)

    def _unsend(self, key: Key) -> None:
        del self.sent[key]
        if self._ranks is not None:
            self._ranks.pop(key, None)

    def _evict(self, key: Key, adv: list[RouteAdv], wd: list[Withdrawal]) -> None:
        assert self._ranks is not None
        rank = self._ranks[key]
        self._unsend(key)
        self._withhold(key, rank)
        # An UPDATE applies withdrawals first: a key advertised earlier in this flush must
        # leave the advertisements, or the peer would keep it.
        if any(a.key == key for a in adv):
            adv[:] = [a for a in adv if a.key != key]
        wd.append(Withdrawal(*key))

    def _withhold(self, key: Key, rank: Rank, *, again: bool = False) -> None:
        if self.withheld.get(key) == rank:
            return
        if key not in self.withheld and not again:
            self.withheld_total += 1
        self.withheld[key] = rank
        heapq.heappush(self._waiting, rank)
        if len(self._waiting) > 2 * len(self.withheld) + 64:
            self._waiting = list(self.withheld.values())
            heapq.heapify(self._waiting)

    def _start_ranking(self) -> None:
        if self._ranks is None:
            self._ranks = {k: export_rank(a) for k, a in self.sent.items()}
            self._worst = [_Worst(r) for r in self._ranks.values()]
            heapq.heapify(self._worst)

    def _peek_worst(self) -> Rank | None:
        assert self._ranks is not None
        while self._worst:
            rank = self._worst[0].rank
            if self._ranks.get(rank[2]) == rank:
                return rank
            heapq.heappop(self._worst)
        return None

    def _peek_waiting(self) -> Rank | None:
        while self._waiting:
            rank = self._waiting[0]
            if self.withheld.get(rank[2]) == rank:
                return rank
            heapq.heappop(self._waiting)
        return None


def _priority(rib: Rib, key: Key) -> tuple[int, int, Key]:
    """Order within a burst, cheap to compute: withdrawals first, then by exported hops."""
    best = rib.loc.get(key)
    if best is None:
        return (0, 0, key)
    return (1, len(best.route.adv.path) + (best.route.peer is not None), key)
