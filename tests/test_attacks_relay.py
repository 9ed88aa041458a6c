"""Attacks on the task-less transit relays and the workers' channels, real processes: a next hop that
stops reading for a while (its session carries on with every record in order once it reads again),
several large responses at once on one session (every sender waiting for room goes on), a next hop
that credits a request after its END (the end goes on once), a response followed by RESET (relayed
whole), a worker's channel to the control process that fills up (the relays waiting for it move again
when it drains), and a peer refusing data channels (redialled with backoff)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

import httpx

from bench.hostile import Site, _open_frame
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab
from interop.wire import TUNNEL, UPDATE, Peer, load_key, new_route, parse_pub

from test_workers_peers import refusing_pair, workers

SIZE = 3_000_000  # each response: several times a stream's window, all of them several times the high-water mark


def _data(sid: int, payload: bytes, *, end: bool) -> bytes:
    return struct.pack(">IBB", sid, 2, 1 if end else 0) + payload


def _queued(sock: socket.socket) -> int:
    """Bytes waiting unread in ``sock``'s receive buffer."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_transit_resuming_relays_after_its_next_hop_was_congested_keeps_records_in_order(tmp_path) -> None:
    """x asks, through t, for four large responses from h's instance and stops reading its socket: t's
    queue towards x passes the high-water mark and the relays wait for it to drain. When x reads again,
    what the relays send on must follow what was queued before (the records' counters are in order:
    a record out of order fails authentication and ends the session)."""
    site = Site(tmp_path)
    try:
        x = site.attacker(caps=["route-refresh", "tunnel", "tunnel-large-data"], tw=[1 << 30, 1 << 30, 64])
        try:
            x.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sids = [2 * i + 1 for i in range(4)]
            for sid in sids:
                x.send_msg(_open_frame(sid, "/far", "h", "s2"), ctype=TUNNEL)
                x.send_msg(_data(sid, f"GET /far?size={SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), end=True),
                           ctype=TUNNEL)
            # Not reading: t's kernel buffers fill, then its own queue (bounded wait for x's to be full).
            deadline, last, since = time.monotonic() + 10, -1, time.monotonic()
            while time.monotonic() < deadline:
                n = _queued(x.sock)
                if n != last:
                    last, since = n, time.monotonic()
                elif n > 0 and time.monotonic() - since > 0.5:
                    break
                x.send_msg({"t": 2, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                time.sleep(0.05)
            got = {sid: 0 for sid in sids}
            ended: set[int] = set()
            reset: dict[int, int] = {}
            deadline, ka = time.monotonic() + 30, 0.0
            while len(ended) + len(reset) < len(sids) and time.monotonic() < deadline:
                if time.monotonic() - ka > 0.5:
                    x.send_msg({"t": 2, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                    ka = time.monotonic()
                ctype, payload = x.recv(10)  # AssertionError: a record out of order failed authentication
                if ctype != TUNNEL:
                    continue
                sid, ftype, flags = struct.unpack(">IBB", payload[:6])
                if ftype == 2 and sid in got:
                    got[sid] += len(payload) - 6
                    if flags & 1:
                        ended.add(sid)
                elif ftype == 4 and sid in got:
                    reset[sid] = int.from_bytes(payload[6:8], "big")
            assert not reset and ended == set(sids), (reset, ended)
            assert all(n > SIZE for n in got.values()), got
        finally:
            x.close()
    finally:
        site.close()


def _downloads(url: str, rounds: int = 2, at_once: int = 6) -> list[object]:
    """``rounds`` of ``at_once`` GETs of ``url`` at the same time: (status, body length) or the error, each."""
    results: list[object] = []

    def download() -> None:
        try:
            r = httpx.get(url, timeout=20)
            results.append((r.status_code, len(r.content)))
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
            results.append(repr(exc))

    for _ in range(rounds):
        threads = [threading.Thread(target=download) for _ in range(at_once)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    return results


def test_several_large_responses_at_once_on_one_session_all_complete(tmp_path) -> None:
    """Six large responses at once from b's instance to a's users: b's egress tasks all wait for
    room in b's queue towards a (past its high-water mark); when it drains, every one of them goes
    on (a waiter must not lose its wake-up to the next one's)."""
    insts = InstanceProcs()
    insts.start("r1")
    topo = Topology(("a", "b"), (Link("a", "b"),), (Instance("r1", "b", "/remote", capacity=1e6),), {"health_interval_ms": 0})
    specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports[i.id]}/{i.id}")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        results = _downloads(f"http://{specs['a'].http}/remote?size={SIZE}")
        assert results == [(200, SIZE)] * 12, results
    finally:
        lab.stop_all()
        insts.stop_all()


def test_relays_waiting_for_a_workers_full_channel_move_again_when_it_drains(tmp_path) -> None:
    """b refuses data channels, so a's workers' requests for b's instance are relayed by a's control
    process, the responses onto the worker's channel. Several large responses at once fill that
    channel past its high-water mark; every relay that waited for it must go on once it drained,
    not sit until the idle sweeper ends it (60 s): each download completes well before that."""
    with refusing_pair(tmp_path) as (lab, specs):
        lab.wait_for(lambda: all(w["report_age_ms"] is not None for w in workers(lab, "a")), 30, "a's workers")
        lab.wait_for(lambda: lab.query("b", "status")["stats"].get("data_channels_refused", 0) >= 2, 20, "refusals")
        results = _downloads(f"http://{specs['a'].http}/remote?size={SIZE}")
        assert results == [(200, SIZE)] * 12, results
        lab.wait_for(lambda: lab.query("a", "status")["http"].get("streams_via_control", 0) == 12, 10,
                     "a's workers' reports: every download through the control process")


def _frames(p: Peer, until: object, limit_s: float = 10.0) -> list[tuple[int, int, int, bytes]]:
    """Tunnel frames ``p`` reads (sid, type, flags, payload) up to and including the first ``until(frame)``."""
    out: list[tuple[int, int, int, bytes]] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ctype, payload = p.recv(max(0.01, deadline - time.monotonic()))
        if ctype != TUNNEL:
            continue
        sid, ftype, flags = struct.unpack(">IBB", payload[:6])
        out.append((sid, ftype, flags, payload[6:]))
        if until(out[-1]):  # type: ignore[operator]
            return out
    raise AssertionError(f"no such frame within {limit_s:g} s: {out}")


class Outsiders:
    """A transit ``t`` alone (a real cpnd) with two outside peers ``x`` and ``y`` driven by hand; y
    advertises /ys (instance yi), so x's streams for it are relayed by t."""

    def __init__(self, tmp_path, *, x_tw: list[int] | None = None) -> None:
        topo = Topology(("t",), (), (Instance("s1", "t", "/svc", 1e6, 1, 0),), {"hold_time_ms": 3000, "health_interval_ms": 0})
        self.specs = write_lab(topo, tmp_path, instance_url=lambda i: "http://127.0.0.1:9/none", trust=False)
        for pid in ("x", "y"):
            add_outside_peer(self.specs["t"], pid, tmp_path / f"{pid}.key")
        self.lab = Lab(self.specs)
        self.peers: list[Peer] = []
        try:
            self.lab.start_all()
            self.lab.wait_for(lambda: self.lab.query("t", "status") is not None, 30, "t to start")
            host, port = self.specs["t"].listen.rsplit(":", 1)
            for pid in ("x", "y"):
                p = Peer((host, int(port)), "t", parse_pub(self.specs["t"].public_key), pid,
                         load_key(str(tmp_path / f"{pid}.key")))
                self.peers.append(p)
                p.open_session(caps=["route-refresh", "tunnel"], tw=x_tw if pid == "x" else None)
            self.x, self.y = self.peers
            self.y.send_msg({"t": UPDATE, "adv": [new_route("/ys", "yi", "y")], "wd": []})
            self.lab.wait_for(lambda: any(r["instance"] == "yi" and r["best"] for r in self.lab.routes("t")), 10,
                              "y's route at t")
        except BaseException:
            self.close()
            raise

    def request(self, body: bytes = b"hello") -> int:
        """x's stream 1 for /ys with its whole request; the id of the stream t opened to y for it."""
        self.x.send_msg(_open_frame(1, "/ys", "y", "yi"), ctype=TUNNEL)
        head = f"POST /ys HTTP/1.1\r\nHost: y\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.x.send_msg(_data(1, head + body, end=True), ctype=TUNNEL)
        got = _frames(self.y, lambda f: f[1] == 2 and f[2] & 1)  # the OPEN, then the request up to its END
        assert got[0][1] == 1 and all(f[0] == got[0][0] for f in got)
        return got[0][0]

    def synced(self) -> list[tuple[int, int, int, bytes]]:
        """What t sent y until t has handled all y sent before: a stream t answers at once from the
        same step (no route: RESET), so whatever t sent for y's earlier frames comes before it."""
        self.y.send_msg(_open_frame(1, "/nowhere", "z", "zi"), ctype=TUNNEL)
        return _frames(self.y, lambda f: f[0] == 1 and f[1] == 4)

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.lab.stop_all()


def test_a_transit_passes_a_requests_end_on_once(tmp_path) -> None:
    """y credits the request's bytes after its END (as an egress does while it reads): t must not send
    the END again (a DATA frame after END is outside the protocol: tunnel.md, the last DATA frame carries END)."""
    o = Outsiders(tmp_path)
    try:
        sid = o.request()
        o.y.send_msg(struct.pack(">IBB", sid, 3, 0) + (4096).to_bytes(4, "big"), ctype=TUNNEL)
        after = o.synced()
        assert [f for f in after if f[0] == sid and f[1] == 2] == [], after  # no second END
        # The exchange still completes: y's response reaches x.
        o.y.send_msg(_data(sid, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", end=True), ctype=TUNNEL)
        back = _frames(o.x, lambda f: f[0] == 1 and (f[1] == 4 or (f[1] == 2 and f[2] & 1)))
        assert back[-1][1] == 2 and back[-1][3].endswith(b"ok"), back
        o.lab.wait_for(lambda: o.lab.query("t", "status")["tunnel_streams"] == 0, 10, "t's streams to close")
    finally:
        o.close()


def test_a_response_followed_by_reset_is_relayed_whole(tmp_path) -> None:
    """y answers with a response larger than x's stream window, its END, then RESET cancel (an egress
    stopping an upload it no longer needs). x credits only after t had all of it: tunnel.md says such
    a response is still delivered whole, so t must pass the rest and the END on before the RESET."""
    o = Outsiders(tmp_path, x_tw=[16384, 1 << 20, 64])
    try:
        sid = o.request()
        body = bytes(range(256)) * 400  # 100 KiB: six times x's window
        resp = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        for i in range(0, len(resp), 16000):
            o.y.send_msg(_data(sid, resp[i:i + 16000], end=i + 16000 >= len(resp)), ctype=TUNNEL)
        o.y.send_msg(struct.pack(">IBB", sid, 4, 0) + (9).to_bytes(2, "big") + b"\x01" + b"done", ctype=TUNNEL)
        o.synced()
        got, ended, reset = b"", False, None
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            ctype, payload = o.x.recv(5)
            if ctype != TUNNEL:
                continue
            fsid, ftype, flags = struct.unpack(">IBB", payload[:6])
            if fsid != 1:
                continue
            if ftype == 2:
                got += payload[6:]
                ended = bool(flags & 1)
                o.x.send_msg(struct.pack(">IBB", 1, 3, 0) + (len(payload) - 6 or 1).to_bytes(4, "big"), ctype=TUNNEL)
                o.x.send_msg(struct.pack(">IBB", 0, 3, 0) + (len(payload) - 6 or 1).to_bytes(4, "big"), ctype=TUNNEL)
            elif ftype == 4:
                reset = payload[6:8]
                break
        assert ended and got == resp, (len(got), len(resp), reset)
        o.lab.wait_for(lambda: o.lab.query("t", "status")["tunnel_streams"] == 0, 10, "t's streams to close")
    finally:
        o.close()


def test_a_peer_refusing_data_channels_is_redialled_with_backoff(tmp_path) -> None:
    """b refuses data channels (max_data_channels_per_peer = 0) once their handshake is done (its
    refusal comes after its OPEN): a's workers must redial with the connect-retry backoff, not at its
    minimum for ever (each try is a handshake's signatures at both ends). From 250 ms doubling, each
    worker tries at most 6 times in the first 4 s (at the minimum: 16 or more)."""
    with refusing_pair(tmp_path, {"health_interval_ms": 0, "workers": 2}) as (lab, _):
        lab.wait_for(lambda: lab.query("b", "status")["stats"].get("data_channels_refused", 0) >= 1, 20, "a first refusal")
        t0 = time.monotonic()
        lab.wait_for(lambda: time.monotonic() - t0 >= 4, 10, "4 s of redials")  # a window of time: what is counted
        refused = lab.query("b", "status")["stats"].get("data_channels_refused", 0)
        assert refused <= 2 * 6 + 1, refused