"""The official OpenAI Python SDK against an OpenAI-compatible stand-in (https, a private CA) two tunnel
hops away, through the gateway's https_listen: plain and streaming chat completions."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cpnd.lab import Instance, Lab, Link, Topology, free_ports, write_lab
from test_tls import FAST, _add_gateway_keys, _add_instance_keys
from tlscerts import CertAuthority

openai = pytest.importorskip("openai")

WORDS = ["Hello", " from", " the", " stand-in"]


class StandIn(BaseHTTPRequestHandler):
    """POST /v1/chat/completions as OpenAI answers it: a chat.completion, or with ``stream`` server-sent
    chat.completion.chunk events ending in ``[DONE]``. It tells what Forwarded it was sent."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        seen = f" [forwarded: {self.headers.get('Forwarded')}; xff: {self.headers.get('X-Forwarded-For')}]"
        base = {"id": "chatcmpl-standin", "created": 1, "model": body["model"]}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, word in enumerate([*WORDS, seen]):
                delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
                event = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                self._chunk(f"data: {json.dumps(event)}\n\n")
            end = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            self._chunk(f"data: {json.dumps(end)}\n\n")
            self._chunk("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        answer = {**base, "object": "chat.completion",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS) + seen},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_sdk_over_https_listen_two_hops_to_an_https_stand_in(tmp_path) -> None:
    ca = CertAuthority.create(tmp_path / "pki")
    gw_cert = ca.issue(tmp_path / "pki", "gw-a", ["localhost"])
    api_cert = ca.issue(tmp_path / "pki", "api", ["api.internal"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*api_cert)
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.daemon_threads = True
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("b", "c", 1)),
                        (Instance("llm", "c", "/v1", 1000, 1, 1),), FAST)
        specs = write_lab(topo, tmp_path / "gw", instance_url=lambda i: f"https://127.0.0.1:{port}/v1")
        https = f"127.0.0.1:{free_ports(1)[0]}"
        _add_gateway_keys(specs["a"].config, [f'https_listen = "{https}"', f'tls_cert_file = "{gw_cert[0]}"',
                                              f'tls_key_file = "{gw_cert[1]}"'])
        _add_instance_keys(specs["c"].config, "llm", [f'tls_ca_file = "{ca.cert_file}"', 'tls_server_name = "api.internal"'])
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 30, "convergence")
            trust = ssl.create_default_context(cafile=str(ca.cert_file))
            with httpx.Client(verify=trust, timeout=20) as http:
                client = openai.OpenAI(base_url=f"https://localhost:{https.rsplit(':', 1)[1]}/v1", api_key="sk-test",
                                       http_client=http, max_retries=0)
                done = client.chat.completions.create(model="standin-1", messages=[{"role": "user", "content": "hi"}])
                assert done.choices[0].message.content.startswith("Hello from the stand-in")
                assert "[forwarded: for=127.0.0.1;by=a; xff: 127.0.0.1]" in done.choices[0].message.content
                assert done.usage.total_tokens == 7 and done.model == "standin-1"
                raw = client.chat.completions.with_raw_response.create(
                    model="standin-1", messages=[{"role": "user", "content": "hi"}])
                assert raw.headers["cpn-instance"] == "llm" and raw.headers["cpn-origin"] == "c"
                stream = client.chat.completions.create(model="standin-1", messages=[{"role": "user", "content": "hi"}],
                                                        stream=True)
                chunks = list(stream)
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert pieces[:4] == WORDS and pieces[4] == " [forwarded: for=127.0.0.1;by=a; xff: 127.0.0.1]"
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert not lab.dead()
    finally:
        server.shutdown()
        server.server_close()
