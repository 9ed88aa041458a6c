"""Attacks on the HTTP/1.1 fast paths (whole.request_events, request_bytes), real processes: crafted
bytes from a user's raw socket (at its ingress ``h``, tunnelled to ``t``, and at ``t`` for its own
instance) and from a hostile peer's tunnel stream straight to ``t``'s egress. A recording instance
keeps every byte and every request it read (by h11), so what an instance got is checked exactly:
one request a tunnelled one, its body as h11 read it, nothing smuggled after it."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any

import h11
import pytest
from rawinstance import ThreadedInstance

from bench.hostile import _open_frame
from cpnd.lab import Instance, Lab, Link, Topology, add_outside_peer, write_lab
from interop.wire import TUNNEL, Peer, load_key, parse_pub


class Recorder(ThreadedInstance):
    """An instance that records every request it reads (h11's events) and every byte, per connection,
    and answers each with 200 and its number."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.raw: list[bytearray] = []
        self.errors: list[str] = []
        super().__init__()

    def _serve(self, c: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        with self.lock:
            raw = bytearray()
            self.raw.append(raw)
            cid = len(self.raw) - 1
        current: dict[str, Any] | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = c.recv(65536)
                    raw += data
                    conn.receive_data(data)
                    continue
                if type(event) is h11.Request:
                    current = {"conn": cid, "method": event.method, "target": event.target,
                               "headers": list(event.headers), "body": b""}
                elif type(event) is h11.Data:
                    assert current is not None
                    current["body"] += event.data
                elif type(event) is h11.EndOfMessage:
                    with self.lock:
                        self.requests.append(current)
                        n = len(self.requests)
                    body = str(n).encode()
                    c.sendall(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))]))
                              + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:  # ConnectionClosed, PAUSED
                    return
        except (h11.ProtocolError, OSError) as exc:
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            c.close()

    def since(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.requests[n:]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """t (with the recording instance ``rec`` of /rec, its URL's path /base) - h; outside peer x at t."""
    rec = Recorder()
    workdir = tmp_path_factory.mktemp("h1atk")
    topo = Topology(("t", "h"), (Link("t", "h", 1),), (Instance("rec", "t", "/rec", 1e6, 1, 0),),
                    {"hold_time_ms": 3000, "health_interval_ms": 0})
    specs = write_lab(topo, workdir, instance_url=lambda i: f"http://127.0.0.1:{rec.port}/base")
    key_path = workdir / "x.key"
    add_outside_peer(specs["t"], "x", key_path)
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        yield {"rec": rec, "specs": specs, "lab": lab, "key": key_path}
    finally:
        try:
            lab.stop_all()
        finally:
            rec.close()


def _hostport(hp: str) -> tuple[str, int]:
    host, port = hp.rsplit(":", 1)
    return host, int(port)


def _responses(data: bytes) -> list[tuple[int, bytes, dict[bytes, bytes]]]:
    """The HTTP/1.1 responses in ``data`` (status, body, headers), read by h11 as a client would
    after as many GETs as it takes."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes, dict[bytes, bytes]]] = []
    conn.receive_data(data)
    conn.receive_data(b"")
    while True:
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError:
            return out
        if type(ev) is h11.InformationalResponse:
            continue
        if type(ev) is h11.Response:
            out.append((ev.status_code, b"", {n: v for n, v in ev.headers}))
        elif type(ev) is h11.Data:
            out[-1] = (out[-1][0], out[-1][1] + ev.data, out[-1][2])
        elif type(ev) is h11.EndOfMessage:
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return out
            conn.start_next_cycle()
        else:
            return out


def user_exchange(hp: str, data: bytes, expect: int = 1) -> tuple[list[tuple[int, bytes, dict[bytes, bytes]]], bool]:
    """``data`` in one send on a new connection to ``hp``; the responses once ``expect`` of them came (or
    the gateway closed, or 10 s), and whether the gateway closed the connection."""
    with socket.create_connection(_hostport(hp), timeout=10) as s:
        s.sendall(data)
        out, closed = b"", False
        try:
            while len(_responses(out)) < expect:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            closed = True
    return _responses(out), closed


class Tunneller:
    """The hostile peer x: tunnel streams to t's instance ``rec``, one request each, written as given."""

    def __init__(self, rig: dict[str, Any]) -> None:
        spec = rig["specs"]["t"]
        self.peer = Peer(_hostport(spec.listen), "t", parse_pub(spec.public_key), "x", load_key(str(rig["key"])))
        self.peer.open_session(caps=["route-refresh", "tunnel", "tunnel-large-data"], tw=[1 << 20, 1 << 30, 64])
        self.sid = -1
        self.ka = 0.0

    def ask(self, *chunks: bytes) -> tuple[bytes, int | None]:
        """One stream carrying ``chunks`` (a DATA frame each, the last with END); what came back on it
        (the response's bytes) and its RESET code, if any."""
        self.sid += 2
        sid = self.sid
        self.peer.send_msg(_open_frame(sid, "/rec", "t", "rec"), ctype=TUNNEL)
        for i, chunk in enumerate(chunks):
            self.peer.send_msg(struct.pack(">IBB", sid, 2, 1 if i == len(chunks) - 1 else 0) + chunk, ctype=TUNNEL)
        out, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline:
            if time.monotonic() - self.ka > 0.5:
                self.peer.send_msg({"t": 2, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                self.ka = time.monotonic()
            ctype, payload = self.peer.recv(10)
            if ctype != TUNNEL:
                continue
            got, ftype, flags = struct.unpack(">IBB", payload[:6])
            if got != sid:
                continue
            if ftype == 2:
                out += payload[6:]
                if flags & 1:
                    return out, None
            elif ftype == 4:
                return out, int.from_bytes(payload[6:8], "big")
        raise AssertionError(f"stream {sid}: no end within 10 s")

    def close(self) -> None:
        self.peer.close()


@pytest.fixture(scope="module")
def peer(rig):
    x = Tunneller(rig)
    try:
        yield x
    finally:
        x.close()


def _user_fields(request: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """A recorded request's fields but those the egress sets (Host, Forwarded, X-Forwarded-For)."""
    return [(n, v) for n, v in request["headers"] if n not in (b"host", b"forwarded", b"x-forwarded-for")]


def _h11_reads(data: bytes) -> tuple[h11.Request, bytes]:
    """The request and body h11 reads from ``data``."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    head, body = conn.next_event(), b""
    while type(ev := conn.next_event()) is h11.Data:
        body += ev.data
    assert type(head) is h11.Request and type(ev) is h11.EndOfMessage
    return head, body


BAD = b"SMUGGLED"  # in a target no request may reach the instance with


@pytest.mark.parametrize("chunks", [
    [b"GET /rec/a?q=1 HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\x7f\xff\r\n\r\n"],  # whole: request_events
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 005\r\n\r\nhello"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nGET /rec/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"GET /rec/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe", b"llo"],  # split: h11's
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"],
    [b"GET /rec/a HTTP/1.1\nHost: x\nX-A: a\r\n b\r\n\r\n"],  # bare LF, a folded field
    [b"GET /rec/a HTTP/1.0\r\nConnection: keep-alive, x-b\r\nX-B: 1\r\n\r\n"],
    [b"POST /rec/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nhi"],
    [b"GET /rec/a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nCPN-Client: 10.0.0.1\r\nForwarded: for=1.2.3.4\r\n"
     b"Content-Length: 0\r\nX-Injected: a\r\n\r\nGET /rec/SMUGGLED HTTP/1.1\r\n\r\n"],
])
def test_a_peers_request_reaches_the_instance_as_h11_reads_it_and_alone(rig, peer, chunks) -> None:
    """Whatever a hostile peer writes into its stream (whole in its first chunk, read around h11, or not),
    the instance gets one request: h11's reading of it (its fields, its body), nothing after it."""
    rec = rig["rec"]
    n, e = len(rec.requests), len(rec.errors)
    out, reset = peer.ask(*chunks)
    assert reset is None and _responses(out)[0][0] == 200, (out, reset)
    [got] = rec.since(n)
    head, body = _h11_reads(b"".join(chunks))
    assert got["method"] == head.method and got["target"] == b"/base" + head.target[len(b"/rec"):]
    assert got["body"] == body
    hop = {b"connection", b"expect", b"upgrade", b"x-b", b"host", b"forwarded"}  # (chunked stays chunked)
    assert sorted(_user_fields(got)) == sorted((n, v) for n, v in head.headers if n not in hop and not n.startswith(b"cpn-"))
    assert not any(BAD in r["target"] for r in rec.since(0)) and rec.errors[e:] == []


@pytest.mark.parametrize(("chunks", "why"), [
    ([b"GET /rec/../admin HTTP/1.1\r\nHost: x\r\n\r\n"], "dot segments"),  # whole: request_events
    ([b"GET /rec/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n"], "dot segments"),
    ([b"GET /rec/..\\admin HTTP/1.1\r\nHost: x\r\n\r\n"], "dot segments"),
    ([b"GET /rec/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n"], "dot segments"),  # (a servlet container's ..)
    ([b"GET /rec/./../admin HTTP/1.0\r\n\r\n"], "dot segments"),  # h11's reading
    ([b"GET http://x/rec/a HTTP/1.1\r\nHost: x\r\n\r\n"], "origin-form"),
    ([b"CONNECT /rec/a HTTP/1.1\r\nHost: x\r\n\r\n"], "CONNECT"),
    ([b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
     "ambiguous framing"),
    ([b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
      b"0\r\n\r\n"], "ambiguous framing"),
])
def test_a_peers_request_an_ingress_refuses_its_users_is_refused_at_the_egress(rig, peer, chunks, why) -> None:
    """A target that could escape the instance URL's path (/rec/../admin reached it as /base/../admin), a
    CONNECT (forwarded: its 2xx switches the instance's connection away from HTTP), both framings (h11
    reads chunked, the instance's copy kept the length: the egress's own h11 refused to write it, reported
    as instance-failed): bad-request, as the ingress refuses them from its users; the instance gets nothing."""
    rec = rig["rec"]
    n, e = len(rec.requests), len(rec.errors)
    out, reset = peer.ask(*chunks)
    assert (out, reset) == (b"", 7)
    assert rec.since(n) == [] and rec.errors[e:] == []
    assert why  # (the detail is logged at t)


def _ok(resp: tuple[int, bytes, dict[bytes, bytes]]) -> bool:
    return resp[0] == 200 and resp[2].get(b"cpn-instance") == b"rec"


@pytest.mark.parametrize("gw", ["t", "h"])  # t: its own instance; h: tunnelled to t
@pytest.mark.parametrize(("data", "answers"), [
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 005\r\n\r\nhello", [(200, b"hello")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /rec/b HTTP/1.1\r\nHost: x\r\n\r\n",
     [(200, b"hello"), (200, b"")]),  # pipelined in one read: two requests, the second its own
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", [(200, b"hello")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 00000000000000000005\r\n\r\nhello", [(200, b"hello")]),
    (b"GET /rec/a HTTP/1.1\nHost: x\n\n", [(200, b"")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", [(200, b"hello")]),
    (b"GET /rec/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /rec/SMUGGLED HTTP/1.0\r\n\r\n", [(200, b"")]),
    (b"GET /rec/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /rec/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n",
     [(200, b"")]),  # the rest is never read
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", [(400, b"bad_request")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello", [(400, b"bad_request")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 000000000000000000005\r\n\r\nhello", [(400, b"bad_request")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", [(400, b"bad_request")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     [(400, b"bad_request")]),
    (b"GET /rec/a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", [(400, b"bad_request")]),
    (b"GET /rec/a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", [(400, b"bad_request")]),
    (b"GET /rec/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),
    (b"GET /rec/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", [(400, b"bad_request")]),
    (b"\r\nGET /rec/a HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),
    (b"GET http://x/rec/a HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),
    (b"GET /rec/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),  # (a servlet container's ..)
    (b"CONNECT x:80 HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),
    (b"CONNECT /rec/a HTTP/1.1\r\nHost: x\r\n\r\n", [(400, b"bad_request")]),  # was forwarded: a 502
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello", [(501, b"not_implemented")]),
    (b"POST /rec/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     [(501, b"not_implemented")]),  # (both were 501 headers_too_large)
])
def test_a_users_crafted_request_whole_in_one_read(rig, gw, data, answers) -> None:
    """A user's request whole in one read (the ingress reads it around h11 when it is plain): answered as
    h11 reads it, each request its own; the README's error codes; the instance gets what was answered 200."""
    rec = rig["rec"]
    n, e = len(rec.requests), len(rec.errors)
    resp, _ = user_exchange(rig["specs"][gw].http, data, expect=len(answers))
    assert len(resp) == len(answers), resp
    for (status, body, headers), (want, what) in zip(resp, answers):
        assert status == want, (status, body)
        if status != 200:
            assert b'"error": "' + what + b'"' in body and b"cpn-instance" not in headers
    got = rec.since(n)
    assert [r["body"] for r in got] == [what for want, what in answers if want == 200]
    assert not any(BAD in r["target"] for r in rec.since(0)) and rec.errors[e:] == []


@pytest.mark.parametrize("gw", ["t", "h"])
def test_a_connection_goes_on_after_a_request_read_whole_and_ends_at_its_close(rig, gw) -> None:
    """One connection: a request whole in one read, one split across reads (h11's), one answered before its
    body (404: the body read whole is not the next request), one with Connection: close; then closed."""
    rec = rig["rec"]
    n, e = len(rec.requests), len(rec.errors)
    with socket.create_connection(_hostport(rig["specs"][gw].http), timeout=10) as s:
        def answer(*writes: bytes) -> tuple[int, bytes, dict[bytes, bytes]]:
            for w in writes:
                s.sendall(w)
            out = b""
            while not (got := _responses(out)):
                chunk = s.recv(65536)
                assert chunk, out
                out += chunk
            assert len(got) == 1, got
            return got[0]

        assert _ok(answer(b"POST /rec/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"))
        assert _ok(answer(b"POST /rec/2 HTTP/1.1\r\nHost: x\r\nContent-Le", b"ngth: 3\r\n\r\ntw", b"o"))
        smuggled = b"GET /rec/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
        assert answer(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))[0] == 404
        assert _ok(answer(b"POST /rec/3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthree"))
        s.sendall(b"GET /rec/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n")
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                rest += chunk
        assert rest == b""  # closed after the third answer, the rest unread
    assert [(r["target"], r["body"]) for r in rec.since(n)] == [(b"/base/1", b"one"), (b"/base/2", b"two"),
                                                               (b"/base/3", b"three")]
    assert len({r["conn"] for r in rec.since(n)}) >= 1 and rec.errors[e:] == []


@pytest.mark.parametrize("gw", ["t", "h"])
@pytest.mark.parametrize("pieces", [1, 70])
def test_a_head_over_64_kib_is_a_431_whole_in_one_read_or_not(rig, gw, pieces) -> None:
    """A head over MAX_HEADER_BYTES: never read around h11 (request_events leaves it to h11, which reads a
    whole one, or refuses one still coming past the bound): 431 headers_too_large either way."""
    rec = rig["rec"]
    n = len(rec.requests)
    head = b"GET /rec/a HTTP/1.1\r\nHost: x\r\n" + b"X-Abcdefgh: 0123456789012345\r\n" * 2300 + b"\r\n"
    assert len(head) > 66_000
    with socket.create_connection(_hostport(rig["specs"][gw].http), timeout=10) as s:
        step = -(-len(head) // pieces)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(0, len(head), step):
                s.sendall(head[i:i + step])
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    [(status, body, _)] = _responses(out)
    assert status == 431 and b'"error": "headers_too_large"' in body
    assert rec.since(n) == []
