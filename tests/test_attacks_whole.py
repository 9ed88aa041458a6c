"""Attacks on the whole-response fast paths (cpnd/whole.py whole_response, read_whole, whole_bytes; relay.py
first_event): response bytes a hostile peer (an egress) or a misbehaving instance crafts, drawn from a
byte alphabet of what splits, smuggles and folds, each path held to what its h11 path gives the user
and the next hop: the same bytes, the same h11 state, or the fast path falling back."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import h11
import pytest
from rawinstance import ThreadedInstance
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from cpnd.h1 import rewrite_headers
from cpnd.heads import MAX_HEADER_BYTES
from cpnd.whole import read_whole, whole_bytes, whole_response, whole_writable, wrote_whole
from cpnd.lab import Instance, Lab, Link, Topology, add_outside_peer, write_lab
from interop.wire import TUNNEL, UPDATE, Peer, load_key, new_route, parse_pub
from test_attacks_h1 import _hostport, _responses
from test_whole import _as_read

# Field names and values an attacker would try: framing, hop-by-hop, the CPN ones, near-misses of each,
# and bytes h11 refuses or reads its own way (NUL, bare CR or LF, obs-text, controls, padding, folds).
_NAMES = st.sampled_from([b"Content-Type", b"X-A", b"Server", b"ETag"] * 4 + [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-Length ", b"Content_Length",
                          b"X-Content-Length", b"Transfer-Encoding", b"transfer-encoding", b"Connection", b"Keep-Alive",
                          b"Proxy-Connection", b"TE", b"Trailer", b"Upgrade", b"Host", b"host", b"CPN-Instance",
                          b"cpn-origin", b"Set-Cookie", b"X-A", b"x", b"a b", b"", b"X\x00", b"\xe9"]).map(bytes)
_VALUES = st.sampled_from([b"text/plain", b"a b", b"1", b"x;q=0.5, y"] * 5 + [b"5", b"05", b"+5", b"-5", b"5, 5", b"5,5", b"5 ", b" 5", b"0x5", b"5\x00", b"9" * 21,
                           b"0" * 20 + b"5", b"0" * 4400 + b"5", b"chunked", b"identity", b"close", b"keep-alive",
                           b"Close", b"x-a, close", b"upgrade", b"a\rb", b"a\nb", b"a\r\nX-I: 1", b"\xe9t\xe9",
                           b"a\x01\x7fb", b"a\tb", b"\t", b"", b"h2c", b"s1", b"HTTP/1.1 200 OK"]).map(bytes)
_SEPS = st.sampled_from([b": "] * 12 + [b":", b":  ", b": \t", b" : "])
_ENDS = st.sampled_from([b"\r\n"] * 16 + [b"\n", b"\r", b"\r\n "])
_STATUS = st.sampled_from([b"HTTP/1.1 200 OK"] * 12 + [b"HTTP/1.1 404 Not Found"] * 4 + [b"HTTP/1.1 200 ", b"HTTP/1.1 200", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No",
                           b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue",
                           b"HTTP/1.1 599 x", b"HTTP/1.1 600 x", b"HTTP/1.1 200 O\rK", b"HTTP/1.1 200 a\x00",
                           b"HTTP/1.1 200 \xe9\t!", b"HTTP/1.1  200 OK", b"HTTP/1.1 0200 OK", b"http/1.1 200 OK",
                           b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK"]).map(bytes)
_BODIES = st.sampled_from([b"", b"hello", b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nSECRET", b"x" * 300])


@st.composite
def responses(draw) -> bytes:
    """A response's bytes: a status line, fields (a right Content-Length among them, mostly), a body,
    maybe more after it."""
    body = draw(_BODIES)
    fields = draw(st.lists(st.tuples(_NAMES, _SEPS, _VALUES, _ENDS), max_size=4))
    if draw(st.integers(0, 7)):
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", b": ", b"%d" % len(body), b"\r\n"))
    more = draw(st.sampled_from([b""] * 6 + [b"!", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]))
    return draw(_STATUS) + b"\r\n" + b"".join(b"".join(f) for f in fields) + b"\r\n" + body + more


_METHODS = st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"OPTIONS"])


def _asked(method: bytes) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    conn.send(h11.Request(method=method, target=b"/x", headers=[(b"host", b"a")]))
    conn.send(h11.EndOfMessage())
    return conn


def _served(method: bytes) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"%s /x HTTP/1.1\r\nhost: a\r\n\r\n" % method)
    assert type(conn.next_event()) is h11.Request and type(conn.next_event()) is h11.EndOfMessage
    return conn


def h11_reads(conn: h11.Connection, data: bytes) -> list[object] | None:
    """The events up to its EndOfMessage h11 reads from ``data`` on a client ``conn`` past any 1xx (as
    the relays skip them), or None where it refuses it or it is not whole."""
    conn.receive_data(data)
    events: list[object] = []
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or type(ev) is h11.ConnectionClosed:
                return None
            if type(ev) is h11.InformationalResponse:
                continue
            events.append(ev)
            if type(ev) is h11.EndOfMessage:
                return events
    except (h11.RemoteProtocolError, ValueError):
        return None


def h11_passes_on(method: bytes, data: bytes, drop_cpn: bool = False, extra=()) -> bytes | None:
    """What a relay's h11 path writes on for ``data``, the first read of its answer to ``method``: h11
    reads it, its fields rewritten as a relay's are, h11 writes it to the next conn (None: refused)."""
    events = h11_reads(_asked(method), data)
    if events is None:
        return None
    head = events[0]
    response = h11.Response(status_code=head.status_code, reason=head.reason, _parsed=True,
                            headers=rewrite_headers(head.headers, drop_cpn=drop_cpn, extra=extra))
    user = _served(method)
    try:
        return b"".join(user.send(e) for e in [response, *events[1:]])
    except h11.LocalProtocolError:
        return None


