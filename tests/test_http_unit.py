"""Pure helpers of the data plane: URL translation, target checks, header filtering."""

from __future__ import annotations

import urllib.parse

import h11
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cpnd.errors import HttpError
from cpnd.h1 import content_length, filter_headers, translate_target
from cpnd.heads import CHECKED_TARGET_BYTES, check_target, split_head


@pytest.mark.parametrize(("target", "service", "url", "expected"), [
    (b"/yolo", "/yolo", "http://h:1/v1/detect", b"/v1/detect"),
    (b"/yolo/x/y?q=1", "/yolo", "http://h:1/v1/detect", b"/v1/detect/x/y?q=1"),
    (b"/yolo?q=1", "/yolo", "http://h:1/v1/detect/", b"/v1/detect/?q=1"),
    (b"/yolo/x", "/yolo", "http://h:1/", b"/x"),
    (b"/yolo", "/yolo", "http://h:1", b"/"),
    (b"/ai/llm/v1/chat", "/ai/llm/v1", "http://h:1/api?model=m", b"/api/chat?model=m"),
    (b"/ai/llm/v1/chat?stream=1", "/ai/llm/v1", "http://h:1/api?model=m", b"/api/chat?model=m&stream=1"),
])
def test_translate_target(target: bytes, service: str, url: str, expected: bytes) -> None:
    assert translate_target(target, service, url) == expected


def _former_translate_target(target: bytes, service: str, instance_url: str) -> bytes:
    """translate_target as it was, parsing the URL per request (the reference for the cached one)."""
    path, sep, query = target.partition(b"?")
    rest = path[len(service.encode()):]
    base = urllib.parse.urlsplit(instance_url)
    base_path = (base.path or "/").encode()
    new = base_path.rstrip(b"/") + rest if rest else base_path
    if base.query:
        query = base.query.encode() + (b"&" + query if query else b"")
        sep = b"?"
    return new + sep + query


_SEGMENTS = st.lists(st.sampled_from(["a", "v1", "", "x-y", "\u00e9"]), max_size=3).map("/".join)


@given(service=_SEGMENTS.map(lambda p: "/" + p), rest=_SEGMENTS, query=st.sampled_from(["", "?", "?q=1", "?a=b&c"]),
       url_path=_SEGMENTS, url_query=st.sampled_from(["", "?", "?model=m", "?a=1&b=2"]),
       slash=st.sampled_from(["", "/", "//"]))
def test_translate_target_as_parsed_per_request(service: str, rest: str, query: str, url_path: str, url_query: str,
                                                slash: str) -> None:
    """The instance URL's parts worked out once give what parsing it per request gave."""
    target = (service + ("/" + rest if rest else "") + query).encode()
    url = "http://h:1" + ("/" + url_path if url_path else "") + slash + url_query
    assert translate_target(target, service, url) == _former_translate_target(target, service, url)


@pytest.mark.parametrize("target", [b"http://x/yolo", b"*", b"/a/../b", b"/a/./b", b"/a/%2E%2E/b", b"/a%2fb", b"/a\\b",
                                    b"/a/..;/b", b"/a/..;x=1/b", b"/a/.;/b", b"/a/..;",
                                    "/caf\u00e9".encode()])
def test_check_target_refuses_escapes(target: bytes) -> None:
    for padded in (target, target + b"?" + b"q" * CHECKED_TARGET_BYTES):  # a kept verdict, and one worked out each time
        for _ in range(2):  # a refusal is never kept: the second is refused too
            with pytest.raises(HttpError) as ei:
                check_target(padded)
            assert ei.value.status == 400


def test_check_target_keeps_the_path() -> None:
    assert check_target(b"/yolo/x.y/..z?a=../b") == check_target(b"/yolo/x.y/..z?a=../b") == "/yolo/x.y/..z"
    assert check_target(b"/yolo?" + b"q" * CHECKED_TARGET_BYTES) == "/yolo"


