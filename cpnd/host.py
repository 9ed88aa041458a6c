"""What the data plane needs of its daemon, as a Protocol: ``http`` names this, never ``daemon``
(the daemon depends on the data plane, not the other way round)."""

from __future__ import annotations

from typing import Protocol

import trio

from .config import Config
from .metrics import Metrics
from .rib import Rib
from .streams import Mux


class PeerConnection(Protocol):
    """An established peer connection, as the data plane opens and relays streams on it."""

    mux: Mux | None


class DataPlaneHost(Protocol):
    id: str
    config: Config
    rib: Rib
    metrics: Metrics
    nursery: trio.Nursery | None

    def established_conn(self, peer_id: str) -> PeerConnection | None: ...

    def health_changed(self, iid: str, healthy: bool) -> None:
        """An instance's health checks changed their verdict (the core re-advertises it)."""
