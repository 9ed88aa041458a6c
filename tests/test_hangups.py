"""A request its user abandons ends at once, real processes: a, the ingress, with a local
instance n1 of /near, and b, one hop away, with f1 of /far; each instance takes 4 requests at
once (max_inflight). One user fills an instance with requests it never answers, then closes
its connections: the instance's connections must close (the calls ended), another user be
served at once (its slots free, not 503 until the requests' 30 s timeout), and the close
counted: over HTTP/1.1, https_listen and HTTP/2. Long jobs abandoned are no compute sample (j1 of /jobs at a, j2 of /farjobs at b,
which nobody else uses). Pipelined requests on one connection are no close: they are all
answered."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import httpx
import pytest
import trio

from cpnd.lab import Instance, Lab, Link, Topology, free_ports, write_lab
from tlscerts import CertAuthority

HELD = 4  # each instance's max_inflight


class Instance4:
    """A test instance: a target with ``/hold`` is read and never answered (its connection waits
    for the gateway to close it), one with ``?ms=N`` is answered after N ms, any other at once:
    200 with its target as the body."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.held = 0  # /hold requests read
        self.jobs = 0  # /job requests read ...
        self.done = 0  # ... whose compute (their ms=) is over
        self.ended = 0  # ... whose connection the gateway closed
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                try:
                    while b"\r\n\r\n" not in buf:
                        chunk = c.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                except OSError:
                    return
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if b"/hold" in target:
                    self._hold(c)
                    return
                m = re.search(rb"ms=(\d+)", target)
                job = b"/job" in target
                if job:
                    with self.lock:
                        self.jobs += 1
                if m:
                    time.sleep(int(m.group(1)) / 1000)  # its compute
                if job:
                    with self.lock:
                        self.done += 1
                try:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
                except OSError:
                    return

    def _hold(self, c: socket.socket) -> None:
        with self.lock:
            self.held += 1
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass
        with self.lock:
            self.ended += 1

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not, on Linux)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for c in self.conns:
            c.close()


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[Lab, dict[str, str], dict[str, Instance4]]]:
    """The lab, a's addresses (``http``; ``https``, with the CA file ``ca`` that trusts it), the instances."""
    insts = {i: Instance4() for i in ("n1", "f1", "j1", "j2")}
    try:
        topo = Topology(("a", "b"), (Link("a", "b", 1),),
                        (Instance("n1", "a", "/near", 1e6, 1.0, 1.0), Instance("f1", "b", "/far", 1e6, 1.0, 1.0),
                         Instance("j1", "a", "/jobs", 1e6, 1.0, 1.0), Instance("j2", "b", "/farjobs", 1e6, 1.0, 1.0)),
                        {"health_interval_ms": 0})
        work = tmp_path_factory.mktemp("hangups")
        specs = write_lab(topo, work, instance_url=lambda i: f"http://127.0.0.1:{insts[i.id].port}/{i.id}")
        for spec in specs.values():  # lab.Instance has no max_inflight: added to each instance's table
            spec.config.write_text(spec.config.read_text().replace("compute_latency_ms = 1.0",
                                                                   f"compute_latency_ms = 1.0\nmax_inflight = {HELD}"))
        ca = CertAuthority.create(work / "pki")
        cert, key = ca.issue(work / "pki", "gw-a", ["127.0.0.1"])
        https = f"127.0.0.1:{free_ports(1)[0]}"
        config = specs["a"].config
        config.write_text(config.read_text().replace(
            "[gateway]\n", f'[gateway]\nhttps_listen = "{https}"\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n', 1))
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: {r["service"] for r in lab.routes("a") if r["best"]} == {"/near", "/far", "/jobs", "/farjobs"},
                         30, "every route at a")
            yield lab, {"http": specs["a"].http, "https": https, "ca": str(ca.cert_file)}, insts
    finally:
        for inst in insts.values():
            inst.close()


def _connect(addr: str, source: str = "127.0.0.1") -> socket.socket:
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))


def _honest(addr: str, service: str, headers: dict[str, str] | None = None) -> int:
    """A request from another address (127.0.0.2): its status."""
    with httpx.Client(base_url=f"http://{addr}", timeout=10,
                      transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        return c.get(f"{service}/fast", headers=headers).status_code


def _abandoned(lab: Lab) -> int:
    return lab.query("a", "stats")["http"].get("user_abandoned", 0)


def _h2_requests(addr: str, service: str) -> socket.socket:
    """HELD requests to ``service``/hold as streams of one HTTP/2 connection (prior knowledge)."""
    s = _connect(addr)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    for i in range(HELD):
        conn.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":path", f"{service}/hold".encode()),
                                      (b":scheme", b"http"), (b":authority", b"a")], end_stream=True)
    s.sendall(conn.data_to_send())
    return s