@given(_METHODS, responses())
@example(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 4400 + b"5\r\n\r\nhello")
@example(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 20 + b"5\r\n\r\nhello")
@settings(max_examples=3000)
def test_what_an_ingress_passes_on_as_it_came_is_what_its_h11_path_writes(method: bytes, data: bytes) -> None:
    """An egress's answer (hostile or not) that whole_response takes is what h11 would have read and
    the ingress written to its user: the same bytes, none after."""
    try:
        status = whole_response(data)
    except ValueError as exc:  # (the ingress's user got no answer: the attempt's task died)
        raise AssertionError(f"whole_response raised {exc!r}") from None
    if status is None or method == b"HEAD":  # (HEAD: whole_writable refuses the user's connection)
        return
    event("taken")
    assert h11_passes_on(method, data) == data


@given(_METHODS, responses())
@example(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 4400 + b"5\r\n\r\nhello")
@example(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 20 + b"5\r\n\r\nhello")
@settings(max_examples=3000)
def test_what_an_egress_reads_whole_from_its_instance_is_what_h11_reads(method: bytes, data: bytes) -> None:
    """An instance's answer read_whole takes gives h11's events (else nothing moved), and what the
    egress then writes down the tunnel (whole_bytes) is what h11 would have written."""
    ours, theirs = _asked(method), _asked(method)
    try:
        read = read_whole(ours, data)
    except ValueError as exc:
        raise AssertionError(f"read_whole raised {exc!r}") from None
    if read is None:
        return
    event("taken")
    expected = h11_reads(theirs, data)
    assert expected is not None, "h11 refuses what read_whole took"
    assert [_as_read(e) for e in reversed(read)] == [_as_read(e) for e in expected]
    assert not theirs.trailing_data[0]
    head = read[-1]
    extra = ((b"cpn-instance", b"i1"), (b"cpn-origin", b"t"))
    response = h11.Response(status_code=head.status_code, reason=head.reason, _parsed=True,
                            headers=rewrite_headers(head.headers, drop_cpn=True, extra=extra))
    tunnel = _served(method)
    written = whole_bytes(tunnel, [response, *reversed(read[:-1])])
    if written is not None:
        assert written == h11_passes_on(method, data, drop_cpn=True, extra=extra)


_USER_REQUESTS = st.sampled_from([
    b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n",
    b"GET /x HTTP/1.1\r\nhost: a\r\n\r\nGET /y HTTP/1.1\r\nhost: a\r\n\r\n",  # pipelined
    b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n", b"GET /x HTTP/1.0\r\n\r\n",
    b"GET /x HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
    b"POST /x HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nab",
    b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nab",  # its body not all in
    b"GET /x HTTP/1.1\r\nhost: a\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n"])


