"""Per-request plans (sans-IO): which instances one request tries, in what order, and when it stops.

The ingress asks ``Planner.plan`` for every request head and ``Plan.next`` for each attempt,
telling ``Plan.failed`` what went wrong; it learns from ``Planner.observed`` what an attempt took.
No I/O and no clock of its own: every call takes ``now`` (protocol-spec/selection.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs

from .clients import source_key
from .errors import HttpError
from .heads import split_head
from .load import LatencyCorrection, OwnTimes, SendAccount, Stage
from .rib import Best, Key, Rib
from .selection import (
    BadHeader,
    Candidate,
    Constraints,
    TtlCache,
    View,
    candidates,
    choose,
    expected_us,
    explain_none,
    match_service,
    no_live_instance,
    parse_constraints,
    pinned_first,
    probe_candidates,
    rank,
    slack_us,
    within_bound,
)
from .tunnel import NO_BUDGET, ResetCode

MAX_ATTEMPTS = 3
# One head's relay counts at most this much (a held body's wait, a stalled write), so a cut at a
# bound comes at most this much before it (and at most a tenth of it).
MAX_CUT_LEAD_S = 0.001
DEADLINE_GRACE_S = 0.05  # a far end's deadline reset this much before ours is its clock, not a lie
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
MODES = ("per-request", "per-connection", "dns-ttl")

Estimate = Callable[[Key, Best, float], View]
NO_CONSTRAINTS = parse_constraints(())  # a request with no CPN-* field (most): parsed once


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def reset_error(code: int, text: str) -> HttpError:
    """The user's answer for an attempt that ended in a stream reset."""
    if code == ResetCode.DEADLINE:
        return HttpError(504, "deadline_exceeded", text or "the request's deadline passed")
    if code == ResetCode.REFUSED:
        return HttpError(503, "no_capacity", text or "every candidate instance refused the request")
    name = ResetCode(code).name.lower() if code in ResetCode._value2member_map_ else str(code)
    return HttpError(502, "bad_gateway", f"{name}: {text}")


def combine(failures: Sequence[HttpError]) -> HttpError:
    """One answer for all failed attempts: 504 if the deadline passed, 503 if all refused, else 502."""
    if not failures:
        return HttpError(502, "bad_gateway", "no candidate could be tried")
    if any(f.status == 504 for f in failures):
        return next(f for f in failures if f.status == 504)
    if all(f.status == 503 for f in failures):
        return HttpError(503, "no_capacity", "; ".join(f.detail for f in failures))
    return HttpError(502, "bad_gateway", "; ".join(f.detail for f in failures if f.status == 502))


@attrs.define
class Attempt:
    """One attempt's timeline (trio clock, seconds), for the end-to-end estimate."""

    sent_head: bool = False  # once the user has the head, a failure can only cut the connection
    sent_at: float | None = None  # the request went upstream (a tunnelled attempt)
    upstream_head_at: float | None = None  # its response head came back
    instance_s: float | None = None  # the instance's time to its response head, as its egress measured it
    head_at: float | None = None  # the response head left for the user
    whole: bool = False  # the whole request went in one write: no time waiting for the user's upload
    bound_at: float | None = None  # the head must leave by then (the latency bound), else 504
    ended_at: float | None = None  # the attempt was over (its response relayed, or it failed)


@attrs.define
class CutLead:
    """This ingress's time from a response head's arrival to its leaving for the user (a moving average
    over answered attempts): a head that comes later than the bound less that would leave after the
    bound, so an attempt with no head by then is cut then, and its 504 leaves that much sooner."""

    lead_s: float = 0.0

    def learn(self, took_s: float) -> None:
        self.lead_s += (max(0.0, min(took_s, MAX_CUT_LEAD_S)) - self.lead_s) / 8  # never over the cap: a mean of capped samples

    def cut_at(self, t0: float, bound_s: float) -> float:
        """When a request whose head came at ``t0`` with a bound of ``bound_s`` is cut."""
        return t0 + bound_s - min(self.lead_s, bound_s / 10)


