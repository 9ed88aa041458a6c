"""Origin validation (sans-IO): certificates, origin signatures and route validation.

An origin signs what only it may say about its instances (service, instance, its own id,
``seq`` and the instance attributes) and, once per neighbour, that it sends its routes to
that neighbour; transits add only path attributes (their hop, ``lat``, ``gw``), unsigned.
A receiver verifies with the origin's key from ``[[peers]]`` or from a certificate issued by
one of its ``trust_anchors``, and files every route as valid, invalid or unknown, as RPKI
origin validation does (protocol-spec/routing.md, "Origin validation"; threats.md).
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .names import id_problem, service_problem
from .wire import MAX_CERT_BYTES, RouteAdv

CERT_VERSION = 1
MAX_CERT_SERVICES = 32
CERT_CONTEXT = b"cpn/1 certificate\x00"
ORIGIN_CONTEXT = b"cpn/1 origin\x00"
ADJACENCY_CONTEXT = b"cpn/1 adjacency\x00"
# Certificates held as authorisations (VRPs); beyond, the oldest learned one goes (our own never).
MAX_CERTIFICATES = 4096
# Verified signatures remembered, so that a route heard from several peers is verified once.
VERIFY_CACHE = 65536
PEM_BEGIN = "-----BEGIN CPN CERTIFICATE-----"
PEM_END = "-----END CPN CERTIFICATE-----"


class Validation(enum.Enum):
    """A route's origin validation state (``validation`` in ``show routes --json``)."""

    VALID = "valid"
    INVALID = "invalid"
    UNKNOWN = "unknown"


class CertificateError(ValueError):
    """A certificate that does not decode, verify or apply."""


