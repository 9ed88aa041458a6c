"""Origin validation, sans-IO: certificates, signatures, the verdict rules, and the RIB's use of them."""

from __future__ import annotations

import re
import subprocess
import sys

import attrs
import pytest

from cpnd.config import load_config
from cpnd.crypto import generate_key, public_key_b64, write_private_key
from cpnd.errors import ConfigError
from cpnd.names import service_label
from cpnd.origin import (
    CertificateError,
    Signer,
    Trust,
    Validation,
    certificate_pem,
    decode_certificate,
    issue,
    read_certificate,
    verify_certificate,
)
from cpnd.rib import AdjRibOut, BestReason, Rib
from cpnd.wire import RouteAdv, Update, decode_message, encode_message

NOW = 1_800_000_000
LATER = NOW + 86400


def raw(key) -> bytes:
    return key.public_key().public_bytes_raw()


def adv(origin: str, path: tuple[str, ...], seq: int = 1, svc: str = "/svc", inst: str = "i1", **kw) -> RouteAdv:
    return RouteAdv(svc, inst, origin, seq, service_label(svc), path, 0, kw.pop("cap", 10.0), kw.pop("load", 0.0),
                    kw.pop("price", 1.0), 1000, **kw)


class World:
    """A domain key, and gateways with keys, certificates and signers."""

    def __init__(self) -> None:
        self.ca = generate_key()
        self.keys = {g: generate_key() for g in ("o", "t", "x", "evil")}
        self.certs = {"o": issue(self.ca, raw(self.keys["o"]), ["/svc"], LATER, "o"),
                      "t": issue(self.ca, raw(self.keys["t"]), ["/loc"], LATER, "t")}

    def signer(self, g: str) -> Signer:
        return Signer(g, self.keys[g], self.certs.get(g))

    def trust(self, local: str = "t", peers: tuple[str, ...] = ("x", "evil"), **kw) -> Trust:
        return Trust(local, {p: raw(self.keys[p]) for p in peers}, [raw(self.ca)], self.certs.get(local),
                     clock=lambda: NOW, **kw)

    def signed(self, g: str, route: RouteAdv, to: str) -> RouteAdv:
        s = self.signer(g)
        return attrs.evolve(s.sign(route), oadj=s.adjacency(to))


@pytest.fixture
def w() -> World:
    return World()


def test_certificate_round_trip_and_checks(w, tmp_path) -> None:
    c = w.certs["o"]
    assert decode_certificate(c.encode()) == c
    verify_certificate(c, [raw(w.ca)], NOW)
    for anchors, now, why in (([raw(generate_key())], NOW, "not issued by a trust anchor"), ([raw(w.ca)], LATER + 1, "expired")):
        with pytest.raises(CertificateError, match=why):
            verify_certificate(c, anchors, now)
    forged = attrs.evolve(c, services=("/svc", "/loc"))
    with pytest.raises(CertificateError, match="bad issuer signature"):
        verify_certificate(forged, [raw(w.ca)], NOW)
    (tmp_path / "o.cert").write_text(certificate_pem(c))
    assert read_certificate(tmp_path / "o.cert") == c
    for bad in (b"\x90", c.encode()[:-3], b"\x81\xa1v\x01"):
        with pytest.raises(CertificateError):
            decode_certificate(bad)


def test_signed_route_is_valid_two_hops_away_and_on_the_wire(w) -> None:
    route = w.signed("o", adv("o", ("o",)), to="x")
    moved = attrs.evolve(route, path=("x", "o"), latency_us=5000)  # x passes it on: lat is its own word
    t = w.trust()
    assert t.validate("x", moved).state is Validation.VALID
    back = decode_message(encode_message(Update((moved,), ()))).adv[0]  # type: ignore[union-attr]
    assert back == moved and t.validate("x", back).state is Validation.VALID
    assert t.verifies == 2 and t.validate("x", back).state is Validation.VALID and t.verifies == 2  # cached


@pytest.mark.parametrize("change, state, why", [
    (dict(seq=(1 << 64) - 1), Validation.INVALID, "bad origin signature"),
    (dict(price=1e12), Validation.INVALID, "bad origin signature"),
    (dict(path=("evil", "o")), Validation.INVALID, "never sent its routes to evil"),
    (dict(path=("evil", "t2", "o")), Validation.INVALID, "never sent its routes to t2"),
    (dict(osig=None, oadj=None), Validation.INVALID, "unsigned, but o's key is known"),
    (dict(osig=None, oadj=None, cert=None), Validation.INVALID, "unsigned, but o's key is known"),  # learned above
    (dict(service="/loc/admin"), Validation.INVALID, "certificate does not name /loc/admin"),
])
def test_forgeries_are_invalid(w, change, state, why) -> None:
    t = w.trust()
    good = attrs.evolve(w.signed("o", adv("o", ("o",)), to="x"), path=("x", "o"))
    assert t.validate("x", good).state is Validation.VALID
    verdict = t.validate(change.get("path", ("x",))[0], attrs.evolve(good, **change))
    assert verdict.state is state and why in verdict.reason, verdict


