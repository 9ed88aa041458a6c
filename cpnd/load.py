"""Load and compute latency, measured and estimated (sans-IO; time is an input).

Service side: ``InstanceMeter`` measures what reaches each local instance and decides
admission; ``LoadPacer`` decides when a change is worth re-advertising. Ingress side:
``SendAccount`` remembers what this gateway itself sent where, so a little-stale
flooded load can be corrected by our own recent sends (protocol-spec/selection.md,
"Selection under stale state").
"""

from __future__ import annotations

import bisect
import collections
import math
import operator
from typing import Any

import attrs

_SECOND, _THIRD = operator.itemgetter(1), operator.itemgetter(2)

WINDOW_S = 1.0  # loads are requests over the last second, over capacity
MAX_EVENTS = 100_000  # bound on remembered timestamps per window
BASE_QUANTILE = 0.25  # a user's base compute: this quantile of its recent normalised samples
PARTY_SAMPLES = 4  # a user's samples count once it has this many (one or two say little)
MAX_PARTIES = 16  # users whose compute samples an instance keeps
LONE_PROBE_S = 2.0  # every counted user shows the instance slow: the configured value is shown this long ...
SAMPLE_TTL_S = 5.0  # a compute sample older than this no longer counts ...
MAX_SAMPLE_TTL_S = 60.0  # ... doubled, up to this, each time a retried instance proves slow again
REPROBE_SAMPLES = 4  # samples after a reset to the hint that decide whether it was slow again


def load_factor(load: float) -> float:
    """The paper's f_d as a factor: 1 below 50 % load, rising linearly to 2 at 100 %."""
    return 1.0 + max(0.0, 2.0 * (load - 0.5))


class RateWindow:
    """Timestamps of events in a sliding window (bounded); counts in O(log n)."""

    def __init__(self, window_s: float = WINDOW_S, keep_s: float | None = None) -> None:
        self.window_s = window_s
        self.keep_s = keep_s if keep_s is not None else window_s
        self._times: list[float] = []  # sorted: time only moves forward
        self._start = 0  # entries before this have left; compacted now and then

    def add(self, now: float) -> None:
        times = self._times
        if times and now < times[-1]:
            now = times[-1]  # keep it sorted even if a caller's clock stutters
        times.append(now)
        cutoff = now - self.keep_s
        start = self._start
        if times[start] <= cutoff:  # one has left; the one just added never has (keep_s > 0)
            start += 1
            if times[start] <= cutoff or start > 1024:
                self._past(cutoff, start)
            else:
                self._start = start
        if len(times) - self._start > MAX_EVENTS:
            self._start = len(times) - MAX_EVENTS

    def add_count(self, now: float) -> int:
        """``add(now)``, then ``count(now)``, in one call: with time moving forward, the events left
        after the add are those in the window (the egress counts its arrivals once a request, not
        twice: the load it was admitted at is this)."""
        times = self._times
        if times and now < times[-1] or self.keep_s != self.window_s:
            self.add(now)  # a stuttering clock, or a window kept longer than counted: as two calls
            return self.count(now)
        self.add(now)
        return len(times) - self._start  # (add has trimmed what left: the rest is in the window)

    def _past(self, cutoff: float, start: int) -> None:
        """Entries from ``start`` on at or before ``cutoff`` have left too (a search), and the list is
        compacted now and then. The callers step over the first to leave themselves: usually one
        leaves as one comes, and per request the calls are what costs (a search and a call for
        each count and add were 2 of the 3-5 calls each took)."""
        times = self._times
        if start < len(times) and times[start] <= cutoff:
            start = bisect.bisect_right(times, cutoff, start)
        self._start = start
        if start > 1024 and start * 2 > len(times):
            del times[:start]
            self._start = 0

    def _trim(self, now: float) -> None:
        self._start = bisect.bisect_right(self._times, now - self.keep_s, self._start)
        if self._start > 1024 and self._start * 2 > len(self._times):
            del self._times[: self._start]
            self._start = 0

    def count(self, now: float, at: float | None = None) -> int:
        """Events in (at - window, at], ``at`` defaulting to now (must be within keep_s)."""
        times, start = self._times, self._start
        n = len(times)
        if start == n:
            return 0  # every event has left (or none came): none is in any window
        if at is None and times[-1] <= now and self.keep_s == self.window_s:
            # The common case: what is not trimmed is in the window (no event is later than
            # now: time only moves forward).
            cutoff = now - self.keep_s
            if times[start] <= cutoff:
                start += 1
                if start < n and times[start] <= cutoff or start > 1024:
                    self._past(cutoff, start)
                    return n - self._start
                self._start = start
            return n - start
        self._trim(now)
        at = now if at is None else at
        lo = bisect.bisect_right(times, at - self.window_s, self._start)
        hi = bisect.bisect_right(times, at, lo)
        return hi - lo

    def change(self, now: float, at: float) -> int:
        """``count(now) - count(now, at=at)`` in one pass (an ingress's estimate of every candidate
        asks it per request: two counts were ten calls, this is six)."""
        times = self._times
        n, start, cutoff = len(times), self._start, now - self.keep_s
        if start < n and times[start] <= cutoff:
            start += 1
            if start < n and times[start] <= cutoff or start > 1024:
                self._past(cutoff, start)
                n, start = len(times), self._start
            else:
                self._start = start
        hi_now = n if not n or times[-1] <= now else bisect.bisect_right(times, now, start)
        lo_now = bisect.bisect_right(times, now - self.window_s, start)
        lo_at = bisect.bisect_right(times, at - self.window_s, start)
        hi_at = bisect.bisect_right(times, at, lo_at)
        return (hi_now - lo_now) - (hi_at - lo_at)


