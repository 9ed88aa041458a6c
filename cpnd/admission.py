"""Who gets a connection slot at the gateway's edges, and how often floods are logged (sans-IO).

One ``SlotTable`` per listener that strangers can reach: HTTP users, unauthenticated
peering connections, metrics scrapers. It caps connections overall and per source
address, and when full takes back the slot that costs least to lose: one that is idle
(what "idle" means is the shell's: an HTTP connection without a whole request head, a
handshake that has sent nothing, a scraper between scrapes), the one idle longest first,
and, where the table allows it, the oldest busy one; else the newcomer is refused.
The shell closes what it is told to. ``Tally`` turns a flood of refusals into one log
line a second. Nothing here imports trio: times are passed in.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs

# Descriptors a gateway needs besides its users' connections: the interpreter, epoll,
# listeners, wake-up fds, the log (measured: ~20 at start; doubled for what a reload opens).
BASE_DESCRIPTORS = 48


@attrs.define(eq=False)
class Slot:
    """One admitted connection; ``owner`` is what the shell closes when the slot is taken back."""

    source: str
    owner: Any = None
    idle: bool = True
    held: bool = True  # False once released or taken back: the connection must end


@attrs.frozen
class Admission:
    slot: Slot | None  # None: refused
    evicted: tuple[Slot, ...] = ()  # taken back for the newcomer: the shell closes their owners
    reason: str = ""  # which bound refused or evicted: "limit" or "per_source"


@attrs.define
class _Source:
    count: int = 0
    slots: dict[Slot, None] = attrs.field(factory=dict)  # in admission order
    idle: dict[Slot, None] = attrs.field(factory=dict)  # in the order they became idle


class SlotTable:
    """Connection slots under a global ``limit`` and a ``per_source`` one.

    ``evict_busy``: when no slot is idle, take back the oldest one rather than refuse
    the newcomer (pre-auth handshakes, where holding a slot must never lock others out).
    """

    def __init__(self, limit: int, per_source: int, *, evict_busy: bool = False) -> None:
        if limit < 1 or per_source < 1:
            raise ValueError("limits must be at least 1")
        self.limit = limit
        self.per_source = per_source
        self.evict_busy = evict_busy
        self._slots: dict[Slot, None] = {}
        self._idle: dict[Slot, None] = {}
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def idle(self) -> int:
        """How many of the slots are idle (the ones a newcomer may take)."""
        return len(self._idle)

    def count(self, source: str) -> int:
        src = self._sources.get(source)
        return src.count if src else 0

    def admit(self, source: str, owner: Any = None) -> Admission:
        """A slot for a new connection from ``source`` (idle until told otherwise), or a refusal."""
        evicted: list[Slot] = []
        reason = ""
        src = self._sources.get(source)
        if src is not None and src.count >= self.per_source:
            victim = self._victim(src.idle, src.slots)
            if victim is None:
                return Admission(None, (), "per_source")
            self._drop(victim)
            evicted.append(victim)
            reason = "per_source"
        if len(self._slots) >= self.limit:
            victim = self._victim(self._idle, self._slots)
            if victim is None:
                # Nothing to take back: the per-source victim (if any) stays taken, and the
                # newcomer still fits, since dropping it freed a global slot too.
                if not evicted:
                    return Admission(None, (), "limit")
            else:
                self._drop(victim)
                evicted.append(victim)
                reason = reason or "limit"
        slot = Slot(source, owner)
        src = self._sources.setdefault(source, _Source())
        src.count += 1
        src.slots[slot] = None
        src.idle[slot] = None
        self._slots[slot] = None
        self._idle[slot] = None
        return Admission(slot, tuple(evicted), reason)

    def set_idle(self, slot: Slot, idle: bool) -> None:
        """The connection went idle (it moves to the back of the reclaim order) or busy."""
        if not slot.held or slot.idle == idle:
            return
        slot.idle = idle
        src = self._sources[slot.source]
        if idle:
            self._idle[slot] = None
            src.idle[slot] = None
        else:
            del self._idle[slot]
            del src.idle[slot]

    def release(self, slot: Slot) -> None:
        """The connection ended; a slot already taken back is left alone."""
        if slot.held:
            self._drop(slot)

    def _victim(self, idle: dict[Slot, None], slots: dict[Slot, None]) -> Slot | None:
        if idle:
            return next(iter(idle))
        if self.evict_busy and slots:
            return next(iter(slots))
        return None

    def _drop(self, slot: Slot) -> None:
        slot.held = False
        self._slots.pop(slot, None)
        self._idle.pop(slot, None)
        src = self._sources[slot.source]
        src.count -= 1
        src.slots.pop(slot, None)
        src.idle.pop(slot, None)
        if not src.count:
            del self._sources[slot.source]  # bounded by the slots held, never by the sources seen


class Tally:
    """One log line a second for a flood: the first event of a quiet spell in full, then counts.

    ``note`` says whether to log an event in full; ``flush`` (called at least once a
    second) returns the line that sums up what was counted since, if an interval passed.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.window_end = -math.inf
        self.counts: collections.Counter[str] = collections.Counter()

    def note(self, kind: str, now: float) -> bool:
        if now >= self.window_end and not self.counts:
            self.window_end = now + self.interval_s
            return True
        self.counts[kind] += 1
        return False

    def flush(self, now: float) -> str | None:
        if not self.counts or now < self.window_end:
            return None
        total = sum(self.counts.values())
        parts = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        self.counts.clear()
        self.window_end = now + self.interval_s
        return f"{total} more in the last {self.interval_s:g} s: {parts}"


def descriptor_reserve(*, peers: int, preauth: int, local_instances: int, pool_idle_per_instance: int,
                       control_clients: int, metrics_clients: int) -> int:
    """Descriptors kept back from HTTP users for everything else the gateway must still do."""
    return (BASE_DESCRIPTORS + 2 * peers + preauth + control_clients + metrics_clients
            + local_instances * (pool_idle_per_instance + 1))  # pooled connections and a health probe each


def http_client_budget(nofile: int, reserve: int, local_instances: int) -> int:
    """How many HTTP users fit in the descriptors left: each holds its own connection, and
    one to an instance while its request is in flight when the gateway has instances."""
    per_client = 2 if local_instances else 1
    return max(1, (nofile - reserve) // per_client)


def preauth_budget(nofile: int, configured: int) -> int:
    """Pending handshakes allowed: at most a quarter of the descriptors (strangers hold them)."""
    return min(configured, max(8, nofile // 4))
