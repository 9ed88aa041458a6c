"""A simulated service instance: a real HTTP/1.1 server (trio + h11) for labs and tests.

    python -m cpnd.simulate --id s1 [--host 127.0.0.1] [--port 0] [--compute-ms 1] [--capacity 50]
    python -m cpnd.simulate --instance s1:1:50 --instance s2:3:50 ...   # several, one process
    python -m cpnd.simulate --id s1 --tls-cert s1.crt --tls-key s1.key  # serving https://

Prints ``listening <host>:<port>`` once ready (``listening <host>:<port> <id>`` per instance
with ``--instance``). Every request is answered with JSON
``{"instance": ID, "method", "path", "query", "body_bytes", "headers"}`` after the
compute latency of the paper's model, counted from the request's arrival (f_d: base below 50 % of capacity, rising
linearly to double at 100 %; beyond capacity it answers 503). Query parameters
shape the answer for tests: ``echo=1`` (return the body), ``size=N`` (N bytes),
``stream=N&interval=S`` (N chunks, chunked), ``sse=N&interval=S`` (server-sent
events), ``delay=S``, ``status=NNN``, ``die=1`` (close without answering), ``truncate=1`` (close
half-way through a Content-Length body).
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import ssl
import sys
import urllib.parse
from http import HTTPStatus

import h11
import trio

from .aio import leaves, sleep_until_precisely

MAX_BODY = 200 * 1024 * 1024


def _reason(status: int) -> bytes:
    """The standard reason phrase (h11 sends none unless told), as a real server answers."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class Instance:
    def __init__(self, iid: str, compute_ms: float, capacity: float) -> None:
        self.id = iid
        self.compute_s = compute_ms / 1000
        self.capacity = capacity
        self.arrivals: collections.deque[float] = collections.deque()
        self.served = 0
        self.refused = 0

    def load(self, now: float) -> float:
        """Requests taken in the last second (refusals are not), as a fraction of capacity."""
        while self.arrivals and self.arrivals[0] <= now - 1.0:
            self.arrivals.popleft()
        return len(self.arrivals) / self.capacity if self.capacity else 0.0

    def compute_time(self, load: float) -> float:
        return self.compute_s * (1 + max(0.0, 2 * (load - 0.5)))

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
        received_at = trio.current_time()

        async def next_event():  # type: ignore[no-untyped-def]
            nonlocal received_at
            while True:
                ev = conn.next_event()
                if ev is not h11.NEED_DATA:
                    return ev
                data = await stream.receive_some(65536)
                received_at = trio.current_time()
                conn.receive_data(data)

        async def send(*events, at: float | None = None) -> None:  # type: ignore[no-untyped-def]
            # Rendered first, sent at ``at``: the answer leaves when the model says, and
            # building it is not added to the compute latency.
            data = b"".join(conn.send(ev) or b"" for ev in events)
            if at is not None:
                await sleep_until_precisely(at)
            if data:
                await stream.send_all(data)

        try:
            while True:
                ev = await next_event()
                if not isinstance(ev, h11.Request):
                    return
                arrived = received_at  # when the head's last bytes came in
                body = bytearray()
                while True:
                    b = await next_event()
                    if isinstance(b, h11.Data):
                        body += b.data
                        if len(body) > MAX_BODY:
                            return
                    elif isinstance(b, h11.EndOfMessage):
                        break
                    else:
                        return
                if not await self.respond(ev, bytes(body), send, arrived):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def respond(self, req: h11.Request, body: bytes, send, arrived: float) -> bool:  # type: ignore[no-untyped-def]
        target = req.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        if q.get("die"):
            return False
        now = trio.current_time()
        load = self.load(now)
        if load >= 1.0:
            # A refusal takes none of the capacity: only what it serves counts (else one request
            # over would have it refuse for a whole second after).
            self.refused += 1
            return await _send_all(send, 503, b'{"error": "overloaded"}', b"application/json")
        self.arrivals.append(now)
        compute = self.compute_time(load)
        # The model's compute latency counts from the request's arrival: this server's own
        # parsing and rendering (~0.5 ms of Python on a slow machine) are part of it.
        ready = arrived + compute + float(q.get("delay", 0))
        self.served += 1
        status = int(q.get("status", 200))
        if q.get("echo"):
            ctype = dict((n.lower(), v) for n, v in req.headers).get(b"content-type", b"application/octet-stream")
            return await _send_all(send, status, body, ctype, at=ready)
        if q.get("size"):
            return await _send_all(send, status, b"x" * int(q["size"]), b"application/octet-stream", at=ready)
        n = int(q.get("stream", 0) or q.get("sse", 0))
        if q.get("truncate"):
            await send(h11.Response(status_code=status, reason=_reason(status), headers=[(b"content-length", b"100")]), at=ready)
            await send(h11.Data(data=b"x" * 50))
            return False
        if n:
            await sleep_until_precisely(ready)
            interval = float(q.get("interval", 0.1))
            sse = bool(q.get("sse"))
            ctype = b"text/event-stream" if sse else b"application/octet-stream"
            await send(h11.Response(status_code=status, reason=_reason(status), headers=[(b"content-type", ctype), (b"transfer-encoding", b"chunked")]))
            for i in range(n):
                chunk = f"data: {json.dumps({'instance': self.id, 'i': i})}\n\n" if sse else f"chunk {i}\n"
                await send(h11.Data(data=chunk.encode()))
                if i < n - 1:
                    await trio.sleep(interval)
            await send(h11.EndOfMessage())
            return True
        info = {
            "instance": self.id, "method": req.method.decode(), "path": path, "query": query,
            "body_bytes": len(body), "load": round(load, 3), "compute_ms": round(compute * 1000, 3),
            "headers": {n.decode("latin-1"): v.decode("latin-1") for n, v in req.headers},
        }
        return await _send_all(send, status, json.dumps(info).encode(), b"application/json", head=req.method == b"HEAD",
                               at=ready)


