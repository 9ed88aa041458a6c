"""Whole HTTP/1.1 messages of known length read and written around h11's per-event machinery
(sans-IO): the events, bytes and connection state h11's own reading and writing would give, by
h11's own grammar; anything else is left to h11 (None)."""

from __future__ import annotations

import itertools
import operator
import re
from typing import Any

import h11
from h11._abnf import field_content, reason_phrase, token
from h11._events import request_target_re
from h11._headers import CONTENT_LENGTH_MAX_DIGITS, Headers
from h11._readers import READERS, header_field_re, request_line_re
from h11._receivebuffer import ReceiveBuffer
from h11._state import ConnectionState
from h11._writers import WRITERS

from .heads import HOP_BY_HOP, MAX_HEADER_BYTES

# Of h11's (raw, lowercase, value) items
_RAW, _NAME, _VALUE = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
_CLIENT, _SERVER, _IDLE, _DONE, _SEND_RESPONSE = h11.CLIENT, h11.SERVER, h11.IDLE, h11.DONE, h11.SEND_RESPONSE
_EOM = h11.EndOfMessage()  # (frozen: one serves every message read whole)
_new = object.__new__
_set = object.__setattr__


# ---- a whole response

# A response h11 writes as it reads it, byte for byte: "HTTP/1.1", a 2xx-5xx status and a reason,
# every field as "name: value" (no folding, no padding), the blank line (h11's own ABNF).
_WHOLE_HEAD = re.compile(rf"HTTP/1\.1 (?P<status>[2-5][0-9][0-9]) (?P<reason>{reason_phrase})\r\n"
                         rf"(?:{token}: (?:{field_content})?\r\n)+\r\n".encode("ascii"))
_FIELD = re.compile(rb"([^:\r\n]+): ([^\r\n]*)\r\n")  # of a head _WHOLE_HEAD took: (name, value)
# What a relay drops or h11 frames its own way (hop-by-hop fields; Host, which h11 writes first).
_NOT_AS_IS = re.compile(b"\r\n(?:" + b"|".join(sorted(HOP_BY_HOP | {b"host"})) + b"):")
# What h11 reads its own way: a framing of its own, an end of the connection's keep-alive.
_NOT_READ_SO = re.compile(rb"\r\n(?:transfer-encoding:|connection:[^\r]*close)")
# h11 refuses a length of more digits (and int() one past 4,300: a ValueError, not h11's RemoteProtocolError)
_LENGTH_FIELD = re.compile(rb"\r\ncontent-length: ([0-9]{1,%d})\r\n" % CONTENT_LENGTH_MAX_DIGITS)
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_READ_ALL = READERS[(h11.SERVER, h11.DONE)]  # a client's reader once the response is in


def _whole(data: bytes, refused: re.Pattern[bytes] = _NOT_AS_IS) -> re.Match[bytes] | None:
    """The head of ``data`` if ``data`` is exactly one whole response of known length as h11 writes it
    (``whole_response``), with no field ``refused`` finds in its lowercase head."""
    head = _WHOLE_HEAD.match(data, 0, MAX_HEADER_BYTES)
    if head is None:
        return None
    end = head.end()
    low = data[:end].lower()
    length = _LENGTH_FIELD.search(low)
    if (length is None or low.count(b"\r\ncontent-length:") != 1 or int(length[1]) != len(data) - end
            or refused.search(low) is not None or head["status"] in (b"204", b"304")):
        return None
    return head


def whole_response(data: bytes) -> int | None:
    """The status of ``data`` if it is exactly one whole response of known length, as h11 writes it
    and a relay passes it on unchanged (what an egress writes down a tunnel stream: read by h11,
    rewritten and written by h11 again, it comes out as it went in), else None. Checked by h11's
    own grammar in C (its every field) rather than read event by event."""
    head = _whole(data)
    return None if head is None else int(head["status"])


def read_whole(conn: h11.Connection, data: bytes) -> list[Any] | None:
    """The events h11 would read from ``data``, the first piece of a client's answer, if it is a whole
    response of known length (``_whole``), last first (Response at the end), with ``conn``'s state
    moved as h11's reading them would; else None (h11 reads it). h11's read of a small answer
    was ~2,500 bytecodes."""
    return read_whole_awaited(conn, data) if awaits_answer(conn) else None


