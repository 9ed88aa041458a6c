"""A worker's data channels (sans-IO): one data-only session to each peer whose session the
control process has established (protocol-spec/session.md, "Data channels"), so that the worker's
tunnel streams go to the peer directly, not through the control process; and the peers' data
channels the control process handed to this worker (their connection's socket, before the
handshake), which it accepts as the responder.

The same face as the gateway core for daemon.Connection (``receive_data``, ``send_tunnel``,
``close``, ``data_to_send``, events ``Dial``/``LinkUp``/``TunnelData``/``LinkDown``), without routes:
a data channel never carries an UPDATE. Nothing here imports trio.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Iterable, Iterator

import attrs

from .config import Config, PeerConfig
from .crypto import Role
from .errors import CeaseSub, Code, FsmSub
from .gateway import Dial, Event, Link, LinkDown, LinkUp, TunnelData, session_config
from .session import (
    TUNNEL_CAP,
    Authenticated,
    Backoff,
    Closed,
    CloseReason,
    Established,
    Session,
    SessionConfig,
    State,
    TunnelFrame,
    UpdateReceived,
)
from .tunnel import LARGE_DATA_CAP, SEALED_CAP, TUNNEL_BATCH_CAP
from .wire import GATEWAY_TIME_CAP

log = logging.getLogger("cpnd.worker")

# What a data channel offers in its OPEN: the tunnel's capabilities (tunnel-window comes with the limits).
CHANNEL_CAPS = (TUNNEL_CAP, LARGE_DATA_CAP, GATEWAY_TIME_CAP, SEALED_CAP, TUNNEL_BATCH_CAP)


@attrs.define(eq=False)
class ChannelPeer:
    """One configured peer as a worker's data channels see it (``config`` as daemon.Connection reads it)."""

    config: PeerConfig
    backoff: Backoff
    link: Link | None = None
    dial_at: float | None = None
    dialling: bool = False
    refused: int = 0  # channels it refused (an older gateway, its limit): the worker relays meanwhile
    inbound: dict[Link, None] = attrs.field(factory=dict)  # its data channels handed to us, authenticated


def channel_session_config(config: Config) -> SessionConfig:
    caps = CHANNEL_CAPS if config.gateway.tunnel_batch else tuple(c for c in CHANNEL_CAPS if c != TUNNEL_BATCH_CAP)
    return attrs.evolve(session_config(config), caps=caps, restart_ms=0)