def test_unknown_and_capture_rules(w) -> None:
    t = w.trust()
    stranger = generate_key()
    s = Signer("far", stranger)
    far = attrs.evolve(s.sign(adv("far", ("far",), svc="/other")), oadj=s.adjacency("x"), path=("x", "far"))
    assert t.validate("x", far).reason == "no key known for far"  # signed, but nobody to check it with
    legacy = adv("x", ("x",), svc="/x")
    assert t.validate("x", legacy).state is Validation.UNKNOWN  # a peer from before origin-sig, for itself
    t.signing_peers.add("x")
    assert t.validate("x", legacy).state is Validation.INVALID  # it signs now: unsigned is not its word
    # Evil's own key signs its capture of t's prefix: covered by t's certificate, not matched.
    capture = w.signed("evil", adv("evil", ("evil",), svc="/loc/admin"), to="t")
    v = t.validate("evil", capture)
    assert v.state is Validation.INVALID and v.reason == "/loc/admin is authorised to t, not evil"
    assert t.validate("evil", w.signed("evil", adv("evil", ("evil",), svc="/evil"), to="t")).state is Validation.VALID
    # A certificate naming no gateway holds only for a key the peer list gives that name.
    anon = issue(w.ca, raw(w.keys["x"]), ["/x"], LATER)
    signed = attrs.evolve(w.signed("x", adv("x", ("x",), svc="/x"), to="t"), cert=anon.encode())
    assert t.validate("x", signed).state is Validation.VALID
    assert "names no gateway" in t.validate("x", attrs.evolve(signed, origin="y", path=("x", "y"))).reason


def test_rib_drops_invalid_counts_and_never_takes_unverified_attributes(w) -> None:
    rib = Rib("t")
    rib.trust = w.trust(peers=("x", "evil", "o"))
    real = w.signed("o", adv("o", ("o",), seq=5), to="t")
    rib.apply_update("o", Update((real,)), 0.0)
    key = real.key
    assert rib.loc[key].route.validation is Validation.VALID
    # Forged: invalid, dropped, counted; the peer's earlier route for the key goes with it.
    rib.apply_update("evil", Update((adv("o", ("evil", "o"), seq=(1 << 64) - 1, price=1e12),)), 0.0)
    assert rib.counters["routes_invalid"] == 1 and rib.invalid_by_peer["evil"] == 1 and key not in rib.adj_in["evil"]
    # Unknown (from an origin nobody can check): kept, but neither best nor the source of attributes.
    rib.trust.peer_keys.pop("o")
    rib.trust.by_origin.pop("o")
    rib.apply_update("x", Update((adv("o", ("x", "o"), seq=(1 << 64) - 1, price=1e12),)), 0.0)
    rib.set_link_cost("o", 9000)
    best = rib.loc[key]
    assert best.route.peer == "o" and best.reason is BestReason.VALID and best.fresh.price == 1.0
    rib.trust.accept_unverified = False
    rib.apply_update("x", Update((adv("o", ("x", "o"), seq=7),)), 0.0)
    assert key not in rib.adj_in["x"] and rib.counters["routes_unverified_dropped"] == 1


def test_policy_import_export_and_local_pref() -> None:
    rib = Rib("t")
    rib.import_prefixes = {"a": ("/ok",)}
    rib.local_pref = {"b": 200}
    rib.apply_update("a", Update((adv("a", ("a",), svc="/ok/x"), adv("a", ("a",), svc="/no"))), 0.0)
    assert {k[0] for k in rib.adj_in["a"]} == {"/ok/x"} and rib.filtered_by_peer["a"] == 1
    rib.set_link_cost("a", 1000)
    rib.set_link_cost("b", 50_000)
    rib.apply_update("b", Update((adv("a", ("b", "a"), svc="/ok/x"),)), 0.0)
    best = rib.loc[("/ok/x", "a", "i1")]
    assert best.route.peer == "b" and best.reason is BestReason.PREFERENCE  # preferred, though 49 ms slower
    out = AdjRibOut("c", 0.0, export_prefixes=("/nothing",))
    out.mark_all(rib)
    assert out.flush(rib, 0.0) == ([], [])


