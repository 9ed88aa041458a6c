"""Registered instances (sans-IO): instances that join and leave by themselves, with a TTL.

``cpnctl register`` and ``PUT /cpn/v1/instances/<id>`` (cpnd/registration.py) validate a body with
``parse_registration`` and hand it to ``Registry.put``; a repeat is the heartbeat. ``expire(now)``
returns what outlived its TTL, ``get_timer()`` when that next happens, and ``merge(config)`` is the
running config: the file's services plus the registered instances, which the gateway then
advertises like configured ones. Time is an input; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import attrs

from .clients import under
from .config import Config, InstanceConfig, ServiceConfig, _url_problem
from .names import id_problem, service_problem

DEFAULT_TTL_S = 30.0  # an HTTP registration without ttl_s must heartbeat within this
MIN_TTL_S = 1.0
MAX_TTL_S = 86_400.0
FIELDS = ("service", "id", "url", "capacity", "price", "compute_latency_ms", "ttl_s")
# (lowest, highest) of the numeric fields: the same ranges as [[services.instances]] in the config.
RANGES = {"capacity": (1e-6, 1e9), "price": (0.0, 1e12), "compute_latency_ms": (0.0, 3_600_000.0),
          "ttl_s": (MIN_TTL_S, MAX_TTL_S)}


class RegistrationError(Exception):
    """A registration refused: HTTP status, error code, and the field at fault (400) if any."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.status = status
        self.error = error
        self.field = field

    @classmethod
    def bad(cls, field: str, detail: str) -> RegistrationError:
        return cls(400, "bad_request", detail, field)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "detail": str(self)}
        if self.field:
            out["field"] = self.field
        return out


@attrs.frozen
class Registration:
    service: str
    instance: InstanceConfig
    ttl_s: float | None  # None: until deregistered (cpnctl register without --ttl-s)
    by: str = "cpnctl"  # who registered it: a registrar's id, or cpnctl


