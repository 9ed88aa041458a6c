"""Sealed streams with real gateways: a transit relays ciphertext, the origin and the ingress alone read it.

The first test runs a line a - b - c (b a real cpnd transit); the second puts a hostile transit,
``evil``, between the ingress t and the origin v, both of which list it: evil legitimately carries
v's routes, so t sends it v's requests, and it reads only ciphertext and cannot forge the answer.
"""

from __future__ import annotations

import struct
import threading
import time

import httpx

from cpnd.crypto import load_private_key, public_key_b64
from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab
from interop.cases import Target
from interop.wire import KEEPALIVE, TUNNEL, UPDATE, load_key, parse_pub

FAST = {"hold_time_ms": 3000, "min_adv_interval_ms": 20, "connect_retry_min_ms": 100, "connect_retry_max_ms": 500}
SECRET = b"Bearer s3cr3t-t0ken-of-the-user"


def test_a_transit_relays_sealed_streams_and_requests_still_work(tmp_path) -> None:
    """Through a real transit b: 20 requests from c are sealed under one epoch (one X25519 exchange at
    each end, each stream its own keys); a peer of b that seals two streams under one key is served
    twice, and its replay of the first is refused (the interop case, against b as the transit)."""
    from interop.cases import _sealed_epoch

    insts = InstanceProcs()
    try:
        urls = {"s1": f"http://127.0.0.1:{insts.start('s1')}/"}
        topo = Topology(("a", "b", "c"), (Link("a", "b", 1), Link("b", "c", 1)), (Instance("s1", "a", "/svc", 1e6, 1, 0),), FAST)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        add_outside_peer(specs["b"], "evil", tmp_path / "evil.key")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            with httpx.Client(timeout=10) as client:
                for n in range(20):
                    r = client.post(f"http://{specs['c'].http}/svc/x", content=b"x" * 100_000 * (n % 3),
                                    headers={"Authorization": SECRET.decode()})
                    assert r.status_code == 200 and r.headers["CPN-Origin"] == "a", r.text
            stats = {gw: lab.query(gw, "stats")["gateway"] for gw in specs}
            assert stats["c"]["sealed_streams_out"] == 20 and stats["a"]["sealed_streams_in"] == 20
            # One epoch (two if the 20 took longer than its 5 s before the next is drawn): one exchange each.
            assert stats["c"]["sealed_epochs_out"] <= 2 and stats["a"]["sealed_exchanges_in"] == stats["c"]["sealed_epochs_out"]
            assert lab.query("b", "stats")["http"]["relayed"] == 20 and "sealed_streams_in" not in stats["b"]
            host, port = specs["b"].listen.rsplit(":", 1)
            _sealed_epoch(Target((host, int(port)), parse_pub(specs["b"].public_key), "evil",
                                 load_key(str(tmp_path / "evil.key")), specs["b"].http))
            after = lab.query("a", "stats")["gateway"]
            assert after["sealed_streams_in"] == 22 and after["sealed_exchanges_in"] == stats["a"]["sealed_exchanges_in"] + 1
            assert not lab.dead()
    finally:
        insts.stop_all()


def _frames(p, until, timeout: float = 10.0) -> list[tuple[int, int, int, bytes]]:
    """Tunnel frames from ``p`` until ``until(frames)`` (control messages answered with nothing)."""
    out: list[tuple[int, int, int, bytes]] = []
    deadline = time.monotonic() + timeout
    while not until(out):
        assert time.monotonic() < deadline, f"no such frames: {[(f[1], f[2], len(f[3])) for f in out]}"
        ctype, payload = p.recv(max(0.01, deadline - time.monotonic()))
        if ctype == TUNNEL:
            sid, ftype, flags = struct.unpack(">IBB", payload[:6])
            out.append((sid, ftype, flags, payload[6:]))
    return out


def test_a_hostile_transit_reads_only_ciphertext_and_cannot_forge_the_answer(tmp_path) -> None:
    insts = InstanceProcs()
    try:
        urls = {"sv": f"http://127.0.0.1:{insts.start('sv')}/"}
        # t reaches v directly over a slow link; evil, a peer of both, offers a fast way.
        topo = Topology(("t", "v"), (Link("t", "v", 40),), (Instance("sv", "v", "/svc", 1e6, 1, 0),), FAST)
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        add_outside_peer(specs["t"], "evil", tmp_path / "evil.key")
        evil_pub = public_key_b64(load_private_key(tmp_path / "evil.key"))
        with open(specs["v"].config, "a") as f:
            f.write(f'\n[[peers]]\nid = "evil"\naddress = "127.0.0.1:9"\npublic_key = "{evil_pub}"\npassive = true\n')
        caps = ["route-refresh", "tunnel", "origin-sig", "sealed-streams"]
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            key = load_key(str(tmp_path / "evil.key"))

            def target(gw: str) -> Target:
                host, port = specs[gw].listen.rsplit(":", 1)
                return Target((host, int(port)), parse_pub(specs[gw].public_key), "evil", key, specs[gw].http)

            to_v, to_t = target("v").session(caps=caps), target("t").session(caps=caps)
            try:
                # evil carries v's route on, as any transit does: v sent it to evil, so it is valid at t.
                routes: dict = {}
                deadline = time.monotonic() + 10
                while ("/svc", "v", "sv") not in routes:
                    assert time.monotonic() < deadline, "v never advertised sv to evil"
                    ctype, msg = to_v.recv(5)
                    if ctype != TUNNEL and msg.get("t") == UPDATE:
                        routes.update({(r["svc"], r["origin"], r["inst"]): r for r in msg["adv"]})
                sv = routes[("/svc", "v", "sv")]
                assert len(sv["xk"]) == 32  # v's sealing key, under its signature
                to_t.send_msg({"t": UPDATE, "adv": [dict(sv, path=["evil", "v"], lat=0)], "wd": []})
                lab.wait_for(lambda: any(r["best"] and r["next_hop"] == "evil" and r["validation"] == "valid"
                                         for r in lab.routes("t") if r["instance"] == "sv"), 10, "t to prefer evil")
                answer: dict = {}
                user = threading.Thread(target=lambda: answer.update(r=httpx.post(
                    f"http://{specs['t'].http}/svc/x", content=b"payload " * 100, headers={"Authorization": SECRET.decode()},
                    timeout=15)))
                user.start()
                frames = _frames(to_t, lambda fs: any(f[1] == 2 and f[2] & 1 for f in fs))
                opened = next(f for f in frames if f[1] == 1)
                assert opened[3][3] & 0x02 and len(opened[3]) >= 32  # the extension header says sealed
                request = b"".join(f[3] for f in frames if f[1] == 2 and f[0] == opened[0])
                assert request and SECRET not in request and b"Bearer" not in request and b"/svc" not in request
                assert b"payload" not in request and b"HTTP/1.1" not in request
                # A forged answer in the clear, claiming v served it.
                fake = b"HTTP/1.1 200 OK\r\nCPN-Origin: v\r\nCPN-Instance: sv\r\nContent-Length: 5\r\n\r\nevil!"
                to_t.send_msg(struct.pack(">IBB", opened[0], 2, 1) + fake, ctype=TUNNEL)
                to_t.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                user.join(20)
                r = answer["r"]
                assert b"evil!" not in r.content and r.status_code != 200, (r.status_code, r.content)
            finally:
                to_v.close()
                to_t.close()
            assert lab.query("t", "stats")["gateway"]["sealed_streams_out"] >= 1
            assert not lab.dead()
    finally:
        insts.stop_all()
