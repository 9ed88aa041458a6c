"""HTTP/2 at the ingress, at the frame level: the h2 library as a raw client against a real gateway
(prior knowledge on http_listen) in front of a real HTTP/1.1 instance."""

from __future__ import annotations

import json
import socket

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes

from cpnd.lab import Instance, InstanceProcs, Lab, Topology, write_lab
from cpnd.preface import H2_PREFACE

MAX_STREAMS = 2


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """One gateway, ``http2_max_streams = 2``, one simulated HTTP/1.1 instance s1 of /svc."""
    insts = InstanceProcs()
    insts.start("s1")
    topo = Topology(("a",), (), (Instance("s1", "a", "/svc", 1e6, 1, 0),), {"http2_max_streams": MAX_STREAMS})
    specs = write_lab(topo, tmp_path_factory.mktemp("h2"), instance_url=lambda i: f"http://127.0.0.1:{insts.ports['s1']}/")
    lab = Lab(specs)
    try:
        lab.start_all()
        lab.wait_for(lambda: any(r["best"] for r in lab.routes("a")), 10, "the local route")
        host, port = specs["a"].http.rsplit(":", 1)
        yield lab, (host, int(port))
    finally:
        lab.stop_all()
        insts.stop_all()


class Client:
    """A blocking h2 client over a socket: send, then read events until a condition holds."""

    def __init__(self, addr: tuple[str, int], *, validate: bool = True) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate))
        self.h2.initiate_connection()
        self.events: list = []

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def until(self, done, limit: int = 200) -> list:
        """Read until ``done(events)`` (bounded: ``limit`` reads, the socket's timeout each)."""
        for _ in range(limit):
            if done(self.events):
                return self.events
            data = self.sock.recv(65536)
            if not data:
                break
            self.events += self.h2.receive_data(data)
            self.flush()
        assert done(self.events), self.events
        return self.events

    def get(self, path: bytes, headers=()) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                   (b":path", path), *headers], end_stream=True)
        return sid

    def response(self, sid: int) -> tuple[dict, bytes]:
        self.until(lambda evs: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
                                   for e in evs))
        head = next(dict(e.headers) for e in self.events if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid)
        body = b"".join(e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
        return head, body

    def close(self) -> None:
        self.sock.close()


def test_a_request_over_h2_reaches_an_http1_instance(edge) -> None:
    _, addr = edge
    c = Client(addr)
    try:
        sids = [c.get(f"/svc/x{i}?q=1".encode()) for i in range(2)]
        c.flush()
        for i, sid in enumerate(sids):
            head, body = c.response(sid)
            assert head[b":status"] == b"200" and head[b"cpn-instance"] == b"s1"
            assert b"connection" not in head and b"transfer-encoding" not in head
            assert json.loads(body)["path"] == f"/x{i}"
    finally:
        c.close()


def test_gateway_errors_are_json_responses_for_non_grpc_clients(edge) -> None:
    _, addr = edge
    c = Client(addr)
    try:
        sid = c.get(b"/nowhere")
        c.flush()
        head, body = c.response(sid)
        assert head[b":status"] == b"404" and json.loads(body)["error"] == "no_such_service"
        sid = c.get(b"/svc/x", [(b"cpn-max-price", b"cheap")])  # same connection: a stream error is the stream's
        c.flush()
        head, body = c.response(sid)
        assert head[b":status"] == b"400" and json.loads(body)["error"] == "bad_header"
    finally:
        c.close()


def test_an_error_to_a_head_request_has_no_body(edge) -> None:
    """A HEAD's response has no content (RFC 9110 section 9.3.2), a gateway-made error's neither:
    nghttp2 (curl) resets a stream whose HEAD response carries DATA. The next stream is served."""
    _, addr = edge
    c = Client(addr)
    try:
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(b":method", b"HEAD"), (b":scheme", b"http"), (b":authority", b"a"),
                                (b":path", b"/nowhere")], end_stream=True)
        c.flush()
        head, body = c.response(sid)
        assert head[b":status"] == b"404" and int(head[b"content-length"]) > 0 and body == b""
        assert not any(isinstance(e, h2.events.StreamReset) for e in c.events)
        sid = c.get(b"/nowhere")
        c.flush()
        assert json.loads(c.response(sid)[1])["error"] == "no_such_service"
    finally:
        c.close()


def test_streams_over_the_bound_are_refused_one_by_one(edge) -> None:
    """Requests sent before the client has our SETTINGS: those over http2_max_streams get
    RST_STREAM REFUSED_STREAM (retryable), the others are served, no GOAWAY."""
    _, addr = edge
    c = Client(addr)
    try:
        sids = [c.get(b"/svc/slow?delay=0.5") for _ in range(MAX_STREAMS + 2)]
        c.flush()
        c.until(lambda evs: sum(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in evs) == len(sids))
        resets = {e.stream_id: e.error_code for e in c.events if isinstance(e, h2.events.StreamReset)}
        assert resets == {sid: ErrorCodes.REFUSED_STREAM for sid in sids[MAX_STREAMS:]}
        assert {e.stream_id for e in c.events if isinstance(e, h2.events.StreamEnded)} == set(sids[:MAX_STREAMS])
        assert c.h2.remote_settings.max_concurrent_streams == MAX_STREAMS  # advertised
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events)
    finally:
        c.close()


