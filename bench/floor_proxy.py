"""The floor of cpnd's stack: the least a trio + h11 reverse proxy can do per request.

    python bench/floor_proxy.py LISTEN_PORT UPSTREAM_PORT [CLIENT_DELAY_MS UPSTREAM_DELAY_MS]

Chained (a floor whose upstream is another floor), it is the yardstick for a path through
as many proxies as cpnd's path has gateways.

One task per client connection and one upstream connection per client; each request is
parsed with h11, re-serialised upstream, and the response parsed and re-serialised back,
streamed as it comes. No routing, no tunnel, no encryption, no limits, no error handling
beyond closing: not a product, a yardstick. ``bench/dataplane.py`` runs it beside nginx,
HAProxy and cpnd, so what cpnd costs over what CPython + trio + h11 must cost is measured,
not guessed.

The optional delays emulate a link as cpnd's `emulated_rtt_ms` does (bench/paper.py's floor
path): what is read from the client, or from the upstream, is held that long from its arrival.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpnd.aio import sleep_until_precisely  # noqa: E402
from cpnd.probe import instruments  # noqa: E402  (CPN_PROBE: the same counters as cpnd's, for the breakdown)

CHUNK = 65536


async def _next(conn: h11.Connection, stream: trio.SocketStream, delay_s: float = 0.0) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(CHUNK)
        if delay_s:
            await sleep_until_precisely(trio.current_time() + delay_s)
        conn.receive_data(data)


async def _handle(client: trio.SocketStream, upstream_port: int, cd: float = 0.0, ud: float = 0.0) -> None:
    up = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    c, u = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    async with client, up:
        while True:
            req = await _next(c, client, cd)
            if not isinstance(req, h11.Request):
                return
            out = [u.send(h11.Request(method=req.method, target=req.target, headers=req.headers))]
            while not isinstance(ev := await _next(c, client, cd), h11.EndOfMessage):
                out.append(u.send(ev))
            out.append(u.send(ev))
            await up.send_all(b"".join(out))
            resp = await _next(u, up, ud)
            out = [c.send(h11.Response(status_code=resp.status_code, reason=resp.reason, headers=resp.headers))]
            while True:
                ev = await _next(u, up, ud)
                out.append(c.send(ev))
                if isinstance(ev, h11.EndOfMessage) or sum(map(len, out)) >= CHUNK:
                    await client.send_all(b"".join(out))
                    out = []
                if isinstance(ev, h11.EndOfMessage):
                    break
            if c.our_state is not h11.DONE or u.our_state is not h11.DONE:
                return
            c.start_next_cycle()
            u.start_next_cycle()


async def _guarded(client: trio.SocketStream, upstream_port: int, cd: float, ud: float) -> None:
    try:
        await _handle(client, upstream_port, cd, ud)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass


async def serve(port: int, upstream_port: int, client_delay_ms: float = 0.0, upstream_delay_ms: float = 0.0) -> None:
    cd, ud = client_delay_ms / 1000, upstream_delay_ms / 1000
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    if not port:  # the OS chose: say which (one line on stdout)
        print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(lambda s: _guarded(s, upstream_port, cd, ud), listeners)


if __name__ == "__main__":
    trio.run(serve, int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:5]), instruments=instruments())
