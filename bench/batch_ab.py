"""Batch records on and off in one run: the same tree's gateways with ``tunnel_batch`` true and false.

    python bench/batch_ab.py [--rounds 9] [--requests 400] [--off-first]
    python bench/batch_ab.py --sessions [--requests 20000]

Two labs a - b - c side by side (one instance behind both c's: nginx when installed, as in
bench/dataplane.py), one with `tunnel-batch` agreed on every session and one without; nothing else
differs. Each round sends, in alternating order, ``--requests`` sequential GETs over one keep-alive
connection through one hop (b -> c) and two (a -> b -> c) of each lab, and the instance directly:
both labs see the same minutes of the machine, so what the box's other load does to one it does to
the other. Reported: medians over rounds of the added p50 (against direct in the same round), and of
the CPU time the path's gateways ran per request (/proc/PID/schedstat), each with its difference,
off minus on (µs), and the rounds on which "on" was the faster or the cheaper.

``--sessions``: the sessions' own part alone, in process (no sockets, warm caches): two ``Session``
cores established over a fake link, a request's four frames (OPEN and DATA one way, LOAD and DATA
back) sealed, read and split ``--requests`` times, with and without `tunnel-batch`: µs a request and hop.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpnd.lab import Instance, Lab, Link, Topology, write_lab  # noqa: E402
from dataplane import Sequential, machine_load, pct, start_peer  # noqa: E402


def lab(stack: contextlib.ExitStack, port: int, batch: bool) -> tuple[dict[str, tuple[str, int, str]], dict[str, list[int]]]:
    """The lab's two paths (host, port, path) and the pids of the gateways on each."""
    topo = Topology(("a", "b", "c"), (Link("a", "b"), Link("b", "c")), (Instance("s1", "c", "/svc", 1e6, 1, 0),),
                    {"log_level": "warning", "tunnel_batch": batch})
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cpn-batch-")))
    specs = write_lab(topo, tmp, instance_url=lambda i: f"http://127.0.0.1:{port}/v1")
    running = stack.enter_context(Lab(specs, log_level="warning"))
    running.start_all()
    running.wait_for(lambda: running.converged(topo), 30, "convergence")
    tag = "on" if batch else "off"
    pid = {gw: running.procs[gw].pid for gw in "abc"}
    return ({f"1 hop {tag}": (*_hp(specs["b"].http), "/svc"), f"2 hops {tag}": (*_hp(specs["a"].http), "/svc")},
            {f"1 hop {tag}": [pid["b"], pid["c"]], f"2 hops {tag}": [pid["a"], pid["b"], pid["c"]]})


def cpu_ns(pids: list[int]) -> int:
    """CPU time the processes have run, ns (schedstat: exact, unlike the 10 ms ticks of stat)."""
    return sum(int(Path(f"/proc/{p}/schedstat").read_text().split()[0]) for p in pids)


