"""Per-request instance selection (sans-IO): constraints, matching, estimates, choice.

Pure functions over a RIB snapshot and the request's headers; the ingress calls
``plan()`` for every request (protocol-spec/selection.md).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from .load import InstanceMeter, LatencyCorrection, OwnTimes, SendAccount, Stage
from .rib import Best, Key, Rib
from .tunnel import QoS

PREFERENCES = ("latency", "price")
QOS_NAMES = {"realtime": QoS.REALTIME, "interactive": QoS.INTERACTIVE, "bulk": QoS.BULK}
# Time allowed for a response to start, by QoS class, when the request names none.
DEFAULT_TIMEOUT_S = {QoS.REALTIME: 2.0, QoS.INTERACTIVE: 30.0, QoS.BULK: 300.0}
MAX_TIMEOUT_S = 3600.0

_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(us|µs|ms|s)?\s*")
_NUMBER_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*")


class BadHeader(ValueError):
    """A CPN-* request header that cannot be understood (HTTP 400)."""

    def __init__(self, header: str, detail: str) -> None:
        super().__init__(f"{header}: {detail}")
        self.header = header
        self.detail = detail


@attrs.frozen
class Constraints:
    """What a request asks of its instance (the CPN-* headers)."""

    max_latency_us: int | None = None
    max_price: float | None = None
    prefer: str = "latency"
    qos: QoS = QoS.INTERACTIVE
    timeout_s: float = DEFAULT_TIMEOUT_S[QoS.INTERACTIVE]


def parse_duration_us(text: str) -> int:
    """``10ms``, ``0.5s``, ``250us`` or a bare number of milliseconds, as µs."""
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise ValueError("expected a duration such as 10ms, 0.5s or 250us")
    value = float(m.group(1)) * {"us": 1, "µs": 1, "ms": 1000, "s": 1_000_000, None: 1000}[m.group(2)]
    if not math.isfinite(value) or value > MAX_TIMEOUT_S * 1_000_000:
        raise ValueError("duration out of range")
    return int(value)


def parse_constraints(headers: Iterable[tuple[bytes, bytes]]) -> Constraints:
    """Read the CPN-* request headers; BadHeader on anything malformed or repeated."""
    seen: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if not name.startswith("cpn-"):
            continue
        if name in seen:
            raise BadHeader(name, "must appear at most once")
        try:
            seen[name] = raw_value.decode("ascii").strip()
        except UnicodeDecodeError:
            raise BadHeader(name, "must be ASCII") from None
    kw: dict[str, object] = {}
    for name, value in seen.items():
        try:
            if name == "cpn-max-latency":
                kw["max_latency_us"] = parse_duration_us(value)
            elif name == "cpn-max-price":
                m = _NUMBER_RE.fullmatch(value)
                if not m:
                    raise ValueError("expected a non-negative number")
                kw["max_price"] = float(m.group(1))
            elif name == "cpn-prefer":
                if value.lower() not in PREFERENCES:
                    raise ValueError(f"expected one of {', '.join(PREFERENCES)}")
                kw["prefer"] = value.lower()
            elif name == "cpn-qos":
                if value.lower() not in QOS_NAMES:
                    raise ValueError(f"expected one of {', '.join(QOS_NAMES)}")
                kw["qos"] = QOS_NAMES[value.lower()]
            elif name == "cpn-timeout":
                us = parse_duration_us(value)
                if us <= 0:
                    raise ValueError("must be positive")
                kw["timeout_s"] = us / 1_000_000
            elif name in ("cpn-instance", "cpn-origin"):
                raise ValueError("is a response header")
            # Other CPN-* names are reserved: ignored, and never forwarded to instances.
        except ValueError as exc:
            raise BadHeader(_display(name), str(exc)) from None
    if "timeout_s" not in kw:
        kw["timeout_s"] = DEFAULT_TIMEOUT_S[kw.get("qos", QoS.INTERACTIVE)]  # type: ignore[index]
    return Constraints(**kw)  # type: ignore[arg-type]


def _display(name: str) -> str:
    return "-".join(p.capitalize() for p in name.split("-")).replace("Cpn", "CPN").replace("-Qos", "-QoS")


def match_service(services: Mapping[str, object] | set[str], path: str) -> str | None:
    """Longest service that is ``path`` or a prefix of it on whole segments (``/yolo`` never matches ``/yolov2``)."""
    candidate = path
    while candidate:
        if candidate in services:
            return candidate
        cut = candidate.rfind("/")
        if cut <= 0:
            return None
        candidate = candidate[:cut]
    return None


FLAT_LOAD = 0.5  # compute_estimate_us is the base up to this load


def compute_estimate_us(base_us: int, load: float) -> int:
    """The paper's f_d: base below 50 % load, growing linearly to double at 100 %."""
    if load <= FLAT_LOAD:
        return base_us
    return int(base_us * (1 + 2 * (load - FLAT_LOAD)))