# An admitted request holds its slot of the instance's capacity until one second after the latest
# moment the instance can have counted it: this long after we wrote it to the instance (after its
# admission if not yet written), or when its answer came back if sooner (protocol-spec/selection.md,
# "Admission"; `admission_guard_ms`). Measured on the paper lab at saturation (bench/lab_overload.py,
# 2 cores): our write to the instance's read took up to 45 ms (the instances' one process starved), and
# admission to the write up to 87 ms with two workers per gateway (the gateway's own queueing).
ADMISSION_GUARD_S = 0.1


@attrs.define
class Hold:
    """One admitted request's slot: until when it counts (SlotHolds keeps every such moment, sorted)."""

    until: float


class SlotHolds:
    """Until when each admitted request counts against its instance's capacity (a sorted multiset).

    An instance counts a request when it reads it: after our admission, before its answer reaches
    us, and (assumed) within ``guard_s`` of our writing it. A request counted until one second after
    the latest such moment is in every sliding second of the instance's own clock that can hold it,
    so admitting below capacity here keeps every such second at or below capacity there, whatever
    the delays in between (counting at admission alone lets a queued request land a window late).
    """

    def __init__(self, guard_s: float = ADMISSION_GUARD_S, window_s: float = WINDOW_S) -> None:
        self.guard_s = guard_s
        self.window_s = window_s
        self._until: list[float] = []  # sorted
        self._start = 0  # entries before this have ended; compacted now and then (as in RateWindow)

    def add(self, now: float, n: int = 1) -> Hold:
        """``n`` requests admitted now, not yet written; the hold (of the last) to move on as it goes."""
        until = now + self.guard_s
        i = bisect.bisect_right(self._until, until, self._start)
        self._until[i:i] = [until] * n
        if len(self._until) - self._start > MAX_EVENTS:
            self._start = len(self._until) - MAX_EVENTS  # bounded like a RateWindow: the oldest go
        return Hold(until)

    def sent(self, hold: Hold, now: float) -> None:
        """The request was written to the instance ``now``: it may count it up to the guard later."""
        if now + self.guard_s > hold.until:
            self._move(hold, now + self.guard_s)

    def answered(self, hold: Hold, now: float) -> None:
        """The request's answer came back ``now``: the instance has counted it by now."""
        if now < hold.until:
            self._move(hold, now)

    def _move(self, hold: Hold, until: float) -> None:
        u = self._until
        n = len(u)
        # The newest hold is the last (requests one at a time: always): moved in place if the order
        # stays, without the three calls of a search, a deletion and an insertion.
        if n > self._start and u[-1] == hold.until and (until >= hold.until or n == 1 or u[-2] <= until):
            u[-1] = hold.until = until
            return
        i = bisect.bisect_left(self._until, hold.until, self._start)
        if i < len(self._until) and self._until[i] == hold.until:
            del self._until[i]
        elif until < hold.until:
            return  # gone already (bounded away): nothing to shorten
        # (Written more than a second and the guard after its admission, it had ended: it counts again.)
        bisect.insort(self._until, until, self._start)
        hold.until = until

    def held(self, now: float) -> int:
        """Requests the instance may still count in a second that ends at or after ``now``."""
        self._start = bisect.bisect_right(self._until, now - self.window_s, self._start)
        if self._start > 1024 and self._start * 2 > len(self._until):
            del self._until[: self._start]
            self._start = 0
        return len(self._until) - self._start


