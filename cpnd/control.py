"""The local control socket: one JSON request line in, one JSON reply line out.

Requests are ``{"cmd": "show-routes", "service": "/yolo"}`` and the like (see
``COMMANDS``); replies are ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import __version__
from .admission import Slot, SlotTable
from .aio import ListenError, serve_accepting
from .errors import ConfigError
from .load import Stage
from .registry import RegistrationError
from .rib import Key
from .select import candidate

if TYPE_CHECKING:
    from .daemon import Daemon

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
        })
        if best:
            out[-1]["estimate"] = estimate_json(daemon, a.key)
    return out


def estimate_json(daemon: Daemon, key: Key) -> dict[str, Any]:
    """What this gateway's ingress expects of a request to the instance now (protocol-spec/selection.md,
    "Estimate"): the load it assumes, and the time from head in to head out, in parts. ``total_ms`` is for a
    request at the instance's load now, ``bounded_total_ms`` for a latency-bound one (checked against
    CPN-Max-Latency: its compute counts only the latency-bound demand, which admission serves first)."""
    view = daemon.dataplane.estimate(key, daemon.rib.loc[key])
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
    now = trio.current_time()
    out = []
    for pid, peer in sorted(daemon.peers.items()):
        conn = peer.current()
        s = conn.session if conn else None
        state = s.state.value if s else peer.status
        up = s is not None and conn is not None and conn.established and s.established_at is not None
        out_rib = conn.adj_out if up and conn is not None else None
        out.append({
            "id": pid,
            "address": str(peer.config.address),
            "state": state,
            "uptime_s": round(now - s.established_at, 3) if up and s and s.established_at is not None else 0.0,
            "rtt_ms": round(s.srtt * 1000, 3) if s and s.srtt is not None else None,
            "routes_received": len(daemon.rib.adj_in.get(pid, {})) if up else 0,
            "link_cost_ms": round(daemon.rib.link_cost_us[pid] / 1000, 3) if pid in daemon.rib.link_cost_us else None,
            "flaps": peer.flaps,
            "last_error": peer.last_error,
            "msgs_in": s.stats["msgs_in"] if s else 0,
            "msgs_out": s.stats["msgs_out"] if s else 0,
            "bytes_in": s.stats["bytes_in"] if s else 0,
            "bytes_out": s.stats["bytes_out"] if s else 0,
            # What both OPENs offered: the features this session actually uses.
            "caps": list(s.agreed_caps) if up and s else [],
            # Route limits (routing.md): what the peer takes from us, what its limit makes us
            # withhold now, and whether we are pacing what it sends (its bytes wait unread).
            "peer_limits": attrs.asdict(s.peer_limits) if up and s and s.peer_limits else None,
            "routes_sent": len(out_rib.sent) if out_rib else 0,
            "routes_withheld": len(out_rib.withheld) if out_rib else 0,
            "route_entries_in": s.stats["route_entries_in"] if s else 0,
            "inbound_paced": bool(up and s and not s.wants_data()),
        })
    return out


def services_json(daemon: Daemon) -> list[dict[str, Any]]:
    """Our own instances as the service-side gateway sees them."""
    now = trio.current_time()
    out = []
    for svc in daemon.config.services:
        for inst in svc.instances:
            meter = daemon.dataplane.meters[inst.id]
            load, bload, comp = round(meter.load(now), 3), round(meter.bounded_load(now), 3), meter.base_us
            inflight = meter.inflight
            if daemon.workers is not None:  # [gateway] workers call the instances: their latest reports
                load, bload, comp = daemon.workers.advertised(inst.id, meter.capacity, meter.base_us)
                inflight = daemon.workers.inflight(inst.id)
            out.append({
                "service": svc.path, "instance": inst.id, "url": inst.url,
                "healthy": daemon.dataplane.health(inst.id).healthy,
                "load": load, "bounded_load": bload,
                "compute_latency_ms": round(comp / 1000, 3), "capacity": inst.capacity, "price": inst.price,
                "inflight": inflight, "refused": meter.refused,
                **daemon.registrations.registry.describe(inst.id, now),  # registered, registered_by, expires_in_s
            })
    return out


# What ``cpnctl show status`` shows, in this order; status_json's other keys are counters and gauges,
# kept there for scripts written against earlier versions (``show stats`` is their place).
STATUS_KEYS = ("id", "version", "pid", "uptime_s", "listen", "http_listen", "metrics_listen", "control_socket",
               "peers_established", "peers", "routes", "paths", "services", "local_instances", "local_instances_down",
               "workers")


def _gauges(daemon: Daemon) -> dict[str, int]:
    return {
        "routes_withheld": sum(len(c.adj_out.withheld) for p in daemon.peers.values() for c in p.conns if c.adj_out is not None),
        "tunnel_streams": sum(len(c.mux.streams) for p in daemon.peers.values() for c in p.conns if c.mux is not None),
        "http_clients": daemon.dataplane.clients + (daemon.workers.clients if daemon.workers else 0),
        "http_clients_idle": daemon.dataplane.slots.idle,  # no whole request head yet: may be taken back
        "http_clients_max": daemon.dataplane.slots.limit,  # max_http_clients, as fitted to the descriptor limit
        "preauth_connections": len(daemon.preauth),
        "pooled_instance_connections": sum(len(q) for q in daemon.dataplane.pool.values()),
    }


def status_json(daemon: Daemon) -> dict[str, Any]:
    """Who this gateway is and where it listens: ``show status``."""
    g = daemon.config.gateway
    http_port, metrics_port = daemon.dataplane.http_port, daemon.metrics_port
    local = [i.id for s in daemon.config.services for i in s.instances]
    return {
        "id": daemon.id,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(trio.current_time() - daemon.started_at, 3),
        "listen": str(attrs.evolve(g.listen, port=daemon.listen_port)),  # the ports bound (a config may say 0)
        "http_listen": str(attrs.evolve(g.http_listen, port=http_port)) if g.http_listen is not None else None,
        "https_listen": (str(attrs.evolve(g.https_listen, port=daemon.dataplane.https_port))  # [tls]
                         if g.https_listen is not None else None),
        "metrics_listen": str(attrs.evolve(g.metrics_listen, port=metrics_port)) if g.metrics_listen is not None else None,
        "control_socket": str(g.control_socket),
        "peers_established": sum(1 for p in daemon.peers.values() if (c := p.current()) and c.established),
        "peers": len(daemon.peers),
        "routes": len(daemon.rib),
        "paths": sum(len(t) for t in daemon.rib.adj_in.values()) + len(daemon.rib.local),
        "services": len(daemon.rib.by_service),
        "local_instances": len(local),
        "local_instances_down": sum(1 for iid in local if not daemon.dataplane.health(iid).healthy),
        **_gauges(daemon),
        "stats": dict(daemon.stats),
        "http": dict(_http_stats(daemon)),
        "workers": workers_json(daemon),
    }


def _http_stats(daemon: Daemon) -> collections.Counter[str]:
    """The data plane's counters: this process's and (``[gateway] workers``) every worker's, added up."""
    return daemon.dataplane.stats + daemon.workers.stats() if daemon.workers is not None else daemon.dataplane.stats