# Candidate and View are built for every live instance on every request: a frozen attrs
# record's __init__ sets each field through object.__setattr__ (2.4 µs for a Candidate
# against 0.45 µs here). They are values all the same: nothing changes one once built
# (attrs.evolve makes a new one).
@attrs.define
class Candidate:
    key: Key
    label: int
    next_hop: str | None
    path: tuple[str, ...]
    path_latency_us: int
    compute_us: int
    price: float
    capacity: float
    load: float
    fill: float = 0.0  # how full the instance is for this request's class (see candidates())
    gateways_us: int = 0  # every gateway's own processing on the way, the ingress's included
    correction_us: int = 0  # what the ingress observed of this instance beyond its estimate, lately
    probe: bool = False  # out of the request's bound by the correction alone, tried as a probe (planner)

    @property
    def estimate_us(self) -> int:
        """The estimate before the correction (what the correction is measured against)."""
        return self.path_latency_us + self.gateways_us + self.compute_us

    @property
    def total_us(self) -> int:
        """What the ingress expects a request to take now, head in to head out (selection.md, "Estimate")."""
        return self.estimate_us + self.correction_us

    @property
    def origin(self) -> str:
        return self.key[1]

    @property
    def instance(self) -> str:
        return self.key[2]


@attrs.define
class View:
    """What the ingress assumes of one instance now: the inputs of its estimate."""

    load: float
    bload: float
    compute_us: int  # base compute latency (at low load)
    gateways_us: int = 0
    correction_us: int = 0


LoadEstimate = Callable[[Key, Best], View]


def flooded_view(rib: Rib, best: Best) -> View:
    """The view from the RIB alone: flooded attributes, the path's advertised gateway time."""
    f = best.fresh
    return View(f.load, f.bload, f.compute_us, rib.path_gateway_us(best.route))


def ingress_view(rib: Rib, key: Key, best: Best, now: float, *, own: OwnTimes, account: SendAccount,
                 correction: LatencyCorrection, meter: InstanceMeter | None = None) -> View:
    """The ingress's view of an instance now: exact for our own (``meter``), else the freshest of
    flooded and piggy-backed load corrected by our own sends; every gateway's own time on the way
    (ours, then the path's `gw`); and our correction from what we observed."""
    if meter is not None:
        return View(meter.load(now), meter.bounded_load(now), int(meter.base_us), own.us(Stage.LOCAL, now),
                    correction.value_us(key, now))
    f = best.fresh
    load, bload, compute_us = account.view(key, f.capacity, f.load, f.bload, f.compute_us, best.fresh_at, now)
    gateways = own.us(Stage.INGRESS, now) + rib.path_gateway_us(best.route)
    return View(load, bload, compute_us, gateways, correction.value_us(key, now))


