"""Each user's fair share of an instance once it fills (sans-IO; time is an input).

An instance's capacity is counted at its egress (load.InstanceMeter). Below ``FULL`` of it,
every request that fits is admitted, whoever sends it. Above, a party (a user: a local user's
address, or the CPN-Client its ingress names within the peer the stream came from) that already holds its share of the capacity
(capacity / the parties that asked in the last second, this one included; for a request with a
latency bound while flexible requests are refused for the bounded ones' latency, those that asked
with one: flexible requests then get none of it, load.InstanceMeter.admit, so counting them would
leave their part unused; a bound claimed where it holds up no one's latency, an hour say, is no
claim on a flexible user's part, unless that user yields: its ingress had room for it elsewhere for each
of its asks, so the bounded request's share is split without it; a request is held while in flight and a second after, as the
instance's own bound counts it) is
refused, so one user sending long jobs as fast as they are admitted cannot take all of an
instance from the others: the room above ``FULL`` is theirs. The users counted are those that
asked in the last second while it was that full, admitted or not: one refused so far still has
its share. Like Envoy's and nginx's per-client limits, but with no setting: a share is what is
left when the instance is contended, no more.

A party whose requests here mostly ended abandoned in the last second (its user hung up before
the answer; so found, for FATE_S more unless its answers come back) gets only what costs the
others nothing: it is refused from ``IDLE`` of the capacity held (below
it, the instance's compute does not grow with its load: the paper's f_d), and is not counted among
the users that split a full one. Capacity spent on an answer nobody takes serves no one, and one
address sending requests and closing them at once would otherwise fill every instance it reaches to
its fair share, slowing every answer there, at the cost of the users who wait for theirs.
"""

from __future__ import annotations

import collections

FULL = 0.8  # shares apply above this fraction of capacity held (the room above: newcomers')
IDLE = 0.5  # a party that abandons its requests is refused above this fraction (f_d is flat below it)
WINDOW_S = 1.0  # a party counts among the users this long after it asked; a request is held this long after it ended
MAX_EVENTS = 65_536  # asks and ends remembered per instance and window (the oldest are forgotten first)
FATE_S = 5.0  # a party found abandoning is held so this long after (refused, it has no ends to show it)
RECOUNT_S = 0.05  # the users left after the abandoning ones: counted anew at most this often


