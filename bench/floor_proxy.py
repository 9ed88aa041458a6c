"""The floor of cpnd's stack: the least a trio + h11 reverse proxy can do per request.

    python bench/floor_proxy.py LISTEN_PORT UPSTREAM_PORT

Chained (a floor whose upstream is another floor), it is the yardstick for a path through
as many proxies as cpnd's path has gateways.

One task per client connection and one upstream connection per client; each request is
parsed with h11, re-serialised upstream, and the response parsed and re-serialised back,
streamed as it comes. No routing, no tunnel, no encryption, no limits, no error handling
beyond closing: not a product, a yardstick. ``bench/dataplane.py`` runs it beside nginx,
HAProxy and cpnd, so what cpnd costs over what CPython + trio + h11 must cost is measured,
not guessed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpnd.probe import instruments  # noqa: E402  (CPN_PROBE: the same counters as cpnd's, for the breakdown)

CHUNK = 65536


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(CHUNK))


async def _handle(client: trio.SocketStream, upstream_port: int) -> None:
    up = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    c, u = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    async with client, up:
        while True:
            req = await _next(c, client)
            if not isinstance(req, h11.Request):
                return
            out = [u.send(h11.Request(method=req.method, target=req.target, headers=req.headers))]
            while not isinstance(ev := await _next(c, client), h11.EndOfMessage):
                out.append(u.send(ev))
            out.append(u.send(ev))
            await up.send_all(b"".join(out))
            resp = await _next(u, up)
            out = [c.send(h11.Response(status_code=resp.status_code, reason=resp.reason, headers=resp.headers))]
            while True:
                ev = await _next(u, up)
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


async def _guarded(client: trio.SocketStream, upstream_port: int) -> None:
    try:
        await _handle(client, upstream_port)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass


async def serve(port: int, upstream_port: int) -> None:
    await trio.serve_tcp(lambda s: _guarded(s, upstream_port), port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(serve, int(sys.argv[1]), int(sys.argv[2]), instruments=instruments())
