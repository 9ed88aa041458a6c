"""HTTP/2 and gRPC translation (sans-IO): header mapping, grpc-timeout, gateway errors as gRPC
statuses, and protocol-spec's http2 vector (how a gRPC call rides a tunnel stream)."""

from __future__ import annotations

import h11
import pytest

from cpnd.errors import HttpError
from cpnd.grpcmap import (
    GrpcStatus,
    grpc_error_fields,
    grpc_status_of,
    grpc_timeout_us,
    is_grpc,
    request_head,
    response_fields,
)
from cpnd.h1 import rewrite_headers
from cpnd.h2edge import H2Stream


@pytest.mark.parametrize("value,us", [(b"1S", 1_000_000), (b"250m", 250_000), (b"5u", 5), (b"3000n", 3),
                                      (b"2M", 120_000_000), (b"1n", 1), (b"99999999H", 3600 * 1_000_000)])
def test_grpc_timeout(value, us) -> None:
    assert grpc_timeout_us(value) == us


@pytest.mark.parametrize("value", [b"", b"1", b"S", b"123456789S", b"1.5S", b"-1S", b"1s"])
def test_grpc_timeout_malformed(value) -> None:
    with pytest.raises(ValueError):
        grpc_timeout_us(value)


@pytest.mark.parametrize("status,error,code", [
    (404, "no_such_service", GrpcStatus.UNIMPLEMENTED), (503, "no_instance", GrpcStatus.UNAVAILABLE),
    (503, "no_capacity", GrpcStatus.UNAVAILABLE), (502, "bad_gateway", GrpcStatus.UNAVAILABLE),
    (504, "deadline_exceeded", GrpcStatus.DEADLINE_EXCEEDED), (400, "bad_header", GrpcStatus.INVALID_ARGUMENT),
    (413, "body_too_large", GrpcStatus.RESOURCE_EXHAUSTED), (429, "rate_limited", GrpcStatus.RESOURCE_EXHAUSTED),
    (401, "unauthorized", GrpcStatus.UNAUTHENTICATED), (403, "forbidden", GrpcStatus.PERMISSION_DENIED),
    (418, "something_new", GrpcStatus.UNKNOWN), (503, "something_new", GrpcStatus.UNAVAILABLE)])
def test_gateway_errors_as_grpc_statuses(status, error, code) -> None:
    assert grpc_status_of(HttpError(status, error, "x")) == code


def test_error_fields_are_trailers_only_with_an_encoded_message() -> None:
    fields = dict(grpc_error_fields(HttpError(503, "no_instance", "50% full\nnext")))
    assert fields[b":status"] == b"200" and fields[b"content-type"] == b"application/grpc"
    assert fields[b"grpc-status"] == b"14" and fields[b"grpc-message"] == b"no_instance: 50%25 full%0Anext"


def test_request_head_makes_an_http1_request() -> None:
    method, target, headers = request_head([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C?x"),
                                            (b":authority", b"h:1"), (b"content-type", b"application/grpc+proto"),
                                            (b"grpc-timeout", b"2S")])
    assert (method, target) == (b"POST", b"/a.B/C?x")
    assert headers[0] == (b"host", b"h:1") and (b"cpn-timeout", b"2000000us") in headers
    assert is_grpc(headers) and not is_grpc([(b"content-type", b"application/json")])
    # An explicit CPN-Timeout wins over grpc-timeout.
    _, _, headers = request_head([(b":method", b"GET"), (b":path", b"/"), (b"grpc-timeout", b"2S"), (b"cpn-timeout", b"1s")])
    assert [v for n, v in headers if n == b"cpn-timeout"] == [b"1s"] and headers[0] == (b"host", b"localhost")


@pytest.mark.parametrize("fields", [[(b":method", b"GET")], [(b":path", b"/")],
                                    [(b":method", b"CONNECT"), (b":path", b"/")], [(b":method", b"GET"), (b":path", b"x")],
                                    [(b":method", b"GET"), (b":path", b"/"), (b":path", b"/")]])
def test_request_head_refuses_what_http1_cannot_carry(fields) -> None:
    with pytest.raises(ValueError):
        request_head(fields)


def test_response_fields_drop_connection_specific_ones() -> None:
    out = response_fields(200, [(b"Content-Type", b"x"), (b"transfer-encoding", b"chunked"), (b"connection", b"close"),
                                (b"te", b"trailers"), (b"grpc-status", b"0")])
    assert out == [(b":status", b"200"), (b"content-type", b"x"), (b"grpc-status", b"0")]


def test_http2_vector_is_what_the_ingress_writes_and_its_trailers_come_back(vectors) -> None:
    v = vectors["http2"]
    fields = [(n.encode(), val.encode()) for n, val in v["h2_request_fields"]]
    method, target, headers = request_head(fields)
    user = h11.Request(method=method, target=target, headers=[*headers, (b"transfer-encoding", b"chunked")])
    tunnelled = rewrite_headers(user.headers, drop_cpn=True, extra=H2Stream.tunnel_extra)
    client = h11.Connection(h11.CLIENT)
    sent = client.send(h11.Request(method=method, target=target, headers=tunnelled))
    assert bytes.fromhex(v["request_hex"]).startswith(sent)
    client.send(h11.Data(data=b"\x00\x00\x00\x00\x05hello"))
    client.send(h11.EndOfMessage())
    client.receive_data(bytes.fromhex(v["response_hex"]))
    events = []
    while not isinstance(events[-1:] and events[-1], h11.EndOfMessage):
        events.append(client.next_event())
    assert [[n.decode(), val.decode()] for n, val in events[-1].headers] == v["trailers"]
