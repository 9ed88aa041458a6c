"""Structure-aware fuzzing of a running gateway, seeded from the spec's vectors.

Each input is sent on a fresh authenticated session (or, for handshake inputs, a
fresh connection); the target may answer with an error and close, or ignore it, but
must stay up and keep accepting sessions. Every batch ends with a liveness check, which
also sees the target's other sessions through the routes it learnt over them.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from .cases import SPEC, Target, advertised_routes, alive
from .wire import BATCH, TUNNEL, Closed, frame, new_route, pack


def _seeds() -> dict[str, list[bytes]]:
    v = json.loads((SPEC / "vectors.json").read_text())
    msgs = [bytes.fromhex(m["hex"]) for m in v["messages"]]
    hs = [bytes.fromhex(v["handshake"][k])[4:] for k in ("hello_frame", "hello_ack_frame", "finish_frame")]
    tun = [bytes.fromhex(m["hex"]) for m in v["tunnel"]]
    batches = [bytes.fromhex(m["hex"]) for m in v["tunnel-batch"]]
    return {"message": msgs, "handshake": hs, "tunnel": tun, "batch": batches}


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):][: rng.randint(1, 8)]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            b = b[: rng.randrange(len(b))]
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


_WEIRD: list[Any] = [None, True, -1, 2**64, 1.5, float("nan"), "", "x" * 300, b"\x00" * 40, [], {}, [1, 2], {"a": 1}]


def _mutate_structure(rng: random.Random, t: Target) -> bytes:
    """A well-formed msgpack map with one field made wrong."""
    base = rng.choice([
        {"t": 2, "ts": 1, "echo": 0, "dly": 0},
        {"t": 3, "adv": [new_route("/fuzz", "f1", t.my_id)], "wd": []},
        {"t": 3, "adv": [], "wd": [["/fuzz", t.my_id, "f1"]]},
        {"t": 5},
        {"t": 1, "id": t.my_id, "hold": 3000, "caps": [], "ts": 1},
    ])
    if base["t"] == 3 and base["adv"] and rng.random() < 0.7:
        route = base["adv"][0]
        route[rng.choice(list(route))] = rng.choice(_WEIRD)
    else:
        key = rng.choice(list(base) + ["extra"])
        base[key] = rng.choice(_WEIRD)
    try:
        return msgpack.packb(base, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return pack({"t": 2, "ts": -1, "echo": 0, "dly": 0})


HTTP_SEEDS = [
    b"GET /yolo HTTP/1.1\r\nHost: x\r\nCPN-Max-Latency: 10ms\r\n\r\n",
    b"POST /yolo/a?b=c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nCPN-Prefer: price\r\n\r\nhello",
    b"POST /yolo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HEAD /yolo HTTP/1.0\r\n\r\n",
]


def one_input(rng: random.Random, t: Target, seeds: dict[str, list[bytes]]) -> tuple[str, bytes]:
    kinds = ["message", "message", "structure", "handshake", "tunnel", "batch"] + (["http", "http"] if t.http else [])
    kind = rng.choice(kinds)
    if kind == "http":
        return kind, _mutate_bytes(rng, rng.choice(HTTP_SEEDS))
    if kind == "structure":
        return "message", _mutate_structure(rng, t)
    return kind, _mutate_bytes(rng, rng.choice(seeds[kind]))


def send_input(t: Target, kind: str, data: bytes) -> None:
    """Deliver one input; what the target answers is its business, as long as it lives."""
    try:
        if kind == "http":
            assert t.http is not None
            host, port = t.http.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(0.5)
                try:
                    while s.recv(65536):
                        pass
                except (socket.timeout, TimeoutError, OSError):
                    pass
            return
        if kind == "handshake":
            p = t.peer()
            p.send_raw(frame(data))
        else:
            # A batch on a session offering tunnel-batch (the target may not: then it is 8/4's to refuse).
            p = t.session(caps=["route-refresh", "tunnel", "tunnel-batch"]) if kind == "batch" else t.session()
            if kind == "tunnel":
                p.send_msg(data, ctype=TUNNEL)
            elif kind == "batch":
                p.send_msg(data, ctype=BATCH)
            else:
                p.send_msg(data)
        p.sock.settimeout(0.3)
        try:
            while p.sock.recv(65536):
                pass
        except (socket.timeout, TimeoutError, OSError):
            pass
        p.close()
    except (Closed, OSError, AssertionError, ValueError, KeyError, msgpack.UnpackException):
        pass


def fuzz(t: Target, n: int, seed: int, batch: int = 100, report: Callable[[dict[str, Any]], None] = print) -> tuple[int, int]:
    """Send ``n`` mutated inputs; (passed batches, failed batches)."""
    rng = random.Random(seed)
    seeds = _seeds()
    routes = advertised_routes(t)
    passed = failed = 0
    sent = 0
    while sent < n:
        chunk: list[tuple[str, bytes]] = []
        for _ in range(min(batch, n - sent)):
            kind, data = one_input(rng, t, seeds)
            chunk.append((kind, data))
            send_input(t, kind, data)
            sent += 1
        why = alive(t, routes)
        result = {"case": f"fuzz-batch-{sent}", "section": "fuzzing", "passed": why is None,
                  "detail": why or "", "inputs": len(chunk)}
        if why is not None:
            kind, data = chunk[-1]
            result["reproducer"] = {"seed": seed, "input_index": sent - 1, "kind": kind, "hex": data.hex()}
            failed += 1
        else:
            passed += 1
        report(result)
        if why is not None:
            break
    return passed, failed

