"""Client keys and quotas (sans-IO, a virtual clock): 401/403/429, the key stripped, failures paced per address."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnd.clients import ClientTable, KeyIndex, SourceLimiter, bearer, key_sha256, new_key, source_key, under
from cpnd.config import ClientConfig, load_config
from cpnd.crypto import generate_key, write_private_key
from cpnd.errors import ConfigError

KEY_A, KEY_B = new_key(), new_key()


def client(cid: str, key: str, services=None, rate=None, burst=None) -> ClientConfig:
    return ClientConfig(cid, hashlib.sha256(key.encode()).digest(), services, rate,
                        burst if burst is not None else max(1.0, rate or 1.0))


def auth(key: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"gw"), (b"authorization", b"Bearer " + key.encode()), *extra]


def table(*clients: ClientConfig) -> ClientTable:
    return ClientTable(clients)


@pytest.mark.parametrize(("headers", "token"), [
    ([(b"authorization", b"Bearer abc")], b"abc"),
    ([(b"Authorization", b"bearer   abc ")], b"abc"),  # scheme case-insensitive (RFC 9110, 11.1)
    ([], None),
    ([(b"authorization", b"Basic YTpi")], None),
    ([(b"authorization", b"Bearer")], None),
    ([(b"authorization", b"Bearer a b")], None),
    ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a")], None),  # repeated: ambiguous
])
def test_bearer(headers, token) -> None:
    assert bearer(headers) == token


@pytest.mark.parametrize(("service", "prefixes", "ok"), [
    ("/yolo", None, True), ("/yolo", ("/",), True), ("/yolo", ("/yolo",), True), ("/yolo/v2", ("/yolo",), True),
    ("/yolov2", ("/yolo",), False), ("/yolo", ("/yolo/v2",), False), ("/a", ("/b", "/a"), True),
])
def test_prefixes_match_whole_segments(service, prefixes, ok) -> None:
    assert under(service, prefixes) is ok


def test_no_clients_means_inactive() -> None:
    assert not table().active and table(client("a", KEY_A)).active


def test_401_403_and_the_key_stripped() -> None:
    t = table(client("alice", KEY_A, ("/yolo",)))
    v = t.check([(b"host", b"gw")], "/yolo", "10.0.0.1", 0.0)
    assert (v.status, v.error, v.client) == (401, "unauthorized", None)
    v = t.check(auth(KEY_B), "/yolo", "10.0.0.1", 0.0)
    assert (v.status, v.error, v.detail) == (401, "unauthorized", "unknown client key")
    v = t.check(auth(KEY_A), "/other", "10.0.0.1", 0.0)
    assert (v.status, v.error, v.client) == (403, "forbidden", "alice")
    v = t.check(auth(KEY_A, (b"x-other", b"1")), "/yolo/sub", "10.0.0.1", 0.0)
    assert v.status == 0 and v.client == "alice"
    assert list(v.headers) == [(b"host", b"gw"), (b"x-other", b"1")]  # Authorization never goes on
    assert [(r["id"], r["allowed"], r["forbidden"]) for r in t.rows(0.0)] == [("alice", 1, 1)]
    assert t.counts["unauthorized"] == 2


def test_rate_and_retry_after_on_a_virtual_clock() -> None:
    t = table(client("bob", KEY_A, rate=2, burst=3))
    statuses = [t.check(auth(KEY_A), "/s", "1.1.1.1", 0.0).status for _ in range(4)]
    assert statuses == [0, 0, 0, 429]
    v = t.check(auth(KEY_A), "/s", "1.1.1.1", 0.1)
    assert (v.status, v.error, v.retry_after_s) == (429, "rate_limited", 1)  # 0.4 s rounds up to 1
    assert t.check(auth(KEY_A), "/s", "1.1.1.1", 0.5).status == 0  # one token a half second
    assert t.check(auth(KEY_A), "/s", "1.1.1.1", 0.5).status == 429
    slow = table(client("c", KEY_B, rate=0.1, burst=1))
    assert slow.check(auth(KEY_B), "/s", "h", 0.0).status == 0
    assert slow.check(auth(KEY_B), "/s", "h", 1.0).retry_after_s == 9  # whole seconds, rounded up


def test_failed_keys_are_paced_per_address_valid_key_or_not() -> None:
    t = ClientTable([client("alice", KEY_A)])
    t.failures = SourceLimiter(rate=1.0, burst=3, max_sources=16)
    for _ in range(3):
        assert t.check(auth(KEY_B), "/s", "6.6.6.6", 0.0).status == 401
    v = t.check(auth(KEY_A), "/s", "6.6.6.6", 0.0)  # even the right key: guessing must cost time
    assert (v.status, v.retry_after_s) == (429, 1)
    assert t.check(auth(KEY_A), "/s", "7.7.7.7", 0.0).status == 0  # another address is untouched
    assert t.check([], "/s", "8.8.8.8", 0.0).status == 401  # no key is no guess: not paced
    assert t.failures.retry_after("8.8.8.8", 0.0) is None
    assert t.check(auth(KEY_A), "/s", "6.6.6.6", 1.0).status == 0  # a token back after 1 s
    assert t.counts["source_blocked"] == 1


def test_ipv6_failures_count_per_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"  # dual-stack listeners see IPv4 users so
    assert source_key("fe80::1%eth0") == "fe80::/64" and source_key("not an address") == "not an address"


def test_an_ipv6_source_is_parsed_once_not_per_request() -> None:
    """The egress keys each request's fair share by it twice (admission, end): ~83 calls each for an
    IPv6 user, parsed anew; a repeated address gives back the same key, not a new parse's string."""
    first = source_key("2001:db8:7:8::1")
    assert source_key("2001:db8:7:8::1") is first


