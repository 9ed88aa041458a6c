"""Regenerate protocol-spec/vectors.json from the reference implementation.

Run from the repository root: ``python protocol-spec/gen_vectors.py``. Every value
is deterministic (fixed seeds), so the file only changes when the protocol does;
tests/ and interop/ both check themselves against it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import attrs
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.crypto import Handshake, RecordLayer, Role, public_key_b64  # noqa: E402
from cpnd.errors import ProtocolError  # noqa: E402
from cpnd.names import service_label  # noqa: E402
from cpnd.origin import Signer, Trust, adjacency_message, issue, origin_message  # noqa: E402
from cpnd.wire import (  # noqa: E402
    ContentType,
    Keepalive,
    Limits,
    Notification,
    Open,
    RouteAdv,
    RouteRefresh,
    TunnelLimits,
    Update,
    Withdrawal,
    decode_message,
    encode_message,
    frame,
)


def seed(name: str) -> bytes:
    return hashlib.sha256(b"cpn test vector " + name.encode()).digest()


def jsonable(obj):
    if isinstance(obj, bytes):
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj


def message_vectors() -> list[dict]:
    yolo = service_label("/yolo")
    good = [
        ("open", "OPEN from gw1: hold 3000 ms, route-refresh capability, timestamp 1000000 us",
         Open("gw1", 3000, ("route-refresh",), 1_000_000)),
        ("open-graceful-restart", "OPEN from gw3 offering graceful restart: keep its routes for 5000 ms",
         Open("gw3", 3000, ("route-refresh", "tunnel", "graceful-restart"), 1_000_000, 5000)),
        ("open-tunnel-window", "OPEN from gw4 granting 1 MiB stream windows, a 60 MiB connection window, 1024 streams",
         Open("gw4", 3000, ("route-refresh", "tunnel", "tunnel-large-data", "tunnel-window"), 1_000_000, None,
              TunnelLimits(1 << 20, 60 << 20, 1024))),
        ("keepalive-first", "KEEPALIVE with nothing to echo", Keepalive(2_000_000, 0, 0)),
        ("keepalive-echo", "KEEPALIVE echoing ts 1000000 after holding it 250 us", Keepalive(2_000_500, 1_000_000, 250)),
        ("update-origin", "gw3 advertises its own instance s1 of /yolo",
         Update((RouteAdv("/yolo", "s1", "gw3", 1_700_000_000_000_000, yolo, ("gw3",), 0, 50.0, 0.0, 2.0, 1000),), ())),
        ("update-transit", "gw1 re-advertises s2 (origin gw4) learned over a 6 ms link, path gw1 gw4",
         Update((RouteAdv("/yolo", "s2", "gw4", 7, yolo, ("gw1", "gw4"), 6000, 50.0, 0.25, 1.0, 3000, 0.1),), ())),
        ("update-gateway-time", "gw1 re-advertises s1 (origin gw3, 4 ms away) to a peer with gateway-time: gw3 takes "
         "700 us of its own per request as the egress, gw1 300 us as a transit: gw 1000 us",
         Update((RouteAdv("/yolo", "s1", "gw3", 9, yolo, ("gw1", "gw3"), 4000, 50.0, 0.1, 2.0, 1000, 0.1,
                          gateway_us=1000),), ())),
        ("update-down", "gw5 advertises its instance s3 of /yolo as down (health checks failed): the service stays known",
         Update((RouteAdv("/yolo", "s3", "gw5", 1_700_000_000_000_001, yolo, ("gw5",), 0, 50.0, 0.0, 2.0, 1000,
                          down=True),), ())),
        ("update-withdraw", "withdraw s5 of /yolo at origin gw7",
         Update((), (Withdrawal("/yolo", "gw7", "s5"),))),
        ("notification", "NOTIFICATION cease/max-routes", Notification(6, 1, "gw9 exceeded 10000 routes")),
        ("route-refresh", "ROUTE-REFRESH: resend your whole Adj-RIB-Out", RouteRefresh()),
        ("limits", "LIMITS: I take at most 10000 routes from you, route entries at 1000/s with bursts of 10000",
         Limits(10_000, 1000, 10_000)),
        ("limits-no-routes", "LIMITS: send me no routes at all (a gateway that only serves), 50 entries/s, bursts of 100",
         Limits(0, 50, 100)),
        ("end-of-rib", "End-of-RIB: an UPDATE with nothing in it, after the initial table", Update((), ())),
        ("update-signed", "gw1 re-advertises s1 (origin gw3) on an origin-sig session: gw3's origin signature, its "
         "adjacency token naming gw1, and its certificate (vectors.json -> origin)", Update((signed_transit(),), ())),
    ]
    out = []
    for name, meaning, msg in good:
        body = encode_message(msg)
        out.append({"name": name, "meaning": meaning, "hex": body.hex(), "decoded": jsonable(msgpack.unpackb(body))})
    route = {"svc": "/yolo", "inst": "s1", "origin": "gw3", "seq": 1, "label": yolo, "path": ["gw3"],
             "lat": 0, "cap": 50.0, "load": 0.0, "bload": 0.0, "price": 2.0, "comp": 1000}
    bad = [
        ("bad-msgpack", "not msgpack at all", b"\xc1"),
        ("bad-type", "unknown message type 99", msgpack.packb({"t": 99})),
        ("missing-field", "KEEPALIVE without dly", msgpack.packb({"t": 2, "ts": 1, "echo": 0})),
        ("unknown-field", "KEEPALIVE with an extra key", msgpack.packb({"t": 2, "ts": 1, "echo": 0, "dly": 0, "x": 1})),
        ("trailing-bytes", "a valid ROUTE-REFRESH followed by a stray byte", msgpack.packb({"t": 5}) + b"\x00"),
        ("loop-in-path", "path repeats a gateway", msgpack.packb({"t": 3, "adv": [dict(route, path=["gw3", "gw1", "gw3"])], "wd": []})),
        ("path-not-at-origin", "path does not end at the origin", msgpack.packb({"t": 3, "adv": [dict(route, path=["gw1"])], "wd": []})),
        ("label-mismatch", "label is not the hash of the service", msgpack.packb({"t": 3, "adv": [dict(route, label=1)], "wd": []})),
        ("zero-capacity", "capacity must be > 0", msgpack.packb({"t": 3, "adv": [dict(route, cap=0.0)], "wd": []})),
        ("down-false", "down present but not true (a live instance omits it)",
         msgpack.packb({"t": 3, "adv": [dict(route, down=False)], "wd": []})),
        ("gw-negative", "gw (gateway time) below 0", msgpack.packb({"t": 3, "adv": [dict(route, gw=-1)], "wd": []})),
        ("gw-too-large", "gw beyond 2^32-1", msgpack.packb({"t": 3, "adv": [dict(route, gw=1 << 32)], "wd": []})),
        ("gw-bool", "gw as a boolean", msgpack.packb({"t": 3, "adv": [dict(route, gw=True)], "wd": []})),
        ("bool-as-int", "a boolean where an integer belongs", msgpack.packb({"t": 2, "ts": True, "echo": 0, "dly": 0})),
        ("gr-without-cap", "OPEN with a gr window but no graceful-restart capability",
         msgpack.packb({"t": 1, "id": "gw1", "hold": 3000, "caps": [], "ts": 1, "gr": 5000})),
        ("cap-without-gr", "OPEN offering graceful-restart without its gr window",
         msgpack.packb({"t": 1, "id": "gw1", "hold": 3000, "caps": ["graceful-restart"], "ts": 1})),
        ("cap-without-tw", "OPEN offering tunnel-window without its tw",
         msgpack.packb({"t": 1, "id": "gw1", "hold": 3000, "caps": ["tunnel", "tunnel-window"], "ts": 1})),
        ("tw-small-window", "OPEN whose tw grants a stream window under 16384 bytes",
         msgpack.packb({"t": 1, "id": "gw1", "hold": 3000, "caps": ["tunnel-window"], "ts": 1, "tw": [1024, 1 << 20, 8]})),
        ("tw-no-streams", "OPEN whose tw allows 0 streams",
         msgpack.packb({"t": 1, "id": "gw1", "hold": 3000, "caps": ["tunnel-window"], "ts": 1, "tw": [65536, 1 << 20, 0]})),
        ("osig-without-oadj", "a Route with osig but no oadj (both or neither)",
         msgpack.packb({"t": 3, "adv": [dict(route, osig=b"\x01" * 64)], "wd": []}, use_bin_type=True)),
        ("osig-short", "osig of 63 bytes", msgpack.packb({"t": 3, "adv": [dict(route, osig=b"\x01" * 63, oadj=b"\x01" * 64)],
                                                          "wd": []}, use_bin_type=True)),
        ("cert-too-long", "cert of 1025 bytes", msgpack.packb({"t": 3, "adv": [dict(route, cert=b"\x01" * 1025)], "wd": []},
                                                               use_bin_type=True)),
        ("limits-zero-rate", "LIMITS with rate 0 (the least is 1)", msgpack.packb({"t": 6, "routes": 10, "rate": 0, "burst": 1})),
        ("limits-without-burst", "LIMITS without burst", msgpack.packb({"t": 6, "routes": 10, "rate": 5})),
        ("limits-too-many-routes", "LIMITS routes beyond 2^32-1", msgpack.packb({"t": 6, "routes": 1 << 32, "rate": 5, "burst": 5})),
    ]
    for name, meaning, body in bad:
        try:
            decode_message(body)
        except ProtocolError as exc:
            out.append({"name": name, "meaning": meaning, "hex": body.hex(), "error": [exc.code, exc.subcode]})
        else:
            raise AssertionError(f"{name} decoded")
    return out


CERT_EXP = 2_000_000_000  # 2033-05-18: the vectors' certificates hold until then
VALIDATE_AT = 1_800_000_000  # the wall clock (Unix seconds) the validation vectors are judged at


def origin_keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, Ed25519PrivateKey]:
    """The domain key (trust anchor), gw3's identity key (an origin) and evil's."""
    return tuple(Ed25519PrivateKey.from_private_bytes(seed(n)) for n in ("domain", "gw3 identity", "evil identity"))


def signed_transit() -> RouteAdv:
    """s1 of /yolo at gw3, signed by gw3 (sent to gw1) and passed on by gw1, 4 ms further."""
    domain, gw3, _ = origin_keys()
    cert = issue(domain, gw3.public_key().public_bytes_raw(), ["/yolo"], CERT_EXP, "gw3")
    s = Signer("gw3", gw3, cert)
    own = RouteAdv("/yolo", "s1", "gw3", 1_700_000_000_000_000, service_label("/yolo"), ("gw3",), 0, 50.0, 0.25, 2.0, 1000, 0.1)
    return attrs.evolve(s.sign(own), oadj=s.adjacency("gw1"), path=("gw1", "gw3"), latency_us=4000)


def origin_vectors() -> dict:
    """Certificates, origin signatures, adjacency tokens, and the verdict on routes (routing.md, "Origin validation")."""
    domain, gw3, evil = origin_keys()
    raw = lambda k: k.public_key().public_bytes_raw()  # noqa: E731
    cert = issue(domain, raw(gw3), ["/yolo"], CERT_EXP, "gw3")
    route = signed_transit()
    pub = lambda k: public_key_b64(k)  # noqa: E731
    receiver = {"id": "gw2", "peers": {"gw1": "(any key)", "evil": pub(evil)}, "trust_anchors": [pub(domain)],
                "now": VALIDATE_AT}
    r = route
    cases = [
        ("valid", "gw3's signed route, passed on by gw1", "gw1", r, "valid"),
        ("forged-seq", "the same with a larger seq than gw3 signed", "gw1", attrs.evolve(r, seq=(1 << 64) - 1), "invalid"),
        ("forged-price", "the same with another price", "gw1", attrs.evolve(r, price=1e12), "invalid"),
        ("transit-latency", "gw1 claims a different latency: a path attribute, its own word", "gw1",
         attrs.evolve(r, latency_us=1), "valid"),
        ("forged-adjacency", "evil claims gw3 sent its routes to evil", "evil", attrs.evolve(r, path=("evil", "gw3")), "invalid"),
        ("unsigned-known-key", "gw3's route without signatures, from evil: gw3's key is known (its certificate)", "evil",
         attrs.evolve(r, path=("evil", "gw3"), osig=None, oadj=None), "invalid"),
        ("unknown-origin", "a route of an origin nobody certified, unsigned, passed on by evil", "evil",
         RouteAdv("/other", "o1", "far", 1, service_label("/other"), ("evil", "far"), 0, 10.0, 0.0, 1.0, 1000), "unknown"),
        ("capture", "evil originates /yolo/admin, signed with its own key: /yolo is authorised to gw3", "evil",
         RouteAdv("/yolo/admin", "grab", "evil", 1, service_label("/yolo/admin"), ("evil",), 0, 10.0, 0.0, 1.0, 1000,
                  osig=evil.sign(origin_message(RouteAdv("/yolo/admin", "grab", "evil", 1, service_label("/yolo/admin"),
                                                         ("evil",), 0, 10.0, 0.0, 1.0, 1000))),
                  oadj=evil.sign(adjacency_message("evil", "gw2"))), "invalid"),
    ]
    out_cases = []
    for name, meaning, peer, adv, want in cases:
        trust = Trust("gw2", {"evil": raw(evil)}, [raw(domain)], clock=lambda: VALIDATE_AT)
        trust._remember(cert, "gw3")  # gw2 saw gw3's certificate before (with the valid route)
        trust.signing_peers = {"gw1", "evil"}
        got = trust.validate(peer, adv).state.value
        assert got == want, (name, got, trust.validate(peer, adv))
        out_cases.append({"name": name, "meaning": meaning, "from": peer,
                          "route": jsonable(msgpack.unpackb(encode_message(Update((adv,), ())))["adv"][0]),
                          "validation": want})
    own = attrs.evolve(route, path=("gw3",), latency_us=0, oadj=None, osig=None, cert=None)
    return {
        "about": "Seeds: sha256('cpn test vector ' + name) for names 'domain', 'gw3 identity', 'evil identity'.",
        "domain_public_key": pub(domain), "gw3_public_key": pub(gw3), "evil_public_key": pub(evil),
        "certificate": {"meaning": "the domain key lets gw3's key originate /yolo until 2033-05-18",
                        "hex": cert.encode().hex(), "signed_hex": cert.body().hex(),
                        "decoded": jsonable(msgpack.unpackb(cert.encode()))},
        "origin_signature": {"meaning": "gw3 signs s1's attributes", "route": jsonable(msgpack.unpackb(
                                 encode_message(Update((own,), ())))["adv"][0]),
                             "signed_hex": origin_message(own).hex(), "osig": route.osig.hex()},
        "adjacency": {"meaning": "gw3 sends its routes to gw1", "signed_hex": adjacency_message("gw3", "gw1").hex(),
                      "oadj": route.oadj.hex()},
        "receiver": receiver,
        "validation": out_cases,
    }


def handshake_vector(data_channel: bool = False) -> dict:
    """A session's handshake, or with ``data_channel`` a data channel's (HELLO `dc`, its transcript's tail)."""
    k1 = Ed25519PrivateKey.from_private_bytes(seed("gw1 identity"))
    k2 = Ed25519PrivateKey.from_private_bytes(seed("gw2 identity"))
    peers1 = {"gw2": k2.public_key()}
    peers2 = {"gw1": k1.public_key()}
    init = Handshake(Role.INITIATOR, "gw1", k1, peers1, expected_peer="gw2", random_bytes=lambda n: seed("gw1 ephemeral")[:n],
                     data_channel=data_channel)
    resp = Handshake(Role.RESPONDER, "gw2", k2, peers2, random_bytes=lambda n: seed("gw2 ephemeral")[:n])
    hello = init.start()
    ack = resp.receive(hello)
    fin = init.receive(ack)
    resp.receive(fin)
    i_send, i_recv = init.traffic_keys()
    rec_i = RecordLayer(i_send, i_recv)
    rec_r = RecordLayer(*resp.traffic_keys())
    caps = ("tunnel",) if data_channel else ("route-refresh",)
    open_i = rec_i.seal(ContentType.CONTROL, encode_message(Open("gw1", 3000, caps, 1_000_000)))
    ka_i = rec_i.seal(ContentType.CONTROL, encode_message(Keepalive(1_000_100, 0, 0)))
    open_r = rec_r.seal(ContentType.CONTROL, encode_message(Open("gw2", 3000, ("route-refresh",), 5_000_000)))
    return {
        "initiator": {"id": "gw1", "identity_seed": seed("gw1 identity").hex(), "public_key": public_key_b64(k1),
                      "ephemeral_seed": seed("gw1 ephemeral").hex()},
        "responder": {"id": "gw2", "identity_seed": seed("gw2 identity").hex(), "public_key": public_key_b64(k2),
                      "ephemeral_seed": seed("gw2 ephemeral").hex()},
        "hello_frame": frame(hello).hex(),
        "hello_ack_frame": frame(ack).hex(),
        "finish_frame": frame(fin).hex(),
        "transcript_hash": init.transcript.hex(),
        "key_initiator_to_responder": i_send.hex(),
        "key_responder_to_initiator": i_recv.hex(),
        "initiator_records": [
            {"counter": 0, "content_type": 1, "meaning": f"OPEN gw1 hold 3000 caps [{caps[0]}] ts 1000000", "frame": open_i.hex()},
            {"counter": 1, "content_type": 1, "meaning": "KEEPALIVE ts 1000100 echo 0 dly 0", "frame": ka_i.hex()},
        ],
        "responder_records": [
            {"counter": 0, "content_type": 1, "meaning": "OPEN gw2 hold 3000 caps [route-refresh] ts 5000000", "frame": open_r.hex()},
        ],
    }


def seal_keys():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return (X25519PrivateKey.from_private_bytes(seed("gw3 sealing")),
            X25519PrivateKey.from_private_bytes(seed("ingress ephemeral")))


def sealed_ext():
    from cpnd.seal import x25519_public
    from cpnd.tunnel import ExtHeader, QoS

    _, eph = seal_keys()
    return ExtHeader(service_label("/yolo"), "gw3", "s1", bytes(range(16)), QoS.INTERACTIVE, 16, 2_000_000, 1,
                     eph=x25519_public(eph))


def sealed_vectors() -> dict:
    """A sealed stream's keys and first records (tunnel.md, "Sealed streams")."""
    from cpnd.seal import Opener, outbound, x25519_public

    static, eph = seal_keys()
    ext = sealed_ext()
    pub, ingress = outbound(x25519_public(static), ext.request_id, ext.label, ext.origin, ext.instance, eph)
    opener = Opener(static)
    egress = opener.inbound(pub, ext.request_id, ext.label, ext.origin, ext.instance)
    request = b"GET /yolo/x HTTP/1.1\r\nhost: gw1\r\nauthorization: Bearer secret\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    sealed_req = ingress.send.seal(request, True)
    sealed_resp = egress.send.seal(response, True)
    assert egress.open(sealed_req) == request and ingress.recv.open(sealed_resp) == response
    # A second stream of the same epoch: the same ephemeral key, another request id, keys of its own.
    rid2 = bytes(range(16, 32))
    pub2, ingress2 = outbound(x25519_public(static), rid2, ext.label, ext.origin, ext.instance, eph)
    egress2 = opener.inbound(pub2, rid2, ext.label, ext.origin, ext.instance)
    sealed_req2, sealed_resp2 = ingress2.send.seal(request, True), egress2.send.seal(response, True)
    assert pub2 == pub and egress2.open(sealed_req2) == request and ingress2.recv.open(sealed_resp2) == response
    assert {ingress2.send.key, ingress2.recv.key}.isdisjoint({ingress.send.key, ingress.recv.key})
    epoch = {"about": "the same eph_public and target, another request id: the egress opens both (its pairs differ)",
             "request_id": rid2.hex(), "request_key": ingress2.send.key.hex(), "response_key": ingress2.recv.key.hex(),
             "sealed_request": sealed_req2.hex(), "sealed_response": sealed_resp2.hex()}
    return {
        "about": "X25519 keys from seeds 'gw3 sealing' (the origin's, published as xk) and 'ingress ephemeral'",
        "origin_private": seed("gw3 sealing").hex(), "origin_public": x25519_public(static).hex(),
        "eph_private": seed("ingress ephemeral").hex(), "eph_public": pub.hex(),
        "request_id": ext.request_id.hex(), "label": ext.label, "origin": ext.origin, "instance": ext.instance,
        "request_key": ingress.send.key.hex(), "response_key": ingress.recv.key.hex(),
        "request": request.hex(), "sealed_request": sealed_req.hex(),
        "response": response.hex(), "sealed_response": sealed_resp.hex(), "epoch": epoch,
    }


def yielding_ext():
    from cpnd.tunnel import EXT_FLAG_YIELDS, NO_BUDGET, ExtHeader, QoS
    return ExtHeader(service_label("/yolo"), "gw3", "s1", bytes(range(16, 32)), QoS.INTERACTIVE, 16, 30_000_000,
                     EXT_FLAG_YIELDS, NO_BUDGET)


def tunnel_vectors() -> list[dict]:
    from cpnd.tunnel import FLAG_END, ExtHeader, FrameType, QoS, ResetCode, encode_frame, load_payload, parse_load, reset_payload

    ext = ExtHeader(service_label("/yolo"), "gw3", "s1", bytes(range(16)), QoS.REALTIME, 16, 2_000_000, 1)
    good = [
        ("open", "OPEN stream 1 to s1 at gw3, /yolo's label, realtime, hop limit 16, 2 s budget, idempotent",
         encode_frame(1, FrameType.OPEN, ext.encode()), ext),
        ("data-end", "DATA on stream 1, 'GET /yolo HTTP/1.1...' fragment, END", encode_frame(1, FrameType.DATA, b"GET /yolo HTTP/1.1\r\nhost: x\r\n\r\n", FLAG_END), None),
        ("window", "WINDOW on stream 2: credit 131072 bytes", encode_frame(2, FrameType.WINDOW, (131072).to_bytes(4, "big")), None),
        ("reset", "RESET stream 3: refused, not delivered, 'over capacity'", encode_frame(3, FrameType.RESET, reset_payload(ResetCode.REFUSED, False, "over capacity")), None),
        ("connection-window", "WINDOW on stream 0 (session with tunnel-window): credit the connection 31457280 bytes",
         encode_frame(0, FrameType.WINDOW, (30 << 20).to_bytes(4, "big")), None),
        ("load", "LOAD on stream 1: load 0.25, latency-bound demand 0.1, base compute 1000 us",
         encode_frame(1, FrameType.LOAD, load_payload(0.25, 0.1, 1000)), None),
        ("load-gateway-time", "LOAD on stream 1 (session with gateway-time): load 0.25, latency-bound demand 0.1, "
         "base compute 1000 us, this request's instance time to its response head 1234 us",
         encode_frame(1, FrameType.LOAD, load_payload(0.25, 0.1, 1000, 1234, timed=True)), None),
        ("open-sealed", "OPEN stream 5 to s1 at gw3, sealed (flag 0x02): the ingress's ephemeral X25519 key ends the "
         "header (vectors.json -> sealed)", encode_frame(5, FrameType.OPEN, sealed_ext().encode()), sealed_ext()),
        ("open-yields", "OPEN stream 7 to s1 at gw3, interactive, no latency bound, not idempotent, yields (flag 0x04): "
         "the ingress has room for it elsewhere", encode_frame(7, FrameType.OPEN, yielding_ext().encode()), yielding_ext()),
        ("load-refused-gateway-time", "LOAD on stream 3 (session with gateway-time) before a RESET refused: "
         "load 1.0, demand 1.2, base compute 3000 us, no instance time (0xFFFFFFFF)",
         encode_frame(3, FrameType.LOAD, load_payload(1.0, 1.2, 3000, None, timed=True)), None),
    ]
    out = []
    for name, meaning, raw, e in good:
        v = {"name": name, "meaning": meaning, "hex": raw.hex(), "stream_id": int.from_bytes(raw[:4], "big"),
             "type": raw[4], "flags": raw[5]}
        if v["stream_id"] == 0:
            v["caps"] = ["tunnel-window"]  # valid only where both OPENs list it
        if "gateway-time" in name:
            v["caps"] = ["gateway-time"]  # the 16-byte LOAD: only where both OPENs list it
        if e is not None:
            v["ext"] = [e.label, e.origin, e.instance, int(e.qos), e.hop_limit, e.budget_us, e.flags]
            if e.eph is not None:
                v["eph"] = e.eph.hex()
                v["caps"] = ["sealed-streams"]
        if raw[4] == FrameType.LOAD:  # [load, bload, base compute us, instance us or null]
            v["load"] = list(parse_load(raw[6:]))
        out.append(v)
    bad = [
        ("stream-zero", "DATA on stream 0", encode_frame(0, FrameType.DATA, b"x")),
        ("stream-zero-window", "WINDOW on stream 0 on a session without tunnel-window", encode_frame(0, FrameType.WINDOW, (65536).to_bytes(4, "big"))),
        ("unknown-type", "frame type 9", bytes.fromhex("000000010900")),
        ("oversized-data", "DATA of 16385 bytes", encode_frame(1, FrameType.DATA, b"x" * 16385)),
        ("zero-window", "WINDOW increment 0", encode_frame(1, FrameType.WINDOW, bytes(4))),
        ("ext-truncated", "OPEN whose extension header stops inside the origin", encode_frame(1, FrameType.OPEN, ext.encode()[:30])),
        ("ext-sealed-without-key", "OPEN whose extension header has the sealed flag but no 32-byte key after the ids",
         encode_frame(1, FrameType.OPEN, sealed_ext().encode()[:-1])),
        ("ext-version", "OPEN with extension header version 2", encode_frame(1, FrameType.OPEN, b"\x02" + ext.encode()[1:])),
        ("load-timed-without-cap", "LOAD of 16 bytes on a session without gateway-time",
         encode_frame(1, FrameType.LOAD, load_payload(0.25, 0.1, 1000, 1234, timed=True))),
        ("load-over-1000", "LOAD whose load is over 1000 (1000001 thousandths)",
         encode_frame(1, FrameType.LOAD, (1_000_001).to_bytes(4, "big") + bytes(8))),
    ]
    from cpnd.tunnel import decode_frame

    for name, meaning, raw in bad:
        try:
            f = decode_frame(raw)
            if f.type is FrameType.OPEN:
                ExtHeader.decode(f.payload)
        except ProtocolError as exc:
            out.append({"name": name, "meaning": meaning, "hex": raw.hex(), "error": [exc.code, exc.subcode]})
        else:
            raise AssertionError(name)
    return out


def _entries(*frames: bytes) -> bytes:
    """A batch payload written here byte by byte (not with cpnd's encoder): ``len u16 | frame`` each."""
    return b"".join(len(f).to_bytes(2, "big") + f for f in frames)


def tunnel_batch_vectors() -> list[dict]:
    """Batch records (content type 3, tunnel.md "Batches"): their payloads, the frames they carry, and
    malformed ones with the [code, subcode] a receiver answers."""
    from cpnd.tunnel import (FLAG_END, ExtHeader, FrameType, QoS, ResetCode, decode_frame, encode_frame, load_payload,
                             reset_payload, split_batch)

    ext = ExtHeader(service_label("/yolo"), "gw3", "s1", bytes(range(16)), QoS.REALTIME, 16, 2_000_000, 1)
    open1 = encode_frame(1, FrameType.OPEN, ext.encode())
    get1 = encode_frame(1, FrameType.DATA, b"GET /yolo HTTP/1.1\r\nhost: x\r\n\r\n", FLAG_END)
    load1 = encode_frame(1, FrameType.LOAD, load_payload(0.25, 0.1, 1000, 1234, timed=True))
    ok1 = encode_frame(1, FrameType.DATA, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", FLAG_END)
    load3 = encode_frame(3, FrameType.LOAD, load_payload(1.0, 1.2, 3000))
    reset3 = encode_frame(3, FrameType.RESET, reset_payload(ResetCode.REFUSED, False, "over capacity"))
    window = [encode_frame(sid, FrameType.WINDOW, (65536).to_bytes(4, "big")) for sid in (2, 4)]
    good = [
        ("open-data", "the ingress's OPEN of stream 1 (as tunnel -> open) and its whole request in one DATA with END",
         [open1, get1], []),
        ("load-data", "the egress's LOAD on stream 1 (session with gateway-time: instance time 1234 us) and the whole "
         "response in one DATA with END", [load1, ok1], ["gateway-time"]),
        ("load-reset", "the egress's LOAD on stream 3 (load 1.0, demand 1.2, base compute 3000 us) and its RESET "
         "refused, not delivered, 'over capacity'", [load3, reset3], []),
        ("three-frames", "WINDOW on streams 2 and 4 (65536 bytes each) and DATA with END on stream 1", [*window, get1], []),
    ]
    out = []
    for name, meaning, frames, caps in good:
        payload = _entries(*frames)
        assert split_batch(payload) == frames
        out.append({"name": name, "meaning": meaning, "caps": ["tunnel", "tunnel-batch", *caps], "hex": payload.hex(),
                    "frames": [f.hex() for f in frames]})
    bad = [
        ("empty", "no entries at all", b"", None),
        ("one-entry", "one entry (an OPEN): a batch carries two or more", _entries(open1), None),
        ("length-cut-short", "two entries, then one byte of a third entry's length", _entries(open1, get1) + b"\x00", None),
        ("entry-past-end", "an OPEN, then an entry whose length (40) runs past the payload's end (38 bytes left)",
         _entries(open1) + (40).to_bytes(2, "big") + get1, None),
        ("zero-length-entry", "an OPEN, then an entry of 0 bytes: a frame shorter than its header", _entries(open1, b""),
         "frame"),
        ("data-on-stream-zero", "an OPEN, then DATA on stream 0", _entries(open1, encode_frame(0, FrameType.DATA, b"x")),
         "frame"),
        ("unknown-frame-type", "an OPEN, then a frame of type 9", _entries(open1, bytes.fromhex("000000010900")), "frame"),
        ("too-many-entries", "17 entries (WINDOW on streams 2, 4, ... 34): a batch carries at most 16",
         _entries(*(encode_frame(sid, FrameType.WINDOW, (1).to_bytes(4, "big")) for sid in range(2, 36, 2))), None),
    ]
    for name, meaning, payload, level in bad:
        try:
            for f in split_batch(payload):
                decode_frame(f)
        except ProtocolError as exc:
            out.append({"name": name, "meaning": meaning, "caps": ["tunnel", "tunnel-batch"], "hex": payload.hex(),
                        "error": [exc.code, exc.subcode]})
            assert (exc.subcode == 4) == (level is None), name
        else:
            raise AssertionError(name)
    out.append({"name": "without-capability", "meaning": "a well-formed batch (open-data) on a session where one OPEN "
                "does not list tunnel-batch", "caps": ["tunnel"], "hex": _entries(open1, get1).hex(), "error": [8, 4]})
    return out


def forwarded_vectors() -> list[dict]:
    """The client address from ingress to egress (tunnel.md, "Client address"): the tunnelled head's
    CPN-Client / CPN-Ingress, and the Forwarded / X-Forwarded-For the instance gets from them."""
    from cpnd.forwarded import at_ingress, for_instance, read

    user = [(b"host", b"api.example"), (b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6")]
    out: list[dict] = []
    for source, ingress, meaning in [
        ("203.0.113.7", "gw1", "an IPv4 user"),
        ("2001:db8::17", "edge-eu.1", "an IPv6 user: bracketed and quoted in Forwarded (RFC 7239 section 6)"),
        ("::ffff:198.51.100.9", "gw_2", "an IPv4-mapped IPv6 peer address travels as IPv4"),
    ]:
        tunnel = at_ingress(list(user), source, ingress)
        origin = read(tunnel)
        assert origin is not None
        out.append({"name": f"forwarded-{len(out) + 1}", "meaning": meaning, "peer_address": source,
                    "ingress": ingress, "user_headers": [[n.decode(), v.decode()] for n, v in user],
                    "tunnel_headers": [[n.decode(), v.decode()] for n, v in tunnel],
                    "instance_headers": [[n.decode(), v.decode()] for n, v in for_instance(tunnel, origin)]})
    for name, meaning, extra in [
        ("not-an-address", "CPN-Client that is not an IP address", [(b"cpn-client", b"example.com"), (b"cpn-ingress", b"gw1")]),
        ("not-canonical", "CPN-Client not in canonical form", [(b"cpn-client", b"2001:DB8:0::17"), (b"cpn-ingress", b"gw1")]),
        ("two-clients", "two CPN-Client headers", [(b"cpn-client", b"192.0.2.1"), (b"cpn-client", b"192.0.2.2"),
                                                  (b"cpn-ingress", b"gw1")]),
        ("no-ingress", "CPN-Client without CPN-Ingress", [(b"cpn-client", b"192.0.2.1")]),
        ("bad-ingress", "CPN-Ingress that is not a gateway id", [(b"cpn-client", b"192.0.2.1"), (b"cpn-ingress", b"g w")]),
    ]:
        tunnel = list(user) + extra
        origin = read(tunnel)
        assert origin is None, name
        out.append({"name": f"forwarded-{name}", "meaning": f"{meaning}: ignored, the user's headers still removed",
                    "tunnel_headers": [[n.decode(), v.decode()] for n, v in tunnel],
                    "instance_headers": [[n.decode(), v.decode()] for n, v in for_instance(tunnel, origin)]})
    return out
def http2_vectors() -> dict:
    """A gRPC unary call as an ingress writes it into a tunnel stream, and a response with trailers
    as an egress writes it back (tunnel.md, "HTTP/2 and gRPC requests in the stream")."""
    import h11

    from cpnd.grpcmap import request_head
    from cpnd.h1 import rewrite_headers
    from cpnd.h2edge import H2Stream

    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/echo.Echo/Say"), (b":authority", b"gw1:8080"),
              (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"250m"),
              (b"cpn-max-latency", b"20ms")]
    message = b"\x00\x00\x00\x00\x05hello"  # gRPC framing: not compressed, length 5
    method, target, headers = request_head(fields)
    # What the ingress keeps: hop-by-hop and CPN-* dropped, chunked for a body of unknown length,
    # TE: trailers for a user that takes trailers (h2edge.py, attempts.py).
    user = h11.Request(method=method, target=target, headers=[*headers, (b"transfer-encoding", b"chunked")])
    headers = rewrite_headers(user.headers, drop_cpn=True, extra=H2Stream.tunnel_extra)
    client = h11.Connection(h11.CLIENT)
    request = b"".join(client.send(e) or b"" for e in (h11.Request(method=method, target=target, headers=headers),
                                                        h11.Data(data=message), h11.EndOfMessage()))
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    while not isinstance(server.next_event(), h11.EndOfMessage):
        pass
    response = b"".join(server.send(e) or b"" for e in (
        h11.Response(status_code=200, headers=[(b"content-type", b"application/grpc"), (b"transfer-encoding", b"chunked"),
                                               (b"cpn-instance", b"s1"), (b"cpn-origin", b"gw3")]),
        h11.Data(data=message),
        h11.EndOfMessage(headers=[(b"grpc-status", b"0"), (b"grpc-message", b""), (b"x-served-by-bin", b"AAH/")])))
    return {
        "meaning": "gRPC unary call /echo.Echo/Say from an HTTP/2 user (grpc-timeout 250m, cpn-max-latency 20ms) "
                   "and its OK response with trailers, as HTTP/1.1 in the tunnel stream",
        "h2_request_fields": [[n.decode(), v.decode()] for n, v in fields],
        "request_hex": request.hex(),
        "request_text": request.decode("latin-1"),
        "response_hex": response.hex(),
        "response_text": response.decode("latin-1"),
        "trailers": [["grpc-status", "0"], ["grpc-message", ""], ["x-served-by-bin", "AAH/"]],
    }


def main() -> None:
    out = {
        "about": "Test vectors for protocol-spec (cpn/1). Hex strings are exact bytes; bin values in 'decoded' are {\"bin\": hex}.",
        "labels": {svc: service_label(svc) for svc in ("/yolo", "/ai/llm/v1", "/ai/embed/v2")},
        "messages": message_vectors(),
        "handshake": handshake_vector(),
        "handshake-data-channel": handshake_vector(data_channel=True),
        "tunnel": tunnel_vectors(),
        "tunnel-batch": tunnel_batch_vectors(),
        "forwarded": forwarded_vectors(),
        "http2": http2_vectors(),
        "origin": origin_vectors(),
        "sealed": sealed_vectors(),
    }
    path = Path(__file__).resolve().parent / "vectors.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
