"""Hostile users and peers against real gateways (bench/hostile.py's attacks, smaller): nothing leaks,
memory stays within the peer budget, and the other session and an honest client carry on."""

from __future__ import annotations

import httpx
import pytest

from bench.hostile import Honest, PeakRss, Site, fds, leaked_streams, rss_mb, tunnel_flood

BUDGET = {"peer_buffer_bytes": 8 * 1024 * 1024, "max_peer_send_buffer": 1536 * 1024,
          "tunnel_window_bytes": 256 * 1024, "max_streams_per_peer": 128}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("hostile"), BUDGET)
    try:
        yield s
    finally:
        s.close()


def _flaps(site: Site) -> int:
    return {p["id"]: p for p in site.lab.query("t", "show-peers")}["h"]["flaps"]


def _settled(site: Site) -> None:
    site.lab.wait_for(lambda: all(site.lab.query(g, "status")["tunnel_streams"] == 0 for g in "th"), 15,
                      "every tunnel stream to close")


def test_requests_that_cannot_be_built_upstream_are_answered_and_leak_no_stream(site) -> None:
    flaps = _flaps(site)
    with Honest(f"http://{site.specs['t'].http}") as honest:
        r = leaked_streams(site, 200)
    assert r["get_answered_200"] == r["gets"]  # HTTP/1.0 without Host and `Connection: host` are served
    _settled(site)
    assert _flaps(site) == flaps and honest.summary()["success"] >= 0.99
    assert site.lab.query("t", "status")["http_clients"] <= 1


def test_a_peer_flooding_tunnel_data_is_held_to_its_budget(site) -> None:
    flaps, rss0, fds0 = _flaps(site), rss_mb(site.pid), fds(site.pid)
    with PeakRss(site.pid) as peak, Honest(f"http://{site.specs['t'].http}") as honest:
        r = tunnel_flood(site, 200, 3.0)  # more streams than allowed, each overrunning its windows
    assert r["refused_too_many"] >= 200 - 128 and r["streams_reset"] == 200
    _settled(site)
    assert _flaps(site) == flaps and honest.summary()["success"] >= 0.99
    # The budget is 8 MiB; the flood pushed several times that at the target.
    assert r["bytes_sent"] > 16 * 1024 * 1024 and peak.peak < rss0 + 40
    assert fds(site.pid) <= fds0 + 4  # the black hole's connections went with their streams
    r = httpx.post(f"http://{site.specs['t'].http}/far", content=b"after", timeout=10)
    assert r.status_code == 200


def test_a_peer_keeping_to_its_windows_is_served_within_them(site) -> None:
    r = tunnel_flood(site, 16, 2.0, honour_windows=True)
    assert r["streams_reset"] == 0  # nothing it sent was beyond the credit it was given
    _settled(site)