class DataChannels:
    """Data channels to the peers the control process has a session with (``want``), redialled with backoff."""

    def __init__(self, config: Config, rng: random.Random | None = None, *, inbound_limit: int = 1,
                 pending_limit: int = 16) -> None:
        self.config = config
        self.id = config.gateway.id
        self.session_config = channel_session_config(config)
        self.peer_keys = {p.id: p.public_key for p in config.peers}
        self.rng = rng or random.Random()
        self.peers = {p.id: self._peer(p) for p in config.peers}
        self.wanted: set[str] = set()
        self.links: dict[Link, None] = {}
        self.inbound_limit = inbound_limit  # per peer: this worker's share of max_data_channels_per_peer
        self.pending_limit = pending_limit  # handed to us and still in their handshake
        self.pending: dict[Link, None] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.timer_dirty = True
        self._events: collections.deque[Event] = collections.deque()
        self._sending: dict[Link, None] = {}
        self._now = 0.0

    # ---- what the worker drives

    def want(self, peers: Iterable[str], now: float) -> None:
        """The peers whose session is up now (the control's feed): a channel to each, none to others."""
        self._now = now
        self.wanted = {p for p in peers if p in self.peers}
        for pid, cp in self.peers.items():
            if pid not in self.wanted:
                cp.dial_at = None
                if cp.link is not None and cp.link.session.state is not State.CLOSED:
                    self.close(cp.link, Code.CEASE, CeaseSub.ADMIN_RESET, "the session it went beside has ended")
                for link in list(cp.inbound):
                    self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "its session ended")
            elif cp.link is None and cp.dial_at is None and not cp.dialling:
                cp.dial_at = now
                self.timer_dirty = True

    def reconfigure(self, config: Config) -> None:
        """A reload: new peers get channels once wanted; a peer removed or changed (its address, its
        key) loses the ones it has (they were made with what no longer holds)."""
        self.config = config
        self.session_config = channel_session_config(config)
        self.peer_keys.clear()
        self.peer_keys.update({p.id: p.public_key for p in config.peers})
        wanted = {p.id: p for p in config.peers}
        for pid, cp in list(self.peers.items()):
            if wanted.get(pid) != cp.config:
                for link in [cp.link, *cp.inbound]:
                    if link is not None and link.session.state is not State.CLOSED:
                        self.close(link, Code.CEASE, CeaseSub.CONFIG_CHANGE, "peer settings changed")
                if pid not in wanted:
                    del self.peers[pid]
                    self.wanted.discard(pid)
                else:
                    cp.config = wanted[pid]
        for pid, p in wanted.items():
            self.peers.setdefault(pid, self._peer(p))
        self.timer_dirty = True

    def _peer(self, p: PeerConfig) -> ChannelPeer:
        g = self.config.gateway
        return ChannelPeer(p, Backoff(base=g.connect_retry_min_ms / 1000, cap=g.connect_retry_max_ms / 1000,
                                      rng=random.Random(self.rng.getrandbits(64))))

    def up(self, peer_id: str) -> Link | None:
        """The established data channel to ``peer_id``, if any."""
        cp = self.peers.get(peer_id)
        link = cp.link if cp is not None else None
        return link if link is not None and link.established else None

    # ---- the core's face

    def handle_timer(self, now: float) -> None:
        self._now = now
        for pid, cp in self.peers.items():
            if cp.dial_at is not None and cp.dial_at <= now and cp.link is None and not cp.dialling and pid in self.wanted:
                cp.dial_at, cp.dialling = None, True
                self._events.append(Dial(pid, cp.config.address, self.session_config.handshake_timeout_s))
        for link in list(self.links):
            at = link.session.get_timer()
            if at is not None and at <= now:
                link.session.handle_timer(now)
                self._process(link)

    def get_timer(self) -> float | None:
        at = [cp.dial_at for pid, cp in self.peers.items() if cp.dial_at is not None and pid in self.wanted]
        at += [t for link in self.links if (t := link.session.get_timer()) is not None]
        return min(at) if at else None

    def connected(self, peer_id: str, now: float) -> Link | None:
        """The dial succeeded: its link (None: no longer wanted, the shell hangs up)."""
        self._now = now
        cp = self.peers.get(peer_id)
        if cp is None:
            return None
        cp.dialling = False
        if peer_id not in self.wanted or cp.link is not None:
            return None
        session = Session(Role.INITIATOR, self.id, self.config.key, self.peer_keys, now, expected_peer=peer_id,
                          config=self.session_config, data_channel=True)
        link = Link(session, initiated=True, remote=str(cp.config.address))
        link.peer = cp  # type: ignore[assignment]  # what the shell reads of it: config
        cp.link = link
        self.links[link] = None
        self.timer_dirty = True
        self._process(link)
        return link

    def accept(self, remote: str, now: float) -> Link:
        """A peer's connection the control process handed us (its HELLO said `dc`): we are the responder."""
        self._now = now
        session = Session(Role.RESPONDER, self.id, self.config.key, self.peer_keys, now, config=self.session_config)
        link = Link(session, initiated=False, remote=remote)
        self.links[link] = None
        self.pending[link] = None
        self.timer_dirty = True
        if len(self.pending) > self.pending_limit:  # the oldest still in its handshake makes room
            oldest = next(iter(self.pending))
            self.stats["data_channels_pending_evicted"] += 1
            self.close(oldest, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "too many handshakes in progress")
        self._process(link)
        return link

    def dial_failed(self, peer_id: str, error: str, now: float) -> None:
        self._now = now
        cp = self.peers.get(peer_id)
        if cp is None:
            return
        cp.dialling = False
        if peer_id in self.wanted:
            cp.dial_at = now + cp.backoff.next_delay()
            self.timer_dirty = True

    def receive_data(self, link: Link, data: bytes, now: float) -> None:
        self._now = now
        link.session.receive_data(data, now)
        self._process(link)

    def wants_data(self, link: Link) -> bool:
        return link.session.wants_data()

    def send_tunnel(self, link: Link, frame: bytes, soon: bool = False) -> bytes:
        if link.session.state is State.CLOSED:
            return b""
        self._sending.pop(link, None)
        return link.session.tunnel_record(frame, soon)

    def release_tunnel(self, link: Link) -> bytes:
        self._sending.pop(link, None)
        return link.session.release_soon()

    def close(self, link: Link, code: int, subcode: int, text: str) -> None:
        link.session.close(code, subcode, text)
        self._process(link)

    def link_gone(self, link: Link, now: float) -> None:
        """The shell hung up ``link``: dial again (with backoff) while its peer is wanted."""
        self._now = now
        if link.session.state is not State.CLOSED:
            link.session.receive_data(b"", now)
            self._process(link)
        self.links.pop(link, None)
        self._sending.pop(link, None)
        self.pending.pop(link, None)
        cp = link.peer
        if isinstance(cp, ChannelPeer):
            cp.inbound.pop(link, None)
        if isinstance(cp, ChannelPeer) and cp.link is link:
            cp.link = None
            if cp.config.id in self.wanted:
                cp.dial_at = now + cp.backoff.next_delay()
                self.timer_dirty = True

    def data_to_send(self, link: Link) -> bytes:
        self._sending.pop(link, None)
        return link.session.data_to_send()

    def links_with_data(self) -> list[Link]:
        out = list(self._sending)
        self._sending.clear()
        return out

    def has_events(self) -> bool:
        return bool(self._events)

    def events(self) -> Iterator[Event]:
        while self._events:
            yield self._events.popleft()

    # ---- internals

    def _process(self, link: Link) -> None:
        s = link.session
        while (event := s.next_event()) is not None:
            if isinstance(event, TunnelFrame):
                self._events.append(TunnelData(link, event.payload))
            elif isinstance(event, Authenticated):
                self._authenticated(link, event)
            elif isinstance(event, Established):
                # The backoff is reset when the channel ends, unless the peer refused it (_closed).
                self.stats["data_channels_up" if link.initiated else "data_channels_in"] += 1
                self._events.append(LinkUp(link))
                self.timer_dirty = True
            elif isinstance(event, UpdateReceived):
                self.close(link, Code.FSM, FsmSub.UNEXPECTED_IN_ESTABLISHED, "UPDATE on a data channel")
            elif isinstance(event, Closed):
                self._closed(link, event)
        if s.has_data_to_send():
            self._sending[link] = None

    def _authenticated(self, link: Link, event: Authenticated) -> None:
        """A handed connection authenticated: a data channel of a peer whose session the control
        process holds, within this worker's share of the peer's limit (session.md, "Data channels")."""
        self.pending.pop(link, None)
        cp = self.peers.get(event.peer_id)
        if cp is None or link.initiated:
            return
        link.peer = cp  # type: ignore[assignment]
        if not link.session.data_channel:  # the control process saw `dc`, the signed transcript did not
            self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "not a data channel")
        elif event.peer_id not in self.wanted:
            self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, "a data channel needs an established session")
        elif len(cp.inbound) >= self.inbound_limit:
            self.stats["data_channels_refused"] += 1
            self.close(link, Code.CEASE, CeaseSub.CONNECTION_REJECTED, f"at most {self.inbound_limit} data channels here")
        else:
            cp.inbound[link] = None

    def _closed(self, link: Link, event: Closed) -> None:
        self._events.append(LinkDown(link, event))
        self.timer_dirty = True
        # A refusal can come once our handshake is done (after the peer's OPEN): it is one all the
        # same, and the redials back off (each is a handshake's signatures at both ends).
        refused = (event.reason is CloseReason.PEER_NOTIFICATION and event.code == Code.CEASE
                   and event.subcode == CeaseSub.CONNECTION_REJECTED)
        if not link.initiated:
            log.debug("%s: a data channel from %s ended: %s", self.id, link.session.peer_id or link.remote, event.describe())
        elif (link.established or link.session.established_at is not None) and not refused:
            link.peer.backoff.reset()  # type: ignore[union-attr]
            log.info("%s: data channel to %s down: %s", self.id, link.session.peer_id, event.describe())
        else:
            self.stats["data_channels_refused"] += 1
            link.peer.refused += 1  # type: ignore[union-attr]
            log.info("%s: data channel to %s not established: %s", self.id, link.remote, event.describe())
