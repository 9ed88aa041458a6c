"""Hostile clients and peers against real gateways: what one party can cost everyone else.

Each attack runs against a target gateway ``t`` (with its own instance ``s1`` of ``/svc``, an honest
peer ``h`` hosting ``s2`` of ``/far``, and a black-hole instance of ``/sink`` that accepts and never
reads), while an honest client sends requests through ``t``. Per attack it reports the target's RSS
(before / peak / 30 s after), its descriptors, and the honest client's success rate and p99 beside a
baseline run; the other session's flaps. Attacks are bounded in count and time.

    .venv/bin/python bench/hostile.py [--attacks a,b] [--seconds 8] [--after 30]

The attack drivers are plain functions (tests/test_hostile.py runs them smaller).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpnd.lab import Instance, InstanceProcs, Lab, Link, Topology, add_outside_peer, write_lab  # noqa: E402
from interop.cases import LIMITS_CAPS  # noqa: E402
from interop.wire import KEEPALIVE, TUNNEL, UPDATE, Closed, Peer, label, load_key, new_route, pack, parse_pub  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------- the set-up


class BlackHole:
    """An instance that accepts connections and never reads a byte (a stuck backend)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                self.conns.append(c)
            except (TimeoutError, socket.timeout, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for c in self.conns:
            c.close()
        self.sock.close()


class Site:
    """Target ``t`` and honest peer ``h`` as real cpnd processes, an outside attacker peer ``x``."""

    def __init__(self, workdir: Path, opts: dict[str, Any] | None = None) -> None:
        self.insts = InstanceProcs()
        self.hole = BlackHole()
        ports = {"s1": self.insts.start("s1"), "s2": self.insts.start("s2")}
        urls = {"s1": f"http://127.0.0.1:{ports['s1']}/v1", "s2": f"http://127.0.0.1:{ports['s2']}/v1",
                "hole": f"http://127.0.0.1:{self.hole.port}/sink"}
        self.topo = Topology(("t", "h"), (Link("t", "h", 1),),
                             (Instance("s1", "t", "/svc", 1e6, 1, 0), Instance("hole", "t", "/sink", 1e6, 1, 0),
                              Instance("s2", "h", "/far", 1e6, 1, 0)),
                             {"hold_time_ms": 3000, "health_interval_ms": 0, **(opts or {})})
        self.specs = write_lab(self.topo, workdir, instance_url=lambda i: urls[i.id])
        self.key_path = workdir / "x.key"
        add_outside_peer(self.specs["t"], "x", self.key_path)
        self.lab = Lab(self.specs)
        try:
            self.lab.start_all()
            self.lab.wait_for(lambda: self.lab.converged(self.topo), 30, "convergence")
        except BaseException:  # no owner gets this site to close: its processes must not outlive the failure
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.lab.procs["t"].pid

    def attacker(self, **open_kw: Any) -> Peer:
        host, port = self.specs["t"].listen.rsplit(":", 1)
        p = Peer((host, int(port)), "t", parse_pub(self.specs["t"].public_key), "x", load_key(str(self.key_path)))
        p.open_session(**open_kw)
        return p

    def close(self) -> None:
        try:
            self.lab.stop_all()
        finally:
            self.insts.stop_all()
            self.hole.close()


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakRss:
    """The highest RSS of ``pid`` while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb(self.pid))


# ---------------------------------------------------------------- the attacks


def leaked_streams(site: Site, n: int) -> dict[str, Any]:
    """Item 1: HTTP/1.0 without Host, `Connection: host`, and bodies announced but never sent,
    to a service behind the other gateway and to the target's own."""
    host, port = site.specs["t"].http.rsplit(":", 1)
    raws = [b"GET /far HTTP/1.0\r\n\r\n", b"GET /far HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n",
            b"POST /far HTTP/1.0\r\nContent-Length: 10\r\n\r\n", b"POST /svc HTTP/1.0\r\nContent-Length: 10\r\n\r\n"]
    answered = 0
    for i in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        raw = raws[i % len(raws)]
        s.sendall(raw)
        if raw.startswith(b"GET"):
            answered += s.recv(64).startswith(b"HTTP/1.1 200")
        s.close()
    return {"requests": n, "get_answered_200": answered, "gets": sum(1 for i in range(n) if raws[i % 4].startswith(b"GET"))}


def _open_frame(sid: int, svc: str, origin: str, inst: str) -> bytes:
    ext = struct.pack(">BBBBIII16s", 1, 1, 8, 0, label(svc), 0xFFFFFFFF, 0xFFFFFFFF, os.urandom(16))
    ext += bytes([len(origin)]) + origin.encode() + bytes([len(inst)]) + inst.encode()
    return struct.pack(">IBB", sid, 1, 0) + ext


def tunnel_flood(site: Site, streams: int, seconds: float, *, honour_windows: bool = False) -> dict[str, Any]:
    """Item 2: an authenticated peer opens ``streams`` uploads to the black-hole instance and sends
    DATA as fast as it can for ``seconds``, ignoring every window (or keeping to them)."""
    p = site.attacker(caps=["route-refresh", "tunnel", "tunnel-large-data"], tw=[1 << 20, 1 << 30, 4096])
    head = b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n"
    sent, resets, refused = 0, 0, 0
    try:
        sids = [2 * i + 1 for i in range(streams)]
        for sid in sids:
            p.send_msg(_open_frame(sid, "/sink", "t", "hole"), ctype=TUNNEL)
            p.send_msg(struct.pack(">IBB", sid, 2, 0) + head, ctype=TUNNEL)
        credit = {sid: (p.target_tw or [1 << 20])[0] - len(head) for sid in sids}
        conn_credit = (p.target_tw or [0, 1 << 62])[1] - len(head) * streams
        live = set(sids)
        chunk = b"x" * 65000
        deadline = time.monotonic() + seconds
        last_ka = 0.0
        while time.monotonic() < deadline and live:
            for sid in list(live):
                n = len(chunk) if not honour_windows else min(len(chunk), credit[sid], conn_credit)
                if n <= 0:
                    continue
                p.send_msg(struct.pack(">IBB", sid, 2, 0) + chunk[:n], ctype=TUNNEL)
                credit[sid] -= n
                conn_credit -= n
                sent += n
            p.sock.settimeout(0.0005)
            try:
                while True:
                    ctype, payload = p.recv(0.0005)
                    if ctype != TUNNEL:
                        continue
                    sid, ftype, _ = struct.unpack(">IBB", payload[:6])
                    if ftype == 4 and sid in live:
                        live.discard(sid)
                        code = int.from_bytes(payload[6:8], "big")
                        resets += 1
                        refused += code == 10
                    elif ftype == 3 and sid == 0:
                        conn_credit += int.from_bytes(payload[6:10], "big")
                    elif ftype == 3 and sid in credit:
                        credit[sid] += int.from_bytes(payload[6:10], "big")
            except (TimeoutError, socket.timeout):
                pass
            finally:
                p.sock.settimeout(5)
            if time.monotonic() - last_ka > 0.5:
                p.send_msg({"t": 2, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
                last_ka = time.monotonic()
    finally:
        p.close()
    return {"streams": streams, "bytes_sent": sent, "streams_reset": resets, "refused_too_many": refused}


def route_flood(site: Site, routes: int) -> dict[str, Any]:
    """Item 3: a peer sends the target ``routes`` routes (its whole import limit, then one more)."""
    p = site.attacker(caps=LIMITS_CAPS, limits=(1_000_000, 1_000_000, 1_000_000))
    try:
        for start in range(0, routes, 300):  # 300 routes fit one record
            adv = [new_route(f"/x{n % 7}", f"i{n}", "x") for n in range(start, min(routes, start + 300))]
            p.send_msg({"t": UPDATE, "adv": adv, "wd": []})
        site.lab.wait_for(lambda: {q["id"]: q for q in site.lab.query("t", "show-peers")}["x"]["routes_received"] >= routes,
                          60, "the target to take the routes")
        h = {q["id"]: q for q in site.lab.query("h", "show-peers")}["t"]
        p.send_msg({"t": UPDATE, "adv": [new_route("/x0", "one-more", "x")], "wd": []})
        try:
            err = p.expect_error(10.0)
        except AssertionError:
            err = None
        return {"routes": routes, "h_received_from_t": h["routes_received"],
                "t_withheld_from_h": site.lab.query("t", "status")["routes_withheld"], "one_more": list(err[:2]) if err else None}
    finally:
        p.close()


def churn_flood(site: Site, seconds: float, keys: int = 250) -> dict[str, Any]:
    """Item 4: a peer advertises and withdraws ``keys`` routes as fast as the target reads, for ``seconds``."""
    p = site.attacker(caps=LIMITS_CAPS)
    up = pack({"t": UPDATE, "adv": [new_route(f"/x{n % 7}", f"c{n}", "x") for n in range(keys)], "wd": []})
    down = pack({"t": UPDATE, "adv": [], "wd": [[f"/x{n % 7}", "x", f"c{n}"] for n in range(keys)]})
    p.sock.settimeout(30)
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and sent < 10_000_000:
            p.send_msg(up if (sent // keys) % 2 == 0 else down)
            sent += keys
            if sent % (keys * 20) == 0:
                p.send_msg({"t": KEEPALIVE, "ts": int(time.monotonic() * 1e6), "echo": 0, "dly": 0})
        taken = {q["id"]: q for q in site.lab.query("t", "show-peers")}["x"]["route_entries_in"]
        return {"offered_entries": sent, "taken_entries": taken, "seconds": round(time.monotonic() - t0, 2)}
    except (OSError, Closed) as exc:
        return {"offered_entries": sent, "error": repr(exc)}
    finally:
        p.close()


def _hostport(hp: str) -> tuple[str, int]:
    host, port = hp.rsplit(":", 1)
    return host, int(port)


class Flood:
    """Holds ``per_source`` TCP connections from each of ``sources`` (127.0.0.x) to ``hostport``, each
    sending ``drip`` one byte every ``drip_s`` (nothing if empty), and opens a new one for each the
    server closes: what an attacker holding slots does. Bounded in count and time."""

    def __init__(self, hostport: str, sources: int, per_source: int, *, drip: bytes = b"", drip_s: float = 0.5) -> None:
        self.addr, self.drip, self.drip_s = _hostport(hostport), drip, drip_s
        self.sources = [f"127.0.0.{i}" for i in range(2, 2 + sources)]
        self.per_source = per_source
        self.sel = selectors.DefaultSelector()
        self.opened = self.closed_by_server = 0
        self.sent: dict[socket.socket, int] = {}

    def _open(self, source: str) -> None:
        try:
            s = socket.create_connection(self.addr, timeout=2, source_address=(source, 0))
        except OSError:
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, source)
        self.sent[s] = 0
        self.opened += 1

    def run(self, seconds: float) -> dict[str, int]:
        for source in self.sources:
            for _ in range(self.per_source):
                self._open(source)
        deadline, next_drip = time.monotonic() + seconds, 0.0
        while time.monotonic() < deadline and self.opened < 200_000:
            for key, _ in self.sel.select(0.05):
                sock = key.fileobj
                try:
                    if sock.recv(65536):  # an answer (a 408, a refusal): the close comes next
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.sel.unregister(sock)
                self.sent.pop(sock, None)
                sock.close()
                self.closed_by_server += 1
                self._open(key.data)
            if self.drip and time.monotonic() >= next_drip:
                next_drip = time.monotonic() + self.drip_s
                for sock in list(self.sent):
                    try:
                        sock.send(self.drip[self.sent[sock] % len(self.drip):][:1])
                        self.sent[sock] += 1
                    except OSError:
                        pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()
        return {"connections_opened": self.opened, "closed_by_target": self.closed_by_server}


def pipelining_flood(hostport: str, seconds: float) -> dict[str, int]:
    """One connection (from 127.0.0.9) pipelining requests the gateway answers without a wait of its own
    (404: no such service) as fast as it reads the answers, for ``seconds``: before users.QUICK_HEADS
    bounded it, it held the gateway's loop for every other user and its peering sessions."""
    s = socket.create_connection(_hostport(hostport), timeout=2, source_address=("127.0.0.9", 0))
    s.setblocking(False)
    burst, answers, deadline = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 64, 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                s.send(burst)
            try:
                while data := s.recv(1 << 16):
                    answers += data.count(b"HTTP/1.1 404")
                break  # closed by the gateway
            except BlockingIOError:
                time.sleep(0.0005)
    finally:
        s.close()
    return {"answers_404": answers}


def peer_logins(site: Site, tries: int) -> int:
    """Fresh sessions of the valid outside peer x that come up (each a full handshake and OPEN)."""
    up = 0
    for _ in range(tries):
        try:
            site.attacker().close()
            up += 1
        except (OSError, AssertionError, Closed):
            pass
    return up


def with_logins(flood: Flood, site: Site, seconds: float) -> dict[str, Any]:
    """Run ``flood`` for ``seconds`` in a thread while x logs in again and again from 127.0.0.1."""
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(flood.run(seconds)), daemon=True)
    t.start()
    time.sleep(min(1.0, seconds / 4))
    out["valid_peer_logins"] = f"{peer_logins(site, 18)}/18"
    t.join()
    return out


ATTACKS: dict[str, Callable[[Site, float], dict[str, Any]]] = {
    "leaked-streams": lambda site, s: leaked_streams(site, int(300 * s)),
    "tunnel-flood": lambda site, s: tunnel_flood(site, 1024, s),
    # items 5-7: slow heads, silent users beyond max_http_clients, silent peering connections
    "slow-loris": lambda site, s: Flood(site.specs["t"].http, 10, 50, drip=b"GET /svc HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 10000).run(s),
    "idle-users": lambda site, s: Flood(site.specs["t"].http, 10, 420).run(s),
    "preauth-flood": lambda site, s: with_logins(Flood(site.specs["t"].listen, 16, 64), site, s),
    "route-flood": lambda site, s: route_flood(site, 10_000),
    "churn-flood": lambda site, s: churn_flood(site, s),
    "pipelining-flood": lambda site, s: pipelining_flood(site.specs["t"].http, s),
}


# ---------------------------------------------------------------- the honest client and the run


def _honest_loop(url: str, stop: Any, ready: Any, out: Any) -> None:
    lat: list[float] = []
    ok = fail = 0
    with httpx.Client(base_url=url, timeout=5) as c:
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                good = c.post("/svc" if i % 2 else "/far", content=b"hello").status_code == 200
            except httpx.HTTPError:
                good = False
            lat.append(time.monotonic() - t0)
            ok += good
            fail += not good
            i += 1
            ready.set()
            time.sleep(0.01)
    out.put((lat, ok, fail))


class Honest:
    """Sequential requests through the target (keep-alive), its own and the other gateway's services,
    from a process of its own (the attacker's loops in this one must not slow its clock)."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop, self._ready, self._out = ctx.Event(), ctx.Event(), ctx.Queue()
        self._p = ctx.Process(target=_honest_loop, args=(url, self._stop, self._ready, self._out), daemon=True)
        self.lat: list[float] = []
        self.ok = self.fail = 0

    def __enter__(self) -> Honest:
        self._p.start()
        if not self._ready.wait(30):  # its first request answered: it is running
            self._p.kill()
            raise RuntimeError("the honest client did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.lat, self.ok, self.fail = self._out.get(timeout=30)
        self._p.join(10)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.lat) or [0.0]
        return {"requests": self.ok + self.fail, "success": round(self.ok / max(1, self.ok + self.fail), 4),
                "p50_ms": round(statistics.median(lat) * 1000, 2), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2)}


def run_one(name: str, seconds: float, after_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        site = Site(Path(d))
        try:
            flaps = lambda: {p["id"]: p for p in site.lab.query("t", "show-peers")}["h"]["flaps"]  # noqa: E731
            flaps0, rss0, fds0 = flaps(), rss_mb(site.pid), fds(site.pid)
            with PeakRss(site.pid) as peak, Honest(f"http://{site.specs['t'].http}") as honest:
                time.sleep(1.0)
                detail = ATTACKS[name](site, seconds) if name != "baseline" else {}
                fds_peak = fds(site.pid)
                time.sleep(1.0)
            deadline = time.monotonic() + after_s
            while time.monotonic() < deadline and rss_mb(site.pid) > rss0 + 16:
                time.sleep(0.5)
            status = site.lab.query("t", "status")
            return {"attack": name, "detail": detail, "rss_mb": {"before": round(rss0, 1), "peak": round(peak.peak, 1),
                    "after": round(rss_mb(site.pid), 1)}, "fds": {"before": fds0, "after_attack": fds_peak},
                    "tunnel_streams_after": status["tunnel_streams"], "other_session_flaps": flaps() - flaps0,
                    "honest": honest.summary()}
        finally:
            site.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--after", type=float, default=30.0, help="at most this long for RSS to come back")
    args = ap.parse_args()
    base = run_one("baseline", args.seconds, 0)
    rows = [base]
    for name in args.attacks.split(","):
        r = run_one(name, args.seconds, args.after)
        r["honest"]["p99_vs_baseline"] = round(r["honest"]["p99_ms"] / max(0.01, base["honest"]["p99_ms"]), 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| attack | RSS before / peak / after MB | fds before / after | streams after | flaps | honest success | p99 ms (x baseline) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m, h = r["rss_mb"], r["honest"]
        print(f"| {r['attack']} | {m['before']} / {m['peak']} / {m['after']} | {r['fds']['before']} / {r['fds']['after_attack']} "
              f"| {r['tunnel_streams_after']} | {r['other_session_flaps']} | {h['success']} | {h['p99_ms']} ({h.get('p99_vs_baseline', 1.0)}) |")


if __name__ == "__main__":
    main()