def candidate(rib: Rib, key: Key, view: View, *, bounded: bool) -> Candidate:
    """One instance as a candidate for a request, with its estimate (``bounded``: the request has a latency bound)."""
    best = rib.loc[key]
    f, r = best.fresh, best.route
    # The compute estimate counts this request too: the load it would find. For a
    # latency-bound request that is the latency-bound load: admission pushes the rest
    # aside within a second of seeing its demand, and if it would miss its bound now the
    # instance refuses it at once. Counting flexible traffic here instead would keep
    # latency-bound demand away from an instance that flexible traffic filled, and so
    # never let admission see that demand (a trap the paper bench fell into).
    # Demand may exceed capacity (it counts refused requests), load never does: admission
    # stops at capacity, and refuses a latency-bound request whose compute would miss its
    # bound, so an admitted request meets the load admitted, not the demand (demand beyond
    # it is refused at once, not served slower): estimating compute at the demand would take
    # the instance out of bounds it serves at the load admission keeps it to.
    # A flexible request meets the load there now, but finds only the room that admission
    # leaves it beside the latency-bound demand: that is how full the instance is for it.
    seen = min(view.bload, view.load) if bounded else view.load
    fill = view.bload if bounded else max(view.load, view.bload)
    load = min(1.0, seen + 1 / f.capacity)
    # (compute_estimate_us's flat half spelt out: at an idle ingress each call in a plan is a cold one)
    compute = view.compute_us if load <= FLAT_LOAD else compute_estimate_us(view.compute_us, load)
    # Bounded: the correction never takes the estimate below the network alone.
    correction = max(-(view.gateways_us + compute), view.correction_us)
    return Candidate(key, f.label, r.peer, () if r.peer is None else r.adv.path, best.latency_us, compute, f.price,
                     f.capacity, view.load, fill, view.gateways_us, correction)


def candidates(rib: Rib, service: str, estimate: LoadEstimate | Callable[[Key, Best, float], View] | None = None, *, bounded: bool = False,
               within: Constraints | None = None, now: float | None = None) -> list[Candidate]:
    """Every live instance of ``service`` with its best path and estimated total latency.

    ``estimate`` gives the ingress's view of an instance now (``ingress_view``); without it
    the RIB's view is used (``flooded_view``). For a latency-bound request (``bounded``) an
    instance is as full as the latency-bound demand on it, since admission lets that demand
    push unbounded traffic aside. ``within``: only the instances that may meet these
    constraints whatever their load are estimated: priced, and the path alone within the bound
    (no estimate is below it: the correction stops at the network), since no other is
    admissible or a probe. An estimate costs ~400 bytecodes: with many instances, most far.
    ``now``: given, ``estimate`` takes it as a third argument (the planner's: no closure made per
    request, no call through one per instance; at an idle ingress each call is a cold one).
    """
    limit = None if within is None or within.max_latency_us is None else bound_limit_us(within.max_latency_us)
    cap = None if within is None else within.max_price
    out = []
    for key in rib.by_service.get(service, ()):
        best = rib.loc[key]
        if best.route.stale or best.fresh.down:
            continue  # every path to it goes through a gateway that is restarting, or its origin took it out
        if (limit is not None and best.latency_us > limit) or (cap is not None and best.fresh.price > cap):
            continue
        if estimate is None:
            view = flooded_view(rib, best)
        else:
            view = estimate(key, best) if now is None else estimate(key, best, now)  # type: ignore[call-arg,arg-type]
        out.append(candidate(rib, key, view, bounded=bounded))
    return out


# Latency-bound requests keep this share of their bound in hand: the flooded view is a
# little stale, and a request refused at the far end rarely has time left to retry.
BOUND_MARGIN_FRAC = 0.01


def bound_limit_us(max_latency_us: int) -> int:
    """The most an estimate may be and meet a bound of ``max_latency_us`` (BOUND_MARGIN_FRAC kept in hand)."""
    return int(max_latency_us * (1 - BOUND_MARGIN_FRAC))


def priced(c: Candidate, cons: Constraints) -> bool:
    """The price check (True without a cap)."""
    return cons.max_price is None or c.price <= cons.max_price


