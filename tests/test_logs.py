"""Structured logs with real processes: one JSON object per line, one line per session change and per error."""

from __future__ import annotations

import json
import signal

import httpx

from cpnd.lab import Instance, Lab, Link, Topology, write_lab


def test_json_logs_have_a_line_per_session_change_and_per_error(tmp_path) -> None:
    topo = Topology(("a", "b"), (Link("a", "b", 1),), (Instance("s", "b", "/svc"),),
                    {"hold_time_ms": 1500, "log_format": "json"})
    with Lab(write_lab(topo, tmp_path)) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.converged(topo), 20, "convergence")
        r = httpx.get(f"http://{lab.specs['a'].http}/nowhere", timeout=10)
        assert r.status_code == 404
        r = httpx.get(f"http://{lab.specs['a'].http}/svc", headers={"CPN-Max-Latency": "soon"}, timeout=10)
        assert r.status_code == 400
        assert lab.stop("b", signal.SIGINT) == 0

        def lines() -> list[dict]:
            return [json.loads(ln) for ln in lab.log("a").splitlines() if ln.strip()]  # every line is JSON

        lab.wait_for(lambda: any(x.get("event") == "peer_down" for x in lines()), 5, "a to log b going")
        events = lines()
        assert all({"ts", "level", "logger", "msg"} <= set(x) for x in events)
        up = [x for x in events if x.get("event") == "peer_up"]
        down = [x for x in events if x.get("event") == "peer_down"]
        # One line per change: as many downs as ups, all b's (a busy box may flap a start-up session
        # once: then two of each), the last down b's NOTIFICATION as it stopped.
        assert {x["peer"] for x in up + down} == {"b"} and len(up) == len(down) >= 1, (up, down)
        assert (down[-1]["reason"], down[-1]["code"], down[-1]["subcode"]) == ("peer-notification", 6, 2)
        errors = [x for x in events if x.get("event") == "http_error"]
        assert [(x["status"], x["error"], x["target"]) for x in errors] == [
            (404, "no_such_service", "/nowhere"), (400, "bad_header", "/svc")], errors
