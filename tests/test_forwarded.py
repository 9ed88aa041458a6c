"""Forwarded / X-Forwarded-For from what the ingress saw (cpnd/forwarded.py), against the spec's vectors."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpnd.forwarded import Origin, at_ingress, client_address, for_instance, read, read_parsed
from cpnd.h1 import filter_headers


def _pairs(rows: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in rows]


def test_vectors(vectors) -> None:
    cases = vectors["forwarded"]
    assert len(cases) >= 8
    for v in cases:
        tunnel = _pairs(v["tunnel_headers"])
        if "peer_address" in v:
            assert at_ingress(_pairs(v["user_headers"]), v["peer_address"], v["ingress"]) == tunnel, v["name"]
        assert for_instance(tunnel, read(tunnel)) == _pairs(v["instance_headers"]), v["name"]


def test_the_data_planes_rewrite_agrees_with_the_vectors(vectors) -> None:
    """What the ingress and egress actually do (h1.rewrite_headers, replace_host, on headers h11 parsed)
    gives the vectors' headers: the same fields, Host aside (the egress sets the instance's)."""
    import h11

    from cpnd.forwarded import REPLACED, tunnel_pair
    from cpnd.h1 import replace_host, rewrite_headers

    def parsed(pairs: list[tuple[bytes, bytes]]) -> h11.Request:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in pairs
                                                                        if n.lower() != b"host") + b"\r\n")
        return conn.next_event()

    def fields(pairs) -> list[tuple[bytes, bytes]]:
        return sorted((n.lower(), v) for n, v in pairs if n.lower() != b"host")

    for v in vectors["forwarded"]:
        if "peer_address" in v:
            user = parsed(_pairs(v["user_headers"]))
            tunnel = rewrite_headers(user.headers, drop_cpn=True, drop=REPLACED,
                                     extra=tunnel_pair(v["peer_address"], v["ingress"]))
            assert fields(tunnel) == fields(_pairs(v["tunnel_headers"])), v["name"]
        head = parsed(_pairs(v["tunnel_headers"]))
        origin = read(head.headers)
        instance = replace_host(rewrite_headers(head.headers, drop_cpn=True), b"i:1", drop=REPLACED,
                                extra=origin.instance_headers if origin is not None else ())
        assert fields(instance) == fields(_pairs(v["instance_headers"])), v["name"]


@pytest.mark.parametrize(("source", "canonical"), [
    ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::ffff:10.1.2.3", "10.1.2.3"), ("fe80::1%eth0", "fe80::1"),
    ("2001:0db8:0000::1", "2001:db8::1"), ("", None), ("localhost", None),
])
def test_client_address(source: str, canonical: str | None) -> None:
    assert client_address(source) == canonical


def test_users_cannot_forge_what_the_egress_trusts() -> None:
    # A user's CPN-Client / CPN-Ingress never reach the tunnel: every CPN-* header a user sends is
    # dropped first, and at_ingress drops any left besides.
    user = [(b"Host", b"x"), (b"CPN-Client", b"6.6.6.6"), (b"CPN-Ingress", b"evil"), (b"X-Forwarded-For", b"6.6.6.6"),
            (b"FORWARDED", b"for=6.6.6.6")]
    tunnel = at_ingress(filter_headers(user, drop_cpn=True), "192.0.2.1", "gw1")
    assert tunnel == [(b"Host", b"x"), (b"cpn-client", b"192.0.2.1"), (b"cpn-ingress", b"gw1")]
    assert at_ingress(list(user), "192.0.2.1", "gw1")[-2:] == [(b"cpn-client", b"192.0.2.1"), (b"cpn-ingress", b"gw1")]
    assert read(tunnel) == Origin("192.0.2.1", "gw1")
    # Not an IP (a unix socket, say): nothing is claimed.
    assert at_ingress([(b"host", b"x")], "", "gw1") == [(b"host", b"x")]


def test_an_ingress_that_sends_no_origin_still_has_the_users_headers_removed() -> None:
    headers = [(b"host", b"x"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"), (b"accept", b"*/*")]
    assert for_instance(headers, None) == [(b"host", b"x"), (b"accept", b"*/*")]
    assert Origin("2001:db8::1", "gw1").forwarded() == b'for="[2001:db8::1]";by=gw1'



@given(st.lists(st.tuples(st.sampled_from([b"CPN-Client", b"cpn-client", b"CPN-Ingress", b"cpn-ingress", b"Accept",
                                           b"Forwarded", b"X-A"]),
                          st.sampled_from([b"192.0.2.1", b"2001:db8::1", b"gw1", b"g-2", b"::ffff:192.0.2.1", b"x y", b""])),
                max_size=6))
def test_reading_h11s_own_items_is_reading_pairs(headers: list[tuple[bytes, bytes]]) -> None:
    """The egress's read of a tunnelled head as h11 holds it (read_parsed) finds what read finds in its pairs."""
    parsed = h11.Request(method="GET", target="/", headers=[(b"host", b"x"), *headers]).headers
    assert read_parsed(parsed._full_items) == read(parsed.raw_items())
