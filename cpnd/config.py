"""The gateway's TOML configuration, validated into frozen records.

Every problem is a ``ConfigError`` whose message is one line naming the file, the
line (when the key can be found in the text) and the key, for example
``gw1.toml:14: peers[1].public_key: not valid base64``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import time
import tomllib
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .crypto import KeyFileError, load_private_key, parse_public_key, public_key_b64
from .errors import ConfigError
from .names import id_problem, service_problem
from .tls import ClientContexts, InstanceTls, ServerTls, TlsFileError, server_context
from .origin import Certificate, CertificateError, covered, read_certificate
from .wire import MAX_HOLD_MS, MAX_RESTART_MS, MAX_TUNNEL_STREAMS, MIN_HOLD_MS, MIN_TUNNEL_WINDOW

SELECTION_MODES = ("per-request", "per-connection", "dns-ttl")
LOG_LEVELS = ("debug", "info", "warning", "error")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@attrs.frozen
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class PeerConfig:
    id: str
    address: Address
    public_key: Ed25519PublicKey = attrs.field(eq=False)
    public_key_b64: str
    emulated_rtt_ms: float = 0.0
    passive: bool = False
    # Per-peer policy (routing.md, "Policy"): the URL-PATH prefixes taken from / given to this peer
    # (None: all), and the preference of its routes over others' (higher wins, default 100).
    import_prefixes: tuple[str, ...] | None = None
    export_prefixes: tuple[str, ...] | None = None
    local_pref: int = 100


@attrs.frozen
class InstanceConfig:
    id: str
    url: str
    capacity: float
    price: float
    compute_latency_ms: float
    health_path: str | None = None  # active probe: GET this path; None: a TCP connect
    max_inflight: int = 256  # requests (and connections) to it at once; more are refused
    tls_ca_file: Path | None = None  # https: verify it against this CA file (PEM); None: the system's CAs
    tls_server_name: str | None = None  # https: the name sent in SNI and checked; None: the URL's host
    tls: InstanceTls | None = attrs.field(default=None, eq=False)  # https: its context, built when loaded
    registered: bool = False  # joined by registration (cpnd/registry.py), not from the file
    http2: bool = False  # the egress speaks HTTP/2 to it (h2c prior knowledge), over one pooled connection


@attrs.frozen
class ServiceConfig:
    path: str
    instances: tuple[InstanceConfig, ...]


@attrs.frozen
class GatewayConfig:
    id: str
    listen: Address
    key_file: Path
    control_socket: Path
    http_listen: Address | None = None
    https_listen: Address | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    metrics_listen: Address | None = None
    selection: str = "per-request"
    dns_ttl_s: float = 30.0
    hold_time_ms: int = 3000
    keepalive_ms: int | None = None
    handshake_timeout_ms: int = 5000
    connect_retry_min_ms: int = 250
    connect_retry_max_ms: int = 30_000
    min_adv_interval_ms: int = 100
    max_routes_per_peer: int = 10_000
    route_changes_per_s: int = 1000
    route_changes_burst: int | None = None  # None: max_routes_per_peer (a whole table at once)
    max_peer_send_buffer: int = 4 * 1024 * 1024
    max_streams_per_peer: int = 1024
    tunnel_window_bytes: int = 1024 * 1024
    tunnel_batch: bool = True  # offer `tunnel-batch`: an OPEN and its request, a LOAD and its response in one record
    peer_buffer_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 100 * 1024 * 1024
    http_header_timeout_ms: int = 10_000
    http_idle_timeout_ms: int = 60_000
    max_http_clients: int = 4096
    max_http_clients_per_ip: int = 256
    max_requests_per_ip_per_s: float = 0.0  # requests a second one user address may send (0: no bound; sourcerate.py)
    max_requests_per_ip_burst: int | None = None  # None: one second of the rate
    max_abandoned_per_ip_per_s: float = 50.0  # requests one user address may abandon a second (0: no bound)
    max_abandoned_per_ip_burst: int = 500
    http2_max_streams: int = 100  # concurrent streams on one HTTP/2 user connection
    preauth_timeout_ms: int = 2000
    max_preauth_connections: int = 64
    max_preauth_per_ip: int = 8
    max_data_channels_per_peer: int = 8  # data-only sessions a peer's workers may add beside its session (session.md)
    load_adv_interval_ms: int = 200
    admission_guard_ms: int = 100  # how late after our write an instance may count a request (load.SlotHolds)
    drain_timeout_ms: int = 5000
    graceful_restart_ms: int = 0
    health_interval_ms: int = 2000
    health_failures: int = 3
    health_successes: int = 2
    load_change_threshold: float = 0.05
    latency_quantile: float = 0.9  # the share of recent responses the ingress's corrected estimate covers
    log_level: str = "info"
    log_format: str = "text"
    # Client keys and instance registration (cpnd/clients.py, cpnd/registry.py).
    registration_listen: Address | None = None
    max_registered_instances: int = 256
    auth_failures_per_s: float = 1.0
    auth_failures_burst: int = 20
    max_auth_failure_sources: int = 4096
    # Origin validation (routing.md): keys whose certificates we believe, our own certificate,
    # and whether routes no key can verify are kept (less preferred) or dropped.
    trust_anchors: tuple[str, ...] = ()
    cert_file: Path | None = None
    accept_unverified_origins: bool = True
    seal_streams: bool = True  # seal requests end to end to origins that publish a key (tunnel.md)
    workers: int = 1  # data-plane processes on http_listen/https_listen (cpnd/workers.py); "auto": one per core


@attrs.frozen
class ClientConfig:
    """A ``[[clients]]`` entry: who may call which services how fast (cpnd/clients.py)."""

    id: str
    api_key_sha256: bytes = attrs.field(repr=False)  # the digest, 32 bytes; the key itself is never stored
    services: tuple[str, ...] | None = None  # URL-PATH prefixes it may call; None: all
    rate: float | None = None  # requests/s; None: no limit
    burst: float = 1.0


@attrs.frozen
class RegistrarConfig:
    """A ``[[registrars]]`` entry: a token that may register instances of these services over HTTP."""

    id: str
    token_sha256: bytes = attrs.field(repr=False)
    services: tuple[str, ...]


# What one open tunnel stream costs beyond its data (its task, HTTP parser, instance connection),
# measured with 1024 streams flooding a gateway: ~21 KiB each; budgeted in peer_buffer_bytes.
STREAM_COST_BYTES = 32 * 1024
# Senders to a peer wait while this much is queued for it (daemon.Connection, handoff.Channel); what one
# write may add beyond it: a read's worth (256 KiB) from a user or an instance, or a relay's chunk of up
# to half a stream window (streams.TunnelStream._taken), and a frame's overhead.
SEND_HIGH_WATER = 1024 * 1024
SEND_CHUNK = 256 * 1024
FRAME_OVERHEAD = 64 * 1024


def least_send_buffer(g: GatewayConfig) -> int:
    """The smallest ``max_peer_send_buffer`` our own writes never overrun (which would drop the session)."""
    return SEND_HIGH_WATER + max(SEND_CHUNK, g.tunnel_window_bytes // 2) + FRAME_OVERHEAD


def peer_overhead(g: GatewayConfig) -> int:
    """What of ``peer_buffer_bytes`` is not the connection window: our send queue and the streams' own cost."""
    return g.max_peer_send_buffer + STREAM_COST_BYTES * g.max_streams_per_peer


