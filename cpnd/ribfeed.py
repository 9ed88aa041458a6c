"""The channel between the control process and one worker (``[gateway] workers = N``),
sans-IO: its framing, and the worker's mirror of the control's Loc-RIB (a snapshot, then deltas).

One unix stream socket per worker carries, both ways, tunnel frames exactly as a peer session's
records would (protocol-spec/tunnel.md: the worker is the opener of the streams it sends towards
peers, the control process of the streams it hands the worker for our instances), and from the
control process to the worker the routes learnt from peers. Both ends are processes of one gateway
started from one file: this is not protocol, never on a network.

Frame: ``length u32 | kind u8 | payload`` (length counts kind and payload). Nothing here imports trio.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import msgpack

from .origin import Validation
from .rib import Best, BestReason, Key, Rib, Route
from .wire import RouteAdv, _decode_route, _route_dict

TUNNEL = 1  # one tunnel frame (tunnel.md), either way
RIB = 2  # one feed message (msgpack), control -> worker
SIBLINGS = 3  # the other workers' sends per instance over their last second (msgpack), control -> worker

SIBLING_KEYS = 1024  # instances per SIBLINGS message, the busiest
MAX_FRAME = 1 << 20  # a feed message of FEED_BATCH routes with certificates fits; more is a bug: the channel ends
FEED_BATCH = 256  # Loc-RIB entries per feed message: the worker applies one between users' requests
_HEAD = struct.Struct(">IB")


class ChannelError(ValueError):
    """The other end sent what no process of ours sends: the channel is given up."""


def encode(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload) + 1, kind) + payload


class Deframer:
    """Frames out of the byte stream, each checked against MAX_FRAME as soon as its head is in."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out, pos, buf = [], 0, self._buf
        while len(buf) - pos >= _HEAD.size:
            length, kind = _HEAD.unpack_from(buf, pos)
            if not 1 <= length <= MAX_FRAME or kind not in (TUNNEL, RIB, SIBLINGS):
                raise ChannelError(f"bad channel frame (length {length}, kind {kind})")
            if len(buf) - pos < 4 + length:
                break
            out.append((kind, bytes(buf[pos + 5:pos + 4 + length])))
            pos += 4 + length
        del buf[:pos]
        return out


# ---------------------------------------------------------------- the control's side


class FeedOut:
    """What one worker still has to be told of the Loc-RIB: a set of keys (a key changed twice is
    sent once, as it is then), so the backlog is bounded by the RIB itself whatever the worker's pace."""

    def __init__(self) -> None:
        self.dirty: set[Key] = set()
        self.meta: Any = None  # (egress µs, transit µs, peers) as last sent
        self.fresh = True  # nothing sent yet: the first messages are the snapshot

    def mark(self, keys: Iterable[Key]) -> None:
        self.dirty.update(keys)

    def pending(self, rib: Rib, peers: Mapping[str, bool]) -> bool:
        return self.fresh or bool(self.dirty) or self.meta != (rib.egress_us, rib.transit_us, dict(peers))

    def take(self, rib: Rib, peers: Mapping[str, bool], now: float, *, xk: bytes | None = None) -> bytes | None:
        """The next feed message (a framed RIB message), or None when the worker is up to date.
        ``peers``: the peers with an established session, and whether it takes sealed streams;
        ``xk``: the gateway's sealing private key, sent with the snapshot (a worker that accepts a
        peer's data channel opens the sealed streams on it: tunnel.md, "Sealed streams")."""
        if not self.pending(rib, peers):
            return None
        if self.fresh:
            self.dirty |= set(rib.loc)
        msg: dict[str, Any] = {"eg": rib.egress_us, "tr": rib.transit_us, "peers": dict(peers), "set": [], "del": []}
        if self.fresh and xk is not None:
            msg["xk"] = xk
        self.fresh = False
        self.meta = (rib.egress_us, rib.transit_us, dict(peers))
        for _ in range(min(FEED_BATCH, len(self.dirty))):
            key = self.dirty.pop()
            best = rib.loc.get(key)
            if best is None:
                msg["del"].append(list(key))
            else:  # ours too: a worker skips those of its own config, and reaches the others (registered) through us
                msg["set"].append(entry(best, now))
        msg["synced"] = not self.dirty  # the worker is up to date as of now (at start: it holds the snapshot)
        return encode(RIB, msgpack.packb(msg, use_bin_type=True))


def add_sends(reports: Iterable[Mapping[Key, int]]) -> dict[Key, int]:
    """Workers' last-second sends per instance (from their reports), added up."""
    total: dict[Key, int] = {}
    for sends in reports:
        for key, n in sends.items():
            total[key] = total.get(key, 0) + n
    return total


