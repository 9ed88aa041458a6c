"""The status snapshot (sans-IO records): what ``cpnctl show`` and the metrics endpoint read.

The daemon builds one from its core and data plane on request; ``control.py`` and ``metrics.py``
read only this, never the daemon's internals.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class PeerStatus:
    """One configured peer as ``show peers --json`` shows it (the field order is the JSON's)."""

    id: str
    address: str
    state: str
    uptime_s: float
    rtt_ms: float | None
    routes_received: int
    link_cost_ms: float | None
    flaps: int
    last_error: str
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    caps: list[str]  # what both OPENs offered: the features this session actually uses
    # Route limits (routing.md): what the peer takes from us, what its limit makes us
    # withhold now, and whether we are pacing what it sends (its bytes wait unread).
    peer_limits: dict[str, int] | None
    routes_sent: int
    routes_withheld: int
    route_entries_in: int
    inbound_paced: bool
    # Policy (routing.md, "Policy") and what origin validation dropped from this peer.
    import_: list[str] | None = None  # "import" in JSON
    export: list[str] | None = None
    local_pref: int = 100
    routes_invalid: int = 0
    routes_filtered: int = 0
    last_invalid: str = ""
    # Tunnel records on its session: frames both ways, and the batch records (content type 3) among them.
    tunnel_frames_in: int = 0
    tunnel_frames_out: int = 0
    batches_in: int = 0
    batches_out: int = 0


@attrs.frozen
class InstanceStatus:
    """One of our own instances as the data plane measures it now."""

    service: str
    instance: str
    url: str
    healthy: bool
    load: float
    bounded_load: float
    compute_latency_ms: float
    capacity: float
    price: float
    inflight: int
    refused: int


@attrs.frozen
class Status:
    """One gateway at one moment: peers, routes, own instances, counters and gauges."""

    id: str
    uptime_s: float
    ports: dict[str, int | None]  # listen, http_listen, metrics_listen as bound (a config may say 0)
    peers: tuple[PeerStatus, ...]
    routes: int  # Loc-RIB entries
    paths: int  # paths held, own instances included
    services: int
    instances: tuple[InstanceStatus, ...]
    gauges: dict[str, int]  # routes_withheld, tunnel_streams, http clients, pre-auth, pooled connections
    session_totals: dict[str, int]  # every link's session counters added up (bytes, frames in and out)
    stats: dict[str, int]  # the gateway's counters since start
    http: dict[str, int]  # the data plane's counters since start
    times: dict[str, float]  # own processing per stage, as measured and as advertised (ms)
    clients: dict[str, dict[str, int]] = attrs.field(factory=dict)  # [[clients]] id -> allowed, forbidden, rate_limited
    client_totals: dict[str, int] = attrs.field(factory=dict)  # unauthorized, source_blocked
    registered_instances: int = 0
    workers: list[dict[str, Any]] = attrs.field(factory=list)  # the processes serving users (README, "Workers")

    @property
    def peers_established(self) -> int:
        return sum(1 for p in self.peers if p.state == "established")

    def peer_json(self) -> list[dict[str, Any]]:
        return [{("import" if k == "import_" else k): v for k, v in attrs.asdict(p).items()} for p in self.peers]
