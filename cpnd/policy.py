"""Wiring a gateway's config into its RIB's origin validation and per-peer policy (sans-IO).

Kept out of daemon.py so that the daemon only calls these two functions.
"""

from __future__ import annotations

from typing import Any

from .config import Config, PeerConfig
from .crypto import parse_public_key
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .origin import Signer, Trust, Validation
from .rib import Rib
from .seal import Opener, StreamSealer
from .tunnel import SEALED_CAP, ExtHeader
from .wire import ORIGIN_SIG_CAP


def _raw(b64: str) -> bytes:
    return parse_public_key(b64).public_bytes_raw()


def configure_rib(rib: Rib, config: Config) -> None:
    """Give ``rib`` the keys, trust anchors, own certificate and per-peer policy of ``config``
    (at start and on every reload; what the trust store learned from routes is kept)."""
    g = config.gateway
    peer_keys = {p.id: _raw(p.public_key_b64) for p in config.peers}
    anchors = [_raw(a) for a in g.trust_anchors]
    if rib.trust is None or rib.trust.own != ((config.cert.encode(), g.id) if config.cert else None):
        old = rib.trust
        rib.trust = Trust(g.id, peer_keys, anchors, config.cert, accept_unverified=g.accept_unverified_origins)
        if old is not None:
            rib.trust.signing_peers = old.signing_peers
    else:
        rib.trust.peer_keys = peer_keys
        rib.trust.anchors = frozenset(anchors)
        rib.trust.accept_unverified = g.accept_unverified_origins
    if rib.opener is None:  # one sealing key per process: our routes publish it
        rib.opener = Opener(X25519PrivateKey.generate())
    if rib.signer is None or rib.signer.cert != (config.cert.encode() if config.cert else None):
        rib.signer = Signer(g.id, config.key, config.cert, rib.opener.public)
    rib.import_prefixes = {p.id: p.import_prefixes for p in config.peers if p.import_prefixes is not None}
    rib.local_pref = {p.id: p.local_pref for p in config.peers if p.local_pref != 100}


def stream_sealer(rib: Rib, config: Config, agreed_caps: tuple[str, ...], peer: str = "") -> StreamSealer | None:
    """How a new session's tunnel (to ``peer``) seals (tunnel.md, "Sealed streams"); None without
    sealed-streams on both OPENs."""
    if SEALED_CAP not in agreed_caps or rib.opener is None:
        return None

    def key_for(ext: ExtHeader) -> bytes | None:
        if ext.origin == peer:
            return None  # no transit between us: the session's own encryption already ends at the origin
        key = rib.lookup_target(ext.label, ext.origin, ext.instance)
        best = rib.loc.get(key) if key is not None else None
        # Only a key the origin signed and we verified: an unverified one could be a transit's own.
        if best is None or best.route.validation is not Validation.VALID:
            return None
        return best.fresh.seal_key

    return StreamSealer(config.gateway.id, rib.opener, key_for, seal_outbound=config.gateway.seal_streams,
                        counters=rib.counters)


def session_up(rib: Rib, peer: PeerConfig, agreed_caps: tuple[str, ...]) -> dict[str, Any]:
    """Note whether ``peer``'s new session signs; the AdjRibOut options for it."""
    signs = ORIGIN_SIG_CAP in agreed_caps
    if rib.trust is not None:
        (rib.trust.signing_peers.add if signs else rib.trust.signing_peers.discard)(peer.id)
    return {"sig_ok": signs and rib.signer is not None,
            "adjacency": rib.signer.adjacency(peer.id) if signs and rib.signer is not None else None,
            "export_prefixes": peer.export_prefixes}