def siblings_message(reports: Iterable[Mapping[Key, int]]) -> bytes:
    """For one worker: the other workers' last-second sends per instance, added up (their reports);
    the busiest SIBLING_KEYS instances (a key is at most ~400 bytes: well under MAX_FRAME)."""
    total = sorted(add_sends(reports).items(), key=lambda kv: -kv[1])[:SIBLING_KEYS]
    return encode(SIBLINGS, msgpack.packb([[*k, n] for k, n in total], use_bin_type=True))


def relay_total(total: Mapping[Key, int], own_max: int) -> dict[Key, int]:
    """Every worker's sends (``add_sends``) as relayed once an interval (``others_message`` takes each
    one's share): only the busiest SIBLING_KEYS + ``own_max`` (a report's most), among which each
    worker's busiest SIBLING_KEYS of the others are (its own, subtracted, lower at most ``own_max``)."""
    if len(total) > SIBLING_KEYS + own_max:
        return dict(heapq.nlargest(SIBLING_KEYS + own_max, total.items(), key=lambda kv: kv[1]))
    return dict(total)


def others_message(total: Mapping[Key, int], own: Mapping[Key, int]) -> bytes:
    """For one worker: the others' sends, ``total`` (relay_total) less its ``own`` report's."""
    return siblings_message([{k: n - own.get(k, 0) for k, n in total.items() if n > own.get(k, 0)}])


def read_siblings(payload: bytes) -> dict[Key, int]:
    """A SIBLINGS message's counts; ChannelError if malformed."""
    try:
        return {(str(a), str(b), str(c)): int(n) for a, b, c, n in msgpack.unpackb(payload, raw=False)[:SIBLING_KEYS]}
    except Exception as exc:  # noqa: BLE001 - any shape error is the same error
        raise ChannelError(f"bad siblings message: {exc!r}") from None


def entry(best: Best, now: float) -> list[Any]:
    r = best.route
    fresh = None if best.fresh is r.adv else _route_dict(best.fresh)
    return [_route_dict(r.adv), r.peer, r.stale, r.validation.value, r.pref, best.latency_us, fresh,
            best.reason.value, max(0.0, now - best.fresh_at)]


# ---------------------------------------------------------------- the worker's side


@attrs.define
class Mirror:
    """A worker's view of the control's Loc-RIB beyond its own instances."""

    peers: dict[str, bool] = attrs.field(factory=dict)  # established peers -> takes sealed streams
    received: int = 0  # entries applied (set and del), for status and tests
    synced: bool = False  # the whole snapshot came (a worker serves users only from then on)
    xk: bytes | None = None  # the gateway's sealing private key, from the snapshot
    # The control's routes for keys this worker serves from its own config, kept aside: a reload
    # that drops one from the config shows the control's (a registered instance of that id) at once.
    shadowed: dict[Key, Best] = attrs.field(factory=dict)

    def apply(self, rib: Rib, payload: bytes, now: float) -> set[Key]:
        """Apply one feed message to ``rib``; the keys that changed. ChannelError if malformed.

        A route of the control process's own (peer None) that the worker's config does not have
        (an instance registered at run time) is kept with our own id as its peer: the worker
        reaches it through the control process (worker.WorkerGateway.established_conn)."""
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_bin_len=MAX_FRAME)
            rib.egress_us, rib.transit_us = int(msg["eg"]), int(msg["tr"])
            self.peers = {str(k): bool(v) for k, v in msg["peers"].items()}
            if "xk" in msg:
                self.xk = bytes(msg["xk"])
            changed: set[Key] = set()
            for e in msg["set"]:
                best = _best(e, now, rib.local_id)
                key = best.route.adv.key
                if key in rib.local:  # ours are served from our own config and health
                    self.shadowed[key] = best
                else:
                    rib.put(key, best)
                    changed.add(key)
            for svc, origin, inst in msg["del"]:
                key = (str(svc), str(origin), str(inst))
                self.shadowed.pop(key, None)
                if key not in rib.local and key in rib.loc:
                    rib.put(key, None)
                    changed.add(key)
        except ChannelError:
            raise
        except Exception as exc:  # noqa: BLE001 - any shape error is the same error
            raise ChannelError(f"bad feed message: {exc!r}") from None
        self.received += len(msg["set"]) + len(msg["del"])
        self.synced = self.synced or bool(msg.get("synced"))
        return changed

    def unshadow(self, rib: Rib) -> set[Key]:
        """After the worker's own instances changed (a reload): the control's routes for keys it no
        longer serves itself go into ``rib``; the keys put."""
        keys = {k for k in self.shadowed if k not in rib.local}
        for key in keys:
            rib.put(key, self.shadowed.pop(key))
        return keys


def _best(e: list[Any], now: float, own_id: str) -> Best:
    adv, peer, stale, validation, pref, latency_us, fresh, reason, age = e
    route_adv: RouteAdv = _decode_route(adv)
    route = Route(route_adv, own_id if peer is None else str(peer), now - float(age), stale=bool(stale), validation=Validation(validation), pref=int(pref))
    return Best(route, int(latency_us), route_adv if fresh is None else _decode_route(fresh), BestReason(reason),
                now - float(age))