class InstanceMeter:
    """One local instance as its service-side gateway sees it."""

    def __init__(self, capacity: float, compute_hint_us: int, *, samples: int = 32,
                 guard_s: float = ADMISSION_GUARD_S) -> None:
        self.capacity = capacity
        self.hint_us = float(compute_hint_us)
        self.base_us = self.hint_us
        self.samples = samples
        # Each user's own samples, and the low quarter of them, like a minimum RTT filter: delays
        # from a busy gateway or a queue only ever add, and one very slow request (a long
        # generation, a stalled instance) must not make the instance look slow for everyone.
        # Kept per user (``party``) so that one user's long jobs describe that user alone.
        self._parties: dict[object, collections.deque[tuple[float, float]]] = {}  # (when, µs)
        self._values: dict[object, float] = {}  # the counted users' low quarters
        self._ranks: dict[object, float] = {}  # every user's: its low quarter, or its fastest sample if not yet counted
        self.arrivals = RateWindow()
        self.bounded = RateWindow()  # latency-bound requests that asked, admitted or not: their demand
        self.servable = RateWindow()  # those of them whose bound this instance can meet at some load
        self.unbounded = RateWindow()  # unbounded requests admitted
        self._ceilings: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_EVENTS)
        self.sample_ttl_s = SAMPLE_TTL_S
        self._expired_base: float | None = None  # the base when samples last ran out, if above the hint
        self._since_expired = 0  # samples since then
        self.measured_us = self.hint_us  # the fastest counted user's; base_us is this, but in a lone probe
        self.lone_ttl_s = SAMPLE_TTL_S  # ... after it has been shown slow this long (doubling)
        self._lone_since: float | None = None
        self._probe_until: float | None = None
        self.inflight = 0
        self.refused = 0
        self.holds = SlotHolds(guard_s)  # the hard capacity bound (admission-time counts alone can be overrun)
        self._last_hold: Hold | None = None
        self._admitted: tuple[float, int] | None = None  # (when, arrivals then) of the request just admitted

    def load(self, now: float) -> float:
        return self.arrivals.count(now) / self.capacity

    def bounded_load(self, now: float) -> float:
        """Latency-bound demand (admitted or not) over the last second, as a fraction of capacity."""
        return self.bounded.count(now) / self.capacity

    def loads(self, now: float) -> tuple[float, float]:
        """``(load(now), bounded_load(now))`` in one call (the egress reports both with every answer)."""
        capacity = self.capacity
        return self.arrivals.count(now) / capacity, self.bounded.count(now) / capacity

    def admit(self, now: float, budget_us: int | None, slack_us: int | None = None,
              held: int | None = None) -> str | None:
        """None to admit (and count) a request, else why it is refused; ``held``: ``holds.held(now)``
        if the caller has it already (the egress's fair share asks it first).

        Requests with a latency bound (``slack_us``: the compute time their bound leaves)
        come first: unbounded ones are admitted only below the load at which the bounded
        ones seen in the last second would miss their bound, and only into the capacity
        the bounded demand of the last second leaves (protocol-spec/selection.md, "Admission").
        """
        n = self.arrivals.count(now)
        if held is None:
            held = self.holds.held(now)  # >= n: every request admitted in the last second, and the later ones
        expect = self.base_us * load_factor((n + 1) / self.capacity)
        if slack_us is not None:  # demand, whether or not it gets in
            self.bounded.add(now)
            limit = self.load_limit(slack_us)
            # A bound this instance cannot meet even idle must not hold capacity back from
            # flexible traffic: that demand is served elsewhere or not at all.
            if limit > 0:
                self.servable.add(now)
                self._ceilings.append((now, limit))
        why = None
        if held + 1 > self.capacity:
            why = f"at capacity ({held} requests in the last second, capacity {self.capacity:g}/s)"
        elif budget_us is not None and expect > budget_us:
            why = f"expected compute {expect / 1000:.1f} ms exceeds the remaining {budget_us / 1000:.1f} ms"
        elif slack_us is not None:
            # Below half load this request does not slow the instance down: whether it
            # fits its bound was the ingress's call, and refusing would only add an error.
            if expect > slack_us and (n + 1) / self.capacity > 0.5:
                why = f"expected compute {expect / 1000:.1f} ms exceeds the {slack_us / 1000:.1f} ms the latency bound leaves"
        else:
            reserved = self.servable.count(now)
            if n + 1 > self.unbounded_ceiling(now) or self.unbounded.count(now) + 1 + reserved > self.capacity:
                why = f"keeping capacity for latency-bound requests ({reserved} req/s of them)"
        if why is not None:
            self.refused += 1
            return why
        self._admitted = (now, self.arrivals.add_count(now))
        self._last_hold = self.holds.add(now)
        if slack_us is None:
            self.unbounded.add(now)
        self.inflight += 1
        return None

    def take_hold(self) -> Hold | None:
        """The hold of the request just admitted, for its call to move on (``sent``, ``done``): the
        egress admits and starts the call in one step, with no checkpoint between."""
        hold, self._last_hold = self._last_hold, None
        return hold

    def take_admitted(self, now: float) -> tuple[Hold | None, float]:
        """``(take_hold(), load(now))`` of the request just admitted at ``now``: its load as counted by
        its admission (no other arrival can come between, in the same step), not counted again."""
        hold = self.take_hold()
        admitted, self._admitted = self._admitted, None
        if admitted is not None and admitted[0] == now:
            return hold, admitted[1] / self.capacity
        return hold, self.arrivals.count(now) / self.capacity

    def sent(self, hold: Hold | None, now: float) -> None:
        """The request of ``hold`` was written to the instance now (its head, at least)."""
        if hold is not None:
            self.holds.sent(hold, now)

    def used_up(self, now: float) -> None:
        """Take every slot for a second and the guard (a replacement worker: what its predecessor
        admitted just before it died is unknown)."""
        n = min(math.ceil(self.capacity), MAX_EVENTS)
        self._admitted = None  # (a count taken before these no longer holds)
        for _ in range(n):
            self.arrivals.add(now)
        self.holds.add(now, n)

    def load_limit(self, slack_us: float) -> float:
        """Most arrivals per second at which compute still fits ``slack_us`` (inverse of f_d)."""
        if self.base_us <= 0 or 2 * self.base_us <= slack_us:
            return self.capacity
        if self.base_us > slack_us:
            return 0.0
        return (0.5 + (slack_us - self.base_us) / (2 * self.base_us)) * self.capacity

    def shut_to_flexible(self, now: float) -> bool:
        """Would a flexible request be refused now for the latency of the bounded ones (the arrivals of
        the last second at the load their bounds leave: ``admit``'s test)? A bound any instance meets
        leaves the whole capacity: it never shuts them out."""
        ceiling = self.unbounded_ceiling(now)
        return ceiling < self.capacity and self.arrivals.count(now) + 1 > ceiling

    def unbounded_ceiling(self, now: float) -> float:
        while self._ceilings and self._ceilings[0][0] <= now - WINDOW_S:
            self._ceilings.popleft()
        if not self._ceilings:
            return self.capacity
        return min(self.capacity, min(c for _, c in self._ceilings))

    def done(self, now: float, service_us: float, load_at_arrival: float, hold: Hold | None = None,
             party: object = "") -> None:
        """A response head came back after ``service_us`` (its exchange ended ``now``) for ``party`` (its
        user, as the egress names it: an address, or a tunnelled user within its peer): ``ended`` and
        ``answered``."""
        self.ended()
        self.answered(now, service_us, load_at_arrival, hold, party)

    def answered(self, now: float, service_us: float, load_at_arrival: float, hold: Hold | None = None,
                 party: object = "") -> None:
        """What ``done`` learns, apart from the count in flight (given back at once, this may come later
        with the times read then: cpnd/pending.py): refine the base compute latency, and end the
        request's ``hold`` (from ``take_hold``) by ``now`` if it runs later."""
        if hold is not None:
            self.holds.answered(hold, now)
        if not math.isfinite(service_us) or service_us < 0:
            return
        window = self._parties.get(party)
        if window is None:
            if len(self._parties) >= MAX_PARTIES:
                self._forget(self._least_telling())
            window = self._parties[party] = collections.deque(maxlen=self.samples)
        window.append((now, service_us / load_factor(load_at_arrival)))
        self._count(party, window)
        self._update()
        if self._expired_base is not None:
            self._since_expired += 1
            if self._values and self._since_expired >= REPROBE_SAMPLES:
                # Retried after its samples ran out: still slow means the next retry waits twice
                # as long (an instance just outside a bound would otherwise swing in and out every
                # few seconds); fast again means the slowness was a passing spell.
                slow_again = self.measured_us >= (self.hint_us + self._expired_base) / 2
                self.sample_ttl_s = min(MAX_SAMPLE_TTL_S, 2 * self.sample_ttl_s) if slow_again else SAMPLE_TTL_S
                self._expired_base = None

    def expire(self, now: float) -> None:
        """Forget samples older than ``sample_ttl_s``; with none left, the configured hint is back.

        An instance that looked slow gets no latency-bound traffic, hence no new samples:
        without this, one slow spell would shut it out for good. Each time it proves slow
        again the wait doubles (like an outlier's ejection time), up to MAX_SAMPLE_TTL_S.
        """
        cutoff = now - self.sample_ttl_s
        stale = [p for p, w in self._parties.items() if w[0][0] < cutoff]
        for party in stale:
            window = self._parties[party]
            while window and window[0][0] < cutoff:
                window.popleft()
            if window:
                self._count(party, window)
            else:
                self._forget(party)
        if stale:
            if not self._parties and self.measured_us > self.hint_us:
                self._expired_base, self._since_expired = self.measured_us, 0
            self._update()
        self._probe_lone(now)

    def _probe_lone(self, now: float) -> None:
        """Every counted user (one alone, or a few) shows the instance slower than configured: believed
        for ``lone_ttl_s``, then the configured value is shown for LONE_PROBE_S, and on while a user not
        yet counted shows it faster, so that other users come and show whether it is the instance or
        those users' own jobs; the wait doubles each time it is still slow after."""
        # Not one user alone only: long jobs from two addresses would have no probe; and on while a
        # newcomer is faster: a user asking under twice a second is not counted within the 2 s.
        if not self.measured_us > self.hint_us:
            self._lone_since = self._probe_until = None
            self.lone_ttl_s = SAMPLE_TTL_S
        elif self._probe_until is not None:
            if now < self._probe_until or self._newcomer_faster():
                return
            self._probe_until, self._lone_since = None, now
            self.lone_ttl_s = min(MAX_SAMPLE_TTL_S, 2 * self.lone_ttl_s)
        elif self._lone_since is None:
            self._lone_since = now
        elif now - self._lone_since >= self.lone_ttl_s:
            self._probe_until = now + LONE_PROBE_S
        self.base_us = self.hint_us if self._probe_until is not None else self.measured_us

    def _newcomer_faster(self) -> bool:
        """Does a user not yet counted have a sample below halfway from the configured value to the
        measured one (it would make the instance faster, once counted)?"""
        halfway = (self.hint_us + self.measured_us) / 2
        return any(rank < halfway for p, rank in self._ranks.items() if p not in self._values)

    def _count(self, party: object, window: collections.deque[tuple[float, float]]) -> None:
        if len(window) >= PARTY_SAMPLES:
            values = sorted(map(_SECOND, window))  # (in C: a generator was 33 calls a request)
            self._values[party] = self._ranks[party] = values[int(BASE_QUANTILE * (len(values) - 1))]
        else:
            self._values.pop(party, None)
            self._ranks[party] = min(map(_SECOND, window))

    def _forget(self, party: object) -> None:
        del self._parties[party], self._ranks[party]
        self._values.pop(party, None)

    def _least_telling(self) -> object:
        """The user to forget for a newcomer: the slowest, by its low quarter, or for one not yet counted
        its fastest sample (so users many addresses send from can push out neither the one the base
        comes from nor one that is coming in to show the instance faster)."""
        return max(self._ranks, key=self._ranks.__getitem__)

    def set_hint(self, compute_hint_us: float) -> None:
        """The configured compute latency (a reload): what is shown with nothing measured, at once."""
        self.hint_us = float(compute_hint_us)
        self._update()

    def _update(self) -> None:
        # The fastest counted user's low quarter (selection.md, "Load advertisement"): one user's
        # own long jobs, sent on purpose or not, must not make the instance look slow to the others.
        self.measured_us = min(self._values.values()) if self._values else self.hint_us
        self.base_us = self.hint_us if self._probe_until is not None else self.measured_us

    def ended(self) -> None:
        """A call ended, answered or not: one fewer in flight."""
        self.inflight = max(0, self.inflight - 1)


