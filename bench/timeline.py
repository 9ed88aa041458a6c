"""Where one idle request's wall time goes, process by process: a timeline from the processes' own system calls.

    python bench/timeline.py [--path "1 hop"] [--requests 300]
    python bench/timeline.py --marks [--path "1 hop"] [--requests 400]   # the processes' own timestamps
    python bench/timeline.py --marks --path "2 hops" --points cpnd.seal:derive cpnd.seal:Opener.record   # finer

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

``--marks`` takes the processes' own timestamps instead (cpnd/probe.py's "timeline" window, no perf:
nothing is slowed but by the marks themselves, ~1 µs each): every read and write by descriptor
(named by the process at its other end), the loop's wake-ups, task steps by task name and the
returns of the functions ``probe.TIMELINE_POINTS`` names (the plan made, a record sealed, records
opened, a frame dispatched, the egress's task started, ...), with this client's own write and read.
The commonest sequence of them per request is reported step by step (median µs), then each process's
count per request of wake-ups, task steps, reads and writes within the request, and its tails: from
the end of each write to its next sleep or read (work after the bytes left, which the process they
went to waits for when both run on one CPU, as at idle here they mostly do).
"""

from __future__ import annotations

import argparse
import collections
import json
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

from dataplane import CPND, FLOORS, Probe, Rig, Sequential  # noqa: E402

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