def test_a_malformed_request_is_reset_protocol_error(edge) -> None:
    _, addr = edge
    c = Client(addr, validate=False)
    try:
        bad = c.h2.get_next_available_stream_id()
        # What h2 lets through but HTTP/1.1 cannot carry (h2 itself answers most malformed heads with GOAWAY).
        c.h2.send_headers(bad, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                (b":path", b"/svc/a b")], end_stream=True)
        good = c.get(b"/svc/fine")
        c.flush()
        c.until(lambda evs: any(isinstance(e, h2.events.StreamReset) and e.stream_id == bad for e in evs))
        reset = next(e for e in c.events if isinstance(e, h2.events.StreamReset))
        assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
        assert c.response(good)[0][b":status"] == b"200"
    finally:
        c.close()


def test_bad_frames_end_the_connection_with_goaway(edge) -> None:
    lab, addr = edge
    with socket.create_connection(addr, timeout=10) as s:
        # The preface, then DATA on stream 0: a connection error (RFC 9113 section 6.1).
        s.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(out)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and goaway[0].error_code == ErrorCodes.PROTOCOL_ERROR
    lab.wait_for(lambda: "sent bad HTTP/2" in lab.log("a"), 5, "the log line")


def test_a_client_reset_is_taken_and_the_connection_goes_on(edge) -> None:
    _, addr = edge
    c = Client(addr)
    try:
        slow = c.get(b"/svc/slow?delay=5")
        c.flush()
        c.h2.reset_stream(slow, ErrorCodes.CANCEL)
        sid = c.get(b"/svc/next")
        c.flush()
        assert c.response(sid)[0][b":status"] == b"200"
    finally:
        c.close()


def test_an_idle_h2_connection_gives_its_slot_to_a_newcomer(tmp_path) -> None:
    """max_http_clients = 1: an HTTP/2 connection with no stream open is taken back for a new user
    (GOAWAY NO_ERROR), as an idle HTTP/1.1 one would be."""
    insts = InstanceProcs()
    insts.start("s1")
    topo = Topology(("a",), (), (Instance("s1", "a", "/svc", 1e6, 1, 0),), {"max_http_clients": 1})
    specs = write_lab(topo, tmp_path, instance_url=lambda i: f"http://127.0.0.1:{insts.ports['s1']}/")
    try:
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: any(r["best"] for r in lab.routes("a")), 10, "the local route")
            host, port = specs["a"].http.rsplit(":", 1)
            c = Client((host, int(port)))
            try:
                sid = c.get(b"/svc/first")
                c.flush()
                assert c.response(sid)[0][b":status"] == b"200"
                # The stream's task may still be finishing when its response has arrived (the connection
                # is not idle yet): a newcomer is refused at once until it is (bounded).
                answer = b""
                for _ in range(50):
                    with socket.create_connection((host, int(port)), timeout=10) as newcomer:
                        newcomer.sendall(b"GET /svc/second HTTP/1.1\r\nHost: a\r\n\r\n")
                        try:
                            answer = newcomer.recv(65536)
                        except ConnectionResetError:
                            answer = b""
                    if answer:
                        break
                assert answer.startswith(b"HTTP/1.1 200 ")
                c.until(lambda evs: any(isinstance(e, h2.events.ConnectionTerminated) for e in evs))
                goaway = next(e for e in c.events if isinstance(e, h2.events.ConnectionTerminated))
                assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == sid
            finally:
                c.close()
    finally:
        insts.stop_all()



def test_rapid_reset_ends_the_connection_and_costs_others_nothing(edge) -> None:
    """HTTP/2 Rapid Reset (CVE-2023-44487): streams opened and reset at once, faster than
    http2_max_streams a second, get GOAWAY ENHANCE_YOUR_CALM; the next client is served."""
    lab, addr = edge
    before = lab.query("a", "stats")["http"].get("h2_rapid_resets", 0)
    c = Client(addr)
    try:
        for _ in range(50):
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                    (b":path", b"/svc/x")], end_stream=True)
            c.h2.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        events = c.until(lambda evs: any(isinstance(e, h2.events.ConnectionTerminated) for e in evs))
        gone = next(e for e in events if isinstance(e, h2.events.ConnectionTerminated))
        assert gone.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        c.close()
    assert lab.query("a", "stats")["http"]["h2_rapid_resets"] == before + 1
    honest = Client(addr)
    try:
        honest.flush()
        head, _ = honest.response(honest.get(b"/svc/ok"))
        honest.flush()
        assert head[b":status"] == b"200"
    finally:
        honest.close()