# A one-second count of n requests is Poisson-noisy by about sqrt(n): a load or bload move counts
# (selection.md, "Load advertisement") only beyond NOISE_K of that, in load units
# NOISE_K * sqrt(max(old, new) / capacity), capped at NOISE_CAP so that a real step of 20 % of
# capacity still goes out at the next interval even with a quarter of it hidden by noise.
NOISE_K = 2.0
NOISE_CAP = 0.15


def load_moved(new: float, old: float, capacity: float, threshold: float) -> bool:
    """Is ``new`` a material change from the advertised ``old`` (a load or bload: a one-second
    count over ``capacity``)? At least ``threshold``, and beyond the count's own noise unless it
    went to or from idle (0) or full (1 or more)."""
    moved = abs(new - old)
    if moved < threshold:
        return False
    if (new <= 0.0) != (old <= 0.0) or (new >= 1.0) != (old >= 1.0) or capacity <= 0:
        return True  # idle and full are news whatever the noise: admission and selection turn on them
    return moved >= min(NOISE_CAP, NOISE_K * math.sqrt(max(new, old) / capacity))


@attrs.define
class LoadPacer:
    """Re-advertise an instance's load only when it moved materially (beyond the threshold and its
    one-second count's noise), at most once per interval; changed values at least every refresh."""

    min_interval_s: float = 0.2
    load_threshold: float = 0.05
    compute_threshold: float = 0.05
    refresh_s: float = 5.0
    capacity: float = 0.0  # requests per second the loads are counted against (0: no noise allowance)
    last_at: float = -math.inf
    last_load: float = 0.0
    last_compute_us: float = 0.0

    last_bload: float = 0.0

    def should_advertise(self, now: float, load: float, bload: float, compute_us: float) -> bool:
        return self.why(now, load, bload, compute_us) is not None

    def why(self, now: float, load: float, bload: float, compute_us: float) -> str | None:
        """What makes this reading worth re-advertising now (``load``, ``bload``, ``compute``,
        ``refresh``), or None."""
        if now - self.last_at < self.min_interval_s:
            return None
        if load_moved(load, self.last_load, self.capacity, self.load_threshold):
            return "load"
        if load_moved(bload, self.last_bload, self.capacity, self.load_threshold):
            return "bload"
        if abs(compute_us - self.last_compute_us) > self.compute_threshold * max(self.last_compute_us, 100.0):
            return "compute"
        changed = (load, bload, compute_us) != (self.last_load, self.last_bload, self.last_compute_us)
        return "refresh" if now - self.last_at >= self.refresh_s and changed else None

    def advertised(self, now: float, load: float, bload: float, compute_us: float) -> None:
        self.last_at, self.last_load, self.last_bload, self.last_compute_us = now, load, bload, compute_us