def test_reload_keeps_level_and_counters() -> None:
    t = table(client("alice", KEY_A, rate=1, burst=2), client("bob", KEY_B))
    for _ in range(2):
        t.check(auth(KEY_A), "/s", "h", 0.0)
    t.reconfigure([client("alice", KEY_B, rate=1, burst=5)])  # alice has a new key, bob is gone
    assert t.check(auth(KEY_A), "/s", "h", 0.0).status == 401
    assert t.check(auth(KEY_B), "/s", "h", 0.0).status == 429  # the bucket was empty and stays so
    (row,) = t.rows(0.0)
    assert (row["id"], row["allowed"], row["rate_limited"], row["burst"]) == ("alice", 2, 1, 5)


def test_keys_and_index() -> None:
    k = new_key()
    assert k.startswith("cpn_") and len(k) > 40 and new_key() != k
    assert key_sha256(k) == hashlib.sha256(k.encode()).hexdigest()
    idx = KeyIndex([(hashlib.sha256(b"one").digest(), "first")])
    assert idx.find(b"one") == "first" and idx.find(b"two") is None and len(idx) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 2)), max_size=300))
def test_failure_table_stays_bounded(events) -> None:
    lim = SourceLimiter(rate=0.5, burst=2, max_sources=16)
    now = 0.0
    for src, dt in events:
        now += dt
        lim.failed(f"10.0.0.{src}", now)
        assert len(lim.buckets) <= 16
        assert lim.retry_after(f"10.0.0.{src}", now) is None or lim.buckets[f"10.0.0.{src}"].level(now) < 1


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5, 50), st.integers(1, 20), st.lists(st.floats(0, 0.5), min_size=1, max_size=300))
def test_a_client_never_exceeds_burst_plus_rate_times_time(rate, burst, gaps) -> None:
    t = table(client("c", KEY_A, rate=rate, burst=burst))
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        v = t.check(auth(KEY_A), "/s", "h", now)
        allowed += v.status == 0
        assert v.status in (0, 429) and (v.status == 0 or v.retry_after_s >= 1)
        assert allowed <= burst + rate * now + 1e-6


def test_core_modules_do_not_import_trio() -> None:
    code = "import sys, cpnd.clients, cpnd.registry; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _config(tmp_path, extra: str) -> str:
    write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    path = tmp_path / "gw1.toml"
    path.write_text('[gateway]\nid = "gw1"\nlisten = "127.0.0.1:7101"\nkey_file = "gw1.key"\n' + extra)
    try:
        load_config(path)
    except ConfigError as exc:
        return str(exc)
    return "ok"


H = key_sha256("k")


@pytest.mark.parametrize(("extra", "error"), [
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\nservices = ["/yolo", "/"]\nrate = 5\n', "ok"),
    ('[[clients]]\nid = "a"\napi_key_sha256 = "abc"\n', "gw1.toml:7: clients[0].api_key_sha256: must be 64 hex digits"),
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\n[[clients]]\nid = "b"\napi_key_sha256 = "{H}"\n',
     "gw1.toml:10: clients[1].api_key_sha256: the same key as clients[0]"),
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\n[[clients]]\nid = "a"\napi_key_sha256 = "{"0" * 64}"\n',
     "gw1.toml:9: clients[1].id: duplicate id 'a'"),
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\nburst = 3\n', "gw1.toml:8: clients[0].burst: needs a rate"),
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\nservices = ["yolo"]\n', "gw1.toml:8: clients[0].services: [0] 'yolo': must start with '/'"),
    (f'[[clients]]\nid = "a"\napi_key_sha256 = "{H}"\nkey = "x"\n', "gw1.toml:8: clients[0].key: unknown key"),
    ('registration_listen = "127.0.0.1:0"\n', "gw1.toml:5: gateway.registration_listen: needs at least one [[registrars]]"),
    (f'[[registrars]]\ntoken_sha256 = "{H}"\n', "gw1.toml:5: registrars[0].services: missing (required)"),
    (f'registration_listen = "127.0.0.1:0"\n[[registrars]]\nid = "r"\ntoken_sha256 = "{H}"\nservices = ["/a"]\n', "ok"),
    ('max_registered_instances = -1\n', "gw1.toml:5: gateway.max_registered_instances: must be between 0 and 100000"),
])
def test_config_errors_name_file_line_and_key(tmp_path, extra, error) -> None:
    assert _config(tmp_path, extra).startswith(error)


def test_cpnctl_hash_key() -> None:
    run = [sys.executable, "-c", "from cpnd.cli import main; raise SystemExit(main())", "hash-key"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=30, check=True).stdout
    (k1, key), (k2, digest) = (line.split() for line in out.splitlines())
    assert (k1, k2) == ("key", "sha256") and key.startswith("cpn_") and digest == hashlib.sha256(key.encode()).hexdigest()
    again = subprocess.run([*run, "--stdin"], input=key + "\n", capture_output=True, text=True, timeout=30, check=True)
    assert again.stdout == out  # an existing key hashed the same way
    empty = subprocess.run([*run, "--stdin"], input="", capture_output=True, text=True, timeout=30)
    assert empty.returncode == 2 and "no key on stdin" in empty.stderr