def awaits_answer(conn: h11.Connection) -> bool:
    """Whether ``conn`` is a client's, kept alive, its request (not HEAD) sent whole and nothing of
    the answer received: its ``next_event`` says NEED_DATA, and ``read_whole`` may take what comes."""
    cstate = conn._cstate
    states = cstate.states
    return (conn.our_role is _CLIENT and states[_SERVER] is _SEND_RESPONSE and states[_CLIENT] is _DONE
            and cstate.keep_alive and not cstate.pending_switch_proposals and conn._request_method != b"HEAD"
            and not conn._receive_buffer and not conn._receive_buffer_closed)


def read_whole_awaited(conn: h11.Connection, data: bytes) -> list[Any] | None:
    """``read_whole`` on a connection its caller found ``awaits_answer``."""
    head = _whole(data, _NOT_READ_SO)  # (its hop-by-hop fields are the relay's to drop)
    if head is None:
        return None
    pairs = _FIELD.findall(data, head.end("reason") + 2, head.end() - 2)
    names = list(map(_FIRST, pairs))
    response = h11.Response(status_code=int(head["status"]), reason=head["reason"], http_version=b"1.1", _parsed=True,
                            headers=Headers(list(zip(names, map(bytes.lower, names), map(_SECOND, pairs)))))
    _answer_read(conn)
    body = data[head.end():]
    return [_EOM, h11.Data(data=body), response] if body else [_EOM, response]


class Whole:
    """A whole response, in one piece, passed on as it came: an egress's down a stream to the user
    (relay.first_event: not read by h11 at the ingress, nor written by it again), or an instance's
    by its egress, to our own user or down a stream, rewritten in its bytes (``answer_as_is``)."""

    __slots__ = ("status_code", "data")

    def __init__(self, status_code: int, data: bytes) -> None:
        self.status_code = status_code
        self.data = data


# An instance's answer passed on by its egress as it came, rewritten in its bytes: refused if it has a
# hop-by-hop field other than Connection: keep-alive and Keep-Alive (nginx's, Apache's), which go; a
# Host (h11 writes it first); a CPN-* field (an instance's are dropped); or what h11 reads its own way.
_ANSWER_REFUSED = re.compile(b"\r\n(?:(?:" + b"|".join(sorted((HOP_BY_HOP - {b"connection", b"keep-alive"}) | {b"host"}))
                             + b"):|cpn-|connection:(?! keep-alive\r\n))")
_KEPT_ALIVE = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.IGNORECASE)  # (a field line, less its CRLF)


def answer_as_is(conn: h11.Connection, data: bytes, extra: bytes) -> Whole | None:
    """For a client ``conn`` that ``awaits_answer``, ``data`` its first read: if it is one whole answer of
    known length that ``read_whole_awaited`` reads and ``_ANSWER_REFUSED`` does not refuse, its status and
    (a Whole) the bytes ``whole_bytes`` writes of it as an egress relays it (``rewrite_headers(drop_cpn=True,
    extra=...)``: Connection and Keep-Alive out, ``extra``, field lines as h11 writes them, after the
    others), ``conn`` moved as h11's reading of it would; else None, nothing moved. (Read into events,
    rewritten and written again: ~1,000 bytecodes an answer.)"""
    head = _whole(data, _ANSWER_REFUSED)
    if head is None:
        return None
    _answer_read(conn)
    end = head.end() - 2  # the blank line's
    return Whole(int(head["status"]), b"".join((_KEPT_ALIVE.sub(b"", data[:end]), extra, data[end:])))


def _answer_read(conn: h11.Connection) -> None:
    """h11's state after reading a whole answer's Response, Data and EndOfMessage (SEND_RESPONSE ->
    SEND_BODY -> DONE), of HTTP/1.1 and kept alive."""
    conn._cstate.states[_SERVER] = _DONE
    conn._reader = _READ_ALL
    conn.their_http_version = b"1.1"
    conn.client_is_waiting_for_100_continue = False


def whole_writable(conn: h11.Connection) -> bool:
    """Whether a whole response of known length may be written on ``conn`` around h11 (``wrote_whole``):
    a server's kept-alive HTTP/1.1 connection whose request came whole, not HEAD, not an upgrade, and
    no response begun."""
    cstate = conn._cstate
    states = cstate.states
    return (conn.our_role is _SERVER and states[_SERVER] is _SEND_RESPONSE and states[h11.CLIENT] is _DONE
            and cstate.keep_alive and not cstate.pending_switch_proposals and conn._request_method != b"HEAD")


def wrote_whole(conn: h11.Connection) -> None:
    """h11's state after its ``send`` of a Response (kept alive, of known length), its Data and its
    EndOfMessage on a ``whole_writable`` connection: ours DONE, no writer, no 100-continue awaited."""
    conn._cstate.states[_SERVER] = _DONE
    conn._writer = None
    conn.client_is_waiting_for_100_continue = False