@attrs.frozen
class LoadReport:
    """An instance's load as told by its gateway (piggy-backed on a response)."""

    load: float
    bload: float
    compute_us: int
    at: float  # our clock, when it arrived


# A flexible request refused by an instance's admission: that instance counts as full for
# flexible requests this long (the next one after it finds out whether there is room again),
# or, refused at capacity, for one request's share of a second: a slot frees as each request
# leaves the one-second window, and holding longer would leave those slots empty.
REFUSAL_HOLD_S = 0.2
SIBLING_SAMPLES = 16  # the other workers' counts kept per instance: 4 s at one relay per report interval


class SendAccount:
    """What this ingress sent to each instance recently, and the freshest load it heard."""

    def __init__(self, max_keys: int = 65536) -> None:
        self.sends: dict[object, RateWindow] = {}
        # With workers: the other workers' sends over their last second, as the control process
        # last relayed them ((when, count) samples per key, the newest last; see ``siblings``).
        self.sibling_sends: dict[object, collections.deque[tuple[float, int]]] = {}
        self.inflight: collections.Counter[object] = collections.Counter()
        self.reports: dict[object, LoadReport] = {}
        self.refusals: dict[object, float] = {}  # until when a refusal keeps flexible requests off
        self.max_keys = max_keys

    def _make_room(self, table: dict[object, Any], key: object) -> None:
        """Before adding ``key``: every table is bounded (the oldest entry goes)."""
        if key not in table and len(table) >= self.max_keys:
            table.pop(next(iter(table)))

    def refused_flexible(self, key: object, capacity: float, now: float) -> None:
        """Admission refused us a flexible request there: hold it full for flexible requests
        (shortly if its last report says it is at capacity, else REFUSAL_HOLD_S)."""
        self._make_room(self.refusals, key)
        report = self.reports.get(key)
        at_capacity = report is not None and report.at >= now - REFUSAL_HOLD_S and report.load * capacity + 1 > capacity
        self.refusals[key] = now + (min(REFUSAL_HOLD_S, 1 / capacity) if at_capacity else REFUSAL_HOLD_S)

    def holds_flexible(self, key: object, now: float) -> bool:
        """Is a refusal still keeping flexible requests off that instance?"""
        until = self.refusals.get(key)
        if until is None:
            return False
        if now >= until:
            del self.refusals[key]
            return False
        return True

    def sent(self, key: object, now: float) -> None:
        sends = self.sends.get(key)
        if sends is None:  # (not setdefault's argument: a window made and dropped a request)
            self._make_room(self.sends, key)  # (a new key only: a known one needs no room)
            sends = self.sends[key] = RateWindow(keep_s=3 * WINDOW_S)
        sends.add(now)
        self.inflight[key] += 1

    def own_rates(self, now: float, limit: int) -> dict[object, int]:
        """Our sends per instance over the last second (the busiest ``limit``), for our siblings."""
        counts = {key: n for key, win in self.sends.items() if (n := win.count(now)) > 0}
        if len(counts) > limit:
            counts = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])
        return counts

    def siblings(self, counts: dict[object, int], now: float) -> None:
        """The other workers' sends over their last second, as of ``now``: the same correction as
        our own sends (``estimate``), up to two report intervals late (their report, then the relay's). A key not in ``counts`` is 0."""
        for key, samples in list(self.sibling_sends.items()):
            if key not in counts:
                if samples[-1][1] == 0 and samples[-1][0] < now - 2 * WINDOW_S:
                    del self.sibling_sends[key]  # quiet for longer than any estimate looks back
                else:
                    samples.append((now, 0))
        for key, n in counts.items():
            self._make_room(self.sibling_sends, key)
            self.sibling_sends.setdefault(key, collections.deque(maxlen=SIBLING_SAMPLES)).append((now, n))

    def _sibling_change(self, key: object, since: float) -> int:
        """How much the other workers' last-second count grew since ``since`` (may be negative)."""
        samples = self.sibling_sends.get(key)
        if not samples:
            return 0
        then = 0
        for at, n in samples:
            if at > since:
                break
            then = n
        return samples[-1][1] - then

    def finished(self, key: object) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def heard(self, key: object, load: float, bload: float, compute_us: int, now: float) -> None:
        self._make_room(self.reports, key)
        self.reports[key] = LoadReport(load, bload, compute_us, now)

    def estimate(self, key: object, capacity: float, flooded_load: float, flooded_bload: float, flooded_at: float,
                 now: float) -> tuple[float, float]:
        """(load, latency-bound demand) now: the freshest known values plus how much our own
        sending changed since they were measured.

        Our own sends inside that measurement are already counted in it; only the change
        of our own rate since it was taken is added (it can be negative).
        """
        load, bload, _ = self.view(key, capacity, flooded_load, flooded_bload, 0, flooded_at, now)
        return load, bload

    def view(self, key: object, capacity: float, flooded_load: float, flooded_bload: float, flooded_us: int,
             flooded_at: float, now: float) -> tuple[float, float, int]:
        """``estimate``, and the base compute latency to use (the piggy-backed one when it is the fresher),
        in one call: a plan asks both of every candidate, and at an idle ingress each call is a cold one."""
        report = self.reports.get(key)
        if report is not None and report.at >= flooded_at:
            load, bload, at, compute_us = report.load, report.bload, report.at, report.compute_us
        else:
            load, bload, at, compute_us = flooded_load, flooded_bload, flooded_at, flooded_us
        win = self.sends.get(key)
        if (win is None and key not in self.sibling_sends) or capacity <= 0:
            return load, bload, compute_us
        at = max(at, now - 2 * WINDOW_S)  # older than our memory: count all of our current rate
        mine = 0 if win is None else win.change(now, at)
        delta = (mine + (self._sibling_change(key, at) if self.sibling_sends else 0)) / capacity  # (workers only)
        return max(0.0, load + delta), max(0.0, bload + delta), compute_us


