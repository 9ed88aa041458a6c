"""Workers' shares of the gateway's bounds and their reports to the control process (sans-IO)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import msgpack
import pytest

from cpnd.config import load_config
from cpnd.crypto import generate_key, write_private_key
from cpnd.fleet import InstanceLoad, Report, WorkerState, hold_predecessors_share, loads, worker_config
from cpnd.histogram import LATENCY_BUCKETS, LatencyHistogram
from cpnd.load import InstanceMeter

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
[gateway]
id = "gw1"
listen = "127.0.0.1:7101"
http_listen = "127.0.0.1:8101"
control_socket = "gw1.sock"
key_file = "gw1.key"
max_http_clients = 101
workers = 2

[[services]]
path = "/yolo"
[[services.instances]]
id = "s1"
url = "http://127.0.0.1:9001/v1"
capacity = 25
max_inflight = 3
[[services.instances]]
id = "s2"
url = "http://127.0.0.1:9002/v1"
capacity = 10
max_inflight = 1

[[clients]]
id = "alice"
api_key_sha256 = "{digest}"
rate = 9
burst = 1
"""


def test_every_bound_is_split_so_the_shares_never_add_up_to_more(tmp_path) -> None:
    write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    (tmp_path / "gw1.toml").write_text(CONFIG.format(digest="ab" * 32))
    config = load_config(tmp_path / "gw1.toml")
    assert worker_config(config, 1) is config
    w = worker_config(config, 2)
    s1, s2 = w.services[0].instances
    assert (s1.capacity, s1.max_inflight) == (12.5, 1)  # 2 x 1 <= 3
    assert (s2.capacity, s2.max_inflight) == (5.0, 1)  # a bound below N: 1 each (README, "workers")
    assert (w.clients[0].rate, w.clients[0].burst) == (4.5, 1.0)
    assert w.gateway.max_http_clients == 50 and w.gateway.id == "gw1"


def test_auto_is_one_worker_per_core(tmp_path) -> None:
    write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    (tmp_path / "gw1.toml").write_text(CONFIG.format(digest="ab" * 32).replace("workers = 2", 'workers = "auto"'))
    assert load_config(tmp_path / "gw1.toml").gateway.workers == min(64, os.cpu_count() or 1)
    (tmp_path / "gw1.toml").write_text(CONFIG.format(digest="ab" * 32).replace("workers = 2\n", ""))
    assert load_config(tmp_path / "gw1.toml").gateway.workers == 1


def test_a_report_survives_the_pipe_and_garbage_is_refused() -> None:
    r = Report(pid=7, clients=2, inflight=1, stats={"requests": 5}, requests={("/yolo", "s1", 200): 4, ("/x", "", 404): 1},
               loads={"s1": InstanceLoad(3, 1, 1, 900.0)}, sends={("/yolo", "gw2", "s2"): 12})
    assert Report.decode(msgpack.unpackb(r.encode(), strict_map_key=False)) == r
    for bad in (None, {}, {"pid": 1}, {**msgpack.unpackb(r.encode()), "loads": {"s1": [-1, 0, 0, 0.0]}}):
        with pytest.raises(ValueError):
            Report.decode(bad)


def test_counts_of_a_replaced_worker_are_kept_and_loads_add_up() -> None:
    a, b = WorkerState(0), WorkerState(1)
    a.started(10, 0.0)
    a.report = Report(10, 1, 0, {"requests": 5}, {("/yolo", "s1", 200): 5}, {"s1": InstanceLoad(4, 2, 1, 800.0)})
    b.report = Report(11, 1, 0, {"requests": 2}, {("/yolo", "s1", 200): 2}, {"s1": InstanceLoad(3, 0, 2, 700.0)})
    assert loads([a, b], "s1") == (7, 2, 3, 700.0) and loads([a, b], "s9") == (0, 0, 0, None)
    a.ended()
    assert a.pid is None and a.stats()["requests"] == 5 and loads([a, b], "s1") == (3, 0, 2, 700.0)
    a.report = Report(12, 0, 0, {"requests": 1}, {("/yolo", "s1", 200): 1}, {})
    assert a.stats()["requests"] == 6 and a.requests()[("/yolo", "s1", 200)] == 6


def test_workers_latency_histograms_travel_in_reports_and_add_up_across_replacements() -> None:
    h = LatencyHistogram()
    for seconds in (0.0005, 0.001, 0.003, 20.0):  # on a bound counts in it (le); past the last: +Inf
        h.observe("/yolo", seconds)
    row = h.by_service["/yolo"]
    assert row[0] == 2 and row[LATENCY_BUCKETS.index(0.005)] == 1 and row[len(LATENCY_BUCKETS)] == 1
    assert row[-1] == pytest.approx(20.0045)
    r = Report(7, 0, 0, {}, {}, {}, latency=h.by_service)
    assert Report.decode(msgpack.unpackb(r.encode(), strict_map_key=False)) == r
    for bad in ({"/yolo": [1, 2]}, {"/yolo": []}, ["/yolo"]):
        with pytest.raises(ValueError):
            Report.decode({**msgpack.unpackb(r.encode()), "latency": bad})
    slot = WorkerState(0)
    slot.report = r
    slot.ended()  # its process is replaced: what it counted stays
    slot.report = Report(8, 0, 0, {}, {}, {}, latency={"/yolo": [1] + [0] * len(LATENCY_BUCKETS) + [0.0002]})
    assert slot.latencies()["/yolo"][0] == 3 and sum(slot.latencies()["/yolo"][:-1]) == 5


def test_a_replacement_starts_with_its_share_used_for_one_second() -> None:
    m = InstanceMeter(12.5, 1000, guard_s=0.1)
    hold_predecessors_share({"s1": m}, 100.0)
    assert m.admit(100.5, None) is not None  # whatever the dead worker admitted just before, nothing more
    assert m.admit(101.09, None) is not None  # its requests may have reached the instance up to the guard late
    assert m.admit(101.11, None) is None  # a second and the guard on: its own share again


def test_fleet_does_not_import_trio() -> None:
    tree = ast.parse((ROOT / "cpnd" / "fleet.py").read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "trio" not in imported and "socket" not in imported