@attrs.frozen
class Config:
    gateway: GatewayConfig
    peers: tuple[PeerConfig, ...]
    services: tuple[ServiceConfig, ...]
    key: Ed25519PrivateKey = attrs.field(eq=False)
    source: Path
    tls: ServerTls | None = attrs.field(default=None, eq=False)  # https_listen's context, built from the files when loaded
    clients: tuple[ClientConfig, ...] = ()
    registrars: tuple[RegistrarConfig, ...] = ()
    cert: Certificate | None = attrs.field(default=None, eq=False)  # cert_file, read


# ---------------------------------------------------------------- locating keys in the text


def _locate(text: str, keypath: tuple[str | int, ...]) -> int | None:
    """Best-effort line number (1-based) of ``keypath`` in TOML ``text``."""
    counts: dict[tuple[str | int, ...], int] = {}
    current: tuple[str | int, ...] = ()
    best: int | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[["):
            names = tuple(n.strip().strip('"') for n in line[2:line.find("]]")].split("."))
            parent: tuple[str | int, ...] = ()
            for n in names[:-1]:  # [[services.instances]] nests under the current services[i]
                parent = (*parent, n)
                if parent in counts:
                    parent = (*parent, counts[parent] - 1)
            arr = (*parent, names[-1])
            counts[arr] = counts.get(arr, 0) + 1
            for k in list(counts):
                if len(k) > len(arr) and k[: len(arr)] == arr:
                    del counts[k]  # a new services[i] restarts its instances
            current = (*arr, counts[arr] - 1)
            if keypath[: len(current)] == current and best is None:
                best = lineno
        elif line.startswith("["):
            current = tuple(n.strip().strip('"') for n in line[1:line.find("]")].split("."))
            if keypath[: len(current)] == current and best is None:
                best = lineno
        else:
            m = re.match(r'"?([A-Za-z0-9_-]+)"?\s*=', line)
            if m and (*current, m.group(1)) == keypath:
                return lineno
    return best if keypath[:-1] and best is not None else None


def _fmt(keypath: tuple[str | int, ...]) -> str:
    out = ""
    for p in keypath:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class _Reader:
    """Typed access to the parsed TOML that turns each problem into a located ConfigError."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def error(self, keypath: tuple[str | int, ...], message: str) -> ConfigError:
        line = _locate(self.text, keypath)
        where = f"{self.path.name}:{line}" if line else self.path.name
        return ConfigError(f"{where}: {_fmt(keypath)}: {message}" if keypath else f"{where}: {message}")

    def table(self, data: Any, keypath: tuple[str | int, ...], allowed: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.error(keypath, "must be a table")
        for k in data:
            if k not in allowed:
                raise self.error((*keypath, k), f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        return data

    def get(self, data: dict[str, Any], keypath: tuple[str | int, ...], kind: type | tuple[type, ...], default: Any = attrs.NOTHING) -> Any:
        key = keypath[-1]
        if key not in data:
            if default is attrs.NOTHING:
                raise self.error(keypath, "missing (required)")
            return default
        v = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(k, k.__name__) for k in kinds)
            raise self.error(keypath, f"must be {names}, got {type(v).__name__}")
        return v

    def number(self, data: dict[str, Any], keypath: tuple[str | int, ...], lo: float, hi: float, default: Any = attrs.NOTHING, *, integer: bool = False) -> Any:
        v = self.get(data, keypath, int if integer else (int, float), default)
        if v is None:
            return v
        if not (math.isfinite(v) and lo <= v <= hi):
            raise self.error(keypath, f"must be between {lo:g} and {hi:g}, got {v}")
        return v

    def checked(self, data: dict[str, Any], keypath: tuple[str | int, ...], check: Callable[[Any], str | None], default: Any = attrs.NOTHING) -> Any:
        v = self.get(data, keypath, str, default)
        problem = check(v) if v is not None else None
        if problem:
            raise self.error(keypath, problem)
        return v

    def address(self, data: dict[str, Any], keypath: tuple[str | int, ...], default: Any = attrs.NOTHING, *, literal: bool = False) -> Address | None:
        v = self.get(data, keypath, str, default)
        if v is None:
            return None
        try:
            return parse_address(v, literal=literal)
        except ValueError as exc:
            raise self.error(keypath, str(exc)) from None

    def file(self, data: dict[str, Any], keypath: tuple[str | int, ...], default: Any = attrs.NOTHING) -> Path:
        v = self.get(data, keypath, str, default)
        if v is None:
            return v  # type: ignore[no-any-return]  # an optional file left out
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


MAX_WORKERS = 64


def _workers(r: _Reader, g: dict[str, Any], keypath: tuple[str | int, ...]) -> int:
    """``workers``: 1..MAX_WORKERS, or "auto" (one per core, as this machine has them)."""
    v = g.get("workers", 1)
    if v == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(v, str):
        raise r.error(keypath, f'must be an integer or "auto", got {v!r}')
    return int(r.number(g, keypath, 1, MAX_WORKERS, 1, integer=True))


def _server_tls(r: _Reader, g: GatewayConfig) -> ServerTls | None:
    """https_listen's context, loaded now: a bad certificate or key is a config error naming its key."""
    gw = ("gateway",)
    if g.https_listen is None:
        for key in ("tls_cert_file", "tls_key_file"):
            if getattr(g, key) is not None:
                raise r.error((*gw, key), "set without https_listen (nothing would serve it)")
        return None
    for key in ("tls_cert_file", "tls_key_file"):
        if getattr(g, key) is None:
            raise r.error((*gw, key), "missing (required with https_listen)")
    if g.https_listen == g.http_listen:
        raise r.error((*gw, "https_listen"), "is http_listen's address too")
    assert g.tls_cert_file is not None and g.tls_key_file is not None
    try:
        return server_context(g.tls_cert_file, g.tls_key_file)
    except TlsFileError as exc:
        raise r.error((*gw, exc.key), exc.message) from None


def _instance_tls(r: _Reader, inst: dict[str, Any], ki: tuple[str | int, ...], contexts: ClientContexts) -> dict[str, Any]:
    """An https instance's trust (``tls_ca_file``, ``tls_server_name``) and its context; http: none of it."""
    https = urllib.parse.urlsplit(inst["url"]).scheme == "https"
    ca = r.file(inst, (*ki, "tls_ca_file"), None)
    name = r.checked(inst, (*ki, "tls_server_name"), lambda v: None if _HOSTNAME_RE.fullmatch(v) else "must be a DNS name", None)
    if not https:
        for key, v in (("tls_ca_file", ca), ("tls_server_name", name)):
            if v is not None:
                raise r.error((*ki, key), "only for an https:// url")
        return {}
    try:
        ctx = contexts.get(ca, h2=inst.get("http2") is True)
    except TlsFileError as exc:
        raise r.error((*ki, exc.key), exc.message) from None
    host = urllib.parse.urlsplit(inst["url"]).hostname or ""
    return {"tls_ca_file": ca, "tls_server_name": name, "tls": InstanceTls(ctx, name or host, ca)}


def _request_burst(r: _Reader, g: dict[str, Any], gw: tuple[str | int, ...]) -> int | None:
    """``max_requests_per_ip_burst``: only beside a ``max_requests_per_ip_per_s`` (alone it would bound nothing)."""
    burst = r.number(g, (*gw, "max_requests_per_ip_burst"), 1, 100_000_000, None, integer=True)
    if burst is not None and not g.get("max_requests_per_ip_per_s"):
        raise r.error((*gw, "max_requests_per_ip_burst"), "set without max_requests_per_ip_per_s (which it is the burst of)")
    return burst


def _health_interval(r: _Reader, data: dict[str, Any], keypath: tuple[str | int, ...]) -> int:
    """0 turns active probing off; otherwise at least 50 ms, so probes cannot become a load of their own."""
    v = r.number(data, keypath, 0, 3_600_000, 2000, integer=True)
    if 0 < v < 50:
        raise r.error(keypath, f"must be 0 (active probes off) or between 50 and 3600000, got {v}")
    return v


def parse_address(text: str, *, literal: bool = False) -> Address:
    """Parse ``host:port`` or ``[v6]:port``; ``literal`` requires an IP address."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    if not m:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [ADDR]:PORT)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if literal or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not an IP address") from None
    return Address(host, port)


# ---------------------------------------------------------------- loading

_GATEWAY_KEYS = {f.name for f in attrs.fields(GatewayConfig)}
_PEER_KEYS = {"id", "address", "public_key", "emulated_rtt_ms", "passive", "import", "export", "local_pref"}
_SERVICE_KEYS = {"path", "instances"}
_INSTANCE_KEYS = {"id", "url", "capacity", "price", "compute_latency_ms", "health_path", "max_inflight",
                  "tls_ca_file", "tls_server_name", "http2"}


def _url_problem(v: str) -> str | None:
    u = urllib.parse.urlsplit(v)
    if u.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    try:
        port = u.port
    except ValueError:
        return "has a bad port"
    if not u.hostname or port is None and ":" in (u.netloc.rsplit("]", 1)[-1]):
        return "must name a host"
    if u.fragment or u.username:
        return "must not carry a fragment or credentials"
    if u.path and not u.path.startswith("/"):
        return "path must start with '/'"
    return None


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text), text
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        what = re.sub(r"\s*\(at line.*\)", "", str(exc))
        raise ConfigError(f"{path.name}:{m.group(1)}: TOML syntax: {what} (column {m.group(2)})" if m else f"{path.name}: TOML syntax: {what}") from None


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a gateway config file, loading its key file too."""
    path = Path(path)
    data, text = _read_toml(path)
    return parse_config(data, path, text)


def _control_socket(r: _Reader, g: dict[str, Any], gid: str) -> Path:
    """The one rule for where a gateway's control socket is: ``control_socket``, else ``<id>.sock``,
    relative paths from the config file's folder (cpnd and ``cpnctl --config`` both use it)."""
    return r.file(g, ("gateway", "control_socket"), f"{gid}.sock")


def control_socket_of(path: str | Path) -> Path:
    """The control socket of the gateway that config file ``path`` describes (its key is not read)."""
    path = Path(path)
    data, text = _read_toml(path)
    r = _Reader(path, text)
    g = data.get("gateway")
    if not isinstance(g, dict):
        raise r.error(("gateway",), "missing (required table)")
    return _control_socket(r, g, r.checked(g, ("gateway", "id"), id_problem))


def parse_config(data: dict[str, Any], path: Path, text: str = "") -> Config:
    """Validate parsed TOML ``data`` (read from ``path``) into a Config."""
    r = _Reader(path, text)
    r.table(data, (), {"gateway", "peers", "services", "clients", "registrars"})
    if "gateway" not in data:
        raise r.error(("gateway",), "missing (required table)")
    g = r.table(data["gateway"], ("gateway",), _GATEWAY_KEYS)
    gateway = _gateway(r, g)
    _check_gateway(r, g, gateway)
    server_tls = _server_tls(r, gateway)
    peers = _peers(r, data, gateway)
    services = _services(r, data)
    gw = ("gateway",)
    try:
        key = load_private_key(gateway.key_file)
    except KeyFileError as exc:
        raise r.error((*gw, "key_file"), str(exc)) from None
    cert = _own_certificate(r, gateway, key, services) if gateway.cert_file is not None else None
    return Config(gateway, tuple(peers), tuple(services), key, path, server_tls, _clients(r, data),
                  _registrars(r, data), cert)


def _gateway(r: _Reader, g: dict[str, Any]) -> GatewayConfig:
    """The [gateway] table's keys, each checked on its own."""
    gw = ("gateway",)
    gid = r.checked(g, (*gw, "id"), id_problem)
    return GatewayConfig(id=gid, control_socket=_control_socket(r, g, gid), **_gateway_site(r, g), **_gateway_peering(r, g),
                         **_gateway_requests(r, g))


def _gateway_site(r: _Reader, g: dict[str, Any]) -> dict[str, Any]:
    """[gateway]: where it listens, its keys and certificates, logging, workers."""
    gw = ("gateway",)
    return dict(
        listen=r.address(g, (*gw, "listen"), literal=True),
        key_file=r.file(g, (*gw, "key_file")),
        http_listen=r.address(g, (*gw, "http_listen"), None, literal=True),
        https_listen=r.address(g, (*gw, "https_listen"), None, literal=True),
        tls_cert_file=r.file(g, (*gw, "tls_cert_file"), None),
        tls_key_file=r.file(g, (*gw, "tls_key_file"), None),
        metrics_listen=r.address(g, (*gw, "metrics_listen"), None, literal=True),
        registration_listen=r.address(g, (*gw, "registration_listen"), None, literal=True),
        log_level=r.checked(g, (*gw, "log_level"), lambda v: None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}", "info"),
        log_format=r.checked(g, (*gw, "log_format"), lambda v: None if v in ("text", "json") else "must be text or json", "text"),
        workers=_workers(r, g, (*gw, "workers")),
        trust_anchors=_anchors(r, g, (*gw, "trust_anchors")),
        cert_file=r.file(g, (*gw, "cert_file")) if "cert_file" in g else None,
        accept_unverified_origins=r.get(g, (*gw, "accept_unverified_origins"), bool, True),
        seal_streams=r.get(g, (*gw, "seal_streams"), bool, True),
    )


def _gateway_peering(r: _Reader, g: dict[str, Any]) -> dict[str, Any]:
    """[gateway]: sessions with peers, tunnels, flooding and their bounds."""
    gw = ("gateway",)
    hold = r.number(g, (*gw, "hold_time_ms"), MIN_HOLD_MS, MAX_HOLD_MS, 3000, integer=True)
    return dict(
        hold_time_ms=hold,
        keepalive_ms=r.number(g, (*gw, "keepalive_ms"), 50, hold / 3, None, integer=True),
        handshake_timeout_ms=r.number(g, (*gw, "handshake_timeout_ms"), 100, 600_000, 5000, integer=True),
        connect_retry_min_ms=r.number(g, (*gw, "connect_retry_min_ms"), 10, 3_600_000, 250, integer=True),
        connect_retry_max_ms=r.number(g, (*gw, "connect_retry_max_ms"), 10, 3_600_000, 30_000, integer=True),
        min_adv_interval_ms=r.number(g, (*gw, "min_adv_interval_ms"), 0, 600_000, 100, integer=True),
        max_routes_per_peer=r.number(g, (*gw, "max_routes_per_peer"), 1, 10_000_000, 10_000, integer=True),
        route_changes_per_s=r.number(g, (*gw, "route_changes_per_s"), 1, 10_000_000, 1000, integer=True),
        route_changes_burst=r.number(g, (*gw, "route_changes_burst"), 1, 10_000_000, None, integer=True),
        max_peer_send_buffer=r.number(g, (*gw, "max_peer_send_buffer"), 65536, 1 << 30, 4 * 1024 * 1024, integer=True),
        max_streams_per_peer=r.number(g, (*gw, "max_streams_per_peer"), 1, MAX_TUNNEL_STREAMS, 1024, integer=True),
        tunnel_window_bytes=r.number(g, (*gw, "tunnel_window_bytes"), MIN_TUNNEL_WINDOW, 1 << 30, 1024 * 1024, integer=True),
        peer_buffer_bytes=r.number(g, (*gw, "peer_buffer_bytes"), 1 << 20, 1 << 31, 64 * 1024 * 1024, integer=True),
        tunnel_batch=r.get(g, (*gw, "tunnel_batch"), bool, True),
        preauth_timeout_ms=r.number(g, (*gw, "preauth_timeout_ms"), 100, 600_000, 2000, integer=True),
        max_preauth_connections=r.number(g, (*gw, "max_preauth_connections"), 1, 100_000, 64, integer=True),
        max_preauth_per_ip=r.number(g, (*gw, "max_preauth_per_ip"), 1, 100_000, 8, integer=True),
        max_data_channels_per_peer=r.number(g, (*gw, "max_data_channels_per_peer"), 0, 64, 8, integer=True),
        load_adv_interval_ms=r.number(g, (*gw, "load_adv_interval_ms"), 10, 600_000, 200, integer=True),
        graceful_restart_ms=r.number(g, (*gw, "graceful_restart_ms"), 0, MAX_RESTART_MS, 0, integer=True),
        auth_failures_per_s=float(r.number(g, (*gw, "auth_failures_per_s"), 0.001, 1e6, 1.0)),
        auth_failures_burst=r.number(g, (*gw, "auth_failures_burst"), 1, 1_000_000, 20, integer=True),
        max_auth_failure_sources=r.number(g, (*gw, "max_auth_failure_sources"), 16, 10_000_000, 4096, integer=True),
    )


def _gateway_requests(r: _Reader, g: dict[str, Any]) -> dict[str, Any]:
    """[gateway]: users' HTTP requests, their limits, selection, admission and health."""
    gw = ("gateway",)
    return dict(
        selection=r.checked(g, (*gw, "selection"), lambda v: None if v in SELECTION_MODES else f"must be one of {', '.join(SELECTION_MODES)}", "per-request"),
        dns_ttl_s=r.number(g, (*gw, "dns_ttl_s"), 0.001, 86400, 30.0),
        max_body_bytes=r.number(g, (*gw, "max_body_bytes"), 0, 1 << 40, 100 * 1024 * 1024, integer=True),
        http_header_timeout_ms=r.number(g, (*gw, "http_header_timeout_ms"), 100, 3_600_000, 10_000, integer=True),
        http_idle_timeout_ms=r.number(g, (*gw, "http_idle_timeout_ms"), 100, 86_400_000, 60_000, integer=True),
        max_http_clients=r.number(g, (*gw, "max_http_clients"), 1, 1_000_000, 4096, integer=True),
        max_http_clients_per_ip=r.number(g, (*gw, "max_http_clients_per_ip"), 1, 1_000_000, 256, integer=True),
        max_requests_per_ip_per_s=float(r.number(g, (*gw, "max_requests_per_ip_per_s"), 0, 10_000_000, 0.0)),
        max_requests_per_ip_burst=_request_burst(r, g, gw),
        max_abandoned_per_ip_per_s=float(r.number(g, (*gw, "max_abandoned_per_ip_per_s"), 0, 10_000_000, 50.0)),
        max_abandoned_per_ip_burst=r.number(g, (*gw, "max_abandoned_per_ip_burst"), 1, 100_000_000, 500, integer=True),
        http2_max_streams=r.number(g, (*gw, "http2_max_streams"), 1, 1_000_000, 100, integer=True),
        admission_guard_ms=r.number(g, (*gw, "admission_guard_ms"), 0, 10_000, 100, integer=True),
        drain_timeout_ms=r.number(g, (*gw, "drain_timeout_ms"), 0, 3_600_000, 5000, integer=True),
        health_interval_ms=_health_interval(r, g, (*gw, "health_interval_ms")),
        health_failures=r.number(g, (*gw, "health_failures"), 1, 1000, 3, integer=True),
        health_successes=r.number(g, (*gw, "health_successes"), 1, 1000, 2, integer=True),
        load_change_threshold=float(r.number(g, (*gw, "load_change_threshold"), 0.0, 1.0, 0.05)),
        latency_quantile=float(r.number(g, (*gw, "latency_quantile"), 0.5, 1.0, 0.9)),
        max_registered_instances=r.number(g, (*gw, "max_registered_instances"), 0, 100_000, 256, integer=True),
    )


def _check_gateway(r: _Reader, g: dict[str, Any], gateway: GatewayConfig) -> None:
    """What the [gateway] keys must satisfy together."""
    gw = ("gateway",)
    if gateway.workers > 1 and gateway.http_listen is None and gateway.https_listen is None:
        raise r.error((*gw, "workers"), "set above 1 without http_listen or https_listen (workers serve users)")
    if gateway.connect_retry_max_ms < gateway.connect_retry_min_ms:
        raise r.error((*gw, "connect_retry_max_ms"), "must be >= connect_retry_min_ms")
    if gateway.max_peer_send_buffer < (send := least_send_buffer(gateway)):
        # Named where the operator set it: the buffer, else the window that outgrew the default buffer.
        key = "max_peer_send_buffer" if "max_peer_send_buffer" in g else "tunnel_window_bytes"
        raise r.error((*gw, key), f"max_peer_send_buffer must be >= 1 MiB + max(256 KiB, tunnel_window_bytes / 2) + 64 KiB"
                      f" ({send}): senders wait at 1 MiB queued, and a relay may then queue half a stream window at once")
    least = peer_overhead(gateway) + gateway.tunnel_window_bytes
    if gateway.peer_buffer_bytes < least:
        raise r.error((*gw, "peer_buffer_bytes"), f"must be >= max_peer_send_buffer + {STREAM_COST_BYTES} x max_streams_per_peer"
                      f" + tunnel_window_bytes ({least})")


def _peers(r: _Reader, data: dict[str, Any], gateway: GatewayConfig) -> list[PeerConfig]:
    """The [[peers]] tables: none twice, none this gateway itself."""
    gid = gateway.id
    peers_raw = data.get("peers", [])
    if not isinstance(peers_raw, list):
        raise r.error(("peers",), "must be an array of tables ([[peers]])")
    peers: list[PeerConfig] = []
    seen_peers: dict[str, int] = {}
    for i, p in enumerate(peers_raw):
        kp: tuple[str | int, ...] = ("peers", i)
        r.table(p, kp, _PEER_KEYS)
        pid = r.checked(p, (*kp, "id"), id_problem)
        if pid == gid:
            raise r.error((*kp, "id"), f"{pid!r} is this gateway itself")
        if pid in seen_peers:
            raise r.error((*kp, "id"), f"duplicate peer id {pid!r} (also peers[{seen_peers[pid]}])")
        seen_peers[pid] = i
        addr = r.address(p, (*kp, "address"))
        if addr == gateway.listen:
            raise r.error((*kp, "address"), f"{addr} is this gateway's own listen address")
        b64 = r.get(p, (*kp, "public_key"), str)
        try:
            pub = parse_public_key(b64)
        except ValueError as exc:
            raise r.error((*kp, "public_key"), str(exc)) from None
        peers.append(PeerConfig(
            id=pid, address=addr, public_key=pub, public_key_b64=b64.strip(),  # type: ignore[arg-type]
            emulated_rtt_ms=float(r.number(p, (*kp, "emulated_rtt_ms"), 0, 10_000, 0.0)),
            passive=r.get(p, (*kp, "passive"), bool, False),
            import_prefixes=_peer_prefixes(r, p, (*kp, "import")),
            export_prefixes=_peer_prefixes(r, p, (*kp, "export")),
            local_pref=r.number(p, (*kp, "local_pref"), 0, 1_000_000, 100, integer=True),
        ))
    return peers


def _services(r: _Reader, data: dict[str, Any]) -> list[ServiceConfig]:
    """The [[services]] tables and their instances: no path and no instance id twice."""
    services_raw = data.get("services", [])
    if not isinstance(services_raw, list):
        raise r.error(("services",), "must be an array of tables ([[services]])")
    services: list[ServiceConfig] = []
    seen_paths: dict[str, int] = {}
    seen_instances: dict[str, tuple[int, int]] = {}
    contexts = ClientContexts()  # one per CA file, shared by the instances that name it
    for i, s in enumerate(services_raw):
        kp = ("services", i)
        r.table(s, kp, _SERVICE_KEYS)
        spath = r.checked(s, (*kp, "path"), service_problem)
        if spath in seen_paths:
            raise r.error((*kp, "path"), f"duplicate service {spath!r} (also services[{seen_paths[spath]}])")
        seen_paths[spath] = i
        inst_raw = s.get("instances", [])
        if not isinstance(inst_raw, list) or not inst_raw:
            raise r.error((*kp, "instances"), "must be a non-empty array of tables ([[services.instances]])")
        instances: list[InstanceConfig] = []
        for j, inst in enumerate(inst_raw):
            ki: tuple[str | int, ...] = (*kp, "instances", j)
            r.table(inst, ki, _INSTANCE_KEYS)
            iid = r.checked(inst, (*ki, "id"), id_problem)
            if iid in seen_instances:
                a, b = seen_instances[iid]
                raise r.error((*ki, "id"), f"duplicate instance id {iid!r} (also services[{a}].instances[{b}])")
            seen_instances[iid] = (i, j)
            instances.append(_instance(r, inst, ki, iid, contexts))
        services.append(ServiceConfig(spath, tuple(instances)))
    return services


def _instance(r: _Reader, inst: dict[str, Any], ki: tuple[str | int, ...], iid: str,
              contexts: ClientContexts) -> InstanceConfig:
    """One [[services.instances]] table (its id already checked against the others')."""
    return InstanceConfig(
        id=iid,
        url=r.checked(inst, (*ki, "url"), _url_problem),
        capacity=float(r.number(inst, (*ki, "capacity"), 1e-6, 1e9)),
        price=float(r.number(inst, (*ki, "price"), 0, 1e12, 0.0)),
        compute_latency_ms=float(r.number(inst, (*ki, "compute_latency_ms"), 0, 3_600_000, 0.0)),
        health_path=r.checked(inst, (*ki, "health_path"),
                              lambda v: None if v.startswith("/") and " " not in v else "must be a path starting with '/'", None),
        max_inflight=r.number(inst, (*ki, "max_inflight"), 1, 1_000_000, 256, integer=True),
        **_instance_tls(r, inst, ki, contexts),
        http2=r.get(inst, (*ki, "http2"), bool, False),
    )


# ---------------------------------------------------------------- clients and registrars

_CLIENT_KEYS = {"id", "api_key_sha256", "services", "rate", "burst"}
_REGISTRAR_KEYS = {"id", "token_sha256", "services"}


def _entries(r: _Reader, data: dict[str, Any], name: str, allowed: set[str]) -> list[dict[str, Any]]:
    raw = data.get(name, [])
    if not isinstance(raw, list):
        raise r.error((name,), f"must be an array of tables ([[{name}]])")
    for i, entry in enumerate(raw):
        r.table(entry, (name, i), allowed)
    return raw


def _digest(r: _Reader, data: dict[str, Any], keypath: tuple[str | int, ...], seen: dict[bytes, int]) -> bytes:
    """A hex SHA-256 (``cpnctl hash-key``), unique among its kind."""
    v = r.checked(data, keypath, lambda v: None if re.fullmatch(r"[0-9A-Fa-f]{64}", v) else
                  "must be 64 hex digits, the SHA-256 of the key (cpnctl hash-key prints one)")
    digest = bytes.fromhex(v)
    if digest in seen:
        raise r.error(keypath, f"the same key as {keypath[0]}[{seen[digest]}]")
    seen[digest] = int(keypath[1])
    return digest


def _prefixes(r: _Reader, data: dict[str, Any], keypath: tuple[str | int, ...], default: Any = attrs.NOTHING) -> tuple[str, ...] | None:
    """URL-PATH prefixes (whole segments; "/" is every service)."""
    v = r.get(data, keypath, list, default)
    if v is None:
        return None
    for j, p in enumerate(v):
        problem = service_problem(p) if p != "/" else None
        if problem:
            raise r.error(keypath, f"[{j}] {p!r}: {problem}")
    if not v:
        raise r.error(keypath, "must name at least one URL-PATH prefix (\"/\" for all)")
    return tuple(v)


def _unique_id(r: _Reader, data: dict[str, Any], keypath: tuple[str | int, ...], seen: set[str]) -> str:
    cid = r.checked(data, keypath, id_problem)
    if cid in seen:
        raise r.error(keypath, f"duplicate id {cid!r}")
    seen.add(cid)
    return cid


def _clients(r: _Reader, data: dict[str, Any]) -> tuple[ClientConfig, ...]:
    out, ids, digests = [], set[str](), dict[bytes, int]()
    for i, c in enumerate(_entries(r, data, "clients", _CLIENT_KEYS)):
        kp: tuple[str | int, ...] = ("clients", i)
        rate = r.number(c, (*kp, "rate"), 0.001, 1e9, None)
        burst = r.number(c, (*kp, "burst"), 1, 1e9, None)
        if burst is not None and rate is None:
            raise r.error((*kp, "burst"), "needs a rate")
        out.append(ClientConfig(
            id=_unique_id(r, c, (*kp, "id"), ids), api_key_sha256=_digest(r, c, (*kp, "api_key_sha256"), digests),
            services=_prefixes(r, c, (*kp, "services"), None), rate=None if rate is None else float(rate),
            burst=float(burst if burst is not None else max(1.0, rate or 1.0)),  # default: one second's worth
        ))
    return tuple(out)


def _registrars(r: _Reader, data: dict[str, Any]) -> tuple[RegistrarConfig, ...]:
    out, ids, digests = [], set[str](), dict[bytes, int]()
    for i, c in enumerate(_entries(r, data, "registrars", _REGISTRAR_KEYS)):
        kp: tuple[str | int, ...] = ("registrars", i)
        rid = _unique_id(r, c, (*kp, "id"), ids) if "id" in c else f"registrars[{i}]"
        out.append(RegistrarConfig(rid, _digest(r, c, (*kp, "token_sha256"), digests), _prefixes(r, c, (*kp, "services"))))  # type: ignore[arg-type]
    if not out and "registration_listen" in data["gateway"]:
        raise r.error(("gateway", "registration_listen"), "needs at least one [[registrars]] (the tokens it accepts)")
    return tuple(out)


def _anchors(r: _Reader, g: dict[str, Any], keypath: tuple[str | int, ...]) -> tuple[str, ...]:
    """``trust_anchors``: base64 Ed25519 public keys (of ``cpnctl keygen`` domain keys)."""
    v = r.get(g, keypath, list, [])
    for i, b64 in enumerate(v):
        if not isinstance(b64, str):
            raise r.error(keypath, f"[{i}]: must be a string (a base64 public key)")
        try:
            parse_public_key(b64)
        except ValueError as exc:
            raise r.error(keypath, f"[{i}]: {exc}") from None
    return tuple(b.strip() for b in v)


def _peer_prefixes(r: _Reader, p: dict[str, Any], keypath: tuple[str | int, ...]) -> tuple[str, ...] | None:
    """``import`` / ``export``: a list of URL-PATH prefixes; absent: every service."""
    v = r.get(p, keypath, list, None)
    if v is None:
        return None
    for s in v:
        problem = service_problem(s) if isinstance(s, str) else "must be a string"
        if problem:
            raise r.error(keypath, f"{s!r}: {problem}")
    return tuple(v)


def _own_certificate(r: _Reader, g: GatewayConfig, key: Ed25519PrivateKey, services: list[ServiceConfig]) -> Certificate:
    """``cert_file``: ours (our key, our id or none), naming every service we host, not expired."""
    assert g.cert_file is not None
    kp = ("gateway", "cert_file")
    try:
        cert = read_certificate(g.cert_file)
    except CertificateError as exc:
        raise r.error(kp, f"{g.cert_file}: {exc}") from None
    if cert.key != parse_public_key(public_key_b64(key)).public_bytes_raw():
        raise r.error(kp, f"{g.cert_file}: certifies another key than key_file's")
    if cert.id and cert.id != g.id:
        raise r.error(kp, f"{g.cert_file}: issued to {cert.id!r}, not {g.id!r}")
    if cert.not_after < time.time():
        raise r.error(kp, f"{g.cert_file}: expired")
    for i, svc in enumerate(services):
        if not covered(cert.services, svc.path):
            raise r.error(kp, f"{g.cert_file}: does not name {svc.path} (services[{i}].path): peers would drop its routes")
    return cert