# ---------------------------------------------------------------- end to end: the gateways' own time

STAGE_SAMPLES = 32  # a gateway's own processing in one role: the median of its last this many requests ...
STAGE_TTL_S = 5.0  # ... not older than this (an idle gateway is soon assumed as fast as its hint again)
STAGE_HINT_US = 500  # with no samples; counts as one sample until the window is full
STAGE_QUANTILE = 0.5


class Stage:
    """The roles in which a gateway measures its own processing (protocol-spec/selection.md, "Estimate")."""

    INGRESS = "ingress"  # a user's request sent on over a tunnel: everything but the wait for the next hop
    TRANSIT = "transit"  # a stream relayed: everything but the wait for the next hop
    EGRESS = "egress"  # a tunnelled request served by our instance: everything but the instance's time
    LOCAL = "local"  # a user's request served by our own instance: ingress and egress in one
    ALL = (INGRESS, TRANSIT, EGRESS, LOCAL)


class StageMeter:
    """One gateway's own processing per request in one role: a median over recent requests."""

    def __init__(self, hint_us: int = STAGE_HINT_US, *, samples: int = STAGE_SAMPLES, ttl_s: float = STAGE_TTL_S) -> None:
        self.hint_us = hint_us
        self.ttl_s = ttl_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=samples)  # (when, µs)
        # The samples' µs in order, kept as they come and go: the median read after every request's
        # add without a sort of the window (a list.sort of 33 a request: ~5,000 instructions).
        self._sorted: list[int] = []
        self._value = hint_us
        self._stale = False  # samples came since _value: it is worked out when next read (an egress's,
        # per route advertisement, not per request)

    def add(self, now: float, own_us: float) -> None:
        """A request took ``own_us`` of this gateway's own time (negative: clock noise, counted as 0)."""
        if not math.isfinite(own_us):
            return
        us = max(0, int(own_us))
        samples = self._samples
        if len(samples) == samples.maxlen:
            self._drop(samples[0][1])  # (the deque drops it as this one comes)
        samples.append((now, us))
        bisect.insort(self._sorted, us)
        self._stale = True

    def _drop(self, us: int) -> None:
        ordered = self._sorted
        del ordered[bisect.bisect_left(ordered, us)]

    def value_us(self, now: float) -> int:
        """The estimate now: the median of the samples younger than ``ttl_s``, the hint among them."""
        if self._samples and self._samples[0][0] < now - self.ttl_s:
            while self._samples and self._samples[0][0] < now - self.ttl_s:
                self._drop(self._samples.popleft()[1])
            self._stale = True
        if self._stale:
            self._stale = False
            self._update()
        return self._value

    def _update(self) -> None:
        values = self._sorted
        n = len(values)
        if n == self._samples.maxlen:
            self._value = values[int(STAGE_QUANTILE * (n - 1))]
            return
        # Not full: the hint counts as one sample, the quantile's place among n + 1 (where the hint
        # would go among equal values makes no difference to the value there).
        i = int(STAGE_QUANTILE * n)
        k = bisect.bisect_right(values, self.hint_us)
        self._value = values[i] if i < k else self.hint_us if i == k else values[i - 1]


