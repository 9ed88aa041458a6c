"""Registered instances (sans-IO, a virtual clock): validation naming the field, heartbeats, TTL expiry, merge."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpnd.config import Config, GatewayConfig, InstanceConfig, ServiceConfig, parse_address
from cpnd.crypto import generate_key
from cpnd.registry import DEFAULT_TTL_S, Registration, RegistrationError, Registry, parse_registration

BODY = {"service": "/yolo", "url": "http://127.0.0.1:9001/v1", "capacity": 10}


def reg(iid: str, service: str = "/yolo", ttl: float | None = 5.0, **fields) -> Registration:
    return parse_registration({**BODY, "service": service, **fields}, iid, default_ttl_s=ttl, by="r1")


def config(*services: ServiceConfig) -> Config:
    g = GatewayConfig(id="gw", listen=parse_address("127.0.0.1:1"), key_file=Path("k"), control_socket=Path("s"))
    return Config(g, (), services, generate_key(), Path("gw.toml"))


FILE_S1 = InstanceConfig("s1", "http://127.0.0.1:9/a", 5.0, 0.0, 0.0)


@pytest.mark.parametrize(("body", "iid", "field", "detail"), [
    ([], "x", "body", "must be a JSON object"),
    ({**BODY, "colour": 1}, "x", "colour", "unknown field"),
    (BODY, "bad id!", "id", "must be 1-64 characters"),
    ({**BODY, "id": "y"}, "x", "id", "differs from the id in the URL"),
    ({k: v for k, v in BODY.items() if k != "service"}, "x", "service", "missing (required)"),
    ({**BODY, "service": "yolo"}, "x", "service", "must start with '/'"),
    ({**BODY, "url": "ftp://h/"}, "x", "url", "must be an http:// or https:// URL"),
    ({**BODY, "url": 5}, "x", "url", "must be a string"),
    ({k: v for k, v in BODY.items() if k != "capacity"}, "x", "capacity", "missing (required)"),
    ({**BODY, "capacity": 0}, "x", "capacity", "must be between"),
    ({**BODY, "capacity": True}, "x", "capacity", "must be a number"),
    ({**BODY, "price": -1}, "x", "price", "must be between 0"),
    ({**BODY, "compute_latency_ms": "1"}, "x", "compute_latency_ms", "must be a number"),
    ({**BODY, "ttl_s": 0.5}, "x", "ttl_s", "must be between 1 and 86400"),
    ({**BODY, "ttl_s": float("nan")}, "x", "ttl_s", "must be a number"),
])
def test_bad_registrations_name_the_field(body, iid, field, detail) -> None:
    with pytest.raises(RegistrationError) as e:
        parse_registration(body, iid, default_ttl_s=DEFAULT_TTL_S)
    assert (e.value.status, e.value.error, e.value.field) == (400, "bad_request", field)
    assert detail in str(e.value) and e.value.json()["field"] == field


def test_defaults() -> None:
    r = parse_registration(BODY, "x", default_ttl_s=30.0)
    assert (r.ttl_s, r.instance.price, r.instance.compute_latency_ms, r.instance.registered) == (30.0, 0.0, 0.0, True)
    assert parse_registration({**BODY, "id": "x"}, default_ttl_s=None).ttl_s is None  # cpnctl: no expiry


def test_put_heartbeat_change_and_expiry_on_a_virtual_clock() -> None:
    r = Registry(max_instances=10)
    assert r.put(reg("i1", ttl=5), 0.0) == "added"
    assert r.get_timer() == 5.0
    assert r.put(reg("i1", ttl=5), 4.0) == "refreshed"  # a heartbeat moves the expiry
    assert r.get_timer() == 9.0 and r.expire(8.9) == []
    assert r.put(reg("i1", ttl=5, capacity=20), 6.0) == "changed"
    assert r.put(reg("i2", ttl=None), 6.0) == "added"  # no TTL: only a deregistration ends it
    assert [g.instance.id for g in r.expire(11.0)] == ["i1"]
    assert r.get_timer() is None and len(r) == 1
    assert r.delete("i2").instance.id == "i2" and len(r) == 0
    with pytest.raises(RegistrationError) as e:
        r.delete("i2")
    assert (e.value.status, e.value.error) == (404, "not_registered")


def test_refusals() -> None:
    r = Registry(max_instances=1)
    with pytest.raises(RegistrationError) as e:
        r.put(reg("s1"), 0.0, configured={"s1"})
    assert (e.value.status, e.value.error) == (409, "conflict")
    with pytest.raises(RegistrationError) as e:
        r.put(reg("i1", service="/other"), 0.0, allowed=("/yolo",))
    assert (e.value.status, e.value.error) == (403, "forbidden")
    r.put(reg("i1", service="/yolo/v2"), 0.0, allowed=("/yolo",))
    with pytest.raises(RegistrationError) as e:  # another registrar may not move or take over it
        r.put(reg("i1", service="/b"), 0.0, allowed=("/b",))
    assert e.value.status == 403
    with pytest.raises(RegistrationError) as e:
        r.delete("i1", allowed=("/b",))
    assert e.value.status == 403
    with pytest.raises(RegistrationError) as e:
        r.put(reg("i2"), 0.0)
    assert (e.value.status, e.value.error) == (503, "registry_full")
    assert r.put(reg("i1", service="/yolo/v2"), 1.0) == "refreshed"  # a heartbeat at the bound is fine


def test_merge_joins_services_and_the_file_wins() -> None:
    r = Registry(10)
    for iid, svc in (("i1", "/yolo"), ("i2", "/new"), ("s1", "/yolo")):
        r.put(reg(iid, service=svc), 0.0)
    merged = r.merge(config(ServiceConfig("/yolo", (FILE_S1,))))
    got = {s.path: [(i.id, i.registered) for i in s.instances] for s in merged.services}
    # s1 is configured in the file now: the file's s1 wins and the registration is dropped.
    assert got == {"/yolo": [("s1", False), ("i1", True)], "/new": [("i2", True)]}
    assert "s1" not in r.entries
    assert r.merge(merged) == merged  # merging the running config again changes nothing
    r.delete("i2")
    assert [s.path for s in r.merge(merged).services] == ["/yolo"]


@attrs.frozen
class Op:
    kind: str
    iid: str
    dt: float
    ttl: float | None


ops = st.builds(Op, st.sampled_from(["put", "delete", "tick"]), st.sampled_from(["a", "b", "c", "d", "e"]),
                st.floats(0, 3), st.one_of(st.none(), st.floats(1, 5)))


@settings(max_examples=80, deadline=None)
@given(st.lists(ops, max_size=60))
def test_registry_invariants(seq) -> None:
    r = Registry(max_instances=3)
    now = 0.0
    for op in seq:
        now += op.dt
        try:
            if op.kind == "put":
                r.put(reg(op.iid, ttl=op.ttl), now)
            elif op.kind == "delete":
                r.delete(op.iid)
        except RegistrationError as exc:
            assert exc.status in (404, 503)
        gone = r.expire(now)
        assert all(g.ttl_s is not None for g in gone)
        assert len(r) <= 3
        timer = r.get_timer()
        assert timer is None or timer > now  # nothing overdue is left behind
        assert timer == min((e.expires_at for e in r.entries.values() if e.expires_at is not None), default=None)
        merged = r.merge(config())
        assert sorted(i.id for s in merged.services for i in s.instances) == sorted(r.entries)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["service", "id", "url", "capacity", "price", "compute_latency_ms", "ttl_s", "x"]),
                       json_values | st.integers(min_value=10**300, max_value=10**400), max_size=8) | json_values,
       st.text(max_size=70))
@example({"service": "/a", "url": "http://h/", "capacity": 10**400}, "x")  # no float holds it
@example({"": 1}, "x")
def test_any_json_is_a_registration_or_a_400(body, iid) -> None:
    try:
        r = parse_registration(body, iid, default_ttl_s=DEFAULT_TTL_S)
    except RegistrationError as exc:
        assert exc.status == 400 and exc.field and len(str(exc)) < 400
    else:
        assert r.instance.id == iid and 1e-6 <= r.instance.capacity <= 1e9
