"""Both ends of the channel between the control process and one worker (cpnd/ribfeed.py has its
framing and the RIB feed): tunnel streams handed over both ways, and the Loc-RIB fed to the worker.

A worker's request for a peer's instance goes as a tunnel stream on this channel to the control
process, which relays it onto its session with the next hop as a transit does (cpnd/transit.py);
a peer's stream for one of our instances goes the other way, from the control process to a worker,
which calls the instance within its share of the instance's bounds (cpnd/fleet.py).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import attrs

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .aio import open_nursery
from .config import SEND_HIGH_WATER
from .errors import ProtocolError
from .origin import Validation
from .rib import Rib
from .ribfeed import RIB, SIBLINGS, TUNNEL, ChannelError, Deframer, encode
from .seal import Opener, SealError, Sealing, StreamSealer
from .streams import BufferAccount, Mux, SealedStream, StreamReset, TunnelStream
from .tunnel import ExtHeader, ResetCode, TunnelLimits, mux_settings
from .wire import MAX_HANDSHAKE_BODY, Hello, decode_handshake

log = logging.getLogger("cpnd.workers")

RECEIVE_CHUNK = 256 * 1024
HIGH_WATER = SEND_HIGH_WATER  # streams wait (wait_writable) while this much is queued (as on a peer connection)
LOW_WATER = 256 * 1024  # the RIB feed sends only below this: routes never crowd out requests


class Channel:
    """One end of a worker's channel: a ``streams.Mux`` runs on it as on a peer connection."""

    def __init__(self, stream: trio.SocketStream, name: str, *, initiator: bool, on_open: Callable[[TunnelStream], None],
                 limits: TunnelLimits, max_buffer: int, account: BufferAccount | None = None,
                 on_rib: Callable[[bytes], None] | None = None,
                 on_siblings: Callable[[bytes], None] | None = None) -> None:
        self.stream = stream
        self.name = name
        self.max_buffer = max_buffer
        self.on_rib = on_rib
        self.on_siblings = on_siblings
        # Both ends run from one config: the same windows both ways, large frames, timed LOAD.
        self.mux = Mux(self, name, initiator, on_open, mux_settings(limits, limits, True, timed_load=True), account)
        self.done = trio.Event()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._writable = trio.Event()
        self.drained = trio.Event()  # set whenever the queue is below LOW_WATER

    # ---- what the Mux calls (streams.Connection)

    def send_tunnel(self, frame: bytes, *, flush: bool = False, soon: bool = False) -> None:
        """``flush``/``soon`` (when to write, for a peer connection) do not matter here: the writer takes all."""
        self._enqueue(encode(TUNNEL, frame))

    @property
    def congested(self) -> bool:
        return self._out_bytes > HIGH_WATER

    async def wait_writable(self) -> None:
        while self._out_bytes > HIGH_WATER and not self.done.is_set():
            if self._writable.is_set():  # one event for every waiter (as daemon.Connection's)
                self._writable = trio.Event()
            await self._writable.wait()

    def send_rib(self, data: bytes) -> None:
        self._enqueue(data)

    @property
    def queued(self) -> int:
        return self._out_bytes

    def _enqueue(self, data: bytes) -> None:
        if self.done.is_set():
            return
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_ready.set()
        if self._out_bytes > self.max_buffer:
            self.close(f"{self._out_bytes} bytes queued: the other end does not read")

    def close(self, why: str, *, level: int = logging.WARNING) -> None:
        if not self.done.is_set():
            log.log(level, "channel %s closed: %s", self.name, why)
            self.mux.fail_all(why)
            self.done.set()
            self._writable.set()
            self._out_ready.set()

    # ---- the shell

    async def run(self) -> None:
        """Read and write until either end closes; then every stream on it is failed."""
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                await self.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.close("ended", level=logging.DEBUG)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _reader(self) -> None:
        frames = Deframer()
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.close("the other end is gone", level=logging.INFO)
                return
            try:
                for kind, payload in frames.feed(data):
                    if kind == TUNNEL:
                        self.mux.handle(payload)
                    elif kind == RIB and self.on_rib is not None:
                        self.on_rib(payload)
                    elif kind == SIBLINGS and self.on_siblings is not None:
                        self.on_siblings(payload)
                    else:
                        raise ChannelError("a feed message towards the control process")
            except Exception as exc:  # noqa: BLE001 - ours on both ends: a bug, which costs this channel only
                log.exception("channel %s: bad input", self.name)
                self.close(f"bad input: {exc}")
                return

    async def _writer(self) -> None:
        while True:
            while not self._out:
                self.drained.set()
                self._out_ready = trio.Event()
                await self._out_ready.wait()
                if self.done.is_set():
                    return
            data = b"".join(self._out)
            self._out.clear()
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.close("the other end is gone", level=logging.INFO)
                return
            self._out_bytes -= len(data)
            if self._out_bytes <= LOW_WATER:
                self._writable.set()
                self.drained.set()
                if self.mux.drain_waiters:  # transit relays that found the channel congested go on
                    self.mux.drained()


