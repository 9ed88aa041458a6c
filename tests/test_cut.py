"""The ingress's cut at a latency bound (cpnd/attempts.py): on a trio loop with a clock the test moves, and through a lab."""

from __future__ import annotations

import collections
import socket
import time
from types import SimpleNamespace
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from cpnd.attempts import Attempts
from cpnd.h1 import H11Stream
from cpnd.lab import Instance, Lab, Topology, write_lab
from cpnd.planner import Attempt


class _Upstream:
    """A response head that comes when ``arrived`` is set, then a chunked body that needs a wait."""

    def __init__(self) -> None:
        self.waiting = trio.Event()  # set as the attempt parks for the head
        self.arrived = trio.Event()
        self.body = collections.deque([h11.Data(data=b"ok"), h11.EndOfMessage()])
        self.resets: list[Any] = []

    def next_event_nowait(self) -> Any:
        return None

    async def next_event(self) -> Any:
        if not self.arrived.is_set():
            self.waiting.set()
            await self.arrived.wait()
            return h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
        await trio.lowlevel.checkpoint()  # the body is not there at once: the relay waits
        return self.body.popleft()

    def reset(self, *args: Any) -> None:
        self.resets.append(args)


def test_a_head_that_comes_in_the_step_the_cut_fires_is_relayed_whole() -> None:
    """The head is handed over in the step before the cut, and the attempt runs in the one after it
    (the cut's scope is cancelled by then, for good): the head came in time, so the user gets it
    and its body, not a lost connection.

    On a clock that moves only when told (rate 0): the reader's step starts before the cut whatever
    the machine's load (on the real clock, a step woken late began after the cut, and the cut then
    rightly came first), and ends after it; trio expires the deadline before the attempt's next step."""
    clock = trio.testing.MockClock(rate=0)

    async def main() -> tuple[int, bytes]:
        a, b = socket.socketpair()
        client = H11Stream(h11.SERVER, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
        client.conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(client.conn.next_event(), h11.Request)
        assert isinstance(client.conn.next_event(), h11.EndOfMessage)
        attempts = Attempts.__new__(Attempts)
        attempts.p = SimpleNamespace(limits=SimpleNamespace(body_idle_timeout_s=60.0), stats=collections.Counter())
        up = _Upstream()
        cut = trio.current_time() + 0.005
        plan = SimpleNamespace(cut_at=cut, deadline=cut + 10, cut_deadline=lambda: cut, cons=SimpleNamespace(timeout_s=10))

        async def reader() -> None:
            """The peer reader's step that brings the head: it starts before the cut and ends after it."""
            await up.waiting.wait()
            assert trio.current_time() < cut
            clock.jump(cut + 0.0005 - trio.current_time())  # holding the loop, as a busy step does
            up.arrived.set()  # the attempt runs in the next step, after trio has expired its deadline

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            status = await attempts._response(client, up, up, plan, Attempt(bound_at=cut + 0.5))
        a.close()
        got = b""
        while chunk := b.recv(65536):
            got += chunk
        b.close()
        return status, got

    status, got = trio.run(main, clock=clock)
    assert status == 200 and got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"2\r\nok\r\n0\r\n\r\n")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_a_local_instance_that_takes_no_connection_is_cut_at_the_bound(tmp_path, http2: bool) -> None:
    """The ingress calling its own instance (no tunnel, no egress to cut it): a connect that hangs
    (the instance's accept queue is full, so Linux drops the SYNs) is cut at the user's bound as a
    late head is, a 504 then, not a 502 when the 2 s connect timeout ends it; HTTP/1.1 or HTTP/2."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(3):  # the first is queued, the queue is then full: the rest wait in SYN-SENT
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        topo = Topology(("a",), (), (Instance("s1", "a", "/svc"),), {"health_interval_ms": 0})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{port}/")
        if http2:
            with open(specs["a"].config, "a") as f:
                f.write("http2 = true\n")  # (the file ends with the instance's table)
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: any(r["instance"] == "s1" for r in lab.routes("a")), 20, "s1's route at a")
            t0 = time.monotonic()
            r = httpx.get(f"http://{specs['a'].http}/svc", headers={"CPN-Max-Latency": "100ms"}, timeout=10)
            took = time.monotonic() - t0
            assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
            assert "latency bound" in r.json()["detail"] and "no connection" in r.json()["detail"], r.text
            assert took < 1.5  # at the bound, not at the connect timeout (2 s)
            assert lab.query("a", "stats")["http"]["bound_cut"] == 1
    finally:
        for s in (hole, *fillers):
            s.close()