def _user(request: bytes) -> h11.Connection:
    """A user's connection at an ingress that has read ``request`` (as far as it goes, one request)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    while conn.their_state is not h11.DONE and conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
        pass
    return conn


def _state(conn: h11.Connection) -> tuple[object, ...]:
    cstate = conn._cstate
    return (dict(cstate.states), cstate.keep_alive, set(cstate.pending_switch_proposals), conn._writer,
            conn.client_is_waiting_for_100_continue, conn.their_http_version, conn._request_method,
            conn.trailing_data)


@given(_USER_REQUESTS, responses())
@example(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\nGET /y HTTP/1.1\r\nhost: a\r\n\r\n",
         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
@settings(max_examples=3000)
def test_the_ingress_decision_and_write_are_h11s_for_any_user_request(request: bytes, data: bytes) -> None:
    """first_event's decision (whole_writable on the user's connection, whole_response on the answer)
    and send_whole's write (wrote_whole): the user's bytes and its connection's state, a next cycle
    included, are what h11's read, rewrite and write give."""
    ours, theirs = _user(request), _user(request)
    if not (whole_writable(ours) and whole_response(data) is not None):
        return
    event("taken")
    method = theirs._request_method
    events = h11_reads(_asked(method), data)
    assert events is not None
    head = events[0]
    response = h11.Response(status_code=head.status_code, reason=head.reason, _parsed=True,
                            headers=rewrite_headers(head.headers, drop_cpn=False))
    assert b"".join(theirs.send(e) for e in [response, *events[1:]]) == data
    wrote_whole(ours)
    assert _state(ours) == _state(theirs)
    if theirs.their_state is h11.DONE and theirs.our_state is h11.DONE:
        ours.start_next_cycle()
        theirs.start_next_cycle()
        assert _state(ours) == _state(theirs)
        assert _as_read(ours.next_event()) == _as_read(theirs.next_event())


# ---- real processes: a hostile egress (an outside peer y advertising /ys) at t's ingress, and a
# misbehaving instance behind t, reached by its own users (t: ingress = egress) and through h.