def marks(path: str, n: int, workdir: Path, points: tuple[str, ...] = ()) -> dict[str, object]:
    """Run ``n`` idle requests on ``path`` with the processes' timeline windows open; the step table.
    ``points``: more functions to mark, as probe.TIMELINE_POINTS names them."""
    os.environ["CPN_PROBE"] = str(workdir)  # inherited by every cpnd and floor process the rig starts
    (workdir / "mode").write_text("timeline")
    (workdir / "points").write_text("\n".join(points))
    with Rig({}, with_peers=False) as rig:
        client = Sequential(*rig.targets[path])
        client.run(300)  # warm
        pids = [pid for _, pid in rig.roles[path]]
        names = {pid: role.rsplit("(", 1)[1].rstrip(")") if "(" in role else "p" + role.split()[1]
                 for role, pid in rig.roles[path]}
        probe = Probe(workdir)
        probe.start(pids)
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            client.one()
            times.append((t0, time.perf_counter_ns()))
        probe.read(pids)
        me = client.sock.getsockname()
        inst_port = rig.targets["direct"][1]
        client.close()
    dumps = {pid: json.loads((workdir / f"probe-{pid}.timeline").read_text()) for pid in pids}
    owner = {tuple(local): names[pid] for pid, d in dumps.items() for local, _ in d["fds"].values()}
    owner[tuple(me)] = "client"

    def peer(pid: int, fd: int) -> str:
        local_remote = dumps[pid]["fds"].get(str(fd))
        if local_remote is None:
            return "?"
        remote = tuple(local_remote[1])
        return "instance" if remote[1] == inst_port else owner.get(remote, f"{remote[1]}")

    events = []
    for pid, d in dumps.items():
        who = names[pid]
        for ev in d["events"]:
            at, what = ev[0], ev[1]
            if what == "sleep":
                label = f"{who} sleep"
            elif what == "write":
                label = f"{who} wrote"  # the write's end
            elif what in ("read", "write<"):
                if ev[3] <= 0:
                    continue
                label = f"{who} {what.rstrip('<')} {peer(pid, ev[2])}"  # a write from its start: the bytes leave in it
            elif what == "step":
                label = f"{who} step {ev[2]}"
            else:
                label = f"{who} {what.rsplit('.', 1)[-1] if what != 'woke' else 'woke'}"
            events.append((at, who, label))
    events.sort()
    runs, tails, counts = [], collections.defaultdict(list), collections.defaultdict(collections.Counter)
    raw: list[list[tuple[int, str, str]]] = []
    after_sleep: dict[str, list[int]] = collections.defaultdict(list)
    i = 0
    for t0, t1 in times:
        while i < len(events) and events[i][0] < t0:
            i += 1
        run = [(t0, "client write")]
        writing: dict[str, str] = {}
        last_to: dict[str, tuple[str, int]] = {}  # process -> (who wrote to it last, since when it slept)
        j = i
        while j < len(events) and events[j][0] <= t1:
            at, who, label = events[j]
            kind = label.split()[1]
            counts[who][kind] += 1
            if kind == "write":
                writing[who] = label.split()[2]
                last_to[label.split()[2]] = (who, 0)
            elif kind == "sleep":
                for to, (writer, _) in list(last_to.items()):
                    if writer == who:
                        last_to[to] = (writer, 1)
            elif kind == "woke" and who in last_to:
                # woken by a write: did the writer sleep first (one CPU: it waited for it)?
                writer, slept = last_to.pop(who)
                after_sleep[f"{writer} -> {who}"].append(slept)
            elif kind == "wrote" and who in writing:
                # the tail: from this write's end to the process's next sleep or read (the next
                # request's, if it came first): what runs after the bytes left, on its CPU
                k = j + 1
                while k < len(events) and not (events[k][1] == who and events[k][2].split()[1] in ("sleep", "read")):
                    k += 1
                if k < len(events):
                    tails[f"{who} after its write to {writing.pop(who)}"].append((events[k][0] - at) / 1000)
            if kind not in ("sleep", "wrote") and run[-1][1] != label:
                run.append((at, label))
            j += 1
        run.append((t1, "client read"))
        runs.append(run)
        raw.append(events[i:j + 40])
    shapes = collections.Counter(tuple(label for _, label in r) for r in runs)
    shape, count = shapes.most_common(1)[0]
    same = [r for r in runs if tuple(label for _, label in r) == shape]
    steps = [(f"{shape[k]} -> {shape[k + 1]}", statistics.median((r[k + 1][0] - r[k][0]) / 1000 for r in same))
             for k in range(len(shape) - 1)]
    return {"path": path, "requests": n, "commonest": count, "steps": steps,
            "segments": segments(path, runs) if path in SEGMENTS else [],
            "total_us": statistics.median((t1 - t0) / 1000 for t0, t1 in times),
            "per_request": {who: {k: round(v / n, 2) for k, v in sorted(c.items())} for who, c in counts.items()},
            "tail_us": {who: round(statistics.median(v), 1) for who, v in tails.items() if len(v) >= n // 10},
            "woke_after_sleep": {k: round(sum(v) / len(v), 2) for k, v in after_sleep.items() if len(v) >= n // 10},
            "raw": [[(round((at - r[0][0]) / 1000, 1), label) for at, _, label in r] for r in raw[::max(1, n // 8)]]}


# The named steps of one request, as the first stamp of each label after the one before (``--marks``);
# a hand-over is a write to the next process's read of it (its wake-up included). By path kind.
SEGMENTS = {
    "1 hop": [("the user's head read by the ingress (hand-over)", "b read client"),
              ("ingress: head parsed, plan made", "b plan"),
              ("ingress: the stream opened, its OPEN sealed", "b send_tunnel"),
              ("ingress: the request serialised and sealed, written", "b write c"),
              ("hand-over to the egress", "c read b"),
              ("egress: records opened", "c receive_data"),
              ("egress: OPEN dispatched, the stream handed to its task", "c handle"),
              ("egress: the reader's step ends, the stream's task runs", "c step stream"),
              ("egress: head parsed, admitted, the call set up, written", "c write instance"),
              ("the instance (write to its answer read)", "c read instance"),
              ("egress: the answer parsed, the LOAD sealed", "c send_tunnel"),
              ("egress: the response serialised and sealed, written", "c write b"),
              ("hand-over to the ingress", "b read c"),
              ("ingress: records opened", "b receive_data"),
              ("ingress: the reader's step ends, the user's task runs", "b step _client"),
              ("ingress: the answer parsed, the response written", "b write client"),
              ("hand-over to the client", "client read")],
    "floor x2": [("the user's head read by proxy 1 (hand-over)", "p1 read client"),
                 ("proxy 1: parsed, serialised, written", "p1 write p2"),
                 ("hand-over to proxy 2", "p2 read p1"),
                 ("proxy 2: parsed, serialised, written", "p2 write instance"),
                 ("the instance (write to its answer read)", "p2 read instance"),
                 ("proxy 2: the answer parsed, serialised, written", "p2 write p1"),
                 ("hand-over to proxy 1", "p1 read p2"),
                 ("proxy 1: the answer parsed, serialised, written", "p1 write client"),
                 ("hand-over to the client", "client read")],
}


def segments(path: str, runs: list[list[tuple[int, str]]]) -> list[tuple[str, float]]:
    """Median µs of each of ``SEGMENTS[path]`` over the requests in which every one was found in order."""
    steps = SEGMENTS[path]
    found: list[list[float]] = []
    for run in runs:
        at, i, deltas = run[0][0], 0, []
        for _, label in steps:
            while i < len(run) and run[i][1] != label:
                i += 1
            if i == len(run):
                break
            deltas.append((run[i][0] - at) / 1000)
            at = run[i][0]
        else:
            found.append(deltas)
    if not found:
        return []
    return [(name, statistics.median(d[k] for d in found)) for k, (name, _) in enumerate(steps)] + [
        (f"client write -> client read ({len(found)} of {len(runs)} requests)", statistics.median(sum(d) for d in found))]


def print_marks(r: dict[str, object]) -> None:
    print(f"{r['path']}: {r['requests']} requests, {r['commonest']} in the commonest sequence; median µs per step")
    for step, us in r["steps"]:  # type: ignore[attr-defined]
        print(f"  {step:<64} {us:8.1f}")
    print(f"  {'client write -> client read (all requests)':<64} {r['total_us']:8.1f}")
    if r["segments"]:
        print("  named steps, median µs:")
        for name, us in r["segments"]:  # type: ignore[attr-defined]
            print(f"  {name:<64} {us:8.1f}")
    for who, c in r["per_request"].items():  # type: ignore[attr-defined]
        print(f"  {who} per request: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print("  work after a write until the process sleeps or reads again (on one CPU, the next process waits for it), median µs: "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["tail_us"].items())))  # type: ignore[attr-defined]
    print("  hand-overs that woke a process only once its writer slept (on one CPU), share: "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["woke_after_sleep"].items())))  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="1 hop", choices=("direct", *FLOORS, *CPND))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--marks", action="store_true", help="the processes' own timestamps (cpnd/probe.py), not perf's")
    ap.add_argument("--raw", action="store_true", help="with --marks: a few requests' events as they came")
    ap.add_argument("--points", nargs="*", default=[], metavar="MODULE:QUALNAME",
                    help="with --marks: more functions to mark as they return ('<' after the name: a coroutine, as it starts)")
    args = ap.parse_args()
    if args.marks:
        with tempfile.TemporaryDirectory(prefix="cpn-marks-") as tmp:
            result = marks(args.path, args.requests, Path(tmp), tuple(args.points))
        print_marks(result)
        if args.raw:
            for r in result["raw"]:  # type: ignore[attr-defined]
                print("  ---\n" + "\n".join(f"  {at:9.1f} {label}" for at, label in r))
        return 0
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