@given(st.lists(st.sampled_from(["", ".", "..", "...", "a", ".a", "a.", "x.y", "..b"]), max_size=6))
def test_dot_segments_are_found_as_splitting_finds_them(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    if any(s in (".", "..") for s in path.split("/")):
        with pytest.raises(HttpError):
            check_target(path.encode() + b"?q=/./")
    else:
        assert check_target(path.encode() + b"?q=/./") == path


@given(st.lists(st.tuples(st.sampled_from([b"Host", b"CPN-QoS", b"cpn-x", b"cpn", b"X-Cpn-A", b"Content-Length",
                                           b"TRANSFER-ENCODING", b"transfer-encoding"]), st.binary(max_size=4)),
                max_size=6))
def test_split_head_finds_the_cpn_fields_and_ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> None:
    names = {n.lower() for n, _ in headers}
    if {b"content-length", b"transfer-encoding"} <= names:
        with pytest.raises(HttpError):
            split_head(b"/a", headers)
        return
    assert split_head(b"/a", headers) == ("/a", [(n.lower(), v) for n, v in headers
                                                 if n.decode("latin-1").lower().startswith("cpn-")])


@given(st.lists(st.sampled_from([(b"CPN-QoS", b"batch"), (b"cpn-x", b"1"), (b"X-Cpn-A", b"2"), (b"Accept", b"*/*" * 30)]),
                max_size=6),
       st.sampled_from([[], [(b"Content-Length", b"1")], [(b"TRANSFER-ENCODING", b"chunked")]]),
       st.integers(0, 70_000))
def test_split_head_walks_h11s_own_fields_as_it_walks_pairs(headers: list[tuple[bytes, bytes]],
                                                            framing: list[tuple[bytes, bytes]], pad: int) -> None:
    """The fast path over h11's parsed items finds what the pair walk finds (names lowercase), size checks included."""
    target = b"/a?" + b"p" * pad
    headers = [(b"Host", b"x"), *headers, *framing]  # (h11 refuses both framings, or no Host or two: never seen)
    parsed = h11.Request(method=b"GET", target=target, headers=headers).headers
    pairs = [(n.lower(), v) for n, v in headers]
    try:
        expected: object = split_head(target, pairs)
    except HttpError as exc:
        expected = (exc.status, exc.detail)
    try:
        got: object = split_head(target, parsed)
    except HttpError as exc:
        got = (exc.status, exc.detail)
    assert got == expected


def test_filter_headers() -> None:
    headers = [(b"Host", b"x"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"), (b"Keep-Alive", b"5"),
               (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"CPN-Max-Price", b"1"),
               (b"Accept", b"*/*"), (b"Expect", b"100-continue")]
    assert filter_headers(headers, drop_cpn=True) == [(b"Host", b"x"), (b"Accept", b"*/*")]
    assert (b"CPN-Max-Price", b"1") in filter_headers(headers, drop_cpn=False)


@pytest.mark.parametrize("size", [0, 300, 2 * 1024 * 1024])
def test_body_taken_whole_or_streamed_loses_nothing(size: int) -> None:
    """A body already received goes in one piece; one too big to keep for a retry is streamed,
    and nothing read ahead to find that out is lost."""
    import h11
    import trio

    from cpnd.body import MAX_REPLAY_BYTES, BodySource
    from cpnd.h1 import H11Stream
    from cpnd.plane import HttpLimits

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    client = H11Stream(h11.SERVER, None)
    client.conn.receive_data(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    assert isinstance(client.conn.next_event(), h11.Request)
    for i in range(0, size, 65536):  # all of it already here, in receive-sized pieces
        client.conn.receive_data(body[i:i + 65536])
    src = BodySource(client, HttpLimits())
    whole = src.take_buffered()
    assert whole == (size <= MAX_REPLAY_BYTES)
    if whole:
        assert src.whole() == body and src.replayable
        return

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in src.iterate()])

    assert trio.run(collect) == body and not src.replayable


def test_the_first_bytes_tell_http2_and_tls_from_http1() -> None:
    from cpnd.preface import H2_PREFACE, sniff_preface

    assert sniff_preface(b"GET / HTTP/1.1\r\n") is None and sniff_preface(b"POST /x") is None
    assert sniff_preface(b"PRI /x HTTP/1.1\r\n") is None  # diverges from the preface: HTTP/1.x's business
    for n in range(len(H2_PREFACE)):
        assert sniff_preface(H2_PREFACE[:n]) == ""  # maybe the preface: read on
    assert sniff_preface(H2_PREFACE) == sniff_preface(H2_PREFACE + b"\x00\x00\x00\x04") == "h2"
    assert sniff_preface(bytes.fromhex("1603010200")) == sniff_preface(b"\x16") == "tls"


_names = st.sampled_from([b"Host", b"Connection", b"X-Secret", b"Keep-Alive", b"TE", b"Upgrade", b"CPN-Max-Price",
                          b"Accept", b"Content-Length", b"Transfer-Encoding", b"cpn-qos", b"X-A"])
_values = st.sampled_from([b"1", b"x", b"keep-alive, X-Secret", b"close", b"chunked", b"host", b"Content-Length", b"5"])


@given(st.lists(st.tuples(_names, _values), max_size=10), st.booleans(), st.sampled_from([None, b"inst:1"]),
       st.sampled_from([None, b"gw"]), st.sampled_from([(), frozenset({b"x-a", b"cpn-qos"}), frozenset({b"content-length"})]))
@example([(b"Host", b"x"), (b"Transfer-Encoding", b"chunked"), (b"Connection", b"Content-Length"),
          (b"CPN-Max-Price", b"1")], True, None, None, ())
@example([(b"Host", b"x"), (b"Content-Length", b"5"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
          (b"TE", b"x")], False, b"inst:1", None, ())
@example([(b"Host", b"x"), (b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")], True, None, None,
         frozenset({b"content-length"}))
def test_rewriting_parsed_headers_is_the_checked_path(headers, drop_cpn: bool, host: bytes | None,
                                                       default_host: bytes | None, drop: frozenset[bytes]) -> None:
    """The fast rewrite of headers h11 parsed (no second validation) gives what the checked path gives."""
    import h11

    from cpnd.h1 import rewrite_headers

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return  # h11 refuses it: nothing is rewritten
    if not isinstance(event, h11.Request):
        return
    options = {"drop_cpn": drop_cpn, "host": host, "default_host": default_host, "drop": drop,
               "extra": [(b"cpn-origin", b"g1")]}
    fast = rewrite_headers(event.headers, **options)
    checked = rewrite_headers(list(event.headers.raw_items()), **options)
    # The same fields (the framing may sit elsewhere: the order of different fields carries no meaning).
    assert sorted(fast) == sorted(checked)
    assert sorted(n.lower() for n, _ in fast.raw_items()) == sorted(n for n, _ in fast)


@given(st.lists(st.tuples(_names, _values), max_size=10), st.sampled_from([b"1.1", b"1.0"]),
       st.sampled_from([{"host": b"inst:1"}, {"default_host": b"gw"}]),
       st.sampled_from([b"/a?b=1", b"/v1/x", b"/a b", b"/\x7f"]))
@example([(b"Host", b"x")], b"1.1", {"default_host": b"gw"}, b"/a b")
def test_a_request_head_without_h11s_checks_is_h11s_own(headers, version: bytes, host: dict[str, bytes],
                                                          target: bytes) -> None:
    """request_head of a parsed request's rewritten headers (Host set, or added if none) is the h11.Request
    h11 would build, and writes the same bytes; a target h11 refuses, it refuses as h11 does."""
    from cpnd.h1 import rewrite_headers
    from cpnd.whole import request_head

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/" + version + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    if not isinstance(event, h11.Request):
        return
    fields = rewrite_headers(event.headers, drop_cpn=True, **host)
    try:
        expected = h11.Request(method=event.method, target=target, headers=fields, _parsed=True)
    except h11.LocalProtocolError as exc:
        with pytest.raises(h11.LocalProtocolError, match=str(exc)):
            request_head(event.method, target, fields)
        return
    got = request_head(event.method, target, fields)
    assert got == expected and type(got) is h11.Request
    assert h11.Connection(h11.CLIENT).send(got) == h11.Connection(h11.CLIENT).send(expected)


_H11_CONN_STATE = ("_request_method", "_writer", "_reader", "client_is_waiting_for_100_continue", "their_http_version")


def _h11_conn_state(conn: h11.Connection) -> tuple[object, ...]:
    return (*(getattr(conn, a) for a in _H11_CONN_STATE), dict(conn._cstate.states), conn._cstate.keep_alive,
            set(conn._cstate.pending_switch_proposals))


def _read_around_and_by_h11(data: bytes) -> tuple[h11.Connection, h11.Connection | None]:
    """``data`` read by request_events and, if it took it, by h11 too: the same events asserted; (ours,
    h11's connection) after, h11's None when request_events left it (its connection then untouched)."""
    from cpnd.whole import request_events

    ours, theirs = h11.Connection(h11.SERVER), h11.Connection(h11.SERVER)
    before = _h11_conn_state(ours)
    got = request_events(ours, data)
    if got is None:
        assert _h11_conn_state(ours) == before and not ours.trailing_data[0]
        return ours, None
    theirs.receive_data(data)
    expected = [theirs.next_event() for _ in got]  # h11 refusing what we read would raise here
    norm = lambda e: (bytes(e.data), e.chunk_start, e.chunk_end) if type(e) is h11.Data else repr(e)  # noqa: E731
    assert list(map(norm, got)) == list(map(norm, expected))  # (h11's Data holds a bytearray)
    return ours, theirs


@given(st.lists(st.tuples(_names, _values), max_size=8), st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT"]),
       st.lists(st.binary(max_size=3), max_size=3), st.booleans(), st.booleans())
@example([(b"X-A", b"x"), (b"Content-Length", b"3")], b"POST", [b"ab", b"c"], False, False)
@example([(b"X-A", b"1")], b"GET", [], False, True)
def test_a_whole_request_written_around_h11_is_what_h11_writes(headers, method: bytes, body: list[bytes],
                                                                  trailers: bool, host_last: bool) -> None:
    """request_bytes writes a whole plain request byte for byte as h11 does and leaves the connection in
    h11's state (the response then read alike); anything else it leaves to h11, the connection untouched."""
    from cpnd.whole import request_bytes

    try:
        fields = [*headers, (b"Host", b"h")] if host_last else [(b"Host", b"h"), *headers]
        head = h11.Request(method=method, target=b"/a?b", headers=fields)
    except h11.LocalProtocolError:
        return
    events = lambda: [head, *(h11.Data(data=b) for b in body),  # noqa: E731
                      h11.EndOfMessage(headers=[(b"x-t", b"1")] if trailers else [])]
    ours, theirs = h11.Connection(h11.CLIENT), h11.Connection(h11.CLIENT)
    before = _h11_conn_state(ours)
    got = request_bytes(ours, events())
    try:
        expected = b"".join(filter(None, map(theirs.send, events())))
    except h11.LocalProtocolError:
        assert got is None and _h11_conn_state(ours) == before  # h11 refuses it: so do we, having changed nothing
        return
    if got is None:
        assert _h11_conn_state(ours) == before
        return
    assert got == expected and _h11_conn_state(ours) == _h11_conn_state(theirs)
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    for conn in (ours, theirs):
        conn.receive_data(answer)
    assert [repr(ours.next_event()) for _ in range(3)] == [repr(theirs.next_event()) for _ in range(3)]


_LINES = st.sampled_from([b"Host: h", b"host:h ", b"Host: h2", b"X-A: 1", b"X-A:  a b\t", b"Content-Length: 2",
                          b"content-length: 0", b"Content-Length: 2, 2", b"Content-Length: x", b"Transfer-Encoding: chunked",
                          b"Connection: close", b"Expect: 100-continue", b"Upgrade: h2c", b" folded", b"X-B:",
                          b"Bad Name: 1", b"X-C: \x01", b"X-D: caf\xc3\xa9", b"Content-Length: 00", b"Content-Length: 02",
                          b"Host: h\nX-E: 1", b"X-F: a\rb"])


@given(st.sampled_from([b"GET /a?b HTTP/1.1", b"POST /v1/x HTTP/1.1", b"GET / HTTP/1.0", b"CONNECT h:1 HTTP/1.1",
                        b"GET /a b HTTP/1.1", b""]),
       st.lists(_LINES, max_size=6), st.sampled_from([b"\r\n", b"\n"]), st.sampled_from([b"", b"hi", b"hi!", b"GET"]))
@example(b"POST /v1/x HTTP/1.1", [b"Host: h", b"Content-Length: 2"], b"\r\n", b"hi")
@example(b"GET /a?b HTTP/1.1", [b"host:h ", b"X-A:  a b\t", b"X-B:"], b"\r\n", b"")
@example(b"POST /v1/x HTTP/1.1", [b"Host: h", b"Content-Length: 00"], b"\r\n", b"")
def test_a_whole_request_read_around_h11_is_what_h11_reads(line: bytes, fields: list[bytes], eol: bytes,
                                                           body: bytes) -> None:
    """request_events reads a whole plain request as h11 reads it (the same events, the connection in
    the same state after); anything else it leaves to h11, the connection untouched."""
    data = eol.join([line, *fields, b"", b""]) + body
    ours, theirs = _read_around_and_by_h11(data)
    if theirs is None:
        return
    assert theirs.next_event() is h11.PAUSED or theirs.next_event() is h11.NEED_DATA
    assert not theirs.trailing_data[0] and _h11_conn_state(ours) == _h11_conn_state(theirs)
    for conn in (ours, theirs):  # the answer goes out alike
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))


@pytest.mark.parametrize("role", [h11.CLIENT, h11.SERVER])
def test_a_new_connection_is_h11s_own_new_one(role) -> None:
    """new_connection's is h11's new Connection, attribute for attribute, with state and buffer its own."""
    from cpnd.heads import MAX_HEADER_BYTES
    from cpnd.whole import new_connection

    ours, theirs, other = new_connection(role), h11.Connection(role, max_incomplete_event_size=MAX_HEADER_BYTES), \
        new_connection(role)
    assert vars(ours).keys() == vars(theirs).keys()
    for name, value in vars(theirs).items():
        if name == "_cstate":
            assert vars(ours._cstate) == vars(value) and ours._cstate is not other._cstate
        elif name == "_receive_buffer":
            assert vars(ours._receive_buffer) == vars(value) and ours._receive_buffer is not other._receive_buffer
        else:
            assert getattr(ours, name) == value, name
    ours._cstate.states[h11.CLIENT] = h11.DONE  # (nothing shared: another new one is IDLE)
    assert other.their_state is h11.IDLE and other.our_state is h11.IDLE


def test_a_request_read_whole_is_given_event_by_event_and_its_unread_rest_goes_with_its_cycle() -> None:
    """H11Stream.take: a user's whole request read around h11 comes out of next_event(_nowait) as h11's
    would; its body left unread (answered without it) is gone with the cycle, not read as the next request's."""
    from cpnd.h1 import H11Stream

    client = H11Stream(h11.SERVER, None)
    client.take(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    assert type(client.next_event_nowait()) is h11.Request
    client.conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
    client.conn.send(h11.EndOfMessage())
    assert client.conn.our_state is client.conn.their_state is h11.DONE
    client.start_next_cycle()
    assert client.next_event_nowait() is None
    client.take(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    first = client.next_event_nowait()
    assert type(first) is h11.Request and first.target == b"/b"
    assert type(client.next_event_nowait()) is h11.EndOfMessage and client.next_event_nowait() is None
    client.take(b"")  # the end, h11's as ever
    client.conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    client.conn.send(h11.EndOfMessage())
    client.start_next_cycle()
    assert type(client.next_event_nowait()) is h11.ConnectionClosed
    from cpnd.h1 import DRAIN_LIMIT

    big = H11Stream(h11.SERVER, None)  # a body larger than drain() reads after an error: h11's, as ever
    big.take(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (DRAIN_LIMIT + 1) + b"x" * (DRAIN_LIMIT + 1))
    assert big._ready is None and type(big.next_event_nowait()) is h11.Request
    assert big.conn.their_state is h11.SEND_BODY


@given(st.lists(st.tuples(st.sampled_from([b"Content-Length", b"content-length", b"X-Len", b"Accept"]),
                          st.sampled_from([b"0", b"12", b"3"])), max_size=4))
def test_content_length_found_in_c_as_by_the_loop(fields: list[tuple[bytes, bytes]]) -> None:
    """Content-Length from h11's own items (found in C) is the pairs' loop's, whatever the fields."""
    try:
        headers = h11.Request(method="POST", target="/", headers=[(b"Host", b"x"), *fields]).headers
    except h11.LocalProtocolError:
        return  # conflicting lengths: h11 takes no such head
    assert content_length(headers) == content_length(list(headers.raw_items()))


def test_content_length_as_h11_holds_the_fields_and_as_pairs() -> None:
    fields = [(b"Host", b"x"), (b"X-Len", b"3"), (b"Content-Length", b"12")]
    assert content_length(h11.Request(method="POST", target="/", headers=fields).headers) == 12
    assert content_length(fields) == 12
    assert content_length(h11.Request(method="GET", target="/", headers=fields[:2]).headers) is None
    assert content_length(fields[:2]) is None


def test_receive_nowait_takes_what_a_socket_holds_and_never_waits() -> None:
    """A plain socket: nothing in is False at once (no wait), bytes in are fed to h11 whole, the end
    is h11's ConnectionClosed; a tunnel stream or a stream with no socket (TLS) is never read."""
    import trio

    from cpnd.h1 import H11Stream

    async def main() -> None:
        left, right = trio.socket.socketpair()
        ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
        stream = H11Stream(h11.SERVER, ours)
        with trio.fail_after(5):
            assert stream.receive_nowait() is False  # nothing yet: no wait either
            await theirs.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            while not stream.receive_nowait():  # loopback: in at once, but give the kernel its moment
                await trio.sleep(0)
            event = stream.next_event_nowait()
            assert isinstance(event, h11.Request) and event.target == b"/a"
            assert isinstance(stream.next_event_nowait(), h11.EndOfMessage)
            tunnel = H11Stream(h11.SERVER, ours, tunnel=True)
            await theirs.send_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tunnel.receive_nowait() is False and H11Stream(h11.SERVER, object()).receive_nowait() is False
            closing = H11Stream(h11.SERVER, ours)
            await theirs.aclose()
            while not closing.receive_nowait():
                await trio.sleep(0)
            # What was in before the end, then the end itself.
            assert isinstance(closing.next_event_nowait(), h11.Request)
            assert isinstance(closing.next_event_nowait(), h11.EndOfMessage)
            closing.conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            closing.conn.send(h11.EndOfMessage())
            closing.conn.start_next_cycle()
            assert closing.next_event_nowait() is None or closing.conn.their_state is h11.CLOSED
            while closing.conn.their_state is not h11.CLOSED:
                assert closing.receive_nowait()  # the end is in: b"" is read at once
                closing.next_event_nowait()
        await ours.aclose()

    trio.run(main)


def test_receive_some_reads_a_plain_socket_as_trio_does_with_fewer_calls() -> None:
    """``h1.receive_some``: what trio's SocketStream.receive_some returns and raises (bytes there: read,
    then a checkpoint that lets others run; none: a wait; Cancelled first in a cancelled scope; our
    close: ClosedResourceError; the peer's reset: BrokenResourceError), in a fraction of its calls;
    a stream without a socket (TLS) reads its own way."""
    import socket
    import struct
    import sys

    import trio

    from cpnd.h1 import receive_some

    def calls(coro_fn):  # Python and C calls made while awaiting coro_fn() (the scheduler's included)
        async def run():
            n = 0

            def count(frame, event, arg):
                nonlocal n
                n += event in ("call", "c_call")
            sys.setprofile(count)
            try:
                return await coro_fn(), n
            finally:
                sys.setprofile(None)
        return run

    async def main() -> None:
        left, right = trio.socket.socketpair()
        ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
        with trio.fail_after(5):
            await theirs.send_all(b"abc")
            await trio.lowlevel.wait_readable(left)
            ran = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: ran.append(1) or trio.sleep(0))
                assert await receive_some(ours) == b"abc" and ran  # the checkpoint after the read let it run
            await theirs.send_all(b"abc")
            await trio.lowlevel.wait_readable(left)
            got, ours_n = await calls(lambda: receive_some(ours))()
            assert got == b"abc"
            await theirs.send_all(b"abc")
            await trio.lowlevel.wait_readable(left)
            got, trios_n = await calls(lambda: ours.receive_some(65536))()
            assert got == b"abc" and ours_n <= trios_n - 10, (ours_n, trios_n)  # (45 against 59 here)

            async def later() -> None:
                await trio.sleep(0.01)
                await theirs.send_all(b"late")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(later)
                assert await receive_some(ours) == b"late"  # nothing there: waited for it

            await theirs.send_all(b"x")
            await trio.lowlevel.wait_readable(left)
            with trio.CancelScope() as scope:
                scope.cancel()
                await receive_some(ours)  # cancelled before reading, as trio's
                raise AssertionError("not cancelled")
            assert await receive_some(ours) == b"x"  # still there for the next read

            class Tls:  # no .socket: its own receive_some
                async def receive_some(self, n: int) -> bytes:
                    return b"tls"
            assert await receive_some(Tls()) == b"tls"

        await ours.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await receive_some(ours)
        # The peer resets: BrokenResourceError, as trio's (SO_LINGER 0 closes with an RST).
        with socket.create_server(("127.0.0.1", 0)) as a:
            client = trio.socket.socket()
            await client.connect(a.getsockname())
            b, _ = a.accept()
            b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            b.close()
            stream = trio.SocketStream(client)
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(5):
                    while await receive_some(stream):
                        pass
                    raise AssertionError("an orderly end, not a reset")
            await stream.aclose()

    trio.run(main)


def test_receive_some_after_its_wait_reads_its_own_socket_not_a_reused_descriptor() -> None:
    """A socket closed by another task after its reader was woken (readable) and before the reader ran,
    its descriptor's number taken at once by a new socket: the reader gets ClosedResourceError, as from
    trio's (which reads through the socket object), never the new socket's bytes (another user's, or
    another instance's answer)."""
    import os

    import trio

    from cpnd import h1

    async def main() -> None:
        left, right = trio.socket.socketpair()
        ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
        fd = left.fileno()
        taken = []
        real_wait = trio.lowlevel.wait_readable

        async def woken_then_closed(sock: object) -> None:
            await real_wait(sock)  # readable: the reader is scheduled ...
            left.close()  # ... and before it runs another task closes its socket; a new one gets its number
            a, b = trio.socket.socketpair()
            taken.extend((a, b))
            new = a if a.fileno() == fd else b
            assert new.fileno() == fd
            os.write((b if new is a else a).fileno(), b"not yours")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(theirs.send_all, b"x")
                h1.trio.lowlevel.wait_readable = woken_then_closed  # (h1 calls it through trio.lowlevel)
                try:
                    with pytest.raises(trio.ClosedResourceError):
                        got = await h1.receive_some(ours)
                        raise AssertionError(f"read {got!r} from a descriptor no longer its")
                finally:
                    h1.trio.lowlevel.wait_readable = real_wait
        for s in (*taken, right):
            s.close()

    trio.run(main)


# Bytes an attacker puts where a request's grammar is tight: control bytes, bare CR and LF, spaces and
# tabs around a colon or a length, a sign or a comma in a length, a high byte, NUL.
_SPICE = st.sampled_from([b"\x00", b"\t", b"\n", b"\x0b", b"\x0c", b"\r", b" ", b"\x7f", b"\x80", b"\xa0", b"\xff",
                          b",", b":", b"+", b"-", b"0", b"5", b"\r\n", b"\r\n ", b"\n\n", b"\r\n\r\n"])
_EXTRA = st.sampled_from([b"Host: h2", b"Content-Length: 0", b"Content-Length: 5", b"content-length: 05",
                          b"Content-Length: 5, 5", b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked",
                          b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue", b"Upgrade: h2c",
                          b" folded", b"\tfolded", b"X-E:", b"X-F: a\x01b"])


@st.composite
def _mutated_requests(draw: st.DrawFn) -> bytes:
    """A plain whole request (a Request, its Data, an EndOfMessage, as request_events reads), then cut,
    spiced, given another field or line ending, or more or less body: what a user or a peer could send."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS"]))
    body = draw(st.sampled_from([b"", b"hello", b"0\r\n\r\n", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"]))
    lines = [method + b" " + draw(st.sampled_from([b"/a?b", b"/", b"*", b"http://h/a", b"h:1"])) + b" HTTP/1.1",
             b"Host: h", *([b"Content-Length: %d" % len(body)] if body or draw(st.booleans()) else [])]
    lines = draw(st.permutations(lines[1:]).map(lambda rest: [lines[0], *rest]))
    for kind, at, what in draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1000), _SPICE), max_size=3)):
        i = at % len(lines)
        if kind == 0:  # a byte or two into a line
            pos = at % (len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + what + lines[i][pos:]
        elif kind == 1:
            lines.insert(1 + at % len(lines), draw(_EXTRA))
        elif kind == 2 and len(lines[i]) > 1:  # a byte out
            pos = at % len(lines[i])
            lines[i] = lines[i][:pos] + lines[i][pos + 1:]
        elif kind == 3:
            body = body + what if at % 2 else body[:-1]
        else:
            lines[i] = lines[i].upper() if at % 2 else lines[i].lower()
    eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n"]))
    return eol.join(lines) + eol + eol + body


@given(_mutated_requests())
@example(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 05\r\n\r\nhello")
@example(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: h\r\n\r\n")
@example(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\n\r\nhello")
@example(b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: a\x0bb\r\n\r\n")
def test_a_crafted_request_is_read_around_h11_only_as_h11_reads_it(data: bytes) -> None:
    """request_events on anything a user or a peer could send: h11's events and state exactly (nothing
    left unread), or None with the connection untouched (h11 then reads or refuses it)."""
    ours, theirs = _read_around_and_by_h11(data)
    if theirs is None:
        return
    assert theirs.next_event() is h11.NEED_DATA and not theirs.trailing_data[0]
    assert _h11_conn_state(ours) == _h11_conn_state(theirs)


def _served(take: bool, reads: list[bytes], early: list[bool]) -> list[object]:
    """A user's connection as users.py serves it, fed ``reads``: each request answered when its body is in
    (``early``: at its head, its body then drained of what is here), the next cycle when both sides are
    done. What it saw: events, answers, cycles, the error that ended it."""
    from cpnd.h1 import H11Stream

    s = H11Stream(h11.SERVER, None)
    out: list[object] = []
    answer = [h11.Response(status_code=200, headers=[(b"content-length", b"0")]), h11.EndOfMessage()]
    try:
        for data in reads:
            s.take(data) if take else s.conn.receive_data(data)
            while (ev := s.next_event_nowait()) is not None:
                out.append(ev if type(ev) is not h11.Data else bytes(ev.data))
                if type(ev) is h11.ConnectionClosed:
                    return out
                if type(ev) is h11.Request and early and early.pop():
                    list(map(s.conn.send, answer))
                    while s.conn.their_state is h11.SEND_BODY and s.next_event_nowait() is not None:
                        pass  # (_rest_of_body_quietly; the fast path has the body read already)
                    out.append("answered early")
                elif type(ev) is h11.EndOfMessage and s.conn.our_state is h11.SEND_RESPONSE:
                    list(map(s.conn.send, answer))
                if s.conn.our_state is h11.DONE:
                    if s.conn.their_state is not h11.DONE:
                        if type(ev) is h11.Request:
                            continue  # its body is still coming
                        return [*out, "closed: body unread"]
                    s.start_next_cycle()
                    out.append("next")
    except h11.ProtocolError as exc:
        out.append(repr(exc))
    return out


@given(st.lists(_mutated_requests(), min_size=1, max_size=3), st.lists(st.integers(0, 200), max_size=3),
       st.lists(st.booleans(), max_size=3))
@example([b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"], [],
         [True])
def test_a_connection_read_around_h11_sees_what_h11_sees_request_after_request(requests: list[bytes],
                                                                              cuts: list[int], early: list[bool]) -> None:
    """H11Stream.take on a user's connection, whatever its reads hold (requests whole, pipelined, split
    anywhere, crafted): the same events, answers, cycles and end as h11 alone, request after request."""
    stream = b"".join(requests)
    bounds, pos = set(), 0
    for r in requests:
        pos += len(r)
        bounds.add(pos)
    bounds |= {c % (len(stream) + 1) for c in cuts}
    edges = [0, *sorted(b for b in bounds if 0 < b < len(stream)), len(stream)]
    reads = [stream[a:b] for a, b in zip(edges, edges[1:])]
    fast, plain = _served(True, reads, list(early)), _served(False, reads, list(early))
    norm = lambda out: [repr(e) if isinstance(e, h11._events.Event) else e for e in out]  # noqa: E731
    assert norm(fast) == norm(plain)