def test_own_routes_signed_once_per_change_and_stripped_for_old_peers(w) -> None:
    rib = Rib("o")
    rib.signer = w.signer("o")
    rib.set_local([adv("o", ("o",), seq=1)], 0.0)
    new = AdjRibOut("t", 0.0, sig_ok=True, adjacency=rib.signer.adjacency("t"))
    old = AdjRibOut("x", 0.0)
    for out in (new, old):
        out.mark_all(rib)
    (sent,), _ = new.flush(rib, 0.0)
    (plain,), _ = old.flush(rib, 0.0)
    assert plain.osig is None and plain.oadj is None and plain.cert is None
    assert w.trust().validate("o", sent).state is Validation.VALID
    assert rib.signer.signs == 2  # the route and the adjacency token
    rib.set_local([attrs.evolve(adv("o", ("o",), seq=1), gateway_us=900)], 0.0)  # a path attribute moved
    new.mark(rib.loc.keys())
    new.flush(rib, 0.0)
    assert rib.signer.signs == 2


def _cfg(tmp_path, extra_gw: str = "", extra_peer: str = "", services: str = "/yolo") -> str:
    key = generate_key()
    write_private_key(tmp_path / "gw1.key", key, force=True)
    return key, f"""[gateway]
id = "gw1"
listen = "127.0.0.1:7101"
key_file = "gw1.key"
{extra_gw}
[[peers]]
id = "gw3"
address = "127.0.0.1:7103"
public_key = "{public_key_b64(generate_key())}"
{extra_peer}
[[services]]
path = "{services}"
[[services.instances]]
id = "s1"
url = "http://127.0.0.1:9001/"
capacity = 50
"""


def test_config_keys_and_their_errors(tmp_path) -> None:
    ca = generate_key()
    key, text = _cfg(tmp_path)
    good = issue(ca, raw(key), ["/yolo"], LATER + 10**8, "gw1")
    (tmp_path / "gw1.cert").write_text(certificate_pem(good))
    anchors = f'trust_anchors = ["{public_key_b64(ca)}"]\ncert_file = "gw1.cert"\naccept_unverified_origins = false'
    policy = 'import = ["/a", "/b"]\nexport = ["/yolo"]\nlocal_pref = 150'
    path = tmp_path / "gw1.toml"
    path.write_text(text.replace("[[peers]]", anchors + "\n[[peers]]").replace("\n[[services]]", policy + "\n[[services]]"))
    c = load_config(path)
    assert c.cert == good and not c.gateway.accept_unverified_origins
    assert c.peers[0].import_prefixes == ("/a", "/b") and c.peers[0].local_pref == 150
    for cert, msg in ((issue(ca, raw(generate_key()), ["/yolo"], LATER + 10**8), "certifies another key"),
                      (issue(ca, raw(key), ["/other"], LATER + 10**8), "does not name /yolo (services[0].path)"),
                      (issue(ca, raw(key), ["/yolo"], 5), "expired")):
        (tmp_path / "gw1.cert").write_text(certificate_pem(cert))
        with pytest.raises(ConfigError, match=r"gw1.toml:\d+: gateway.cert_file: .*" + re.escape(msg)):
            load_config(path)
    for bad, msg in (('trust_anchors = ["nope"]', r"gw1.toml:\d+: gateway.trust_anchors: \[0\]: must decode to 32 bytes"),):
        path.write_text(text.replace("[[peers]]", bad + "\n[[peers]]"))
        with pytest.raises(ConfigError, match=msg):
            load_config(path)
    path.write_text(text.replace("\n[[services]]", 'import = ["yolo"]\n[[services]]'))
    with pytest.raises(ConfigError, match=r"gw1.toml:\d+: peers\[0\].import: 'yolo'"):
        load_config(path)