def workers_json(daemon: Daemon) -> list[dict[str, Any]]:
    """``show status --json``'s ``workers``: the processes serving users (this one alone when workers = 1)."""
    if daemon.workers is not None:
        return daemon.workers.status()
    return [{"index": 0, "pid": os.getpid(), "alive": True, "restarts": 0, "up_s": round(trio.current_time() - daemon.started_at, 3),
             "http_clients": daemon.dataplane.clients, "inflight": daemon.dataplane.inflight,
             "requests": daemon.dataplane.stats["requests"], "report_age_ms": 0}]


def stats_json(daemon: Daemon) -> dict[str, Any]:
    """Counters since start (``gateway``: sessions and routing, ``http``: the data plane) and gauges now: ``show stats``."""
    now = trio.current_time()
    own = daemon.dataplane.own
    # This gateway's own processing per request by stage, as measured now and as its routes carry it
    # (protocol-spec/selection.md, "Own time"; routing.md, "Gateway time").
    times: dict[str, float] = {f"own_{stage}_ms": _ms(own.us(stage, now)) for stage in Stage.ALL}
    times |= {"advertised_egress_ms": _ms(daemon.rib.egress_us), "advertised_transit_ms": _ms(daemon.rib.transit_us)}
    return {"gateway": dict(sorted(daemon.stats.items())), "http": dict(sorted(_http_stats(daemon).items())),
            "gauges": {**_gauges(daemon), **times}}


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


async def serve_control(daemon: Daemon, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the unix socket ``path`` until cancelled, then remove it."""
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
    listener = trio.SocketListener(sock)
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
