"""The local control socket: one JSON request line in, one JSON reply line out.

Requests are ``{"cmd": "show-routes", "service": "/yolo"}`` and the like (see
``COMMANDS``); replies are ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from . import __version__
from .admission import Slot, SlotTable
from .aio import ListenError, serve_accepting
from .config import Config
from .errors import ConfigError
from .registry import RegistrationError
from .rib import Best, Key, Rib
from .selection import View, candidate
from .status import Status


class Host(Protocol):
    """What the control socket needs of its daemon (given to ``serve_control``; no import of the daemon)."""

    config: Config
    rib: Rib

    def status(self) -> Status: ...

    def estimate(self, key: Key, best: Best) -> View: ...

    def reload(self, trigger: str) -> str: ...

    def edge_event(self, kind: str, line: str) -> None: ...


Daemon = Host  # the name the functions below were written with

log = logging.getLogger("cpnd.control")

MAX_REQUEST = 65536
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 32  # beyond, the client waiting longest for its request line is closed for a newcomer


def routes_json(daemon: Daemon, service: str | None = None) -> list[dict[str, Any]]:
    """The RIB as the user contract's ``show routes --json`` objects."""
    now = trio.current_time()
    out = []
    for route, latency_us, best in daemon.rib.routes(service):
        a = route.adv
        fresh = daemon.rib.loc[a.key].fresh
        out.append({
            "service": a.service,
            "instance": a.instance,
            "origin": a.origin,
            "next_hop": route.peer,
            "path": [] if route.peer is None else list(a.path),
            "path_latency_ms": round(latency_us / 1000, 3),
            "compute_latency_ms": round(a.compute_us / 1000, 3),
            "load": a.load,
            "bounded_load": a.bload,
            "capacity": a.capacity,
            "price": a.price,
            "label": a.label,
            "age_s": round(now - route.received_at, 3),
            "best": best,
            "seq": a.seq,
            "older_seq": a.seq < fresh.seq,  # its attributes are not the freshest we hold
            "stale": route.stale,  # kept through the next hop's graceful restart
            "down": fresh.down,  # its origin's health checks took it out: known, not used
            "reason": daemon.rib.loc[a.key].reason.value if best else None,
            "validation": route.validation.value,  # origin validation (routing.md): valid or unknown
        })
        if best:
            out[-1]["estimate"] = estimate_json(daemon, a.key)
    return out


def estimate_json(daemon: Daemon, key: Key) -> dict[str, Any]:
    """What this gateway's ingress expects of a request to the instance now (protocol-spec/selection.md,
    "Estimate"): the load it assumes, and the time from head in to head out, in parts. ``total_ms`` is for a
    request at the instance's load now, ``bounded_total_ms`` for a latency-bound one (checked against
    CPN-Max-Latency: its compute counts only the latency-bound demand, which admission serves first)."""
    view = daemon.estimate(key, daemon.rib.loc[key])
    c = candidate(daemon.rib, key, view, bounded=False)
    b = candidate(daemon.rib, key, view, bounded=True)
    return {"load": round(view.load, 3), "bounded_load": round(view.bload, 3),
            "compute_latency_ms": round(view.compute_us / 1000, 3),
            "total_ms": _ms(c.total_us), "path_ms": _ms(c.path_latency_us), "gateways_ms": _ms(c.gateways_us),
            "compute_ms": _ms(c.compute_us), "correction_ms": _ms(c.correction_us),
            "bounded_total_ms": _ms(b.total_us), "bounded_compute_ms": _ms(b.compute_us)}


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def peers_json(daemon: Daemon) -> list[dict[str, Any]]:
    """The peer list as the user contract's ``show peers --json`` objects."""
    return daemon.status().peer_json()


def services_json(daemon: Daemon) -> list[dict[str, Any]]:
    """Our own instances as the service-side gateway sees them."""
    now = trio.current_time()
    return [{"service": i.service, "instance": i.instance, "url": i.url, "healthy": i.healthy,
             "load": round(i.load, 3), "bounded_load": round(i.bounded_load, 3),
             "compute_latency_ms": round(i.compute_latency_ms, 3), "capacity": i.capacity, "price": i.price,
             "inflight": i.inflight, "refused": i.refused,
             **daemon.registrations.registry.describe(i.instance, now)}  # registered, registered_by, expires_in_s
            for i in daemon.status().instances]


# What ``cpnctl show status`` shows, in this order; status_json's other keys are counters and gauges,
# kept there for scripts written against earlier versions (``show stats`` is their place).
STATUS_KEYS = ("id", "version", "pid", "uptime_s", "listen", "http_listen", "metrics_listen", "control_socket",
               "peers_established", "peers", "routes", "paths", "services", "local_instances", "local_instances_down",
               "workers")