def test_cpnctl_certify(tmp_path) -> None:
    ca = generate_key()
    write_private_key(tmp_path / "domain.key", ca)
    gw = public_key_b64(generate_key())
    cmd = [sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())"]
    r = subprocess.run([*cmd[:3], "certify", "--ca", str(tmp_path / "domain.key"), "--pubkey", gw, "--services", "/a,/b",
                        "--out", str(tmp_path / "gw.cert"), "--id", "gw1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    cert = read_certificate(tmp_path / "gw.cert")
    assert cert.services == ("/a", "/b") and cert.id == "gw1" and cert.issuer == raw(ca)
    verify_certificate(cert, [raw(ca)], NOW)
    r = subprocess.run([*cmd[:3], "certify", "--ca", str(tmp_path / "domain.key"), "--pubkey", gw, "--services", "a",
                        "--out", str(tmp_path / "x.cert")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "services: 'a'" in r.stderr


def test_origin_vectors(vectors) -> None:
    """cpnd reproduces the spec's certificate, signatures and verdicts (vectors.json -> origin)."""
    import base64

    from cpnd.wire import _decode_route

    v = vectors["origin"]
    key = lambda b64: base64.b64decode(b64)  # noqa: E731
    cert = decode_certificate(bytes.fromhex(v["certificate"]["hex"]))
    assert cert.body().hex() == v["certificate"]["signed_hex"] and cert.encode().hex() == v["certificate"]["hex"]
    verify_certificate(cert, [key(v["domain_public_key"])], v["receiver"]["now"])

    def route(d):
        return _decode_route({k: bytes.fromhex(x["bin"]) if isinstance(x, dict) else x for k, x in d.items()})

    from cpnd.origin import adjacency_message, origin_message

    assert origin_message(route(v["origin_signature"]["route"])).hex() == v["origin_signature"]["signed_hex"]
    assert adjacency_message("gw3", "gw1").hex() == v["adjacency"]["signed_hex"]
    for case in v["validation"]:
        trust = Trust("gw2", {"evil": key(v["evil_public_key"])}, [key(v["domain_public_key"])],
                      clock=lambda: v["receiver"]["now"])
        trust.signing_peers = {"gw1", "evil"}
        assert trust.validate("gw1", route(v["validation"][0]["route"])).state is Validation.VALID  # learns gw3's cert
        assert trust.validate(case["from"], route(case["route"])).state.value == case["validation"], case["name"]


def test_a_certificate_goes_once_per_session_and_the_receiver_keeps_it(w) -> None:
    """Routes after the first of an origin come without its certificate; the receiver validates them with
    the one it keeps (and with the same rules: a service it does not name is invalid)."""
    rib = Rib("x")
    rib.trust = w.trust(local="x", peers=())
    routes = [attrs.evolve(w.signed("o", adv("o", ("o",), inst=f"i{n}"), to="t"), path=("t", "o")) for n in range(3)]
    rib.apply_update("t", Update(tuple(routes)), 0.0)
    out = AdjRibOut("y", 0.0, sig_ok=True)
    out.mark_all(rib)
    sent, _ = out.flush(rib, 0.0)
    assert [r.cert is not None for r in sent] == [True, False, False]
    far = w.trust(local="y", peers=())
    assert [far.validate("x", attrs.evolve(r, path=("x", *r.path))).state for r in sent] == [Validation.VALID] * 3
    stray = attrs.evolve(w.signed("o", adv("o", ("o",), svc="/elsewhere"), to="t"), path=("x", "t", "o"), cert=None)
    assert "does not name /elsewhere" in far.validate("x", stray).reason


def test_a_route_that_came_without_its_certificate_goes_on_with_it(w) -> None:
    """The freshest attributes may come over a session that sent the origin's certificate earlier: what
    we pass on carries the one we hold, or a gateway further on could not verify the origin (a 10-gateway
    lab saw exactly that: "/svc is authorised to ..., not g003")."""
    rib = Rib("a")
    rib.trust = w.trust(local="a", peers=())
    first = attrs.evolve(w.signed("o", adv("o", ("o",), seq=1), to="x"), path=("x", "o"))
    fresher = attrs.evolve(w.signed("o", adv("o", ("o",), seq=2), to="y"), path=("y", "o"), cert=None)
    rib.apply_update("x", Update((first,)), 0.0)
    rib.apply_update("y", Update((fresher,)), 0.0)
    assert rib.loc[first.key].fresh.seq == 2 and rib.loc[first.key].fresh.cert is None
    out = AdjRibOut("z", 0.0, sig_ok=True)
    out.mark_all(rib)
    (sent,), _ = out.flush(rib, 0.0)
    assert sent.cert == w.certs["o"].encode()
    far = w.trust(local="z", peers=())
    assert far.validate("a", sent).state is Validation.VALID


def test_a_capture_held_before_the_covering_certificate_goes_when_it_comes(w) -> None:
    rib = Rib("x")
    rib.trust = w.trust(local="x", peers=("evil",))
    capture = w.signed("evil", adv("evil", ("evil",), svc="/svc/admin"), to="x")
    rib.apply_update("evil", Update((capture,)), 0.0)
    assert rib.loc[capture.key].route.validation is Validation.VALID  # nobody is authorised for /svc yet
    real = attrs.evolve(w.signed("o", adv("o", ("o",)), to="t"), path=("t", "o"))  # carries o's /svc certificate
    changed = rib.apply_update("t", Update((real,)), 0.0)
    assert capture.key in changed and capture.key not in rib.loc and real.key in rib.loc
    assert rib.invalid_by_peer["evil"] == 1 and "learned later" in rib.last_invalid["evil"]