class OwnTimes:
    """A gateway's own processing per request, one StageMeter per Stage."""

    def __init__(self, hint_us: int = STAGE_HINT_US) -> None:
        self.meters = {role: StageMeter(hint_us) for role in Stage.ALL}
        self._read: tuple[str, float, int] | None = None  # the last reading: a plan asks once per candidate

    def add(self, role: str, now: float, own_us: float) -> None:
        self.meters[role].add(now, own_us)
        self._read = None

    def us(self, role: str, now: float) -> int:
        read = self._read
        if read is not None and read[1] == now and read[0] == role:
            return read[2]
        value = self.meters[role].value_us(now)
        self._read = (role, now, value)
        return value


# What an ingress observes against what it estimated, per instance (Envoy's latency-aware
# balancing and Prequal compare the same way): the correction is a high quantile of
# (observed - estimated) over recent responses, so that the corrected estimate covers most
# requests, not the typical one; bounded, and fading once no response refreshes it: an
# instance that the correction took out of a bound gets no traffic, hence no new evidence,
# and is tried again once the old evidence has faded enough (soon when it was just over,
# later when far over; after a transient spike, not a whole TTL later).
CORRECTION_SAMPLES = 32
CORRECTION_PRIOR = 8  # residuals of 0 counted until the window is full: one slow response alone corrects nothing
CORRECTION_HOLD_S = 1.0  # the correction holds this long after the newest response ...
CORRECTION_TTL_S = 5.0  # ... then fades linearly to 0 at this age; a residual older than this no longer counts
CORRECTION_QUANTILE = 0.9
CORRECTION_MAX_US = 1_000_000
CORRECTION_REFRESH_S = 0.05  # the faded value is recomputed at most this often (every request reads it)
# An instance out of a request's bound by the correction alone gets a request at most this often
# (a probe), when no instance meets the bound ...
PROBE_INTERVAL_S = 0.05
MAX_PROBE_INTERVAL_S = 0.8  # ... doubled by each probe that failed (late or cut), up to this; a good one resets it ...
PROBE_GOOD = 3  # ... and this many probes in a row within their bound end the evidence from before them ...
MAX_PROBE_GOOD = 24  # ... twice as many each time it is out again within RELAPSE_S of that, up to this
RELAPSE_S = 5.0


@attrs.define
class _Probes:
    """One instance's probes while the correction holds it out of a bound (selection.md, "Probes")."""

    sent_at: float  # the last one
    run: int = 0  # good ones in a row ...
    run_from: float = 0.0  # ... since the first of them
    interval: float = PROBE_INTERVAL_S
    needed: int = PROBE_GOOD  # good ones in a row that let it back in
    let_in_at: float | None = None  # when they last did