@attrs.define
class Plan:
    """The candidates one request may still try, and what its failed attempts said."""

    service: str
    cons: Constraints
    remaining: list[Candidate]
    t0: float  # when the request head came: the bound runs from here
    deadline: float  # no attempt starts after this (the request's timeout)
    bound_at: float | None  # t0 + CPN-Max-Latency: no response head leaves for the user after this
    idempotent: bool
    max_attempts: int
    flexible: bool  # per-request mode, no latency bound: split at random, retries too
    per_request: bool
    planner: Planner
    failures: list[HttpError] = attrs.field(factory=list)
    cut_at: float | None = None  # bound_at less the time a head takes to leave (CutLead): the cut is then

    def next(self, now: float, *, replayable: bool = True) -> Candidate | None:
        """The next candidate to try, or None: none left, attempts used up, or a body that cannot be
        sent twice. HttpError 504 once the deadline has passed."""
        while self.remaining:
            if len(self.failures) >= self.max_attempts or (self.failures and not replayable):
                return None
            cand = self.remaining.pop(0)
            if self.failures and not within_bound(cand, self.cons, _us(now - self.t0)):
                continue  # a retry must still make the bound, counting the time already spent
            if now >= self.deadline:
                raise HttpError(504, "deadline_exceeded", f"no response within {self.cons.timeout_s:g} s")
            return cand
        return None

    def yields(self, replayable: bool = True) -> bool:
        """Whether the attempt ``next`` just gave has room elsewhere (EXT_FLAG_YIELDS): a flexible request
        with an attempt left and another candidate it estimates has room (selection.md, "Admission")."""
        return (self.flexible and replayable and len(self.failures) + 1 < self.max_attempts
                and bool(self.remaining) and any(c.fill < 1.0 for c in self.remaining))

    def failed(self, cand: Candidate, code: int, delivered: bool, text: str, now: float) -> bool:
        """An attempt on ``cand`` was reset before any response reached the user; whether to go on."""
        self.failures.append(reset_error(code, text))
        # A deadline reset ends the request only when our own clock agrees (the far end's budget runs
        # out a one-way trip before ours): one sent early is a failed attempt, retried if that is safe.
        out_of_time = code == ResetCode.DEADLINE and now >= self.head_deadline() - DEADLINE_GRACE_S
        if (delivered and not self.idempotent) or out_of_time:
            self.remaining = []
            return False
        if self.flexible:
            if code == ResetCode.REFUSED and cand.next_hop is not None:  # our own: the meter is exact
                self.planner.account.refused_flexible(cand.key, cand.capacity, now)
            # A retry is split like a first try: all of them on the next in rank order would
            # swing that instance's load with the refusals.
            self.remaining = choose(self.remaining, self.cons.prefer, self.planner.rng)
        return True

    def more(self, replayable: bool) -> bool:
        """Whether another attempt may follow (for the log line)."""
        return bool(self.remaining) and len(self.failures) < self.max_attempts and replayable

    def error(self) -> HttpError:
        return combine(self.failures)

    def head_deadline(self) -> float:
        """Until when an attempt waits for its response head: the bound, if any, else the timeout."""
        return self.deadline if self.bound_at is None else min(self.deadline, self.bound_at)

    def cut_deadline(self) -> float:
        """When an attempt waiting for its response head is cut: the bound less the time a head takes
        to leave, if there is a bound, else the timeout."""
        return self.deadline if self.cut_at is None else min(self.deadline, self.cut_at)

    def budget_us(self, now: float) -> int:
        """The extension header's budget: the time left before the deadline."""
        return min(NO_BUDGET - 1, max(0, _us(self.deadline - now)))

    def slack_us(self, cand: Candidate, now: float) -> int:
        """The extension header's slack: compute time the bound leaves at ``cand`` (NO_BUDGET: none)."""
        if not self.per_request or self.cons.max_latency_us is None:  # (slack_us's None, without its call)
            return NO_BUDGET
        left = slack_us(cand, self.cons, _us(now - self.t0))
        return NO_BUDGET if left is None else min(NO_BUDGET - 1, left)