def _number(body: dict[str, Any], field: str, default: float | None) -> float | None:
    v = body.get(field, default)
    if v is None or field not in body:
        return v
    lo, hi = RANGES[field]
    # Compared before any float conversion: JSON integers have no size limit (10**400 overflows a float).
    if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not math.isfinite(v):
        raise RegistrationError.bad(field, f"must be a number, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise RegistrationError.bad(field, f"must be between {lo:g} and {hi:g}, got {str(v)[:24]}")
    return float(v)


def _text(body: dict[str, Any], field: str, check: Any) -> str:
    if field not in body:
        raise RegistrationError.bad(field, "missing (required)")
    v = body[field]
    if not isinstance(v, str):
        raise RegistrationError.bad(field, f"must be a string, got {type(v).__name__}")
    problem = check(v)
    if problem:
        raise RegistrationError.bad(field, problem)
    return v


def parse_registration(body: object, iid: str | None = None, *, default_ttl_s: float | None, by: str = "cpnctl") -> Registration:
    """Validate a registration (the JSON body, or cpnctl's arguments); ``iid`` from the URL, if any."""
    if not isinstance(body, dict):
        raise RegistrationError.bad("body", "must be a JSON object")
    for k in body:
        if k not in FIELDS:
            raise RegistrationError.bad(str(k)[:64] or '""', f"unknown field (expected: {', '.join(FIELDS)})")
    if iid is not None:
        if id_problem(iid):
            raise RegistrationError.bad("id", f"{iid[:64]!r} in the URL: {id_problem(iid)}")
        if "id" in body and body["id"] != iid:
            raise RegistrationError.bad("id", "differs from the id in the URL")
        body = {**body, "id": iid}
    # In FIELDS order: the first field at fault is the one named.
    service = _text(body, "service", service_problem)
    rid = _text(body, "id", id_problem)
    url = _text(body, "url", _url_problem)
    capacity = _number(body, "capacity", None)
    if capacity is None:
        raise RegistrationError.bad("capacity", "missing (required)")
    inst = InstanceConfig(id=rid, url=url, capacity=capacity, price=_number(body, "price", 0.0) or 0.0,
                          compute_latency_ms=_number(body, "compute_latency_ms", 0.0) or 0.0, registered=True)
    return Registration(service, inst, _number(body, "ttl_s", default_ttl_s), by)


@attrs.define
class Entry:
    reg: Registration
    expires_at: float | None
    since: float  # first registered (a heartbeat keeps it)
    heartbeats: int = 0


class Registry:
    """Registered instances by id, bounded by ``max_instances``."""

    def __init__(self, max_instances: int) -> None:
        self.max_instances = max_instances
        self.entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, reg: Registration, now: float, *, configured: Collection[str] = (),
            allowed: Iterable[str] | None = None) -> str:
        """Register or heartbeat: ``added``, ``changed`` (re-advertise it) or ``refreshed`` (a heartbeat).

        ``configured``: ids the config file holds (those win); ``allowed``: the caller's service
        prefixes (None: any), which must cover the instance's service before and after.
        """
        iid = reg.instance.id
        allowed = None if allowed is None else tuple(allowed)
        if iid in configured:
            raise RegistrationError(409, "conflict", f"instance {iid} is configured in the gateway's config file")
        if not under(reg.service, allowed):
            raise RegistrationError(403, "forbidden", f"{reg.by} may not register instances of {reg.service}")
        old = self.entries.get(iid)
        if old is not None and not under(old.reg.service, allowed):
            raise RegistrationError(403, "forbidden", f"instance {iid} is registered for {old.reg.service}, "
                                    f"which {reg.by} may not register")
        if old is None and len(self.entries) >= self.max_instances:
            raise RegistrationError(503, "registry_full", f"{self.max_instances} instances registered "
                                    "(max_registered_instances)")
        expires = None if reg.ttl_s is None else now + reg.ttl_s
        if old is None:
            self.entries[iid] = Entry(reg, expires, now)
            return "added"
        what = "refreshed" if (old.reg.service, old.reg.instance) == (reg.service, reg.instance) else "changed"
        old.reg, old.expires_at = reg, expires
        old.heartbeats += 1
        return what

    def delete(self, iid: str, *, allowed: Iterable[str] | None = None, by: str = "cpnctl") -> Registration:
        """Deregister ``iid``; 404 if not registered, 403 if outside ``allowed``."""
        entry = self.entries.get(iid)
        if entry is None:
            raise RegistrationError(404, "not_registered", f"no registered instance {iid}")
        if not under(entry.reg.service, None if allowed is None else tuple(allowed)):
            raise RegistrationError(403, "forbidden", f"instance {iid} is registered for {entry.reg.service}, "
                                    f"which {by} may not deregister")
        del self.entries[iid]
        return entry.reg

    def expire(self, now: float) -> list[Registration]:
        """Those whose TTL passed without a heartbeat, removed."""
        gone = [iid for iid, e in self.entries.items() if e.expires_at is not None and e.expires_at <= now]
        return [self.entries.pop(iid).reg for iid in gone]

    def get_timer(self) -> float | None:
        """When the next registration expires (None: none will)."""
        return min((e.expires_at for e in self.entries.values() if e.expires_at is not None), default=None)

    def merge(self, config: Config) -> Config:
        """``config``'s own services and instances plus the registered ones (a service of its own if new).

        A registration whose id the file now configures is dropped: the file wins.
        """
        own = [ServiceConfig(s.path, tuple(i for i in s.instances if not i.registered)) for s in config.services]
        own = [s for s in own if s.instances]
        configured = {i.id for s in own for i in s.instances}
        for iid in [iid for iid in self.entries if iid in configured]:
            del self.entries[iid]
        extra: dict[str, list[InstanceConfig]] = {}
        for e in self.entries.values():
            extra.setdefault(e.reg.service, []).append(e.reg.instance)
        services = [ServiceConfig(s.path, s.instances + tuple(extra.pop(s.path, ()))) for s in own]
        services += [ServiceConfig(path, tuple(insts)) for path, insts in sorted(extra.items())]
        return attrs.evolve(config, services=tuple(services))

    def describe(self, iid: str, now: float) -> dict[str, Any]:
        """What ``show services --json`` adds for a registered instance."""
        e = self.entries.get(iid)
        if e is None:
            return {"registered": False}
        return {"registered": True, "registered_by": e.reg.by, "ttl_s": e.reg.ttl_s, "heartbeats": e.heartbeats,
                "expires_in_s": None if e.expires_at is None else round(max(0.0, e.expires_at - now), 3)}