def whole_bytes(conn: h11.Connection, events: list[Any]) -> bytes | None:
    """What h11 would write for ``events`` (a Response, Data, an EndOfMessage) if they are a whole
    response of known length ``conn`` may take around h11, its state moved as h11 would move it;
    else None (h11 writes them). h11's send of the three was ~2,000 bytecodes a small response."""
    head, last = events[0], events[-1]
    if last.headers or head.http_version != b"1.1" or not whole_writable(conn):
        return None
    full = head.headers._full_items
    names = list(map(_NAME, full))
    if (names.count(b"content-length") != 1 or b"transfer-encoding" in names or b"connection" in names
            or b"host" in names or head.status_code in (204, 304)):
        return None
    body = [ev.data for ev in events[1:-1] if type(ev) is h11.Data]
    if len(body) != len(events) - 2 or sum(map(len, body)) != int(full[names.index(b"content-length")][2]):
        return None
    wrote_whole(conn)
    fields = b"\r\n".join(map(b": ".join, zip(map(_RAW, full), map(_VALUE, full))))
    return b"".join([b"HTTP/1.1 %d %s\r\n%s\r\n\r\n" % (head.status_code, head.reason, fields), *body])


# ---- a whole request

# A new h11 connection a tunnel stream (~130 bytecodes in h11's __init__, each end of every hop): a
# fresh one's attributes copied from one made once, with a state and a receive buffer of its own.
_FRESH = {role: vars(h11.Connection(role, max_incomplete_event_size=MAX_HEADER_BYTES)) for role in (h11.CLIENT, h11.SERVER)}


def new_connection(role: type[h11.CLIENT] | type[h11.SERVER]) -> h11.Connection:
    """``h11.Connection(role, max_incomplete_event_size=MAX_HEADER_BYTES)``, as h11 makes it."""
    conn = _new(h11.Connection)
    conn.__dict__.update(_FRESH[role])
    conn._cstate = ConnectionState()
    conn._receive_buffer = ReceiveBuffer()
    return conn


_target_ok = request_target_re.fullmatch


def request_head(method: bytes, target: bytes, headers: Headers) -> h11.Request:
    """An HTTP/1.1 request of a method h11 parsed and headers as ``rewrite_headers`` or ``replace_host``
    made them, with exactly one Host (h11's own items): without h11's checks of them again."""
    # h11's Request walks the headers for Host (a Python iteration of h11's Headers) and checks the
    # method and the target: ~110 bytecodes a head, built once at the ingress and once at the egress.
    # The target may come from an instance's URL: it is checked, and h11 names what is wrong with it.
    if _target_ok(target) is None:
        return h11.Request(method=method, target=target, headers=headers, _parsed=True)
    return _request(method, target, headers)


def _request(method: bytes, target: bytes, headers: Headers) -> h11.Request:
    """An HTTP/1.1 h11 Request of what h11's grammar has taken already, made without its checks."""
    req = _new(h11.Request)
    _set(req, "method", method)
    _set(req, "target", target)
    _set(req, "headers", headers)
    _set(req, "http_version", b"1.1")
    return req


_RAW_VALUE = operator.itemgetter(0, 2)  # of h11's (raw, lowercase, value) items
_FIELD_LINE = b"%s: %s\r\n".__mod__  # as h11 writes a field
_IS_HOST = b"host".__eq__
_RESPONSE_READER = READERS[(h11.SERVER, h11.SEND_RESPONSE)]
# Fields that make h11 do more than write a request (chunked framing, a keep-alive or 100-continue
# change, an upgrade proposal): a request with any of them goes through h11's own send.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"connection", b"expect", b"upgrade"})