@attrs.define
class Planner:
    """One gateway's per-request choices: the RIB, the selection mode, and what it measured."""

    rib: Rib
    estimate: Estimate  # the ingress's view of an instance now (select.ingress_view)
    account: SendAccount
    own: OwnTimes
    correction: LatencyCorrection
    cut: CutLead = attrs.field(factory=CutLead)
    mode: str = attrs.field(default="per-request", validator=attrs.validators.in_(MODES))
    ttl: TtlCache = attrs.field(factory=lambda: TtlCache(0.0))
    rng: random.Random = attrs.field(factory=random.Random)

    def plan(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], pinned: dict[str, Key],
             t0: float, now: float) -> Plan:
        """The plan for a request whose head came at ``t0``, or the HttpError it gets instead."""
        path, cpn = split_head(target, headers)
        if method == b"CONNECT":  # (its 2xx would switch the connections on the way away from HTTP)
            raise HttpError(400, "bad_request", "CONNECT is not relayed")
        try:
            cons = parse_constraints(cpn) if cpn else NO_CONSTRAINTS
        except BadHeader as exc:
            raise HttpError(400, "bad_header", str(exc)) from None
        service = match_service(self.rib.by_service, path)
        if service is None:
            raise HttpError(404, "no_such_service", f"no service matches {path}")
        ranked = self._ranked(service, cons, pinned, now)
        per_request = self.mode == "per-request"
        # The baselines emulate network-layer schemes: what they chose is final, no retries.
        # The baselines emulate schemes that know nothing of the bound: they answer late, not 504.
        if cons.max_latency_us is None or not per_request:
            return Plan(service, cons, ranked, t0, now + cons.timeout_s, None, method in IDEMPOTENT,
                        MAX_ATTEMPTS if per_request else 1, per_request and cons.max_latency_us is None, per_request, self)
        bound_s = cons.max_latency_us / 1_000_000
        return Plan(service, cons, ranked, t0, now + cons.timeout_s, t0 + bound_s, method in IDEMPOTENT, MAX_ATTEMPTS,
                    False, True, self, cut_at=self.cut.cut_at(t0, bound_s))

    def _ranked(self, service: str, cons: Constraints, pinned: dict[str, Key], now: float) -> list[Candidate]:
        per_request = self.mode == "per-request"
        bounded = cons.max_latency_us is not None and per_request
        # Per request, only the instances that may meet the constraints are estimated (the baselines
        # know nothing of them: they rank every instance, and pin what they chose).
        pruned = per_request and (cons.max_latency_us is not None or cons.max_price is not None)
        cands = candidates(self.rib, service, self.estimate, bounded=bounded, within=cons if pruned else None, now=now)
        ranked = rank(cands, cons)
        if per_request:
            # Latency-bound requests go first-fit in rank order: packing them tight leaves
            # whole instances to flexible traffic. Flexible ones are split at random.
            if cons.max_latency_us is None and self.account.refusals:
                ranked = [attrs.evolve(c, fill=max(c.fill, 1.0)) if self.account.holds_flexible(c.key, now) else c
                          for c in ranked]
            if len(ranked) > 1:  # (one is tried first whatever choose would say: no call)
                ranked = choose(ranked, cons.prefer, self.rng, split=cons.max_latency_us is None)
        elif self.mode == "per-connection":
            ranked = pinned_first(ranked, pinned.get(service), cands)
        else:
            ranked = pinned_first(ranked, self.ttl.get(service, cons, now), cands)
        if not ranked and per_request and cons.max_latency_us is not None and cands:
            ranked = self._probe(cands, cons, now)
        if not ranked:
            if pruned:  # the error names the best of them all
                cands = candidates(self.rib, service, self.estimate, bounded=bounded, now=now)
            if not cands:  # known, but every instance is down or reachable only through stale paths
                raise HttpError(503, "no_instance", no_live_instance(self.rib, service))
            raise HttpError(503, "no_instance", f"no instance of {service} meets the request's constraints "
                            f"({len(cands)} live): {explain_none(cands, cons)}")
        if self.mode == "per-connection":
            pinned[service] = ranked[0].key
        elif self.mode == "dns-ttl" and self.ttl.get(service, cons, now) is None:
            self.ttl.put(service, cons, ranked[0].key, now)
        return ranked

    def _probe(self, cands: Sequence[Candidate], cons: Constraints, now: float) -> list[Candidate]:
        """With no instance within a latency bound: the best one out of it by our correction alone that
        is due a probe, if any (selection.md, "Probes")."""
        for cand in probe_candidates(cands, cons):
            if self.correction.probe_due(cand.key, now):
                return [cand]
        return []

    def observed(self, plan: Plan, cand: Candidate, attempt: Attempt, start: float, now: float) -> bool:
        """An attempt's response head left for the user: what it took against the estimate, and our
        own share of it; True if it left after the request's bound (a defect of the estimate). Only a
        request that was whole in hand when it went upstream counts: an upload's pace is the user's."""
        if attempt.head_at is None or not attempt.whole:
            return False
        took = attempt.head_at - start
        if attempt.upstream_head_at is not None:
            self.cut.learn(attempt.head_at - attempt.upstream_head_at)
        instance_s = attempt.instance_s
        if instance_s is not None and attempt.sent_at is not None and attempt.upstream_head_at is not None:
            # Told in LOAD, which a transit may forge: at most our own wait for the head, so a
            # lie hides at most the path and the gateways on the way, never the instance's compute.
            instance_s = min(instance_s, attempt.upstream_head_at - attempt.sent_at)
        instance_us = None if instance_s is None else _us(instance_s)
        expected = expected_us(cand, instance_us)
        self.correction.observe(cand.key, now, took * 1_000_000, expected)
        if cand.probe:  # good: within the largest correction that met the bound
            self.correction.probed(cand.key, now, took * 1_000_000 - expected <= cand.correction_us)
        if cand.next_hop is None and attempt.instance_s is not None:
            self.own.add(Stage.LOCAL, now, (took - attempt.instance_s) * 1_000_000)
            self.own.us(Stage.LOCAL, now)  # its median worked out here, off the user's path, not in the next plan
        elif cand.next_hop is not None and attempt.sent_at is not None and attempt.upstream_head_at is not None:
            self.own.add(Stage.INGRESS, now, (took - (attempt.upstream_head_at - attempt.sent_at)) * 1_000_000)
            self.own.us(Stage.INGRESS, now)  # (the same)
        return plan.cons.max_latency_us is not None and _us(attempt.head_at - plan.t0) > plan.cons.max_latency_us

    def missed(self, cand: Candidate, attempt: Attempt, start: float, now: float, party: object = None) -> None:
        """An attempt was cut at the request's bound: it took at least ``now - start``. The
        correction learns that much (a lower bound), as from a late answer, within what answered
        requests show (load.LatencyCorrection.observe: one user's long jobs are not the instance's);
        as for an answer, only if the request was whole in hand: a slow upload is the user's pace.
        ``party``: whose request it was (the user's address): one party's cuts alone count as 0; an
        IPv6 user is its /64 (source_key, as for its fair share: one host holds a whole /64)."""
        if attempt.whole:
            self.correction.observe(cand.key, now, (now - start) * 1_000_000, expected_us(cand, None), cut=True,
                                    party=source_key(party) if isinstance(party, str) else party)
            if cand.probe:
                self.correction.probed(cand.key, now, False)