def _hp(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def sessions(n: int) -> None:
    from cpnd.crypto import Role, generate_key
    from cpnd.session import DEFAULT_CAPS, Session, SessionConfig
    from cpnd.tunnel import FLAG_END, TUNNEL_BATCH_CAP, ExtHeader, FrameType, encode_frame, load_payload

    keys = {g: generate_key() for g in "ab"}
    ext = ExtHeader(7, "c", "s1", bytes(16))
    frames = [encode_frame(1, FrameType.OPEN, ext.encode()), encode_frame(1, FrameType.DATA, b"GET /svc HTTP/1.1\r\n\r\n", FLAG_END),
              encode_frame(1, FrameType.LOAD, load_payload(0.2, 0.1, 1000, 100, timed=True)),
              encode_frame(1, FrameType.DATA, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", FLAG_END)]

    def run(caps: tuple[str, ...]) -> float:
        cfg = SessionConfig(caps=caps)
        a = Session(Role.INITIATOR, "a", keys["a"], {"b": keys["b"].public_key()}, 0.0, expected_peer="b", config=cfg)
        b = Session(Role.RESPONDER, "b", keys["b"], {"a": keys["a"].public_key()}, 0.0, config=cfg)
        while a.has_data_to_send() or b.has_data_to_send():
            for x, y in ((a, b), (b, a)):
                if x.has_data_to_send():
                    y.receive_data(x.data_to_send(), 0.0)
        a.tunnel_direct = b.tunnel_direct = True
        t0 = time.perf_counter()
        for _ in range(n):
            b.receive_data(a.tunnel_record(frames[0], True) + a.tunnel_record(frames[1]), 0.0)
            a.receive_data(b.tunnel_record(frames[2], True) + b.tunnel_record(frames[3]), 0.0)
            a.tunnel_in.clear()
            b.tunnel_in.clear()
        return (time.perf_counter() - t0) / n * 1e6

    for _ in range(3):
        on, off = run(DEFAULT_CAPS), run(tuple(c for c in DEFAULT_CAPS if c != TUNNEL_BATCH_CAP))
        print(f"a request and hop, both ends: with tunnel-batch {on:.1f} µs, without {off:.1f} µs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--off-first", action="store_true", help="start the lab without batches first (the labs' order "
                    "moves their figures by more than batches do: run both orders)")
    ap.add_argument("--sessions", action="store_true", help="only the sessions' own part, in process")
    args = ap.parse_args()
    if args.sessions:
        sessions(args.requests if args.requests != 400 else 20000)
        return 0
    with contextlib.ExitStack() as stack:
        inst_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cpn-batch-instance-")))
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if nginx:
            proc, port = start_peer("instance", nginx, inst_dir, 0)
        else:
            proc = subprocess.Popen([sys.executable, "-m", "cpnd.simulate", "--id", "s1"], stdout=subprocess.PIPE, text=True)
            port = int(proc.stdout.readline().rsplit(":", 1)[1])  # type: ignore[union-attr]
        stack.callback(lambda: (proc.kill(), proc.wait()))
        if args.off_first:
            (off, off_pids), (on, on_pids) = lab(stack, port, False), lab(stack, port, True)
        else:
            (on, on_pids), (off, off_pids) = lab(stack, port, True), lab(stack, port, False)
        targets, pids = {"direct": ("127.0.0.1", port, "/v1"), **on, **off}, {"direct": [], **on_pids, **off_pids}
        clients = {k: stack.enter_context(contextlib.closing(Sequential(*t))) for k, t in targets.items()}
        for c in clients.values():
            c.run(50)
        added: dict[str, list[float]] = {k: [] for k in targets}
        cpu: dict[str, list[float]] = {k: [] for k in targets}
        names = list(targets)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            p50 = {}
            for k in order:
                before = cpu_ns(pids[k])
                p50[k] = pct(clients[k].run(args.requests), 50) * 1000  # µs
                cpu[k].append((cpu_ns(pids[k]) - before) / args.requests / 1000)
            for k in names:
                added[k].append(p50[k] - p50["direct"])
            print(f"round {rnd}: " + ", ".join(f"{k} {p50[k]:.0f}" for k in names) + f" µs p50; {machine_load()}", flush=True)
    print("\n| path | added p50 on (µs) | off | off - on, median of rounds | rounds on faster | gateways' CPU µs a "
          "request, on | off | off - on, median of rounds | rounds on cheaper |\n|---|---|---|---|---|---|---|---|---|")
    for path in ("1 hop", "2 hops"):
        row = []
        for what in (added, cpu):
            a, b = what[f"{path} on"], what[f"{path} off"]
            diff = [y - x for x, y in zip(a, b)]
            row += [f"{statistics.median(a):.0f}", f"{statistics.median(b):.0f}", f"{statistics.median(diff):.0f}",
                    f"{sum(d > 0 for d in diff)} of {len(diff)}"]
        print(f"| {path} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