class _Window:
    """Events of the last WINDOW_S by party (at most MAX_EVENTS: the oldest are forgotten first)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, str]] = collections.deque()  # (when, party), oldest first
        self.count: collections.Counter[str] = collections.Counter()

    def add(self, party: str, now: float) -> None:
        events, count = self._events, self.count
        events.append((now, party))
        count[party] += 1
        first = events[0]
        if first[0] <= now - self.window_s:
            # Usually one leaves as one comes (an end a request): that one here, without trim's loop.
            events.popleft()
            left = first[1]
            n = count[left] - 1
            if n:
                count[left] = n
            else:
                del count[left]
            if events[0][0] <= now - self.window_s or len(events) > MAX_EVENTS:
                self.trim(now)
        elif len(events) > MAX_EVENTS:
            self.trim(now)

    def trim(self, now: float) -> None:
        events, count, cutoff = self._events, self.count, now - self.window_s
        while events and (events[0][0] <= cutoff or len(events) > MAX_EVENTS):
            _, party = events.popleft()
            count[party] -= 1
            if not count[party]:
                del count[party]


class Shares:
    """One instance's users of the last second: those that asked, and what each holds."""

    def __init__(self) -> None:
        self._asked = _Window()  # who wants the instance: a share is counted among them
        # Those of them with a latency bound: a bounded request's share is counted among these alone
        # (load.InstanceMeter.admit: flexible requests get only what the bounded demand leaves, so an
        # unbounded party holds none of a bounded one's share; counted among all, one flexible ask
        # refused for the bounded demand halved the bounded user's share, and that half went unused).
        self._asked_bounded = _Window()
        # Those that asked without yielding: a bounded request's share is counted among these (every
        # party but a flexible one whose ingress had room elsewhere for each of its asks: EXT_FLAG_YIELDS).
        self._asked_firm = _Window()
        self._ended = _Window()  # requests answered (or abandoned) in the last second: still held
        self._inflight: collections.Counter[str] = collections.Counter()  # admitted, not yet ended
        self._dropped = _Window()  # those of them abandoned by their users (nothing to do per request)
        self._abandoning: dict[str, float] = {}  # parties found abandoning: until when (FATE_S on), oldest first
        # (counted at, users that asked then and abandon, those of them with a bound, those that did not yield)
        self._dropping: tuple[float, int, int, int] = (-1.0, 0, 0, 0)

    def held(self, party: str) -> int:
        """The requests ``party`` holds of the instance's capacity (as load.SlotHolds counts them:
        until a second after their answer), as of the last ``refuse``."""
        return self._inflight.get(party, 0) + self._ended.count.get(party, 0)

    def refuse(self, party: str, held: int, capacity: float, now: float, bounded: bool = False,
               bounded_only: bool = False, yields: bool = False) -> str | None:
        """Why ``party``'s request is over its share, or None; ``held``: requests counted against
        ``capacity`` now (the instance's own bound is checked apart). A request that asks while the
        instance is that full counts its party among the users from now on, for a second; one with
        a latency bound (``bounded``) also among the bounded users, the only ones its share is split
        by if ``bounded_only``: flexible requests are refused now for the bounded ones' latency
        (load.InstanceMeter.shut_to_flexible). Else a bound takes no flexible user's part: any request
        may claim one (an hour, met by any instance), and one user sending such requests as fast as
        they were admitted took 43.5 of 50 a second, the flexible user beside it 1.7; but a flexible
        user all of whose asks ``yields`` (its ingress had room for it elsewhere) has no part here
        that a bounded request's share is split by."""
        if held + 1 <= IDLE * capacity:
            return None
        if (self._dropped.count or self._abandoning) and self.abandons(party, now):
            return (f"this user abandoned most of its requests here lately (hung up before the answer): "
                    f"none while the instance is over {IDLE:.0%} full")
        if held + 1 <= FULL * capacity:
            return None
        self._count_ask(party, now, bounded, yields)
        i = (1 if bounded_only else 2) if bounded else 0  # whom the share is split among
        asked = (self._asked, self._asked_bounded, self._asked_firm)[i]
        self._ended.trim(now)
        users = max(1, len(asked.count) - self._abandoning_users(now)[i])
        share = capacity / users
        mine = self.held(party)
        if mine < share:  # a party holding nothing is under any share (shares below one request refused all)
            return None
        return (f"over its fair share: this user holds {mine} of its capacity, share {share:.3g} "
                f"among {users} users (the instance is {FULL:.0%} full)")

    def _count_ask(self, party: str, now: float, bounded: bool, yields: bool) -> None:
        """Count ``party`` among those that asked, those that asked with a bound, and those that did not yield."""
        for window, counts in ((self._asked, True), (self._asked_bounded, bounded),
                               (self._asked_firm, bounded or not yields)):
            if counts:
                window.add(party, now)
                window.trim(now)

    def admitted(self, party: str) -> None:
        self._inflight[party] += 1

    def ended(self, party: str, now: float, abandoned: bool = False) -> None:
        """A request of ``party`` admitted here ended now, answered (or failed) or ``abandoned`` (its
        user hung up): held a second more."""
        n = self._inflight.pop(party, 0)
        if n > 1:
            self._inflight[party] = n - 1
        self._ended.add(party, now)
        if abandoned:
            self._dropped.add(party, now)

    def abandons(self, party: str, now: float) -> bool:
        """Does ``party`` abandon its requests here: were most of those that ended in the last second
        abandoned, or was that so within FATE_S and none of its answers since says otherwise?"""
        dropped = self._dropped.count.get(party, 0)
        until = self._abandoning.get(party)
        if not dropped and until is None:
            return False  # (the usual case: a dict lookup each)
        self._dropped.trim(now)
        self._ended.trim(now)
        dropped = self._dropped.count.get(party, 0)
        answered = self._ended.count.get(party, 0) - dropped
        if dropped and 2 * dropped > answered:
            self._abandoning.pop(party, None)  # (to the end: the oldest entries go first)
            self._abandoning[party] = now + FATE_S
            if len(self._abandoning) > MAX_EVENTS:
                del self._abandoning[next(iter(self._abandoning))]
            return True
        if until is not None and (now >= until or answered > 2 * dropped):
            del self._abandoning[party]  # its time is over, or its answers came back
            return False
        return until is not None

    def _abandoning_users(self, now: float) -> tuple[int, int, int]:
        """How many of the users that asked in the last second abandon, of those with a bound, and of those
        that did not yield (counted at most every RECOUNT_S: parties with abandoned requests may be many)."""
        at, n, nb, nf = self._dropping
        if now - at >= RECOUNT_S or now < at:
            for p in [p for p, d in self._dropped.count.items() if p not in self._abandoning]:
                self.abandons(p, now)  # found abandoning by their ends alone, before they ask again
            out = [p for p, until in self._abandoning.items() if until > now]
            n, nb, nf = (sum(1 for p in out if p in w.count) for w in (self._asked, self._asked_bounded, self._asked_firm))
            self._dropping = (now, n, nb, nf)
        return n, nb, nf

    def users(self, now: float) -> int:
        """Users that asked in the last second."""
        self._asked.trim(now)
        return len(self._asked.count)