def _raw(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def covers(prefix: str, service: str) -> bool:
    """Whether the URL-PATH ``prefix`` names ``service`` or a service under it (segment-wise)."""
    return service == prefix or service.startswith(prefix + "/")


def covered(prefixes: Iterable[str], service: str) -> bool:
    return any(covers(p, service) for p in prefixes)


# ---------------------------------------------------------------- certificates


@attrs.frozen
class Certificate:
    """A trust anchor's statement: key ``key`` (of gateway ``id``; "" binds no name) may
    originate ``services`` (URL-PATH prefixes) until ``not_after`` (Unix seconds)."""

    id: str
    key: bytes = attrs.field(repr=False)
    services: tuple[str, ...]
    not_after: int
    issuer: bytes = attrs.field(repr=False)
    sig: bytes = attrs.field(repr=False)

    def body(self) -> bytes:
        return certificate_body(self.id, self.key, self.services, self.not_after, self.issuer)

    def encode(self) -> bytes:
        return msgpack.packb({"v": CERT_VERSION, "id": self.id, "key": self.key, "svc": list(self.services),
                              "exp": self.not_after, "iss": self.issuer, "sig": self.sig}, use_bin_type=True)


def certificate_body(id: str, key: bytes, services: Iterable[str], not_after: int, issuer: bytes) -> bytes:
    """What the issuer signs: the context string, then msgpack [v, id, key, services, not_after, issuer]."""
    return CERT_CONTEXT + msgpack.packb([CERT_VERSION, id, key, list(services), not_after, issuer], use_bin_type=True)


def issue(ca: Ed25519PrivateKey, key: bytes, services: Iterable[str], not_after: int, id: str = "") -> Certificate:
    """A certificate signed by ``ca`` (``cpnctl certify``)."""
    services = tuple(services)
    _check_fields(id, key, services, not_after)
    issuer = _raw(ca)
    return Certificate(id, key, services, not_after, issuer, ca.sign(certificate_body(id, key, services, not_after, issuer)))


def _check_fields(id: str, key: object, services: tuple[object, ...], not_after: object) -> None:
    if id and id_problem(id):
        raise CertificateError(f"id: {id_problem(id)}")
    if type(key) is not bytes or len(key) != 32:
        raise CertificateError("key: must be 32 bytes")
    if not 1 <= len(services) <= MAX_CERT_SERVICES:
        raise CertificateError(f"services: 1-{MAX_CERT_SERVICES} URL-PATH prefixes")
    for s in services:
        if type(s) is not str or service_problem(s):
            raise CertificateError(f"services: {s!r}: {service_problem(s) if type(s) is str else 'not a string'}")
    if type(not_after) is not int or not 0 <= not_after < 1 << 63:
        raise CertificateError("exp: must be an integer in [0, 2^63)")


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError("msgpack ext types are not allowed")


def decode_certificate(raw: bytes) -> Certificate:
    """Parse an encoded certificate (its signature is not checked here); CertificateError otherwise."""
    if len(raw) > MAX_CERT_BYTES:
        raise CertificateError(f"longer than {MAX_CERT_BYTES} bytes")
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except Exception:
        raise CertificateError("not one msgpack object") from None
    if type(m) is not dict or set(m) != {"v", "id", "key", "svc", "exp", "iss", "sig"}:
        raise CertificateError("must be a map of exactly v, id, key, svc, exp, iss, sig")
    if m["v"] != CERT_VERSION or type(m["v"]) is not int:
        raise CertificateError(f"unsupported version {m['v']!r}")
    if type(m["id"]) is not str or type(m["svc"]) is not list:
        raise CertificateError("id must be a string and svc a list")
    _check_fields(m["id"], m["key"], tuple(m["svc"]), m["exp"])
    for k in ("iss", "sig"):
        if type(m[k]) is not bytes or len(m[k]) != (32 if k == "iss" else 64):
            raise CertificateError(f"{k}: wrong size")
    return Certificate(m["id"], m["key"], tuple(m["svc"]), m["exp"], m["iss"], m["sig"])


def verify_certificate(cert: Certificate, anchors: Iterable[bytes], now: float) -> None:
    """Raise CertificateError unless ``cert`` is signed by one of ``anchors`` and not expired at ``now``."""
    if cert.issuer not in set(anchors):
        raise CertificateError("not issued by a trust anchor")
    if cert.not_after < now:
        raise CertificateError(f"expired at {cert.not_after}")
    try:
        Ed25519PublicKey.from_public_bytes(cert.issuer).verify(cert.sig, cert.body())
    except InvalidSignature:
        raise CertificateError("bad issuer signature") from None


def certificate_pem(cert: Certificate) -> str:
    b64 = base64.b64encode(cert.encode()).decode()
    return "\n".join([PEM_BEGIN, *(b64[i:i + 64] for i in range(0, len(b64), 64)), PEM_END]) + "\n"


def read_certificate(path: Path) -> Certificate:
    """A certificate file written by ``cpnctl certify``; CertificateError with a short reason otherwise."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CertificateError(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != PEM_BEGIN or lines[-1] != PEM_END:
        raise CertificateError(f"not a certificate (expected {PEM_BEGIN} ... {PEM_END})")
    try:
        raw = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("not valid base64") from None
    return decode_certificate(raw)


# ---------------------------------------------------------------- origin signatures


def origin_message(adv: RouteAdv) -> bytes:
    """What the origin signs: the context string, then msgpack
    [svc, inst, origin, seq, cap, load, bload, price, comp, down, xk], numbers as float64 / int, xk nil when absent."""
    return ORIGIN_CONTEXT + msgpack.packb(
        [adv.service, adv.instance, adv.origin, adv.seq, float(adv.capacity), float(adv.load), float(adv.bload),
         float(adv.price), adv.compute_us, adv.down, adv.seal_key], use_bin_type=True)


def adjacency_message(origin: str, neighbour: str) -> bytes:
    """What the origin signs once per neighbour: it sends its routes to ``neighbour``."""
    o, n = origin.encode(), neighbour.encode()
    return ADJACENCY_CONTEXT + bytes([len(o)]) + o + bytes([len(n)]) + n


class Signer:
    """The origin side: signs our own instances' routes and our adjacency tokens."""

    def __init__(self, local_id: str, key: Ed25519PrivateKey, cert: Certificate | None = None,
                 seal_key: bytes | None = None) -> None:
        self.local_id = local_id
        self.key = key
        self.seal_key = seal_key  # our X25519 public key for sealed streams, published in our routes (`xk`)
        self.cert = cert.encode() if cert is not None else None
        self._last: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # per instance: the last message and its signature
        self._adjacency: dict[str, bytes] = {}
        self.signs = 0

    def sign(self, adv: RouteAdv) -> RouteAdv:
        """``adv`` (one of ours) with our sealing key, its origin signature and our certificate."""
        adv = attrs.evolve(adv, seal_key=self.seal_key)
        msg = origin_message(adv)
        last = self._last.get((adv.service, adv.instance))
        if last is not None and last[0] == msg:
            sig = last[1]  # a path attribute moved (gw), not what we sign
        else:
            sig = self.key.sign(msg)
            self.signs += 1
            self._last[(adv.service, adv.instance)] = (msg, sig)
        return attrs.evolve(adv, osig=sig, oadj=adv.oadj, cert=self.cert)

    def adjacency(self, neighbour: str) -> bytes:
        """Our token for ``neighbour``: the `oadj` of our own routes sent to it."""
        tok = self._adjacency.get(neighbour)
        if tok is None:
            tok = self._adjacency[neighbour] = self.key.sign(adjacency_message(self.local_id, neighbour))
            self.signs += 1
        return tok

    def forget(self, keep: Iterable[tuple[str, str]]) -> None:
        keep = set(keep)
        self._last = {k: v for k, v in self._last.items() if k in keep}


# ---------------------------------------------------------------- validation


@attrs.frozen
class Verdict:
    state: Validation
    reason: str = ""


VALID = Verdict(Validation.VALID)


class Trust:
    """The receiver side: what keys and authorisations it knows, and the verdict on each route."""

    def __init__(self, local_id: str, peer_keys: Mapping[str, bytes], anchors: Iterable[bytes] = (),
                 own_cert: Certificate | None = None, *, accept_unverified: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.local_id = local_id
        self.peer_keys = dict(peer_keys)
        self.anchors = frozenset(anchors)
        self.accept_unverified = accept_unverified
        self.clock = clock  # wall clock, for certificate expiry
        self.signing_peers: set[str] = set()  # peers whose session offered origin-sig both ways
        # Authorisations (RPKI's VRPs): every certificate verified, by (encoding, origin it applies to).
        self.certs: collections.OrderedDict[tuple[bytes, str], Certificate] = collections.OrderedDict()
        self.vrp: dict[str, dict[str, int]] = {}  # prefix -> origin -> certificates naming it
        self.by_origin: dict[str, Certificate] = {}  # origin -> the newest certificate seen for it
        self.raw_by_origin: dict[str, bytes] = {}  # ... and its encoding, as routes carry it on
        self.own: tuple[bytes, str] | None = None
        self.new_prefixes: set[str] = set()  # prefixes that gained an authorised origin since last taken
        self._bad_certs: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._verified: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # sig -> key + message
        self.verifies = 0
        self.cache_hits = 0
        if own_cert is not None:
            self.own = (own_cert.encode(), local_id)
            self._remember(own_cert, local_id)

    # ---- authorisations

    def _remember(self, cert: Certificate, origin: str) -> None:
        k = (cert.encode(), origin)
        if k in self.certs:
            return
        while len(self.certs) >= MAX_CERTIFICATES:
            old_k = next(k2 for k2 in self.certs if k2 != self.own)
            self._forget(old_k)
        self.certs[k] = cert
        for p in cert.services:
            self.vrp.setdefault(p, {})
            if origin not in self.vrp[p]:
                self.new_prefixes.add(p)  # a new authorisation: routes held under it are judged again
            self.vrp[p][origin] = self.vrp[p].get(origin, 0) + 1
        self.by_origin[origin] = cert
        self.raw_by_origin[origin] = k[0]

    def _forget(self, k: tuple[bytes, str]) -> None:
        cert = self.certs.pop(k)
        if self.by_origin.get(k[1]) is cert:
            del self.by_origin[k[1]]
            del self.raw_by_origin[k[1]]
        for p in cert.services:
            n = self.vrp[p][k[1]] - 1
            if n:
                self.vrp[p][k[1]] = n
            else:
                del self.vrp[p][k[1]]
                if not self.vrp[p]:
                    del self.vrp[p]

    def take_new_prefixes(self) -> set[str]:
        out, self.new_prefixes = self.new_prefixes, set()
        return out

    def authorised(self, service: str) -> set[str] | None:
        """The origins some certificate authorises for ``service``; None when none covers it."""
        out: set[str] | None = None
        prefix = ""
        for seg in service.split("/")[1:]:
            prefix += "/" + seg
            found = self.vrp.get(prefix)
            if found:
                out = (out or set()) | set(found)
        return out

    def _certificate(self, raw: bytes, origin: str, now: float) -> Certificate:
        known = self.certs.get((raw, origin))
        if known is not None and known.issuer in self.anchors:  # verified before: only time moved
            if known.not_after < now:
                raise CertificateError(f"expired at {known.not_after}")
            self.certs.move_to_end((raw, origin))
            return known
        bad = self._bad_certs.get(raw)
        if bad is not None:
            raise CertificateError(bad)
        try:
            cert = decode_certificate(raw)
            verify_certificate(cert, self.anchors, now)
        except CertificateError as exc:
            self._bad_certs[raw] = str(exc)
            if len(self._bad_certs) > 1024:
                self._bad_certs.popitem(last=False)
            raise
        if cert.id and cert.id != origin:
            raise CertificateError(f"issued to {cert.id}, not {origin}")
        if not cert.id and self.peer_keys.get(origin) != cert.key:
            raise CertificateError(f"names no gateway, and {origin}'s key in [[peers]] is not its key")
        if origin in self.peer_keys and self.peer_keys[origin] != cert.key:
            raise CertificateError(f"its key is not {origin}'s key in [[peers]]")
        self._remember(cert, origin)
        return cert

    # ---- signatures

    def _verify(self, key: bytes, sig: bytes, msg: bytes) -> bool:
        if self._verified.get(sig) == key + msg:
            self.cache_hits += 1
            self._verified.move_to_end(sig)
            return True
        self.verifies += 1
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
        except (InvalidSignature, ValueError):
            return False
        self._verified[sig] = key + msg
        if len(self._verified) > VERIFY_CACHE:
            self._verified.popitem(last=False)
        return True

    def key_of(self, origin: str) -> bytes | None:
        cert = self.by_origin.get(origin)
        return self.peer_keys.get(origin) or (cert.key if cert is not None else None)

    def validate(self, peer: str, adv: RouteAdv) -> Verdict:
        """The verdict on ``adv`` received from ``peer`` (routing.md, "Origin validation")."""
        now = self.clock()
        cert: Certificate | None = None
        if adv.cert is not None:
            try:
                cert = self._certificate(adv.cert, adv.origin, now)
            except CertificateError as exc:
                return Verdict(Validation.INVALID, f"certificate: {exc}")
        elif adv.origin not in self.peer_keys:
            # Sent once per session: the one we hold for the origin (routing.md, "Certificates").
            cert = self.by_origin.get(adv.origin)
            if cert is not None and (cert.not_after < now or cert.issuer not in self.anchors):
                cert = None
        if cert is not None:
            if not covered(cert.services, adv.service):
                return Verdict(Validation.INVALID, f"{adv.origin}'s certificate does not name {adv.service}")
        allowed = self.authorised(adv.service)
        if allowed is not None and adv.origin not in allowed:
            return Verdict(Validation.INVALID, f"{adv.service} is authorised to {', '.join(sorted(allowed))}, "
                                               f"not {adv.origin}")
        key = cert.key if cert is not None else self.peer_keys.get(adv.origin)
        if adv.osig is None or adv.oadj is None:
            if key is None or (adv.origin == peer and peer not in self.signing_peers):
                return Verdict(Validation.UNKNOWN, "unsigned")  # nobody to check it with, or a peer from before origin-sig
            return Verdict(Validation.INVALID, f"unsigned, but {adv.origin}'s key is known")
        if key is None:
            return Verdict(Validation.UNKNOWN, f"no key known for {adv.origin}")
        if not self._verify(key, adv.osig, origin_message(adv)):
            return Verdict(Validation.INVALID, f"bad origin signature of {adv.origin}")
        neighbour = adv.path[-2] if len(adv.path) >= 2 else self.local_id
        if not self._verify(key, adv.oadj, adjacency_message(adv.origin, neighbour)):
            return Verdict(Validation.INVALID, f"{adv.origin} never sent its routes to {neighbour}")
        return VALID
