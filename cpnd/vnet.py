"""Gateway cores wired by in-memory links under a virtual clock (sans-IO): tests and bench/scale_sim.py.

The shell of a simulation, as ``daemon.py`` is the shell of a process: it moves each link's bytes
to the other end after the link's one-way delay, turns ``Dial`` into a pair of links (or a refusal),
hangs a link up after its last bytes once the core closed it, and calls ``handle_timer`` when each
core's ``get_timer`` falls due. No wall-clock time passes; every decision is the cores' own.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .config import Address, Config, GatewayConfig, InstanceConfig, PeerConfig, ServiceConfig
from .crypto import public_key_b64
from .gateway import Dial, Gateway, Link, LinkDown
from .load import STAGE_HINT_US

DEFAULT_DELAY_S = 0.001


class Instances:
    """An ``InstanceSource`` whose readings and health a test (or a load walk) sets."""

    def __init__(self, readings: Mapping[str, tuple[float, float, float]] | None = None) -> None:
        self.values: dict[str, tuple[float, float, float]] = dict(readings or {})
        self.down: set[str] = set()
        self.walk: Callable[[str, float], tuple[float, float, float] | None] | None = None

    def readings(self, now: float) -> Mapping[str, tuple[float, float, float]]:
        if self.walk is not None:
            for iid in list(self.values):
                moved = self.walk(iid, now)
                if moved is not None:
                    self.values[iid] = moved
        return self.values

    def healthy(self, iid: str) -> bool:
        return iid not in self.down

    def own_us(self, stage: str, now: float) -> int:
        return STAGE_HINT_US


class Net:
    """Cores by id, the links between them, and one event heap for bytes, hang-ups and timers."""

    def __init__(self, *, now: float = 0.0, enter: Callable[[str], None] | None = None) -> None:
        self.now = now
        self.cores: dict[str, Gateway] = {}
        self.delays: dict[frozenset[str], float] = {}  # one-way delay per pair of ids
        self.other: dict[Link, Link] = {}  # each link's far end, while both are connected
        self.owner: dict[Link, Gateway] = {}  # the core (not the id: a restarted gateway is a new core) of each link
        self.all_links: list[Link] = []  # every link ever made (their counters outlive them)
        self.dead: set[str] = set()
        self.enter = enter or (lambda gid: None)  # called before any call into a core (scale_sim's shared tables)
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._timer_at: dict[Gateway, float] = {}

    def add(self, core: Gateway, *, start: bool = True) -> Gateway:
        gid = core.id
        self.cores[gid] = core
        self.dead.discard(gid)
        if start:
            self.enter(gid)
            core.start(self.now)
        self.pump(gid)
        return core

    def delay(self, a: str, b: str) -> float:
        return self.delays.get(frozenset((a, b)), DEFAULT_DELAY_S)

    # ---- the event loop

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._order), fn, args))

    def run_until(self, t: float) -> None:
        """Run every event and timer due up to ``t`` (virtual seconds), then set the clock to ``t``."""
        while self._heap and self._heap[0][0] <= t:
            when, _, fn, args = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            fn(*args)
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_while(self, cond: Callable[[], bool], limit_s: float = 60.0, step_s: float = 0.01) -> None:
        """Run in steps of ``step_s`` while ``cond()`` holds; AssertionError after ``limit_s``."""
        end = self.now + limit_s
        while cond():
            if self.now >= end:
                raise AssertionError(f"still true after {limit_s} s (virtual)")
            self.run_for(step_s)

    # ---- a core's outputs

    def alive(self, core: Gateway) -> bool:
        """``core`` is its id's current core, and not dead (a restart adds a new core under the old id)."""
        return self.cores.get(core.id) is core and core.id not in self.dead

    def pump(self, gid: str) -> None:
        """Deliver what core ``gid`` has to send, act on its events, and re-arm its timer."""
        self._pump(self.cores[gid])

    def _pump(self, core: Gateway) -> None:
        if not self.alive(core):
            return
        gid = core.id
        while True:
            links = core.links_with_data()
            if not links and not core.has_events():
                break
            for link in links:
                data = core.data_to_send(link)
                far = self.other.get(link)
                if data and far is not None:
                    self.at(self.now + self.delay(gid, self.owner[far].id), self._deliver, far, data)
            for event in core.events():
                if isinstance(event, Dial):
                    self._dial(gid, event)
                elif isinstance(event, LinkDown):
                    self._hang_up(core, event.link)
        t = core.get_timer()
        if t is not None and t < self._timer_at.get(core, float("inf")):
            self._timer_at[core] = t
            self.at(t, self._fire, core, t)

    def _fire(self, core: Gateway, t: float) -> None:
        if self._timer_at.get(core) != t or not self.alive(core):
            return
        del self._timer_at[core]
        self.enter(core.id)
        core.handle_timer(self.now)
        self._pump(core)

    def _deliver(self, link: Link, data: bytes) -> None:
        core = self.owner[link]
        if not self.alive(core) or link.gone:
            return
        self.enter(core.id)
        core.receive_data(link, data, self.now)
        self._pump(core)

    def _dial(self, gid: str, dial: Dial) -> None:
        """A connect takes one round trip; a dead or unknown peer refuses it."""
        rtt = 2 * self.delay(gid, dial.peer_id)
        self.at(self.now + rtt, self._connect, self.cores[gid], dial.peer_id)

    def _connect(self, core: Gateway, peer_id: str) -> None:
        if not self.alive(core):
            return
        gid = core.id
        self.enter(gid)
        target = self.cores.get(peer_id)
        if target is None or peer_id in self.dead:
            core.dial_failed(peer_id, f"connect {peer_id}: Connection refused", self.now)
            self._pump(core)
            return
        link = core.connected(peer_id, self.now)
        if link is None:
            self._pump(core)
            return
        self.enter(peer_id)
        far = target.accept(gid, gid, self.now)
        self.join(core, link, target, far)
        self._pump(target)
        self.enter(gid)
        self._pump(core)

    def join(self, a: Gateway, link_a: Link, b: Gateway, link_b: Link) -> None:
        """Pair two links as the two ends of one connection."""
        self.other[link_a], self.other[link_b] = link_b, link_a
        self.owner[link_a], self.owner[link_b] = a, b
        self.all_links += [link_a, link_b]

    def _hang_up(self, core: Gateway, link: Link) -> None:
        """The core closed ``link``: after its last bytes the far end reads EOF, and both ends are gone."""
        far = self.other.pop(link, None)
        t = self.now + (self.delay(core.id, self.owner[far].id) if far is not None else 0.0)
        if far is not None:
            self.other.pop(far, None)
            self.at(t, self._deliver, far, b"")
            self.at(t, self._gone, self.owner[far], far)
        self.at(t, self._gone, core, link)

    def _gone(self, core: Gateway, link: Link) -> None:
        if not self.alive(core):
            return
        self.enter(core.id)
        core.link_gone(link, self.now)
        self._pump(core)

    # ---- scenario steps

    def kill(self, gid: str) -> None:
        """Core ``gid`` dies: every far end sees its connection lost, now."""
        self.dead.add(gid)
        core = self.cores[gid]
        for link in list(core.links):
            far = self.other.pop(link, None)
            if far is not None:
                self.other.pop(far, None)
                fc = self.owner[far]
                if self.alive(fc):
                    self.enter(fc.id)
                    fc.receive_data(far, b"", self.now)
                    fc.link_gone(far, self.now)
                    self._pump(fc)

    def silence(self, gid: str) -> None:
        """Core ``gid`` dies and nobody notices: its far ends hold their links until a hold timer
        or a new connection from its next core says otherwise."""
        self.dead.add(gid)

    def cut(self, a: str, b: str) -> None:
        """Break the connection between ``a`` and ``b`` silently on ``b``'s side: ``a`` sees it lost,
        ``b`` still holds its end (it never noticed: the far end's hold timer or a new dial tells it)."""
        for link in list(self.cores[a].links):
            far = self.other.get(link)
            if far is not None and self.owner[far].id == b:
                del self.other[link], self.other[far]
                self.enter(a)
                self.cores[a].receive_data(link, b"", self.now)
                self.cores[a].link_gone(link, self.now)
                self.pump(a)

    def links_between(self, a: str, b: str) -> list[Link]:
        return [link for link in self.cores[a].links if link.peer is not None and link.peer.config.id == b]