@pytest.mark.parametrize("service", ["/near", "/far"])
@pytest.mark.parametrize("protocol", ["http1", "https", "h2"])
def test_an_abandoned_request_frees_its_instance_at_once(site, service: str, protocol: str) -> None:
    lab, addrs, insts = site
    addr = addrs["http"]
    inst = insts["n1" if service == "/near" else "f1"]
    held, ended, abandoned = inst.held, inst.ended, _abandoned(lab)
    if protocol == "h2":
        socks = [_h2_requests(addr, service)]
    else:
        socks = [_connect(addrs[protocol.replace("http1", "http")]) for _ in range(HELD)]
        if protocol == "https":  # (closed with no close_notify: as a user that goes away)
            trust = ssl.create_default_context(cafile=addrs["ca"])
            socks = [trust.wrap_socket(s, server_hostname="127.0.0.1") for s in socks]
        for s in socks:
            s.sendall(f"GET {service}/hold HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    try:
        _until(lambda: inst.held == held + HELD, 10, f"{HELD} calls at the instance")
        assert _honest(addr, service) == 503  # its max_inflight: full
    finally:
        for s in socks:
            s.close()  # abandoned, mid-wait
    _until(lambda: inst.ended == ended + HELD, 5, "the instance's connections to close")
    # Its slots are free now (else: 503 until the 30 s timeout of the abandoned requests).
    _until(lambda: _honest(addr, service) == 200, 3, "another user's request to be served")
    assert _abandoned(lab) == abandoned + HELD
    assert not lab.dead() and "Traceback" not in lab.log("a")


def _responses(s: socket.socket, n: int) -> list[tuple[int, bytes]]:
    """``n`` whole responses read from ``s`` in turn (each with a Content-Length)."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed after {len(out)} responses"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(buf) < length:
            chunk = s.recv(65536)
            assert chunk, "closed mid-body"
            buf += chunk
        out.append((int(head.split(b" ", 2)[1]), buf[:length]))
        buf = buf[length:]
    return out


@pytest.mark.parametrize("service", ["/near", "/far"])
def test_pipelined_requests_are_no_hang_up(site, service: str) -> None:
    """The next requests' bytes come while the first is served (its instance takes 200 ms): all
    are answered, in order, on the one connection."""
    lab, addrs, insts = site
    addr = addrs["http"]
    abandoned = _abandoned(lab)
    with _connect(addr) as s:
        targets = [f"{service}/slow?ms=200", f"{service}/one", f"{service}/two?ms=50"]
        s.sendall(b"".join(f"GET {t} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for t in targets))
        got = _responses(s, 3)
        assert [st for st, _ in got] == [200] * 3
        assert [body.split(b"/", 2)[2] for _, body in got] == [t.split("/", 2)[2].encode() for t in targets]
        s.sendall(f"GET {service}/after HTTP/1.1\r\nHost: a\r\n\r\n".encode())  # the connection goes on
        assert _responses(s, 1)[0][0] == 200
    assert _abandoned(lab) == abandoned


@pytest.mark.parametrize("service", ["/jobs", "/farjobs"])
def test_abandoned_long_jobs_are_no_compute_sample(site, service: str) -> None:
    """One user's jobs of 1 s, abandoned once the instance has them, and nobody else's samples:
    had their times counted once the instance finished them, its compute would be 1 s for
    everyone (the fastest user's), and a 200 ms-bound user told 503 no_instance for seconds."""
    lab, addrs, insts = site
    addr = addrs["http"]
    inst = insts["j1" if service == "/jobs" else "j2"]
    socks = [_connect(addr) for _ in range(HELD)]
    try:
        for s in socks:
            s.sendall(f"GET {service}/job?ms=1000 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        _until(lambda: inst.jobs == HELD, 10, "the jobs at the instance")
    finally:
        for s in socks:
            s.close()
    _until(lambda: inst.done == HELD, 10, "the instance to finish the jobs")
    statuses = []
    for _ in range(5):  # over a second: the far gateway's compute reaches a with its next load report
        statuses.append(_honest(addr, service, {"CPN-Max-Latency": "200ms"}))
        time.sleep(0.25)
    assert statuses == [200] * 5


def test_the_watch_sees_a_close_or_a_reset_and_no_pipelined_bytes() -> None:
    """hangups.py alone, on socket pairs: bytes of a next request leave an armed watch be (and
    stay unread in the socket); a FIN ends its target, a scope; a reset ends one armed after it came;
    an unwatched socket's close is nobody's."""
    from cpnd.hangups import hangups

    async def main() -> list[object]:
        with trio.fail_after(10):  # a watch that never fires fails the test, never hangs it
            return await checks()

    async def checks() -> list[object]:
        watch = hangups()
        assert watch is not None
        seen: list[object] = []
        pairs = [trio.socket.socketpair() for _ in range(3)]
        (ours, theirs), (ours2, theirs2), (ours3, theirs3) = pairs
        h, h2, h3 = watch.watch(ours), watch.watch(ours2), watch.watch(ours3)
        assert h is not None and h2 is not None and h3 is not None
        with trio.CancelScope() as scope:
            h.arm(scope)
            await theirs.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")  # pipelined
            with trio.move_on_after(0.3):
                await trio.sleep_forever()
            seen.append((h.gone, await ours.recv(100)))  # not gone; the bytes are still there for us
            theirs.close()  # FIN
            await trio.sleep_forever()
        seen.append((h.gone, scope.cancelled_caught))
        theirs2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs2.close()  # RST
        while not h2.gone:
            await trio.sleep(0.01)
        late = trio.CancelScope()
        h2.arm(late)
        seen.append(late.cancel_called)
        watch.unwatch(h3)
        theirs3.close()
        await trio.sleep(0.1)
        seen.append(h3.gone)
        for a, b in pairs:
            a.close()
            b.close()
        return seen

    assert trio.run(main) == [(False, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"), (True, True), True, False]
