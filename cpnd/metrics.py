"""Prometheus metrics at ``[gateway] metrics_listen``: GET /metrics (prometheus-client text format).

Gauges are read from a status snapshot taken at scrape time (nothing on the hot path); per-request
counters and the latency histogram are updated by the data plane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .admission import Slot, SlotTable, Tally
from .aio import admit_stream, open_listeners, read_reclaimable, serve_accepting
from .config import Address
from .histogram import LATENCY_BUCKETS, LatencyHistogram, Latencies, add_latencies
from .status import Status

log = logging.getLogger("cpnd.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Scrapers are few: beyond MAX_CLIENTS connections, the one that has waited longest for its
# next request is closed for the newcomer (one busy answering is never cut), so idle
# connections cannot lock a scraper out; a request must arrive within READ_TIMEOUT_S of
# the connection or of the last answer, and an answer be taken within WRITE_TIMEOUT_S.
MAX_CLIENTS = 16
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_REQUEST_BODY = 16384
MAX_CACHED_CHILDREN = 4096


def _child(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """The metric child for ``key``, made once (the cache is bounded: users choose services)."""
    child = cache.get(key)
    if child is None:
        if len(cache) >= MAX_CACHED_CHILDREN:
            cache.clear()
        child = cache[key] = make()
    return child


class Metrics:
    """One registry per daemon, so several daemons in one process (tests) never mix."""

    def __init__(self, daemon_id: str, status: Callable[[], Status]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cpn_requests", "Requests answered at this ingress, by service, instance and status",
                                ["service", "instance", "status"], registry=self.registry)
        self.latency = LatencyHistogram()
        # Other processes' latencies (the workers', cpnd/workers.py), added to ours at scrape time.
        self.more_latencies: Callable[[], Latencies] = dict
        self.registry.register(_StatusCollector(status))
        self.registry.register(_LatencyCollector(self))
        # labels() takes a lock and builds keys on every call: the children, once each, are kept here.
        self._counters: dict[tuple[str, str, int], Any] = {}
        # Requests counted since the last scrape, added to the children then (an increment of a child
        # takes a lock: ~6 calls a request, where a dict's takes none).
        self._pending: dict[tuple[str, str, int], int] = {}
        self.daemon_id = daemon_id
        self.edge_tally = Tally()  # connections refused or reclaimed: one log line a second

    def edge_event(self, kind: str, line: str) -> None:
        if self.edge_tally.note(kind, trio.current_time()):
            log.warning("%s: %s (more are counted: one line a second)", self.daemon_id, line)

    def flush_edge_log(self) -> None:
        line = self.edge_tally.flush(trio.current_time())
        if line:
            log.warning("%s: %s", self.daemon_id, line)

    def observe(self, service: str, instance: str | None, status: int, seconds: float | None) -> None:
        key = (service, instance or "", status)
        try:
            self._pending[key] += 1
        except KeyError:
            if len(self._pending) >= MAX_CACHED_CHILDREN:  # bounded: users choose services
                self.flush_counts()
            self._pending[key] = 1
        if seconds is not None:
            self.latency.observe(service, seconds)

    def flush_counts(self) -> None:
        """Add the requests counted since the last flush to the prometheus counter."""
        pending, self._pending = self._pending, {}
        for (service, instance, status), n in pending.items():
            _child(self._counters, (service, instance, status),
                   lambda: self.requests.labels(service, instance, str(status))).inc(n)  # noqa: B023 - called at once

    def render(self) -> bytes:
        self.flush_counts()
        return generate_latest(self.registry)


class _LatencyCollector(Collector):
    """``cpn_request_seconds``: this process's latencies and the workers' together."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[HistogramMetricFamily]:
        rows: Latencies = {}
        add_latencies(rows, self.metrics.latency.by_service)
        add_latencies(rows, self.metrics.more_latencies())
        family = HistogramMetricFamily("cpn_request_seconds", "Time from request head to response head at this ingress",
                                       labels=["service"])
        for service, row in sorted(rows.items()):
            buckets, total = [], 0.0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), row[:-1]):
                total += n
                buckets.append((bound, total))
            family.add_metric([service], buckets, sum_value=row[-1])
        yield family


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self.status()
        sessions = GaugeMetricFamily("cpn_sessions", "Peers by session state", labels=["state"])
        counts: dict[str, int] = {}
        for peer in st.peers:
            counts[peer.state] = counts.get(peer.state, 0) + 1
        for state, n in sorted(counts.items()):
            sessions.add_metric([state], n)
        yield sessions
        yield GaugeMetricFamily("cpn_routes", "Instances with a best path (Loc-RIB size)", value=st.routes)
        yield GaugeMetricFamily("cpn_paths", "Paths held, own instances included", value=st.paths)
        tunnel = CounterMetricFamily("cpn_peer_bytes", "Bytes exchanged with peers (sessions and tunnels)", labels=["direction"])
        totals = st.session_totals
        tunnel.add_metric(["in"], totals.get("bytes_in", 0))
        tunnel.add_metric(["out"], totals.get("bytes_out", 0))
        yield tunnel
        frames = CounterMetricFamily("cpn_tunnel_frames", "Tunnel frames exchanged with peers", labels=["direction"])
        frames.add_metric(["in"], totals.get("tunnel_in", 0))
        frames.add_metric(["out"], totals.get("tunnel_out", 0))
        yield frames
        yield GaugeMetricFamily("cpn_tunnel_streams", "Open tunnel streams", value=st.gauges["tunnel_streams"])
        http = st.http
        yield CounterMetricFamily("cpn_selection_retries", "Requests retried on another candidate", value=http.get("retries", 0))
        yield CounterMetricFamily("cpn_admission_rejects", "Requests refused by admission here", value=http.get("admission_rejects", 0))
        yield CounterMetricFamily("cpn_relayed_streams", "Streams relayed as a transit gateway", value=http.get("relayed", 0))
        bound = CounterMetricFamily("cpn_latency_bound", "Latency-bound requests: answered 504 at their bound (cut), sent "
                                    "to an instance our correction alone held out of it (probe), their head sent after it "
                                    "(late: 0, the bound being enforced)", labels=["event"])
        for event, key in (("cut", "bound_cut"), ("probe", "bound_probes"), ("late", "late")):
            bound.add_metric([event], http.get(key, 0))
        yield bound
        yield CounterMetricFamily("cpn_user_abandoned", "Requests ended because their user closed its connection while "
                                  "they were served", value=http.get("user_abandoned", 0))
        yield CounterMetricFamily("cpn_rate_limited_per_ip", "Requests answered 429 because their address was over "
                                  "max_requests_per_ip_per_s", value=http.get("rate_limited_per_ip", 0))
        tls = CounterMetricFamily("cpn_tls_refused", "https_listen connections closed before a request", labels=["reason"])
        for reason in ("handshake_failures", "handshake_timeouts", "plain_http"):
            tls.add_metric([reason], http.get(f"tls_{reason}", 0))
        yield tls
        dropped = CounterMetricFamily("cpn_routes_dropped", "Routes dropped on receipt: origin validation failed "
                                      "(invalid), unverifiable and not accepted (unverified), or an import filter",
                                      labels=["reason"])
        for reason, key in (("invalid", "routes_invalid"), ("unverified", "routes_unverified_dropped"),
                            ("filtered", "routes_filtered")):
            dropped.add_metric([reason], st.stats.get(key, 0))
        yield dropped
        load = GaugeMetricFamily("cpn_instance_load", "Load of our own instances, fraction of capacity", labels=["instance"])
        for inst in st.instances:
            load.add_metric([inst.instance], inst.load)
        yield load
        yield from _client_metrics(st)