def rank(cands: Sequence[Candidate], cons: Constraints) -> list[Candidate]:
    """Admissible candidates, best first by the request's objective (deterministic ties)."""
    cap, bound = cons.max_price, cons.max_latency_us
    if cap is None and bound is None:
        return list(cands) if len(cands) < 2 else ordered(cands, cons.prefer)
    # Priced and within the bound, spelt out: two calls and two properties per candidate were a tenth
    # of a plan. (Estimates are whole µs: within the limit's floor is within the limit.)
    limit = bound_limit_us(bound) if bound is not None else math.inf
    return ordered([c for c in cands if (cap is None or c.price <= cap)
                    and c.path_latency_us + c.gateways_us + c.compute_us + c.correction_us <= limit], cons.prefer)


def ordered(cands: Sequence[Candidate], prefer: str) -> list[Candidate]:
    """Best first by the objective ``prefer`` (deterministic ties)."""
    if len(cands) < 2:  # (one instance, the usual: sorted would still call the key, ~20 bytecodes a plan)
        return list(cands)
    if prefer == "price":
        return sorted(cands, key=lambda c: (c.price, c.total_us, c.key))
    return sorted(cands, key=lambda c: (c.total_us, c.price, c.key))


def probe_candidates(cands: Sequence[Candidate], cons: Constraints) -> list[Candidate]:
    """Candidates out of a latency bound by the correction alone and not full, best first, each with
    the largest correction that meets the bound in place of its own (selection.md, "Probes")."""
    assert cons.max_latency_us is not None
    limit = bound_limit_us(cons.max_latency_us)
    out = [c for c in cands if c.correction_us > 0 and c.fill < 1.0 and c.estimate_us <= limit < c.total_us
           and priced(c, cons)]
    return [attrs.evolve(c, correction_us=limit - c.estimate_us, probe=True) for c in ordered(out, cons.prefer)]


# Candidates this close to the best are "near-equal" and split at random, so that
# ingresses acting on the same flooded view do not all herd onto one instance.
NEAR_EQUAL_US = 500
NEAR_EQUAL_FRAC = 0.10


def near_equal(best: Candidate, c: Candidate, prefer: str) -> bool:
    tol = max(NEAR_EQUAL_US, NEAR_EQUAL_FRAC * best.total_us)
    if prefer == "price" and c.price != best.price:
        return False
    return c.total_us <= best.total_us + tol


def choose(ranked: Sequence[Candidate], prefer: str, rng: random.Random, *, split: bool = True) -> list[Candidate]:
    """Order for trying: one of the near-equal best (power of two choices when ``split``,
    else the first), then the rest; instances estimated full go last, since admission
    would refuse them anyway, the least oversubscribed first.
    """
    if len(ranked) < 2:  # one candidate, spare or full, is tried first either way
        return list(ranked)
    spare = [c for c in ranked if c.fill < 1.0]
    # Demand beyond capacity spreads over the full ones by how oversubscribed each is: all
    # of it on the best-ranked would leave the others' gateways seeing less demand than
    # they could serve, and giving the room it kept for that demand to flexible traffic.
    full = sorted((c for c in ranked if c.fill >= 1.0), key=lambda c: c.fill)
    if len(spare) < 2 or not split:
        return [*spare, *full]
    near = [c for c in spare if near_equal(spare[0], c, prefer)]
    pick = near[0]
    if len(near) > 1:  # power of two choices: two at random, the less loaded wins
        x, y = rng.sample(near, 2)
        pick = x if (x.fill, rng.random()) < (y.fill, 0.5) else y
    return [pick, *(c for c in spare if c is not pick), *full]


def no_live_instance(rib: Rib, service: str) -> str:
    """Why a known ``service`` has no candidate at all: its instances are down or only stale paths lead there."""
    keys = rib.by_service.get(service, ())
    down = sum(1 for k in keys if rib.loc[k].fresh.down)
    stale = sum(1 for k in keys if rib.loc[k].route.stale and not rib.loc[k].fresh.down)
    why = [f"{down} down by health checks"] if down else []
    if stale:
        why.append(f"{stale} reachable only through a restarting gateway")
    return f"no live instance of {service}: {', '.join(why) or 'none known'}"


