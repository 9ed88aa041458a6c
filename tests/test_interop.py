"""The interop suite (a second implementation, from protocol-spec/ alone) against a real cpnd."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab
from interop.cases import Target, advertised_routes
from interop.fuzz import alive
from interop.wire import load_key, parse_pub

ROOT = Path(__file__).resolve().parent.parent


def test_interop_never_imports_cpnd() -> None:
    for path in (ROOT / "interop").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not any(m == "cpnd" or m.startswith("cpnd.") for m in names), path


def test_suite_and_fuzzing_pass_and_leave_other_sessions_alone(tmp_path) -> None:
    # The target's id is greater than the suite's ("z" > "interop"): when a case logged in while the
    # target still held the previous case's session, the old collision rule kept the old one and cases
    # failed with 6/7 in most runs. Now a new connection from the same dialler replaces the old one, and
    # a closed one takes no part (session.md, "Collisions").
    a = "z"
    insts = InstanceProcs()
    try:
        urls = {"s1": f"http://127.0.0.1:{insts.start('s1')}/v1"}
        topo = Topology((a, "b"), (Link(a, "b", 1),), (Instance("s1", "b", "/yolo", 50, 1, 1),),
                        {"hold_time_ms": 3000})
        specs = write_lab(topo, tmp_path, instance_url=lambda i: urls[i.id])
        add_outside_peer(specs[a], "interop", tmp_path / "interop.key")
        with Lab(specs) as lab:
            lab.start_all()
            lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
            before = {p["id"]: p for p in lab.query(a, "show-peers")}["b"]
            r = subprocess.run(
                [sys.executable, "-m", "interop", "--target", specs[a].listen, "--target-pubkey", specs[a].public_key,
                 "--key", str(tmp_path / "interop.key"), "--id", "interop", "--http", specs[a].http,
                 "--fuzz", "300", "--seed", "3", "--json"],
                cwd=ROOT, capture_output=True, text=True, timeout=300)
            lines = r.stdout.strip().splitlines()
            results = [json.loads(ln) for ln in lines[:-1]]
            failed = [x for x in results if not x["passed"]]
            assert r.returncode == 0 and not failed, failed or r.stderr
            assert lines[-1] == f"{len(results)} passed, 0 failed"
            assert not [x["case"] for x in results if x.get("skipped")]  # this target offers every case something
            assert any(x["case"].startswith("fuzz-batch") for x in results)
            after = {p["id"]: p for p in lab.query(a, "show-peers")}["b"]
            assert after["state"] == "established" and after["flaps"] == 0
            assert after["uptime_s"] > before["uptime_s"]
            assert not lab.dead() and "Traceback" not in lab.log(a)
            # The liveness check sees the target's other sessions: with b gone, s1's route goes too.
            host, port = specs[a].listen.rsplit(":", 1)
            target = Target((host, int(port)), parse_pub(specs[a].public_key), "interop",
                            load_key(str(tmp_path / "interop.key")), specs[a].http)
            routes = advertised_routes(target)
            assert ("/yolo", "b", "s1") in routes
            assert alive(target, routes) is None
            lab.procs["b"].kill()
            lab.procs.pop("b").wait()
            lab.wait_for(lambda: not lab.routes(a), 10, "b's routes to leave the target")
            why = alive(target, routes)
            assert why is not None and "('/yolo', 'b', 's1')" in why, why
    finally:
        insts.stop_all()
