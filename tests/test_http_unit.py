"""Pure helpers of the data plane: URL translation, target checks, header filtering."""

from __future__ import annotations

import urllib.parse

import h11
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from cpnd.errors import HttpError
from cpnd.h1 import awaits_answer, content_length, filter_headers, read_whole, rewrite_headers, translate_target, \
    whole_bytes, whole_response
from cpnd.heads import check_target, split_head


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
                                    "/caf\u00e9".encode()])
def test_check_target_refuses_escapes(target: bytes) -> None:
    with pytest.raises(HttpError) as ei:
        check_target(target)
    assert ei.value.status == 400


def test_check_target_keeps_the_path() -> None:
    assert check_target(b"/yolo/x.y/..z?a=../b") == "/yolo/x.y/..z"


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


# ---- whole responses written and passed on around h11's per-event machinery (h1.whole_bytes, whole_response)

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