class LatencyCorrection:
    """Per instance, at the ingress: observed minus estimated time to the response head."""

    def __init__(self, *, samples: int = CORRECTION_SAMPLES, ttl_s: float = CORRECTION_TTL_S,
                 quantile: float = CORRECTION_QUANTILE, max_keys: int = 65536) -> None:
        self.samples = samples
        self.quantile = quantile  # `latency_quantile`: a reload applies it from the next response on
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        # (when, residual, cut): ``cut`` is False for an answered attempt, else the party whose attempt was cut
        self._residuals: dict[object, collections.deque[tuple[float, int, object]]] = {}
        # The last answered ones' residuals apart (when, residual): those of the last CORRECTION_HOLD_S
        # cap cut ones even when many cut at once (one user's long jobs) pushed them out of the window.
        self._answered: dict[object, collections.deque[tuple[float, int]]] = {}
        self._values: dict[object, tuple[float, int]] = {}  # (computed at, value)
        # When the newest response that bore the value out came (its residual at least the value): the
        # hold runs from there, so a trickle of answers faster than that does not keep re-arming it.
        self._held: dict[object, float] = {}
        self._probes: dict[object, _Probes] = {}  # kept as long as its residuals

    def observe(self, key: object, now: float, observed_us: float, estimated_us: float, *, cut: bool = False,
                party: object = None) -> None:
        """A response head left for the user ``observed_us`` after the attempt began; we had expected ``estimated_us``.

        ``cut``: no head came; the attempt was cut at the request's bound after ``observed_us``. Such
        a residual may be the request's own nature (a long job under a tight bound, which one user can
        send on purpose), so while the window holds answered ones, or one was answered within
        CORRECTION_HOLD_S (kept apart: cut ones do not push those out), it counts at most as much as
        the largest of theirs. With none answered, cut ones count as far as two parties' show (at most the
        second party's largest; ``party``: the user's address; everyone's requests too slow), else as
        0: one user alone cannot hold an instance out for everyone else."""
        if not (math.isfinite(observed_us) and math.isfinite(estimated_us)):
            return
        window = self._residuals.get(key)
        if window is None:
            if len(self._residuals) >= self.max_keys:
                # Bounded like every ingress table: the oldest instance's history goes.
                self._forget(next(iter(self._residuals)))
            window = self._residuals[key] = collections.deque(maxlen=self.samples)
        residual = int(observed_us - estimated_us)
        if residual >= self._values.get(key, (now, 0))[1]:
            self._held[key] = now
        window.append((now, residual, (True if party is None else party) if cut else False))
        if not cut:
            self._answered.setdefault(key, collections.deque(maxlen=self.samples)).append((now, residual))
        self._update(key, window, now)

    def value_us(self, key: object, now: float) -> int:
        """The correction to add to the estimate of ``key`` now (0 with no response in the last ``ttl_s``)."""
        window = self._residuals.get(key)
        if window is None:
            return 0
        at, value = self._values[key]
        if now - at < CORRECTION_REFRESH_S:
            return value
        while window and window[0][0] <= now - self.ttl_s:
            window.popleft()
        if not window:
            self._forget(key)  # its answered ones are none younger than the window's newest
            return 0
        return self._update(key, window, now)

    def _forget(self, key: object) -> None:
        """Everything kept of ``key`` goes (its residuals expired, or it is the oldest and room is needed)."""
        del self._residuals[key]
        for table in (self._values, self._answered, self._held, self._probes):
            table.pop(key, None)

    def probe_due(self, key: object, now: float) -> bool:
        """Whether ``key``, out of a bound by its correction alone, may get a request now (a probe;
        selection.md, "Probes"): the correction learns only from answers, which it no longer gets."""
        if key not in self._residuals:
            return False
        probe = self._probes.get(key)
        if probe is None:
            self._probes[key] = _Probes(now)
            return True
        if probe.let_in_at is not None:  # out again since good probes let it in: soon, so they said too little
            probe.needed = min(MAX_PROBE_GOOD, probe.needed * 2) if now - probe.let_in_at < RELAPSE_S else PROBE_GOOD
            probe.let_in_at, probe.run, probe.interval = None, 0, PROBE_INTERVAL_S
        elif now - probe.sent_at < probe.interval:
            return False
        elif now - probe.sent_at > CORRECTION_HOLD_S:
            probe.run = 0  # a run of good probes says something of now only while it lasts
        probe.sent_at = now
        return True

    def probed(self, key: object, now: float, good: bool) -> None:
        """A probe of ``key`` was answered (after ``observe``) within the bound it was sent for (``good``),
        or not (late, or cut). Enough good ones in a row: the residuals from before them go."""
        probe = self._probes.get(key)
        window = self._residuals.get(key)
        if probe is None or window is None or probe.let_in_at is not None:
            return
        if not good:
            probe.run = 0
            probe.interval = min(MAX_PROBE_INTERVAL_S, probe.interval * 2)  # slow still: probing at 20 a second costs 20 cuts
            return
        probe.interval = PROBE_INTERVAL_S
        if probe.run == 0:
            probe.run_from = now
        probe.run += 1
        if probe.run < probe.needed:
            return
        probe.let_in_at = now
        window = collections.deque((e for e in window if e[0] >= probe.run_from), maxlen=self.samples)
        if not window:  # not reached: the answer that made the run is in it (``observe`` comes first)
            return
        self._residuals[key] = window
        answered = self._answered.get(key)
        if answered is not None:
            self._answered[key] = collections.deque((e for e in answered if e[0] >= probe.run_from), maxlen=self.samples)
        self._held.pop(key, None)
        self._update(key, window, now)

    def _update(self, key: object, window: collections.deque[tuple[float, int, object]], now: float) -> int:
        # Every response (~400 bytecodes a request at saturation as a comprehension): in C when none
        # was cut, the usual case (a cut is True or a party's address, never equal to False).
        if list(map(_THIRD, window)).count(False) == len(window):
            values = list(map(_SECOND, window))
        else:  # some were cut: capped as observe() says
            values = [r for _, r, cut in window if cut is False]
            answered = values + [r for at, r in self._answered.get(key, ()) if at > now - CORRECTION_HOLD_S]
            if answered:
                cap = max(0, *answered)
            else:  # every attempt cut: the instance slow for all, as far as two parties' cuts show (one party's: 0)
                top: dict[object, int] = {}  # each party's largest residual
                for _, r, cut in window:
                    top[cut] = max(r, top.get(cut, r))
                cap = max(0, sorted(top.values())[-2]) if len(top) >= 2 else 0  # the second party's largest
            values = [r if cut is False else min(r, cap) for _, r, cut in window]
        values += [0] * min(CORRECTION_PRIOR, self.samples - len(window))
        values.sort()
        quiet = now - self._held.get(key, window[-1][0])  # since the newest response that bore the value out
        fade = 1.0 if quiet <= CORRECTION_HOLD_S else max(0.0, (self.ttl_s - quiet) / (self.ttl_s - CORRECTION_HOLD_S))
        value = int(values[int(self.quantile * (len(values) - 1))] * fade)
        value = max(-CORRECTION_MAX_US, min(CORRECTION_MAX_US, value))
        self._values[key] = (now, value)
        return value
