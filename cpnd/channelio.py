"""The trio shell of a worker's data channels (cpnd/channels.py): each a daemon.Connection with a
``streams.Mux`` on it, as a peer session is in the control process, so a worker's tunnel streams go
to the peer directly. Until a peer's data channel is up (or when the peer refuses one), the worker's
streams go through the control process instead (cpnd/handoff.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from .channels import DataChannels
from .config import Config
from .daemon import Connection, CoreShell
from .gateway import Dial, Link, LinkDown, LinkUp, TunnelData
from .handoff import PartSealer
from .fleet import int_share
from .policy import stream_sealer
from .rib import Rib
from .streams import BufferAccount, Mux, TunnelStream
from .tunnel import LARGE_DATA_CAP, ResetCode, mux_settings
from .wire import GATEWAY_TIME_CAP

log = logging.getLogger("cpnd.worker")


def _refuse(stream: TunnelStream) -> None:
    """A stream the peer opened on a data channel: only the worker opens streams there (session.md)."""
    stream.reset(ResetCode.REFUSED, False, "streams are opened only by a data channel's initiator")


class ChannelIO(CoreShell):
    """What daemon.Connection needs of its daemon (``core``, ``config``, ``paused``, ``held``, ``pump``,
    ``flush_held``, ``_connection_gone``), for data channels: the shell loop is daemon.CoreShell's."""

    CONNECTION = "data channel"
    _where = " on a data channel"

    def __init__(self, config: Config, rib: Rib, *, n: int = 1, on_stream: Callable[[TunnelStream], None] | None = None,
                 owns: Callable[[Any], bool] | None = None) -> None:
        g = config.gateway
        # This worker's share of what a peer may open here (session.md, "Data channels"), as with every bound.
        self.core = DataChannels(config, inbound_limit=int_share(g.max_data_channels_per_peer, n),
                                 pending_limit=int_share(g.max_preauth_connections, n))
        self.on_stream = on_stream or _refuse  # streams a peer opens on its data channel to us
        self.owns = owns  # which sealed streams to us this worker opens (the others go on to their owner)
        self.config = config
        self.rib = rib
        self.conns: dict[Link, Connection] = {}
        self.paused: set[Connection] = set()
        self.held: set[Connection] = set()  # connections with bytes queued but not yet written (flush_held)
        self.tunnel_bytes = BufferAccount()
        self.nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._pumping = False

    def want(self, peers: Any) -> None:
        """The peers with a session at the control process now: a data channel to each."""
        self.core.want(peers, trio.current_time())
        if self.nursery is not None:  # else the run loop's first round dials them
            self.pump()

    def conn(self, peer: str) -> Connection | None:
        """The established data channel to ``peer`` with its Mux, if any."""
        link = self.core.up(peer)
        conn = self.conns.get(link) if link is not None else None
        return conn if conn is not None and conn.mux is not None and not conn._done.is_set() else None

    def accept(self, sock: socket.socket) -> None:
        """A peer's data channel the control process handed us (its HELLO still unread): run it."""
        assert self.nursery is not None
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            sock.close()
            return
        link = self.core.accept(f"{host}:{port}", trio.current_time())
        conn = self.conns[link] = Connection(self, stream, link)  # type: ignore[arg-type]
        self.nursery.start_soon(self._run_connection, conn)
        self.pump()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self._timer_loop()

    def _on_event(self, event: object) -> None:
        if isinstance(event, TunnelData):
            self._tunnel_data(event)
        elif isinstance(event, LinkUp):
            conn = self.conns.get(event.link)
            s = event.link.session
            if conn is not None and s.tunnel_enabled and s.peer_id is not None:
                ours = s.config.tunnel
                assert ours is not None
                settings = mux_settings(ours, s.peer_tunnel, LARGE_DATA_CAP in s.agreed_caps,
                                        timed_load=GATEWAY_TIME_CAP in s.agreed_caps)
                # Ours carry our streams only; a peer's carry its streams, served here as the control process would.
                on_open = _refuse if event.link.initiated else self.on_stream
                conn.mux = Mux(conn, s.peer_id, event.link.initiated, on_open, settings, self.tunnel_bytes)
                sealer = stream_sealer(self.rib, self.config, s.agreed_caps, s.peer_id)
                if sealer is not None and self.owns is not None:
                    sealer = PartSealer(sealer, lambda: self.rib.opener, self.owns)
                conn.mux.sealer = sealer
                s.tunnel_direct = True  # its records go straight to the Mux from now on (CoreShell.received)
        elif isinstance(event, LinkDown):
            conn = self.conns.get(event.link)
            if conn is not None:
                conn.down()
        elif isinstance(event, Dial):
            assert self.nursery is not None
            self.nursery.start_soon(self._dial, event)