def _ms(us: float) -> str:
    return f"{us / 1000:.3g} ms"


def explain_none(cands: Sequence[Candidate], cons: Constraints) -> str:
    """What the best candidate could achieve when none meets ``cons``: the figures the routes show, no more."""
    priced = [c for c in cands if cons.max_price is None or c.price <= cons.max_price]
    if not priced:
        cheap = min(cands, key=lambda c: (c.price, c.key))
        return f"the lowest price is {cheap.price:g} ({cheap.instance} at {cheap.origin}), over CPN-Max-Price {cons.max_price:g}"
    best = min(priced, key=lambda c: (c.total_us, c.key))
    where = f"{best.instance} at {best.origin}"
    if cons.max_latency_us is None:
        return f"the best is {where}"  # not reached: without a bound every priced candidate is admissible
    bound = f"CPN-Max-Latency {_ms(cons.max_latency_us)}"
    return (f"the best estimate now is {_ms(best.total_us)} ({where}: {parts(best)}), over {bound} less its "
            f"{BOUND_MARGIN_FRAC:.0%} margin")


def parts(c: Candidate) -> str:
    """The estimate's parts in words, as ``show routes`` gives them."""
    text = f"path {_ms(c.path_latency_us)} + gateways {_ms(c.gateways_us)} + compute {_ms(c.compute_us)}"
    if c.correction_us:
        text += f" {'+' if c.correction_us > 0 else '-'} correction {_ms(abs(c.correction_us))}"
    return text


def within_bound(c: Candidate, cons: Constraints, elapsed_us: int) -> bool:
    """A retry must still meet the latency bound counting the time already spent."""
    return cons.max_latency_us is None or elapsed_us + c.total_us <= cons.max_latency_us


def expected_us(c: Candidate, instance_us: int | None) -> int:
    """What an attempt on ``c`` was expected to take, to set against what it took (selection.md,
    "Correction"): the estimate without its correction, with this request's own instance time in
    place of the estimated compute when the egress told it (None: not told)."""
    return c.estimate_us if instance_us is None else c.estimate_us - c.compute_us + instance_us


def slack_us(c: Candidate, cons: Constraints, elapsed_us: int) -> int | None:
    """The compute time a latency-bound request leaves at ``c``'s instance (the extension header's
    ``slack_us``; None: no bound): the bound less the time already spent and everything of the
    estimate that is not compute (path, gateways, correction), at most the bound less the time
    spent and the network (selection.md, "Admission")."""
    if cons.max_latency_us is None:
        return None
    left = cons.max_latency_us - elapsed_us - c.path_latency_us
    return max(0, min(left, left - c.gateways_us - c.correction_us))


@attrs.define
class TtlCache:
    """``dns-ttl`` emulation: one choice per (service, constraints) held for ``ttl_s``."""

    ttl_s: float
    max_entries: int = 4096
    _entries: dict[tuple[str, Constraints], tuple[Key, float]] = attrs.field(factory=dict)

    def get(self, service: str, cons: Constraints, now: float) -> Key | None:
        hit = self._entries.get((service, cons))
        if hit is None or hit[1] <= now:
            return None
        return hit[0]

    def put(self, service: str, cons: Constraints, key: Key, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        self._entries[(service, cons)] = (key, now + self.ttl_s)


def pinned_first(ranked: list[Candidate], pinned: Key | None, all_cands: Sequence[Candidate]) -> list[Candidate]:
    """Baselines: keep using ``pinned`` while it has a route, whatever its latency or load now."""
    if pinned is None:
        return ranked
    for c in all_cands:
        if c.key == pinned:
            return [c] + [r for r in ranked if r.key != pinned]
    return ranked
