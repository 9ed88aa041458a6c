"""A minimal keep-alive HTTP/1.1 client for the load generators: cheap enough not to be the bottleneck."""

from __future__ import annotations

import json

import trio


async def exchange(stream: trio.SocketStream, req: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a kept-alive stream; (status, lower-cased headers, body). Content-Length bodies only."""
    await stream.send_all(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return status, headers, body


def classify(status: int, headers: dict[str, str], body: bytes) -> tuple[str, str]:
    """A response as ("served" | "failed_explicit" | "lost", what): served is a 200 from an
    instance, explicit a gateway-made error with the contract's JSON body, lost anything else."""
    if status == 200 and headers.get("cpn-instance"):
        return "served", ""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if status >= 400 and isinstance(obj, dict) and set(obj) == {"error", "detail"} and "cpn-instance" not in headers:
        return "failed_explicit", f"{status} {obj['error']}"
    return "lost", f"status {status}: {body[:200]!r}"


class KeepAlive:
    """One client connection kept alive across requests, reopened after the server closed it (as a real client does)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None

    async def request(self, req: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
        try:
            if self.stream is None:
                self.stream = await trio.open_tcp_stream(self.host, self.port)
            with trio.fail_after(timeout):
                status, headers, body = await exchange(self.stream, req)
        except Exception:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.aclose()
