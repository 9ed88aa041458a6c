"""Responses around h11's per-event machinery (cpnd/whole.py): a whole one written as h11 writes it
(``whole_bytes``), an egress's answer passed on as it came (``whole_response``), an instance's read
as h11 reads it (``read_whole``); each leaving h11's connection state as h11's own would."""

from __future__ import annotations

import h11
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from cpnd.h1 import rewrite_headers
from cpnd.whole import answer_as_is, awaits_answer, read_whole, whole_bytes, whole_response



def _served(request: bytes = b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n") -> h11.Connection:
    """A server connection that has read ``request`` (as far as it goes)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    for _ in range(3):  # a head, what of a body came, its end
        if conn.next_event() in (h11.NEED_DATA, h11.PAUSED):
            break
    return conn


def _h11_state(conn: h11.Connection) -> tuple[object, ...]:
    """Everything of an h11 connection's state that a next send or read, or a next cycle, depends on."""
    cstate = conn._cstate
    return (dict(cstate.states), cstate.keep_alive, set(cstate.pending_switch_proposals), conn._writer,
            getattr(conn._reader, "__qualname__", type(conn._reader)), conn.client_is_waiting_for_100_continue,
            conn.their_http_version, conn._request_method)


_response_fields = st.lists(st.tuples(
    st.sampled_from([b"Content-Type", b"X-A", b"Server", b"Host", b"Connection", b"cpn-instance", b"Set-Cookie"]),
    st.sampled_from([b"text/plain", b"a b", b"", b"close", b"keep-alive", b"\xe9t\xe9", b"x\ty"])), max_size=4)
_requests = st.sampled_from([b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n",
                             b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n", b"GET /x HTTP/1.0\r\n\r\n",
                             b"GET /x HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
                             b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nab",
                             b"GET /x HTTP/1.1\r\nhost: a\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"])
# The framing of a response of ``n`` body bytes: its length (mostly), a wrong one, chunked, none
_framings = st.sampled_from([lambda n: [(b"Content-Length", b"%d" % n)], lambda n: [(b"content-length", b"%d" % n)],
                             lambda n: [(b"content-length", b"%d" % (n + 1))], lambda n: [(b"Transfer-Encoding", b"chunked")],
                             lambda n: []])


@given(st.sampled_from([b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"]) | _requests, st.sampled_from([200, 201, 204, 304, 404, 503]),
       st.sampled_from([b"OK", b"", b"Not Found  x"]), _response_fields, st.integers(0, 2), _framings,
       st.lists(st.sampled_from([b"hello", b"", b"x" * 3]), max_size=3), st.sampled_from([[], [(b"x-t", b"1")]]))
@example(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", 200, b"OK", [(b"Content-Type", b"text/plain")], 1,
         lambda n: [(b"content-length", b"%d" % n)], [b"hello"], [])
def test_a_whole_response_is_written_as_h11_writes_it_and_leaves_its_state(request: bytes, status: int, reason: bytes,
                                                                          fields, at: int, framing, body: list[bytes],
                                                                          trailers) -> None:
    """whole_bytes, where it takes the events, gives h11's bytes and h11's state after its own sends;
    where it does not, nothing of the connection has moved."""
    fields = fields[:at] + framing(sum(map(len, body))) + fields[at:]
    try:
        events = [h11.Response(status_code=status, reason=reason, headers=fields), *(h11.Data(data=d) for d in body),
                  h11.EndOfMessage(headers=trailers)]
    except h11.LocalProtocolError:
        return  # h11 makes no such response
    ours, theirs = _served(request), _served(request)
    before = _h11_state(ours)
    data = whole_bytes(ours, list(events))
    if data is None:
        assert _h11_state(ours) == before
        return
    event("taken")
    assert data == b"".join(map(theirs.send, events))
    assert _h11_state(ours) == _h11_state(theirs)
    if theirs.our_state is h11.DONE and theirs.their_state is h11.DONE:
        ours.start_next_cycle()
        theirs.start_next_cycle()
        assert _h11_state(ours) == _h11_state(theirs)


def test_whole_bytes_takes_the_common_response_and_leaves_the_rest_to_h11() -> None:
    ok = [h11.Response(status_code=200, headers=[(b"content-length", b"2")], reason=b"OK"), h11.Data(data=b"hi"),
          h11.EndOfMessage()]
    assert whole_bytes(_served(), list(ok)) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    for request in (b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n", b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
                    b"GET /x HTTP/1.0\r\n\r\n", b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nab"):
        assert whole_bytes(_served(request), list(ok)) is None  # HEAD, closing, HTTP/1.0, the request not whole
    assert whole_bytes(_served(), [ok[0], h11.Data(data=b"h"), ok[2]]) is None  # short: h11 says so
    chunked = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
    assert whole_bytes(_served(), [chunked, h11.EndOfMessage()]) is None
    assert whole_bytes(_served(), [ok[0], ok[1], h11.EndOfMessage(headers=[(b"x-t", b"1")])]) is None


_fields = st.lists(st.sampled_from([b"X-A: a b\r\n", b"X-A: \r\n", b"X-A:  a\r\n", b" folded\r\n", b"x-a: \xe9\r\n",
                                    b"x-a: a\x00\r\n", b"Connection: close\r\n", b"transfer-encoding: chunked\r\n",
                                    b"Host: h\r\n", b"te: x\r\n", b"cpn-instance: s1\r\n", b"X-B: b\n", b"bad name: x\r\n",
                                    b"x-c: c \r\n", b"X-Content-Length: 9\r\n", b"Connection: keep-alive\r\n",
                                    b"connection: x, close\r\n", b"Keep-Alive: timeout=5\r\n"]), max_size=4)
_lengths = st.sampled_from([b"content-length: %d\r\n", b"Content-Length: %d\r\n", b"content-length:%d\r\n",
                            b"content-length: %d \r\n", b"content-length: %d, %d\r\n", b"content-length: 0%d\r\n", b""])


@given(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 \r\n", b"HTTP/1.1 200\r\n", b"HTTP/1.0 200 OK\r\n",
                        b"HTTP/1.1 204 No\r\n", b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 503 Busy now\r\n",
                        b"HTTP/1.1 200 \xe9\r\n"]),
       _fields, st.integers(0, 4), _lengths, st.sampled_from([b"hello", b"", b"x" * 300]), st.sampled_from([b"", b"!"]))
@example(b"HTTP/1.1 200 OK\r\n", [b"cpn-instance: s1\r\n"], 0, b"content-length: %d\r\n", b"hello", b"")
@settings(max_examples=500)  # (most of what it draws is refused: a few in a hundred are taken)
def test_a_response_passed_on_whole_is_what_reading_and_writing_it_again_gives(status_line: bytes, fields, at: int,
                                                                               length: bytes, body: bytes, more: bytes) -> None:
    """What whole_response takes, the ingress would have read with h11 and written to its user with h11
    (its fields rewritten as relayed ones are) byte for byte the same: so it passes it on as it came."""
    fields = fields[:at] + [length.replace(b"%d", b"%d" % len(body))] + fields[at:]
    data = status_line + b"".join(fields) + b"\r\n" + body + more
    status = whole_response(data)
    if status is None:
        return
    event("passed")
    up = h11.Connection(h11.CLIENT)
    up.send(h11.Request(method=b"GET", target=b"/x", headers=[(b"host", b"a")]))
    up.send(h11.EndOfMessage())
    up.receive_data(data)
    events = [up.next_event()]
    while type(events[-1]) is not h11.EndOfMessage:
        events.append(up.next_event())
    head = events[0]
    assert isinstance(head, h11.Response) and head.status_code == status
    assert not up.trailing_data[0]  # nothing after it
    response = h11.Response(status_code=head.status_code, reason=head.reason, _parsed=True,
                            headers=rewrite_headers(head.headers, drop_cpn=False))
    user = _served()
    assert b"".join(user.send(e) for e in [response, *events[1:]]) == data
    assert user.our_state is h11.DONE and user.their_state is h11.DONE


def test_whole_response_takes_an_egress_answer_and_nothing_else() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\ncpn-instance: s1\r\n\r\nhello"
    assert whole_response(answer) == 200
    assert whole_response(answer[:-1]) is None  # not whole yet
    assert whole_response(answer + b"HTTP/1.1 200 OK\r\n") is None  # more than one
    assert whole_response(answer.replace(b"content-length: 5", b"transfer-encoding: chunked")) is None
    assert whole_response(answer.replace(b"OK\r\n", b"OK\r\nconnection: close\r\n")) is None
    assert whole_response(answer.replace(b"200", b"304")) is None
    assert whole_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") == 200
    assert whole_response(b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 9000 + b"content-length: 0\r\n\r\n") is None  # > 64 KiB


def _asked(method: bytes = b"GET", fields: tuple[tuple[bytes, bytes], ...] = ()) -> h11.Connection:
    """A client connection that has sent a whole request."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/x", headers=[(b"host", b"a"), *fields]))
    conn.send(h11.EndOfMessage())
    return conn


def _as_read(event: object) -> tuple[object, ...]:
    """An event as compared: its type and every field (the header fields with their raw names)."""
    if isinstance(event, h11.Response):
        return h11.Response, event.status_code, event.reason, event.http_version, event.headers._full_items
    if isinstance(event, h11.Data):
        return h11.Data, bytes(event.data)
    if isinstance(event, h11.EndOfMessage):
        return h11.EndOfMessage, event.headers._full_items
    return (event,)


@given(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 \r\n", b"HTTP/1.1 200\r\n", b"HTTP/1.0 200 OK\r\n",
                        b"HTTP/1.1 204 No\r\n", b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 503 Busy now\r\n"]),
       _fields, st.integers(0, 4), _lengths, st.sampled_from([b"hello", b"", b"x" * 300]), st.sampled_from([b"", b"!"]),
       st.sampled_from([(b"GET", ()), (b"HEAD", ()), (b"GET", ((b"connection", b"close"),)),
                        (b"POST", ((b"expect", b"100-continue"), (b"content-length", b"0")))]))
@example(b"HTTP/1.1 200 OK\r\n", [b"X-A: a b\r\n"], 0, b"content-length: %d\r\n", b"hello", b"", (b"GET", ()))
@example(b"HTTP/1.1 200 OK\r\n", [b"Connection: keep-alive\r\n"], 0, b"content-length: %d\r\n", b"hello", b"", (b"GET", ()))
@example(b"HTTP/1.1 200 OK\r\n", [b"Connection: Keep-Alive, Close\r\n"], 1, b"content-length: %d\r\n", b"x", b"", (b"GET", ()))
@settings(max_examples=500)  # (most of what it draws is refused: a few in a hundred are taken)
def test_an_answer_read_whole_is_what_h11_reads_and_leaves_its_state(status_line: bytes, fields, at: int, length: bytes,
                                                                     body: bytes, more: bytes, request) -> None:
    """read_whole, where it takes an answer, gives h11's events and leaves h11's state as h11's own
    read of it would, a next cycle included; where it does not, nothing of the connection has moved."""
    fields = fields[:at] + [length.replace(b"%d", b"%d" % len(body))] + fields[at:]
    data = status_line + b"".join(fields) + b"\r\n" + body + more
    ours, theirs = _asked(*request), _asked(*request)
    if awaits_answer(ours):  # (H11Stream.next_event does not ask h11 then)
        assert theirs.next_event() is h11.NEED_DATA
    before = _h11_state(ours)
    read = read_whole(ours, data)
    if read is None:
        assert _h11_state(ours) == before
        return
    event("taken")
    theirs.receive_data(data)
    expected = [theirs.next_event()]
    while type(expected[-1]) is not h11.EndOfMessage:
        expected.append(theirs.next_event())
    assert [_as_read(e) for e in reversed(read)] == [_as_read(e) for e in expected]
    assert _h11_state(ours) == _h11_state(theirs) and not theirs.trailing_data[0]
    assert ours.next_event() is theirs.next_event()
    ours.start_next_cycle()
    theirs.start_next_cycle()
    assert _h11_state(ours) == _h11_state(theirs)


_EXTRA = ((b"cpn-instance", b"s1"), (b"cpn-origin", b"gw-c"))  # what an egress adds to its instance's answer
_answer_fields = _fields | st.lists(st.sampled_from([b"Connection: Keep-Alive\r\n", b"connection: keep-alive\r\n",
                                                     b"CONNECTION: keep-alive \r\n", b"Connection: keep-alive, x-a\r\n",
                                                     b"Keep-Alive: timeout=5, max=100\r\n", b"Upgrade: h2c\r\n",
                                                     b"CPN-Origin: evil\r\n", b"Server: nginx/1.22.1\r\n",
                                                     b"X-Connection: close\r\n", b"Date: Wed, 02 Dec 2026 01:00:00 GMT\r\n"]),
                                     max_size=5)


@given(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 \r\n", b"HTTP/1.1 200\r\n", b"HTTP/1.0 200 OK\r\n",
                        b"HTTP/1.1 204 No\r\n", b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 503 Busy now\r\n"]),
       _answer_fields, st.integers(0, 5), _lengths, st.sampled_from([b"hello", b"", b"x" * 300, b"\r\nconnection: a\r\n"]),
       st.sampled_from([b"", b"!"]),
       st.sampled_from([(b"GET", ()), (b"HEAD", ()), (b"GET", ((b"connection", b"close"),)),
                        (b"POST", ((b"expect", b"100-continue"), (b"content-length", b"0")))]))
@example(b"HTTP/1.1 200 OK\r\n", [b"Server: nginx/1.22.1\r\n", b"Date: Wed, 02 Dec 2026 01:00:00 GMT\r\n",
                                  b"Content-Type: application/json\r\n", b"Connection: keep-alive\r\n"], 3,
         b"Content-Length: %d\r\n", b'{"instance": "s1"}', b"", (b"GET", ()))
@example(b"HTTP/1.1 200 OK\r\n", [b"Connection: Keep-Alive\r\n", b"Keep-Alive: timeout=5, max=100\r\n"], 1,
         b"content-length: %d\r\n", b"hello", b"", (b"GET", ()))
@settings(max_examples=500)  # (most of what it draws is refused: a few in a hundred are taken)
def test_an_answer_passed_on_as_is_is_what_reading_rewriting_and_writing_it_gives(status_line: bytes, fields, at: int,
                                                                                  length: bytes, body: bytes, more: bytes,
                                                                                  request) -> None:
    """answer_as_is, where it takes an instance's answer, gives what reading it (read_whole), rewriting its
    fields for our own user (rewrite_headers, the egress's added) and writing it (whole_bytes) give, byte
    for byte, and leaves the instance's connection as h11's read of it would; where it does not, nothing
    of the connection has moved."""
    fields = fields[:at] + [length.replace(b"%d", b"%d" % len(body))] + fields[at:]
    data = status_line + b"".join(fields) + b"\r\n" + body + more
    ours, theirs = _asked(*request), _asked(*request)
    if not awaits_answer(ours):  # (H11Stream.answer asks it only then)
        return
    before = _h11_state(ours)
    whole = answer_as_is(ours, data, b"".join(b"%s: %s\r\n" % f for f in _EXTRA))
    if whole is None:
        assert _h11_state(ours) == before
        return
    event("taken")
    read = read_whole(theirs, data)
    assert read is not None
    head = read[-1]
    response = h11.Response(status_code=head.status_code, reason=head.reason, _parsed=True,
                            headers=rewrite_headers(head.headers, drop_cpn=True, extra=_EXTRA))
    user = _served()
    assert whole.data == whole_bytes(user, [response, *reversed(read[:-1])])
    assert whole.status_code == head.status_code
    assert _h11_state(ours) == _h11_state(theirs)


def test_answer_as_is_takes_the_common_answer_and_leaves_the_rest() -> None:
    nginx = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
             b"Connection: keep-alive\r\n\r\n{}")
    extra = b"cpn-instance: s1\r\n"
    whole = answer_as_is(_asked(), nginx, extra)
    assert whole is not None and whole.status_code == 200
    assert whole.data == (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                          b"cpn-instance: s1\r\n\r\n{}")
    for other in (nginx.replace(b"keep-alive", b"close"), nginx.replace(b"keep-alive", b"keep-alive, x-a"),
                  nginx.replace(b"Server", b"CPN-Instance"), nginx.replace(b"Server: nginx", b"Upgrade: x"),
                  nginx.replace(b"Server", b"Host"), nginx[:-1], nginx + b"HTTP/1.1 200 OK\r\n"):
        conn = _asked()
        before = _h11_state(conn)
        assert answer_as_is(conn, other, extra) is None
        assert _h11_state(conn) == before