def request_bytes(conn: h11.Connection, events: list[Any]) -> bytes | None:
    """What h11 would write for ``events`` (a Request, its Data, an EndOfMessage: a whole plain request
    of known length) on a client ``conn`` that sent nothing yet, its state moved as h11's send would
    move it; else None (h11 writes them)."""
    head, last = events[0], events[-1]
    if type(head) is not h11.Request or type(last) is not h11.EndOfMessage or last.headers._full_items \
            or head.http_version != b"1.1" or head.method == b"CONNECT":
        return None
    cstate = conn._cstate
    states = cstate.states
    if conn.our_role is not _CLIENT or states[_CLIENT] is not _IDLE or states[_SERVER] is not _IDLE \
            or not cstate.keep_alive or cstate.pending_switch_proposals:
        return None
    full = head.headers._full_items
    names = list(map(_NAME, full))
    if not _NOT_PLAIN.isdisjoint(names):
        return None
    body = [ev.data for ev in events[1:-1] if type(ev) is h11.Data]
    lengths = names.count(b"content-length")
    if len(body) != len(events) - 2 or lengths > 1 or sum(map(len, body)) != (
            int(full[names.index(b"content-length")][2]) if lengths else 0):  # (no length: none, as h11 frames it)
        return None
    # h11's send of the Request and the EndOfMessage: client IDLE -> SEND_BODY -> DONE, the server's
    # side to SEND_RESPONSE (its reader for the response), nothing left to write.
    states[_CLIENT], states[_SERVER] = _DONE, _SEND_RESPONSE
    conn._request_method = head.method
    conn._writer = None
    conn._reader = _RESPONSE_READER
    conn.client_is_waiting_for_100_continue = False
    if names[0] != b"host" or names.count(b"host") != 1:  # Host first, as h11 writes it (RFC 7230 section 5.4)
        hosts = list(map(_IS_HOST, names))
        full = [*itertools.compress(full, hosts), *itertools.compress(full, map(operator.not_, hosts))]
    fields = map(_FIELD_LINE, map(_RAW_VALUE, full))
    return b"".join([b"%s %s HTTP/1.1\r\n" % (head.method, head.target), *fields, b"\r\n", *body])


_RESPONSE_WRITER = WRITERS[(h11.SERVER, h11.SEND_RESPONSE)]
_DONE_READER = READERS[(h11.CLIENT, h11.DONE)]
_LOWER = bytes.lower
_FIELD_NAME, _FIELD_VALUE = operator.itemgetter("field_name"), operator.itemgetter("field_value")  # of h11's matches


def request_events(conn: h11.Connection, data: bytes, max_body: int | None = None) -> list[Any] | None:
    """The events h11 would read from ``data`` on a server ``conn`` that has read nothing yet, if
    ``data`` is exactly one whole plain HTTP/1.1 request of known length (a Request, its Data up to
    ``max_body`` bytes, an EndOfMessage), ``conn`` moved as h11's reading them would; else None."""
    # What an ingress writes down a tunnel stream (h11's own writing, or request_bytes'), read by h11's
    # own grammar (its request line and field regexes) with its per-event machinery left out: ~1,000
    # bytecodes a request at the egress. Anything h11 would read otherwise, or refuse, h11 reads.
    cstate = conn._cstate
    states = cstate.states
    if conn.our_role is not _SERVER or states[_CLIENT] is not _IDLE or states[_SERVER] is not _IDLE \
            or conn._receive_buffer._data or not cstate.keep_alive:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_HEADER_BYTES:
        return None
    lines = data[:end].split(b"\r\n")
    line = request_line_re.fullmatch(lines[0])
    if line is None or line["http_version"] != b"1.1" or data.count(b"\n", 0, end) != len(lines) - 1:
        return None  # (a bare LF ends a line for h11: it reads such heads itself)
    fields = list(map(header_field_re.fullmatch, lines[1:]))  # a folded line matches none: h11's
    if None in fields:
        return None
    raw = list(map(_FIELD_NAME, fields))
    names = list(map(_LOWER, raw))
    full = list(zip(raw, names, map(_FIELD_VALUE, fields)))
    size = 0  # no framing field: h11 reads a request with no body
    if b"content-length" in names:
        length = full[names.index(b"content-length")][2]
        if names.count(b"content-length") != 1 or not length.isdigit() or len(length) > CONTENT_LENGTH_MAX_DIGITS:
            return None  # (a list of lengths, a bad one: h11 folds or refuses it)
        size = int(length)
    method = line["method"]
    if names.count(b"host") != 1 or method == b"CONNECT" or not _NOT_PLAIN.isdisjoint(names) \
            or size != len(data) - end - 4 or (max_body is not None and size > max_body):
        return None
    # h11's reading of the Request, its Data and its EndOfMessage: client IDLE -> SEND_BODY -> DONE,
    # ours to SEND_RESPONSE (its writer for the response), nothing more to read.
    states[_CLIENT], states[_SERVER] = _DONE, _SEND_RESPONSE
    conn._request_method = method
    conn.their_http_version = b"1.1"
    conn._reader = _DONE_READER
    conn._writer = _RESPONSE_WRITER
    conn.client_is_waiting_for_100_continue = False
    req = _request(method, line["target"], Headers(full))
    return [req, h11.Data(data=data[end + 4:]), _EOM] if size else [req, _EOM]