class Scripted(ThreadedInstance):
    """An instance that answers each request it reads (h11) with the next of ``answers``' raw bytes, in
    one write, whatever they are; every request it read is recorded (method, target)."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.requests: list[tuple[bytes, bytes]] = []
        super().__init__()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                conn = h11.Connection(h11.SERVER)
                if buf:
                    conn.receive_data(buf)  # (b"" would be the end)
                while type(ev := conn.next_event()) is not h11.EndOfMessage:
                    if ev is h11.NEED_DATA:
                        data = c.recv(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif type(ev) is h11.Request:
                        with self.lock:
                            self.requests.append((ev.method, ev.target))
                    elif type(ev) is not h11.Data:
                        return
                buf = bytes(conn.trailing_data[0])
                with self.lock:
                    answer = self.answers.pop(0) if self.answers else b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                c.sendall(answer)
        c.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """t (the scripted instance ``bad`` of /bad) - h; outside peer y at t, advertising /ys (its yi)."""
    inst = Scripted()
    workdir = tmp_path_factory.mktemp("wholeatk")
    topo = Topology(("t", "h"), (Link("t", "h", 1),), (Instance("bad", "t", "/bad", 1e6, 1, 0),),
                    {"hold_time_ms": 3000, "health_interval_ms": 0})
    specs = write_lab(topo, workdir, instance_url=lambda i: f"http://127.0.0.1:{inst.port}/base")
    add_outside_peer(specs["t"], "y", workdir / "y.key")
    lab = Lab(specs)
    y = None
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        y = Peer(_hostport(specs["t"].listen), "t", parse_pub(specs["t"].public_key), "y", load_key(str(workdir / "y.key")))
        y.open_session(caps=["route-refresh", "tunnel"])
        y.send_msg({"t": UPDATE, "adv": [new_route("/ys", "yi", "y")], "wd": []})
        lab.wait_for(lambda: any(r["instance"] == "yi" and r["best"] for r in lab.routes("t")), 10, "y's route at t")
        yield {"inst": inst, "specs": specs, "lab": lab, "y": y}
    finally:
        try:
            if y is not None:
                y.close()
            lab.stop_all()
        finally:
            inst.close()


def _egress_answers(y: Peer, answer: bytes) -> bytes:
    """As the hostile egress y: the next stream t opens to it, read to its request's END, answered with
    ``answer`` in one DATA frame with END; the request's bytes."""
    sid, request, deadline, ka = None, b"", time.monotonic() + 10, 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - ka > 0.5:
            y.send_msg({"t": 2, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
            ka = time.monotonic()
        ctype, payload = y.recv(10)
        if ctype != TUNNEL:
            continue
        got, ftype, flags = struct.unpack(">IBB", payload[:6])
        if ftype == 1:
            sid, request = got, b""
        elif ftype == 2 and got == sid:
            request += payload[6:]
            if flags & 1:
                y.send_msg(struct.pack(">IBB", sid, 2, 1) + answer, ctype=TUNNEL)
                return request
    raise AssertionError("t opened no stream to y within 10 s")


def _read_answers(s: socket.socket, n: int) -> tuple[bytes, bool]:
    """What comes on ``s`` until ``n`` responses are in it (or it closes): the bytes, and whether it closed."""
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while len(_responses(out)) < n:
            chunk = s.recv(65536)
            if not chunk:
                return out, True
            out += chunk
        return out, False
    return out, True


HOSTILE = [
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 4400 + b"5\r\n\r\nhello",  # int(): ValueError
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 20 + b"5\r\n\r\nhello",  # h11: bad Content-Length
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nAHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECRET",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\nhello",
    b"HTTP/1.1 204 No\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 O\rK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nCPN-Instance: other\r\nCPN-Instance: x\r\nContent-Length: 5\r\n\r\nhello",
]


def _answers(method: bytes, out: bytes) -> list[tuple[int, bytes, dict[bytes, bytes]]]:
    """The answers in ``out`` to a request of ``method``: a HEAD's is its head alone, nothing after it."""
    if method != b"HEAD":
        return _responses(out)
    if not out:
        return []
    head, sep, rest = out.partition(b"\r\n\r\n")
    assert sep and rest == b"", out  # (bytes past a HEAD's head would be the next answer's start)
    return [(int(head[9:12]), b"", {})]


def _expected(method: bytes, answer: bytes) -> list[list[tuple[int, bytes]]]:
    """What the user may get for ``answer`` by the h11 path: its one response; for one h11 refuses, a
    502, or nothing and the connection closed (a length h11 finds wrong only as it writes the body)."""
    written = h11_passes_on(method, answer)
    if written is None:
        return [[(502, b"")], []]
    [(status, body, _)] = _responses(written) if method != b"HEAD" else [(int(written[9:12]), b"", {})]
    return [[(status, body)]]


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("answer", HOSTILE)
def test_a_hostile_egress_answer_gives_the_user_one_answer_and_the_next_its_own(rig, method, answer) -> None:
    """A hostile egress's answer to a user's request at t: the user gets what h11's path gives (one
    response, or 502), and the user's next request on the same connection gets its own answer."""
    y = rig["y"]
    with socket.create_connection(_hostport(rig["specs"]["t"].http), timeout=10) as s:
        s.sendall(b"%s /ys/a HTTP/1.1\r\nHost: x\r\n\r\n" % method)
        _egress_answers(y, answer)
        out, closed = _read_answers(s, 1)
        got = _answers(method, out)
        assert [(st_, b if st_ == 200 else b"") for st_, b, _ in got] in _expected(method, answer), out
        if closed:
            return
        s.sendall(b"GET /ys/b HTTP/1.1\r\nHost: x\r\n\r\n")
        _egress_answers(y, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext")
        rest, _ = _read_answers(s, 1)
        assert [(st_, b) for st_, b, _ in _responses(rest)] == [(200, b"next")], rest



@pytest.mark.parametrize("gw", ["t", "h"])  # t: its own instance (ingress = egress); h: tunnelled to t
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("answer", HOSTILE + [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
def test_a_misbehaving_instance_answer_gives_the_user_what_h11_gives_and_the_next_user_its_own(rig, gw, method,
                                                                                              answer) -> None:
    """An instance's crafted answer (read whole at t's egress, or by h11): the user gets what h11's path
    gives; then another user's request gets the instance's answer to it, not what was left of this one
    (bytes past a response, or a HEAD's body, on a kept-alive connection are the next answer's start)."""
    inst = rig["inst"]
    n = len(inst.requests)
    with inst.lock:
        inst.answers[:] = [answer]
    with socket.create_connection(_hostport(rig["specs"][gw].http), timeout=10) as s:
        s.sendall(b"%s /bad/a HTTP/1.1\r\nHost: x\r\n\r\n" % method)
        out, _ = _read_answers(s, 1)
    got = _answers(method, out)
    assert [(st_, b if st_ == 200 else b"") for st_, b, _ in got] in _expected(method, answer), out
    with socket.create_connection(_hostport(rig["specs"][gw].http), timeout=10) as s:
        s.sendall(b"GET /bad/next HTTP/1.1\r\nHost: x\r\n\r\n")
        rest, _ = _read_answers(s, 1)
    assert [(st_, b) for st_, b, _ in _responses(rest)] == [(200, b"ok")], rest
    assert inst.requests[n:] == [(method, b"/base/a"), (b"GET", b"/base/next")]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A line a - b - c, the scripted instance ``bad`` of /bad at a: c's users reach it through the
    transit b on sealed streams (what c's ingress reads whole came opened, record by record)."""
    inst = Scripted()
    workdir = tmp_path_factory.mktemp("wholesealed")
    topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("b", "c", 1)), (Instance("bad", "a", "/bad", 1e6, 1, 0),),
                    {"hold_time_ms": 3000, "health_interval_ms": 0, "min_adv_interval_ms": 20})
    specs = write_lab(topo, workdir, instance_url=lambda i: f"http://127.0.0.1:{inst.port}/base")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
        yield {"inst": inst, "specs": specs, "lab": lab}
    finally:
        try:
            lab.stop_all()
        finally:
            inst.close()


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: a\xe9\x01\r\n\r\nhello", *HOSTILE[1:3],
                                    HOSTILE[6], b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
def test_a_sealed_answer_through_a_transit_gives_the_user_what_h11_gives_and_the_next_its_own(sealed, method,
                                                                                              answer) -> None:
    """Through a transit on a sealed stream: the user gets what h11's path gives, its next request on the
    same connection its own answer, and so does another user's."""
    inst = sealed["inst"]
    n = len(inst.requests)
    with inst.lock:
        inst.answers[:] = [answer]
    hp = _hostport(sealed["specs"]["c"].http)
    with socket.create_connection(hp, timeout=10) as s:
        s.sendall(b"%s /bad/a HTTP/1.1\r\nHost: x\r\n\r\n" % method)
        out, closed = _read_answers(s, 1)
        got = _answers(method, out)
        assert [(st_, b if st_ == 200 else b"") for st_, b, _ in got] in _expected(method, answer), out
        if not closed:
            s.sendall(b"GET /bad/same HTTP/1.1\r\nHost: x\r\n\r\n")
            rest, _ = _read_answers(s, 1)
            assert [(st_, b) for st_, b, _ in _responses(rest)] == [(200, b"ok")], rest
    with socket.create_connection(hp, timeout=10) as s:
        s.sendall(b"GET /bad/next HTTP/1.1\r\nHost: x\r\n\r\n")
        rest, _ = _read_answers(s, 1)
    assert [(st_, b) for st_, b, _ in _responses(rest)] == [(200, b"ok")], rest
    assert inst.requests[n:][0] == (method, b"/base/a") and inst.requests[-1] == (b"GET", b"/base/next")
    assert sealed["lab"].query("c", "stats")["gateway"]["sealed_streams_out"] >= 2


@pytest.mark.parametrize("first", [b"GET", b"HEAD"])
def test_pipelined_requests_each_get_their_own_answer_passed_on_whole(rig, first) -> None:
    """Three requests in one write (the first GET or HEAD, one with Expect: 100-continue and a body),
    answered by the hostile egress each with a whole response (the first's with a body whatever the
    method): the user reads exactly three answers, in order, each its own."""
    y = rig["y"]
    with socket.create_connection(_hostport(rig["specs"]["t"].http), timeout=10) as s:
        s.sendall(b"%s /ys/1 HTTP/1.1\r\nHost: x\r\n\r\n" % first
                  + b"POST /ys/2 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
                  + b"GET /ys/3 HTTP/1.1\r\nHost: x\r\n\r\n")
        asked = [_egress_answers(y, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                 for body in (b"one", b"two!", b"three")]
        out = b""
        while out.count(b"HTTP/1.1 200") < 3:
            chunk = s.recv(65536)
            assert chunk, out
            out += chunk
    assert [a.split(b" ", 2)[1] for a in asked] == [b"/ys/1", b"/ys/2", b"/ys/3"] and asked[1].endswith(b"abc")
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + (b"one" if first == b"GET" else b"")
    out = out.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"", 1)  # (the ingress's own, before it reads the body)
    assert out == one + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ntwo!HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree"