def status_json(daemon: Daemon) -> dict[str, Any]:
    """Who this gateway is and where it listens: ``show status``."""
    g = daemon.config.gateway
    st = daemon.status()
    ports = st.ports
    return {
        "id": st.id,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": st.uptime_s,
        "listen": str(attrs.evolve(g.listen, port=ports["listen"])),  # the ports bound (a config may say 0)
        "http_listen": str(attrs.evolve(g.http_listen, port=ports["http_listen"])) if g.http_listen is not None else None,
        "https_listen": str(attrs.evolve(g.https_listen, port=ports["https_listen"])) if g.https_listen is not None else None,
        "metrics_listen": str(attrs.evolve(g.metrics_listen, port=ports["metrics_listen"])) if g.metrics_listen is not None else None,
        "control_socket": str(g.control_socket),
        "peers_established": st.peers_established,
        "peers": len(st.peers),
        "routes": st.routes,
        "paths": st.paths,
        "services": st.services,
        "local_instances": len(st.instances),
        "local_instances_down": sum(1 for i in st.instances if not i.healthy),
        **st.gauges,
        "stats": st.stats,
        "http": st.http,
        "workers": st.workers,
    }


def stats_json(daemon: Daemon) -> dict[str, Any]:
    """Counters since start (``gateway``: sessions and routing, ``http``: the data plane) and gauges now: ``show stats``."""
    st = daemon.status()
    return {"gateway": dict(sorted(st.stats.items())), "http": dict(sorted(st.http.items())),
            "gauges": {**st.gauges, **st.times}}


def reload_json(daemon: Daemon) -> dict[str, Any]:
    try:
        return {"reloaded": True, "summary": daemon.reload("cpnctl reload")}
    except ConfigError as exc:
        raise ControlError(f"new config refused, the old one keeps running: {exc}") from None


def registration_json(daemon: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """``cpnctl register`` / ``deregister`` (cpnd/registration.py)."""
    try:
        return daemon.registrations.control(req)
    except RegistrationError as exc:
        raise ControlError(str(exc)) from None


COMMANDS = {
    "reload": lambda d, req: reload_json(d),
    "show-routes": lambda d, req: routes_json(d, req.get("service")),
    "show-peers": lambda d, req: peers_json(d),
    "show-services": lambda d, req: services_json(d),
    "show-clients": lambda d, req: d.clients.rows(trio.current_time()),
    "register": registration_json,
    "deregister": registration_json,
    "status": lambda d, req: status_json(d),
    "stats": lambda d, req: stats_json(d),
}


def handle_request(daemon: Daemon, raw: bytes) -> dict[str, Any]:
    """Answer one request line; never raises."""
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # 64 KiB of '[' is too deep for json: not a crash
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
        return {"ok": False, "error": f"unknown command; known: {', '.join(COMMANDS)}"}
    service = req.get("service")
    if service is not None and not isinstance(service, str):
        return {"ok": False, "error": "service must be a string"}
    try:
        return {"ok": True, "data": COMMANDS[req["cmd"]](daemon, req)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug here must not take the daemon down
        log.exception("control command %s failed", req.get("cmd"))
        return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


async def _bound(path: Path) -> trio.SocketListener:
    """The control socket bound at ``path`` (a stale one removed; a live one is another daemon's: refused)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if await _socket_alive(path):  # another daemon serves it: never take it over
                raise ListenError("control_socket", str(path), os.strerror(errno.EADDRINUSE))
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o660)
    except OSError as exc:
        raise ListenError("control_socket", str(path), exc.strerror or str(exc)) from None
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve_control(daemon: Daemon, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the unix socket ``path`` until cancelled, then remove it."""
    listener = await _bound(path)
    slots = SlotTable(MAX_CLIENTS, MAX_CLIENTS)

    async def client(stream: trio.SocketStream, slot: Slot) -> None:
        try:
            reading = trio.CancelScope(deadline=trio.current_time() + REQUEST_TIMEOUT_S)
            slot.owner = reading
            buf = bytearray()
            with reading:
                while slot.held and b"\n" not in buf and len(buf) <= MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buf += chunk
            slots.set_idle(slot, False)
            if reading.cancelled_caught or not slot.held:
                return
            if len(buf) > MAX_REQUEST:
                reply: dict[str, Any] = {"ok": False, "error": "request too long"}
            else:
                reply = handle_request(daemon, bytes(buf).split(b"\n", 1)[0])
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            slots.release(slot)
            await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            def admit(stream: trio.SocketStream) -> None:
                adm = slots.admit("local")
                for victim in adm.evicted:
                    if victim.owner is not None:
                        victim.owner.cancel()
                    daemon.edge_event("control connections reclaimed",
                                      f"control: a client silent for its request line closed for a new one ({MAX_CLIENTS} connected)")
                if adm.slot is None:  # all of them being answered
                    stream.socket.close()
                    daemon.edge_event("control connections refused", f"control: connection refused: {MAX_CLIENTS} being answered")
                    return
                nursery.start_soon(client, stream, adm.slot)

            nursery.start_soon(serve_accepting, listener, admit, daemon.edge_event, "control")
            task_status.started()
    finally:
        try:
            path.unlink()
        except OSError:
            pass


async def _socket_alive(path: Path) -> bool:
    try:
        s = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await s.aclose()
    return True


class ControlError(Exception):
    """The control socket could not be reached or answered with an error."""


def request(path: str | os.PathLike[str], cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Blocking client: send one command, return its ``data`` or raise ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no such control socket (is cpnd running? see control_socket in its config)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: connection refused (cpnd is not running)") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: the daemon closed the connection without an answer") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply["data"]