def established(cores: Iterable[Gateway]) -> bool:
    """Every configured peer of every core has an established session."""
    return all(c.established_link(pid) is not None for c in cores for pid in c.peers)


def config_for(gid: str, key: Ed25519PrivateKey, peers: Mapping[str, Ed25519PublicKey], *,
               services: Mapping[str, Iterable[str]] | None = None, passive: Iterable[str] = (), **gateway: Any) -> Config:
    """A gateway's config as a file would give it: ``peers`` by id and public key, ``services`` as
    path -> instance ids (capacity 50, price 1, 1 ms), ``gateway`` keys as keywords."""
    g = GatewayConfig(id=gid, listen=Address("127.0.0.1", 0), key_file=Path(f"{gid}.key"),
                      control_socket=Path(f"{gid}.sock"), **gateway)
    quiet = set(passive)
    peer_cfgs = tuple(PeerConfig(pid, Address("127.0.0.1", 1), pub, public_key_b64(pub), passive=pid in quiet) for pid, pub in peers.items())
    svcs = tuple(ServiceConfig(path, tuple(InstanceConfig(iid, "http://127.0.0.1:1", 50.0, 1.0, 1.0) for iid in iids))
                 for path, iids in (services or {}).items())
    return Config(g, peer_cfgs, svcs, key, Path(f"{gid}.toml"))
