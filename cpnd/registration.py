"""Instance registration, the trio shell around ``registry.Registry``.

Registrations come from ``cpnctl register`` (the control socket) and from ``PUT
/cpn/v1/instances/<id>`` at ``[gateway] registration_listen`` (a ``[[registrars]]`` token, Bearer);
a repeat is the heartbeat, ``DELETE`` leaves. A timer withdraws what outlives its TTL. Every change
goes through ``Daemon.apply_registry``, which advertises registered instances like configured ones.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Protocol

import attrs
import h11
import trio

from .admission import Slot, SlotTable
from .aio import admit_stream, open_listeners, read_reclaimable, serve_accepting
from .clients import KeyIndex, SourceLimiter, bearer
from .config import Config, RegistrarConfig
from .loglimit import LogLimiter
from .registry import DEFAULT_TTL_S, Registration, RegistrationError, Registry, parse_registration



class Host(Protocol):
    """What registration needs of the daemon: its config and counters, and a way to apply the registry."""

    id: str
    config: Config
    stats: collections.Counter[str]

    def apply_registry(self, changed: Iterable[str]) -> None: ...

    def edge_event(self, kind: str, line: str) -> None: ...

log = logging.getLogger("cpnd.registration")

# The registration endpoint's bounds (README, "Bounds"): registrars are few and their requests small.
MAX_CLIENTS = 64  # connections at once; beyond, the one idle longest is closed for the newcomer
MAX_CLIENTS_PER_IP = 16
MAX_BODY_BYTES = 16 * 1024  # a registration is a few hundred bytes
MAX_HEAD_BYTES = 16 * 1024
READ_TIMEOUT_S = 5.0  # for a whole request, from its first byte or the last answer
WRITE_TIMEOUT_S = 5.0
LOG_PER_S = 10
PATH_RE = re.compile(rb"/cpn/v1/instances/([^/?#]*)")


def _answer(status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return status, json.dumps(body).encode(), headers or []


class Registrations:
    """Registered instances of one gateway: the registry, its expiry timer and its HTTP endpoint."""

    def __init__(self, daemon: Host) -> None:
        self.d = daemon
        g = daemon.config.gateway
        self.registry = Registry(g.max_registered_instances)
        self.failures = SourceLimiter(g.auth_failures_per_s, g.auth_failures_burst, g.max_auth_failure_sources)
        self.registrars = KeyIndex((r.token_sha256, r) for r in daemon.config.registrars)
        # Counted in the daemon's stats (show stats) as registration_<what>; /metrics has them too.
        self.stats: collections.Counter[str] = daemon.stats
        self.port: int | None = None
        self._wake = trio.Event()
        self._lines = LogLimiter(LOG_PER_S, "registration", log)

    def reconfigure(self, config: Config) -> Config:
        """A reload: new bounds and registrar tokens; the running config keeps the registered instances."""
        g = config.gateway
        self.registry.max_instances = g.max_registered_instances
        self.failures.retune(g.auth_failures_per_s, g.auth_failures_burst, g.max_auth_failure_sources)
        self.registrars = KeyIndex((r.token_sha256, r) for r in config.registrars)
        self._wake.set()
        return self.registry.merge(config)

    # ---- registering (cpnctl and HTTP alike)

    def put(self, reg: Registration, allowed: tuple[str, ...] | None) -> tuple[int, dict[str, Any]]:
        now = trio.current_time()
        configured = {i.id for s in self.d.config.services for i in s.instances if not i.registered}
        what = self.registry.put(reg, now, configured=configured, allowed=allowed)
        self.stats[f"registration_{what}"] += 1
        iid = reg.instance.id
        if what != "refreshed":
            self.d.apply_registry([iid])
            log.info("%s: instance %s of %s %s by %s (%s, ttl %s)", self.d.id, iid, reg.service,
                     "registered" if what == "added" else "re-registered with changes", reg.by, reg.instance.url,
                     f"{reg.ttl_s:g} s" if reg.ttl_s is not None else "none",
                     extra={"cpn": {"event": "instance_registered", "instance": iid, "service": reg.service, "by": reg.by}})
        self._wake.set()
        return (201 if what == "added" else 200), {"id": iid, "service": reg.service, "result": what, "ttl_s": reg.ttl_s}

    def delete(self, iid: str, allowed: tuple[str, ...] | None, by: str) -> dict[str, Any]:
        reg = self.registry.delete(iid, allowed=allowed, by=by)
        self.stats["registration_deleted"] += 1
        self.d.apply_registry([iid])
        log.info("%s: instance %s of %s deregistered by %s", self.d.id, iid, reg.service, by,
                 extra={"cpn": {"event": "instance_deregistered", "instance": iid, "service": reg.service, "by": by}})
        return {"id": iid, "service": reg.service, "result": "deleted"}

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        """``cpnctl register`` / ``deregister``: the operator may register any service (no TTL by default)."""
        if req.get("cmd") == "deregister":
            iid = req.get("id")
            if not isinstance(iid, str):
                raise RegistrationError.bad("id", "missing (required)")
            return self.delete(iid, None, "cpnctl")
        body = {k: v for k, v in req.items() if k != "cmd" and v is not None}
        return self.put(parse_registration(body, default_ttl_s=None, by="cpnctl"), None)[1]

    # ---- expiry

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire registrations on time; serve ``registration_listen`` if configured."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expiry_loop)
            if self.d.config.gateway.registration_listen is not None:
                await nursery.start(self._serve)
            task_status.started()

    async def _expiry_loop(self) -> None:
        while True:
            at = self.registry.get_timer()
            with trio.move_on_at(at if at is not None else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            gone = self.registry.expire(trio.current_time())
            if gone:
                self.stats["registration_expired"] += len(gone)
                self.d.apply_registry([r.instance.id for r in gone])
                for reg in gone:
                    log.warning("%s: instance %s of %s withdrawn: no heartbeat within its ttl (%g s)", self.d.id,
                                reg.instance.id, reg.service, reg.ttl_s,
                                extra={"cpn": {"event": "instance_expired", "instance": reg.instance.id, "service": reg.service}})

    # ---- the HTTP endpoint

    def handle(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
               source: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """One request to the endpoint: (status, JSON body, extra headers). ``body`` None: over MAX_BODY_BYTES."""
        now = trio.current_time()
        m = PATH_RE.fullmatch(target.split(b"?", 1)[0])
        if m is None:
            return _answer(404, {"error": "not_found", "detail": "the endpoint is /cpn/v1/instances/<id>"})
        if method not in (b"PUT", b"DELETE"):
            return _answer(405, {"error": "method_not_allowed", "detail": "PUT registers or heartbeats, DELETE leaves"},
                           [(b"allow", b"PUT, DELETE")])
        wait = self.failures.retry_after(source, now)
        if wait is not None:
            self.stats["registration_rate_limited"] += 1
            return _answer(429, {"error": "rate_limited", "detail": "too many failed authentications from this address"},
                           [(b"retry-after", str(max(1, int(wait + 0.999))).encode())])
        token = bearer(headers)
        registrar = self.registrars.find(token) if token is not None else None
        if not isinstance(registrar, RegistrarConfig):
            self.stats["registration_unauthorized"] += 1
            if token is not None:
                self.failures.failed(source, now)
            return _answer(401, {"error": "unauthorized", "detail": "a [[registrars]] token is required: "
                                 "Authorization: Bearer <token>"}, [(b"www-authenticate", b"Bearer")])
        iid = m.group(1).decode("ascii", "replace")
        try:
            if method == b"DELETE":
                return _answer(200, self.delete(iid, registrar.services, registrar.id))
            if body is None:
                raise RegistrationError(413, "body_too_large", f"a registration is at most {MAX_BODY_BYTES} bytes")
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):  # 16 KiB of '[' is too deep for json
                raise RegistrationError.bad("body", "not JSON (or nested too deep)") from None
            status, out = self.put(parse_registration(data, iid, default_ttl_s=DEFAULT_TTL_S, by=registrar.id),
                                   registrar.services)
            return _answer(status, out)
        except RegistrationError as exc:
            self.stats[f"registration_error_{exc.status}"] += 1
            if self._lines.allow(self.d.id, now):
                log.info("%s: registration %s %s from %s (%s) refused: %d %s: %s", self.d.id, method.decode(), iid[:64],
                         registrar.id, source, exc.status, exc.error, exc)
            return _answer(exc.status, exc.json())

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        addr = self.d.config.gateway.registration_listen
        assert addr is not None
        listeners = await open_listeners("registration_listen", addr.host, addr.port, str(addr))
        self.port = listeners[0].socket.getsockname()[1]
        log.info("%s: instance registration on %s (%d registrars)", self.d.id, attrs.evolve(addr, port=self.port),
                 len(self.d.config.registrars))
        slots = SlotTable(MAX_CLIENTS, MAX_CLIENTS_PER_IP)
        async with trio.open_nursery() as nursery:
            def admit(stream: trio.SocketStream) -> None:
                admitted = admit_stream(slots, stream)
                if admitted is None:
                    return
                source, adm = admitted
                if adm.slot is None:
                    self.stats["registration_refused"] += 1
                    self.d.edge_event("registration connections refused",
                                      f"registration: connection from {source} refused: {MAX_CLIENTS} busy")
                    return
                nursery.start_soon(self._client, stream, adm.slot, slots)

            for listener in listeners:
                nursery.start_soon(serve_accepting, listener, admit, self.d.edge_event, "registration")
            task_status.started()

    async def _client(self, stream: trio.SocketStream, slot: Slot, slots: SlotTable) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while slot.held:
                got = await read_reclaimable(slots, slot, READ_TIMEOUT_S, lambda: _read_request(conn, stream))
                if got is None or not slot.held:
                    break
                req, body = got
                try:
                    status, data, extra = self.handle(req.method, req.target, req.headers, body, slot.source)
                except Exception:  # a bug must cost this request, never the daemon
                    log.exception("%s: registration request failed", self.d.id)
                    status, data, extra = _answer(500, {"error": "internal", "detail": "see the gateway's log"})
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                           (b"cache-control", b"no-store"), *extra]
                if body is None:
                    headers.append((b"connection", b"close"))  # the rest of the body is not read
                out = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode())) or b""
                out += (conn.send(h11.Data(data=data)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                with trio.move_on_after(WRITE_TIMEOUT_S) as writing:
                    await stream.send_all(out)
                if writing.cancelled_caught or body is None or conn.our_state is not h11.DONE \
                        or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            slots.release(slot)
            await stream.aclose()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request, bytes | None] | None:
    """The next request and its body (None: longer than MAX_BODY_BYTES, the rest unread); None: closed."""
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(16384))
        elif isinstance(event, h11.Request):
            request = event
            length = next((v for n, v in event.headers if n == b"content-length"), None)
            if length is not None and int(length) > MAX_BODY_BYTES:
                return request, None
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                return request, None  # type: ignore[return-value]
        elif isinstance(event, h11.EndOfMessage):
            return (request, bytes(body)) if request is not None else None
        else:
            return None