def peek_hello(fd: int) -> tuple[Hello | None, bool]:
    """(the HELLO at the head of a fresh connection, whether the first frame is all there or never
    will be), by MSG_PEEK: nothing is taken from the socket. (None, False): wait for more."""
    with socket.socket(fileno=os.dup(fd)) as s:
        try:
            data = s.recv(4 + MAX_HANDSHAKE_BODY, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None, False
        except OSError:
            return None, True
    if not data:
        return None, True  # closed: the daemon's accept sees it
    length = int.from_bytes(data[:4], "big") if len(data) >= 4 else 0
    if len(data) < 4 or len(data) < 4 + length:
        return None, len(data) >= 4 and length > MAX_HANDSHAKE_BODY  # too long for a HELLO: not ours to wait for
    try:
        msg = decode_handshake(data[4:4 + length])
    except ProtocolError:
        return None, True
    return (msg if isinstance(msg, Hello) else None), True


def owner(eph: bytes, request_id: bytes, n: int) -> int:
    """The one worker that may open a sealed stream with ephemeral key ``eph`` and ``request_id``: every
    process of a gateway holds its sealing key, but a replay window is per process, so each pair has
    one process (a recorded stream replayed through another session or data channel meets the same
    window). By the pair, not the key alone: an ingress's epoch shares its key over many streams,
    which spread over the workers (each keeps its own secret of the key)."""
    return int.from_bytes(hashlib.sha256(eph + request_id).digest()[:4], "big") % n


class PartSealer(StreamSealer):
    """A StreamSealer that opens only the sealed streams ``mine`` says are this process's (the rest
    are delivered as they came, still sealed, to be passed to their owner); the key read when needed
    (a worker has it from the RIB snapshot)."""

    def __init__(self, base: StreamSealer, opener: Callable[[], Opener | None], mine: Callable[[ExtHeader], bool]) -> None:
        super().__init__(base.local_id, base.opener, base.key_for, seal_outbound=base.seal_outbound, counters=base.counters,
                         ephemerals=base.ephemerals)
        self._opener, self._mine = opener, mine

    def inbound(self, ext: ExtHeader) -> Sealing | None:
        if ext.eph is None or ext.origin != self.local_id or not self._mine(ext):
            return None
        opener = self._opener()
        if opener is None:
            raise SealError("no sealing key here yet")
        self.opener = opener
        return super().inbound(ext)


def worker_sealer(local_id: str, rib: Rib, peers: Callable[[], dict[str, bool]], seal: bool) -> StreamSealer:
    """How a worker seals the streams it sends through the control process (tunnel.md, "Sealed
    streams"): as the control process would on the session with the route's next hop."""

    def key_for(ext: ExtHeader) -> bytes | None:
        key = rib.lookup_target(ext.label, ext.origin, ext.instance)
        best = rib.loc.get(key) if key is not None else None
        if best is None or best.route.peer is None or best.route.peer == ext.origin:
            return None  # no transit between the control process and the origin: the session's encryption is enough
        if not peers().get(best.route.peer) or best.route.validation is not Validation.VALID:
            return None  # that session does not take sealed streams; a key we did not verify
        return best.fresh.seal_key

    # The opener is a placeholder until the snapshot brings the gateway's (PartSealer reads rib.opener).
    return StreamSealer(local_id, Opener(X25519PrivateKey.generate()), key_for, seal_outbound=seal, counters=rib.counters)


def relay_sealer(local_id: str, opener: Opener, mine: Callable[[ExtHeader], bool]) -> StreamSealer:
    """The control's side of a channel: what a worker sends on is relayed as it comes; a sealed stream
    for one of our instances is opened here only if ``mine`` (a registered instance: this process's)."""
    return PartSealer(StreamSealer(local_id, opener, lambda ext: None, seal_outbound=False), lambda: opener, mine)


def still_sealed(stream: Any) -> bool:
    """A sealed stream this process did not open (it goes on as it came, to its owner)."""
    return stream.ext is not None and stream.ext.eph is not None and not isinstance(stream, SealedStream)


async def pass_on(plane: Any, stream: TunnelStream, mux: Mux, idle_s: float, what: str) -> None:
    """Relay ``stream`` onto a new stream on ``mux`` (opened here if it was sealed to us: it goes on
    plain; else as it came), counted in ``plane`` (its drain waits for it); nothing that goes wrong escapes."""
    plane.begin()
    try:
        ext = stream.ext
        assert ext is not None
        try:
            out = mux.open(ext if still_sealed(stream) else attrs.evolve(ext, eph=None))
        except StreamReset as exc:
            stream.reset(ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL,
                         False, exc.text)
            return
        await hand_over(stream, out, idle_s)
    except Exception:  # a bug must cost one request, never the process
        log.exception("passing a stream on to %s failed", what)
        stream.reset(ResetCode.INTERNAL, True, "internal error")
    finally:
        if not stream.closed:
            stream.reset(ResetCode.CANCEL, True, "done with the stream")
        plane.end()


async def hand_over(inbound: TunnelStream, outbound: TunnelStream, idle_s: float) -> None:
    """Relay one stream from a peer to a worker (control process): bytes both ways, RESETs passed on,
    the worker's LOAD frames passed back; neither side moving for ``idle_s`` ends it."""
    outbound.relay_to = inbound
    async with open_nursery() as nursery:
        nursery.cancel_scope.deadline = trio.current_time() + idle_s
        nursery.start_soon(_pump, inbound, outbound, nursery.cancel_scope, idle_s)
        nursery.start_soon(_pump, outbound, inbound, nursery.cancel_scope, idle_s)
    for end in (inbound, outbound):
        if not end.closed:
            end.reset(ResetCode.CANCEL, True, f"hand-over idle for {idle_s:g} s")


async def _pump(src: TunnelStream, dst: TunnelStream, scope: trio.CancelScope, idle_s: float) -> None:
    try:
        while True:
            data = await src.receive()
            if not data:
                await dst.send(b"", end=True)
                return
            await dst.send(data)
            now = trio.current_time()
            if scope.deadline - now < idle_s - 1.0:
                scope.deadline = now + idle_s
    except StreamReset as exc:
        code = ResetCode(exc.code) if exc.code in ResetCode._value2member_map_ else ResetCode.INTERNAL
        for end in (src, dst):
            end.reset(code, exc.delivered, exc.text)
        scope.cancel()