def _client_metrics(st: Status) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """[[clients]] counters and registered instances (cpnd/clients.py, cpnd/registry.py)."""
    per_client = CounterMetricFamily("cpn_client_requests", "Requests with a known client key, by client and result "
                                     "(allowed, forbidden, rate_limited)", labels=["client", "result"])
    for cid, counts in sorted(st.clients.items()):
        for result in ("allowed", "forbidden", "rate_limited"):
            per_client.add_metric([cid, result], counts[result])
    yield per_client
    yield CounterMetricFamily("cpn_client_unauthorized", "Requests refused 401: no client key, or an unknown one",
                              value=st.client_totals.get("unauthorized", 0))
    yield CounterMetricFamily("cpn_client_source_blocked", "Requests refused 429 for their address's failed keys",
                              value=st.client_totals.get("source_blocked", 0))
    yield GaugeMetricFamily("cpn_registered_instances", "Instances registered here (cpnctl register, HTTP)",
                            value=st.registered_instances)
    registrations = CounterMetricFamily("cpn_registrations", "Registration requests by result (added, changed, "
                                        "refreshed, deleted, expired, unauthorized, error_<status>, ...)", labels=["result"])
    for name, n in sorted(st.stats.items()):
        if name.startswith("registration_"):
            registrations.add_metric([name.removeprefix("registration_")], n)
    yield registrations


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next whole request (any small body read and dropped), or None: closed, or too big."""
    request = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(16384))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_REQUEST_BODY:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return request
        else:
            return None


def _answer(metrics: Metrics, conn: h11.Connection, request: h11.Request) -> bytes:
    path = request.target.split(b"?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"method not allowed\n", b"text/plain"
    elif path != b"/metrics":
        status, body, ctype = 404, b"see /metrics\n", b"text/plain"
    else:
        status, body, ctype = 200, metrics.render(), CONTENT_TYPE
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method != b"HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def serve_metrics(metrics: Metrics, addr: Address, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer GET /metrics on ``addr`` (``metrics_listen``; its port as bound goes to ``task_status``); anything else 404/405."""
    listeners = await open_listeners("metrics_listen", addr.host, addr.port, str(addr))
    slots = SlotTable(MAX_CLIENTS, MAX_CLIENTS)

    async def client(stream: trio.SocketStream, slot: Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while slot.held:
                request = await read_reclaimable(slots, slot, READ_TIMEOUT_S, lambda: _read_request(conn, stream))
                if request is None or not slot.held:
                    break
                with trio.move_on_after(WRITE_TIMEOUT_S) as writing:
                    await stream.send_all(_answer(metrics, conn, request))
                if writing.cancelled_caught or conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            slots.release(slot)
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        def admit(stream: trio.SocketStream) -> None:
            admitted = admit_stream(slots, stream)
            if admitted is None:
                return
            source, adm = admitted
            for victim in adm.evicted:
                metrics.edge_event("metrics idle connections reclaimed",
                                   f"metrics: idle connection from {victim.source} closed for a new one")
            if adm.slot is None:
                metrics.edge_event("metrics connections refused",
                                   f"metrics: connection from {source} refused: {MAX_CLIENTS} connections busy")
                return
            nursery.start_soon(client, stream, adm.slot)

        for listener in listeners:
            nursery.start_soon(serve_accepting, listener, admit, metrics.edge_event, "metrics")
        task_status.started(listeners[0].socket.getsockname()[1])