async def _send_all(send, status: int, body: bytes, ctype: bytes, head: bool = False,  # type: ignore[no-untyped-def]
                    at: float | None = None) -> bool:
    events = [h11.Response(status_code=status, reason=_reason(status), headers=[(b"content-type", ctype), (b"content-length", str(len(body)).encode())])]
    if not head:
        events.append(h11.Data(data=body))
    await send(*events, h11.EndOfMessage(), at=at)
    return True


async def serve(inst: Instance, host: str, port: int, tls: ssl.SSLContext | None = None, *,  # type: ignore[no-untyped-def]
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    if tls is not None:  # https: the handshake runs on the connection's first read
        listeners = [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]  # type: ignore[misc]
    await trio.serve_listeners(inst.handle, listeners)


def _instance_spec(text: str) -> tuple[str, float, float]:
    try:
        iid, compute, capacity = text.split(":")
        return iid, float(compute), float(capacity)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID:COMPUTE_MS:CAPACITY, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cpnd.simulate", description="a simulated service instance")
    ap.add_argument("--id")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--compute-ms", type=float, default=0.0)
    ap.add_argument("--capacity", type=float, default=1e9)
    ap.add_argument("--instance", type=_instance_spec, action="append", default=[], metavar="ID:COMPUTE_MS:CAPACITY",
                    help="serve several instances from this one process, each on a port of its own "
                         "(prints 'listening HOST:PORT ID' per instance); instead of --id")
    ap.add_argument("--tls-cert", help="serve https:// with this certificate (PEM; with --tls-key)")
    ap.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = ap.parse_args(argv)
    if bool(args.id) == bool(args.instance):
        ap.error("give either --id or one or more --instance")
    tls = None
    if args.tls_cert or args.tls_key:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        tls.set_alpn_protocols(["http/1.1"])
    many = bool(args.instance)
    specs = args.instance or [(args.id, args.compute_ms, args.capacity)]
    insts = [Instance(iid, compute, capacity) for iid, compute, capacity in specs]

    async def run() -> None:
        # SIGINT (a Ctrl-C) and SIGTERM end it quietly: trio would otherwise raise the
        # interrupt wrapped in an exception group, a traceback on the terminal.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for inst in insts:
                    port = await nursery.start(serve, inst, args.host, 0 if many else args.port, tls)
                    print(f"listening {args.host}:{port}" + (f" {inst.id}" if many else ""), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except BaseException as exc:  # an interrupt before the receiver was in place
        if not all(isinstance(e, KeyboardInterrupt) for e in leaves(exc)):
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
