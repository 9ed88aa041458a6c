"""Where one idle request's wall time goes, process by process: a timeline from the processes' own system calls.

    python bench/timeline.py [--path "1 hop"] [--requests 300]

Starts bench/dataplane.py's rig (the instance, gateways a - b - c, the floor chain), warms the
path, then sends ``--requests`` requests one at a time over one keep-alive connection while
``perf trace`` records the data reads and writes of every process on it (this client, the
gateways or floor proxies, the instance) and ``perf sched`` which CPU ran whom. A request is
the run of reads and writes from the client's write to its read of the answer; the commonest
such run is reported step by step (median µs): a process's read to its next write is its own
work on the way (e.g. "b read -> b write": the ingress from the user's request to its tunnel
write), a write to another process's read is the hand-over (its wake-up included). ``perf
trace`` adds a few µs to every system call, so compare paths within one run. The scheduler
part says on how many CPUs the path ran: on one (this shared 2-core machine, often), a
process woken by another runs only once that one sleeps, so every process's whole CPU per
request, after its write too, is on the request's path.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataplane import CPND, FLOORS, Rig, Sequential  # noqa: E402

_LINE = re.compile(r"^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+) (recvfrom|read|write|sendto|writev)\(.*?= (-?\d+)")
_SCHED = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+\S+\[(\d+)\]")


def _perf(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["perf", *args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def record(path: str, n: int, workdir: Path) -> tuple[dict[int, str], Path, Path]:
    """Run ``n`` idle requests on ``path`` under perf trace and perf sched; (pid -> name, the two recordings)."""
    with Rig({}, with_peers=False) as rig:
        client = Sequential(*rig.targets[path])
        client.run(300)  # warm
        names = {os.getpid(): "client", rig.instance_pid: "instance"}
        for role, pid in rig.roles[path]:  # "ingress (b)" -> "b", "proxy 1 of 2" -> "p1"
            names[pid] = role.rsplit("(", 1)[1].rstrip(")") if "(" in role else "p" + role.split()[1]
        pids = ",".join(map(str, names))
        trace, sched = workdir / "trace.txt", workdir / "sched.data"
        tracer = _perf(["trace", "-T", "-p", pids, "-e", "recvfrom,read,write,sendto,writev"], trace)
        scheduler = _perf(["sched", "record", "-a"], sched)
        time.sleep(1.5)  # both attached
        client.run(n)
        time.sleep(0.2)
        for p in (tracer, scheduler):
            p.send_signal(signal.SIGINT)
            p.wait(timeout=60)
        client.close()
    return names, trace, sched


def steps(names: dict[int, str], trace: Path) -> tuple[int, int, list[tuple[str, float]], float]:
    """(requests, requests of the commonest run, [(step, median µs)], median total µs)."""
    events = []
    for line in trace.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m or int(m.group(6)) <= 0 or int(m.group(4)) not in names:
            continue
        write = m.group(5) in ("write", "sendto", "writev")  # each counts from its start: a read cannot start
        events.append((float(m.group(1)), names[int(m.group(4))], "write" if write else "read"))  # before its write
    events.sort()
    runs: list[list[tuple[float, str]]] = []
    for at, who, what in events:
        if who == "client" and what == "write":
            runs.append([])
        if runs:
            label = f"{who} {what}"
            if not runs[-1] or runs[-1][-1][1] != label:  # a read in pieces is one read
                runs[-1].append((at, label))
    shapes = collections.Counter(tuple(label for _, label in r) for r in runs)
    if not shapes:
        return 0, 0, [], 0.0
    shape, count = shapes.most_common(1)[0]
    same = [r for r in runs if tuple(label for _, label in r) == shape]
    out = [(f"{shape[i]} -> {shape[i + 1]}", statistics.median((r[i + 1][0] - r[i][0]) * 1000 for r in same))
           for i in range(len(shape) - 1)]
    return len(runs), count, out, statistics.median((r[-1][0] - r[0][0]) * 1000 for r in same)


def cpus(names: dict[int, str], sched: Path) -> dict[str, collections.Counter[int]]:
    """Which CPUs each process was switched out of (one line per switch in perf sched timehist)."""
    text = subprocess.run(["perf", "sched", "timehist", "-i", str(sched)], capture_output=True, text=True).stdout
    seen: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        m = _SCHED.match(line)
        if m and int(m.group(3)) in names:
            seen[names[int(m.group(3))]][int(m.group(2))] += 1
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="1 hop", choices=("direct", *FLOORS, *CPND))
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpn-timeline-") as tmp:
        names, trace, sched = record(args.path, args.requests, Path(tmp))
        total, count, rows, whole = steps(names, trace)
        where = cpus(names, sched)
    print(f"{args.path}: {total} requests, {count} in the commonest run of reads and writes; median µs per step")
    for step, us in rows:
        print(f"  {step:<40} {us:8.1f}")
    print(f"  {'client write -> client read':<40} {whole:8.1f}")
    for who, c in sorted(where.items()):
        print(f"  {who}: switched out on CPU " + ", ".join(f"{cpu} x{k}" for cpu, k in sorted(c.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
