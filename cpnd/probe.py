"""Event-loop counters for the data-plane benches, off unless ``CPN_PROBE`` names a directory.

    CPN_PROBE=/tmp/probe cpnd --config gw.toml
    kill -USR1 PID   # start a window: what /tmp/probe/mode says (count, the default; profile; calls; opcodes; quiet)
    kill -USR2 PID   # end it: write /tmp/probe/probe-PID.json (and .prof, .calls or .opcodes after those modes)

Counts trio's scheduler batches, the batches that slept in epoll (wake-ups), task steps
and spawns, and the time of task steps by task name (wall time: ``perf_counter`` costs no
system call, where a CPU clock would cost two per step). In a "profile" window cProfile runs
instead, in a "calls" one every function call is counted by the stack it came from (exact and
load-independent, unlike any timing here), in an "opcodes" one every bytecode instruction by
function (exact too: what each call does, which the call counts hide), in a "quiet" one nothing (for py-spy, outside), in a "timeline" one a timestamp
(``perf_counter_ns``, one clock for every process on the machine) at each step of a request's way
through the process (``Timeline``: its reads and writes by descriptor, its wake-ups, task steps and
the functions ``TIMELINE_POINTS`` names, and those the directory's ``points`` file adds), into a ring buffer written as ``probe-PID.timeline``: the
counters are off the loop then, so that a profile shows cpnd, not the probe. Off (the default), ``instruments()``
is empty and nothing else runs: the event loop is not touched.
"""

from __future__ import annotations

import cProfile
import collections
import functools
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio._socket  # (its socket class's recv and send are what a timeline window patches)

ENV_DIR = "CPN_PROBE"
MODE_FILE = "mode"  # in the directory: what the next window does (count, profile, calls, opcodes, timeline or quiet)
# What a "timeline" window marks besides reads, writes, wake-ups and task steps: "module:Class.method",
# each marked as it returns (a coroutine: as it starts, "<" after the name). Looked up by name when the
# window starts (a process without one, e.g. a floor proxy, skips it), put back when it ends.
TIMELINE_POINTS = ("cpnd.users:Users._request<", "cpnd.planner:Planner.plan", "cpnd.attempts:Attempts._attempt<",
                   "cpnd.attempts:rewrite_headers", "cpnd.egress:rewrite_headers", "cpnd.streams:Mux.open", "cpnd.gateway:Gateway.send_tunnel",
                   "cpnd.gateway:Gateway.receive_data", "cpnd.streams:Mux.handle", "cpnd.egress:Egress.serve<",
                   "cpnd.egress:Egress._head<", "cpnd.egress:Egress.admit", "cpnd.egress:Egress.call<",
                   "cpnd.egress:Egress._kept", "cpnd.egress:_Upload.run<", "cpnd.egress:relay_response<", "cpnd.attempts:relay_response<",
                   "cpnd.attempts:Attempts._relay<", "cpnd.streams:TunnelStream.receive")
TIMELINE_EVENTS = 1 << 18  # the ring buffer: the newest this many events
POINTS_FILE = "points"  # in the directory: more points for a "timeline" window, one a line (finer marks)


class LoopCounter(trio.abc.Instrument):
    """Counts what the scheduler does between two resets; the time of steps by task name."""

    def __init__(self) -> None:
        self._step_started = self._gc_started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.batches = 0  # io waits: one per scheduler batch (an epoll_wait call)
        self.sleeps = 0  # io waits with a timeout: the loop had nothing to run and blocked (a wake-up)
        self.steps = 0
        self.spawned = 0
        self.scheduled = 0
        self.step_s: collections.Counter[str] = collections.Counter()
        self.step_count: collections.Counter[str] = collections.Counter()
        self.gc_runs = [0, 0, 0]  # collections by generation, and the time they took
        self.gc_s = [0.0, 0.0, 0.0]
        self.since = time.monotonic()
        # _step_started is left alone: a reset comes from a signal handler, inside a task step.

    def before_io_wait(self, timeout: float) -> None:
        self.batches += 1
        if timeout > 0:
            self.sleeps += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.scheduled += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self._step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        name = task.name.rsplit(".", 1)[-1]
        self.step_s[name] += time.perf_counter() - self._step_started
        self.step_count[name] += 1

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry: the cyclic collector's runs by generation, and their time."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            gen = info["generation"]
            self.gc_runs[gen] += 1
            self.gc_s[gen] += time.perf_counter() - self._gc_started

    def snapshot(self) -> dict[str, Any]:
        return {"seconds": time.monotonic() - self.since, "batches": self.batches, "sleeps": self.sleeps,
                "steps": self.steps, "spawned": self.spawned, "scheduled": self.scheduled,
                "step_s": dict(self.step_s), "step_count": dict(self.step_count),
                "gc_runs": list(self.gc_runs), "gc_s": list(self.gc_s)}


class CallCounter:
    """Every Python and C function call, counted by the Python stack it was made from (a
    ``sys.setprofile`` hook: exact counts, for a run of its own, since it slows every call)."""

    def __init__(self) -> None:
        self.stacks: collections.Counter[tuple[Any, ...]] = collections.Counter()

    def __call__(self, frame: Any, event: str, arg: object) -> None:
        if event == "call" or event == "c_call":
            codes = []
            while frame is not None:
                codes.append(frame.f_code)
                frame = frame.f_back
            self.stacks[tuple(codes)] += 1

    def dump(self, path: Path) -> None:
        """py-spy's raw format: the stack outermost first, ``;``-separated, then the count."""
        lines = [";".join(_frame_name(c) for c in reversed(codes)) + f" {n}" for codes, n in self.stacks.items()]
        path.write_text("\n".join(lines) + "\n")


def _frame_name(code: Any) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "/cpnd/", "/bench/"):
        if marker in path:
            path = (marker.strip("/") + "/" if marker != "site-packages/" else "") + path.split(marker, 1)[1]
            break
    return f"{code.co_qualname} ({path}:{code.co_firstlineno})"


# The phases of one request at one process, for requests one at a time (OpcodeCounter): from the
# read that brings it from downstream ("in"), from its write upstream ("wait": the upstream has it),
# from the read that brings the answer back ("out"), from the write of the answer downstream
# ("after": until the next request's read). "in" and "out" are the request's critical path; what
# runs in "after" is on the next request's as well when it comes before that work is done.
PHASES = ("idle", "in", "wait", "out", "after")


class OpcodeCounter:
    """Every bytecode instruction executed, counted by the function (code object) it ran in
    (``sys.settrace`` with opcode events: exact and load-independent, far slower than calls;
    what a call costs differs from function to function, and this counts what the calls hide);
    and by the phase of the request it ran in (PHASES), told apart by the socket reads and writes
    that return data (``_io_sites``: the descriptor each names)."""

    def __init__(self) -> None:
        self.ops: collections.Counter[Any] = collections.Counter()  # (phase, code): bytecodes
        self.phase = "idle"
        self.phase_s: collections.Counter[str] = collections.Counter()
        self._since = time.perf_counter()
        self._down: int | None = None  # the descriptor the request came on
        self._up: int | None = None  # the one it went out on
        self._sites = _io_sites()

    def __call__(self, frame: Any, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: Any, event: str, arg: object) -> Any:
        if event == "opcode":
            self.ops[(self.phase, frame.f_code)] += 1
        elif event == "return" and frame.f_code in self._sites:
            kind, fd_of = self._sites[frame.f_code]
            fd = fd_of(frame, arg)
            if fd is not None:
                self._io(kind, fd)
        return self._local

    def _io(self, kind: str, fd: int) -> None:
        """A read (``kind`` "r") or write ("w") on ``fd`` moved data: the phase that follows."""
        phase = self.phase
        if kind == "r":
            if phase in ("idle", "after") and (fd == self._down or fd != self._up):
                self._enter("in")
                self._down = fd
            elif phase == "wait" and fd == self._up:
                self._enter("out")
        elif phase == "in" and fd != self._down:
            self._enter("wait")
            self._up = fd
        elif phase in ("in", "wait", "out") and fd == self._down:
            self._enter("after")

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.phase_s[self.phase] += now - self._since
        self._since = now
        self.phase = phase

    def dump(self, path: Path) -> None:
        """One line a function, as a one-frame stack in py-spy's raw format, then its count; by phase
        in ``PATH.phases`` (JSON: each phase's seconds and bytecodes by function)."""
        self._enter(self.phase)
        total: collections.Counter[Any] = collections.Counter()
        phases: dict[str, dict[str, int]] = {}
        for (phase, code), n in self.ops.items():
            total[code] += n
            by = phases.setdefault(phase, {})
            name = _frame_name(code)
            by[name] = by.get(name, 0) + n
        path.write_text("".join(f"{_frame_name(c)} {n}\n" for c, n in total.items()))
        path.with_name(path.name + ".phases").write_text(json.dumps({"seconds": dict(self.phase_s), "ops": phases}))


def _io_sites() -> dict[Any, tuple[str, Any]]:
    """The functions whose return says a socket read ("r") or write ("w") moved data, by code object:
    each with how to tell the descriptor from its frame and return value (None: nothing moved, or
    a coroutine suspended, whose return event carries trio's trap, not the function's result)."""
    from . import daemon, h1  # (cpnd's own: after the probe module, which the daemon's main imports first)

    def sock_fd(frame: Any) -> int | None:
        sock = frame.f_locals.get("sock")
        return None if sock is None else sock.fileno()

    def stream_fd(frame: Any) -> int:
        return frame.f_locals["self"].socket.fileno()

    return {
        h1.H11Stream.receive_nowait.__code__: ("r", lambda f, a: sock_fd(f) if a is True else None),
        h1.H11Stream._write.__code__: ("w", lambda f, a: sock_fd(f) if a is None else None),
        daemon.Connection._read.__code__: ("r", lambda f, a: f.f_locals["fd"] if isinstance(a, bytes) and a else None),
        daemon.Connection.send_tunnel.__code__: ("w", lambda f, a: f.f_locals["self"]._fd if "n" in f.f_locals else None),
        daemon.Connection.flush.__code__: ("w", lambda f, a: f.f_locals["self"]._fd if "n" in f.f_locals else None),
        trio.SocketStream.receive_some.__code__: ("r", lambda f, a: stream_fd(f) if isinstance(a, bytes) and a else None),
        trio.SocketStream.send_all.__code__: ("w", lambda f, a: stream_fd(f) if a is None else None),
    }


class Timeline(trio.abc.Instrument):
    """Timestamps of what a process does on a request's way, while a "timeline" window is open:
    every ``os.read``/``os.write`` and trio socket ``recv``/``send`` (descriptor, bytes), the loop's
    wake-ups (an io wait that slept, and when it ended), task steps (by task name) and the returns
    of ``TIMELINE_POINTS``; as (ns, what, detail) in a ring buffer. Installed by patching those
    functions when the window opens and put back when it ends: nothing of it runs otherwise."""

    def __init__(self, points: tuple[str, ...] = TIMELINE_POINTS) -> None:
        self.events: collections.deque[tuple[int, str, Any]] = collections.deque(maxlen=TIMELINE_EVENTS)
        self.points = points
        self._undo: list[tuple[Any, str, Any]] = []
        self._fds: set[int] = set()

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._undo.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, new)

    def install(self) -> None:
        add, now, fds = self.events.append, time.perf_counter_ns, self._fds
        read, write = os.read, os.write

        def os_read(fd: int, n: int) -> bytes:
            data = read(fd, n)
            add((now(), "read", fd, len(data)))
            fds.add(fd)
            return data

        def os_write(fd: int, data: Any) -> int:
            add((now(), "write<", fd, len(data)))
            n = write(fd, data)
            add((now(), "write", fd, n))
            fds.add(fd)
            return n

        self._patch(os, "read", os_read)
        self._patch(os, "write", os_write)
        cls = trio._socket._SocketType
        recv, send = cls.__dict__["recv"], cls.__dict__["send"]

        async def sock_recv(sock: Any, *args: Any) -> bytes:
            data = await recv(sock, *args)
            fd = sock.fileno()
            add((now(), "read", fd, len(data)))
            fds.add(fd)
            return data

        async def sock_send(sock: Any, data: Any, *args: Any) -> int:
            fd = sock.fileno()
            add((now(), "write<", fd, len(data)))
            n = await send(sock, data, *args)
            add((now(), "write", fd, n))
            fds.add(fd)
            return n

        self._patch(cls, "recv", sock_recv)
        self._patch(cls, "send", sock_send)
        for point in self.points:
            where, _, qual = point.rstrip("<").partition(":")
            try:
                owner = importlib.import_module(where)
            except ImportError:
                continue
            *path, name = qual.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if owner is None or name not in getattr(owner, "__dict__", {}):
                continue
            self._patch(owner, name, self._wrap(owner.__dict__[name], qual, point.endswith("<")))
        trio.lowlevel.add_instrument(self)

    def _wrap(self, fn: Any, what: str, starts: bool) -> Any:
        add, now = self.events.append, time.perf_counter_ns
        if starts:
            @functools.wraps(fn)
            async def marked_start(*args: Any, **kw: Any) -> Any:
                add((now(), what, None))
                return await fn(*args, **kw)
            return marked_start

        @functools.wraps(fn)
        def marked(*args: Any, **kw: Any) -> Any:
            out = fn(*args, **kw)
            add((now(), what, None))
            return out
        return marked

    def uninstall(self) -> None:
        """Everything put back (once: a second call does nothing)."""
        if not self._undo:
            return
        trio.lowlevel.remove_instrument(self)
        for owner, name, old in reversed(self._undo):
            setattr(owner, name, old)
        self._undo.clear()

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.events.append((time.perf_counter_ns(), "sleep", None))

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.events.append((time.perf_counter_ns(), "woke", None))

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.events.append((time.perf_counter_ns(), "step", task.name.rsplit(".", 1)[-1]))

    def dump(self, path: Path) -> None:
        """One JSON object: the events, and each descriptor's (local, remote) address (the bench names them)."""
        names = {}
        for fd in self._fds:
            try:
                with socket.socket(fileno=os.dup(fd)) as s:
                    names[fd] = [s.getsockname(), s.getpeername()]
            except OSError:
                pass
        path.write_text(json.dumps({"events": list(self.events), "fds": names}))


class _Probe:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.counter = LoopCounter()
        self.profiler: cProfile.Profile | None = None
        self.calls: CallCounter | None = None
        self.opcodes: OpcodeCounter | None = None
        self.timeline: Timeline | None = None
        self.counting = True

    # Signal handlers run in the main thread, between two bytecodes of the trio loop: the
    # instrument calls below are as safe there as in a task (trio copies its instrument lists),
    # and sys.setprofile hooks the thread trio runs in.

    def start(self, signum: int, frame: object) -> None:
        self._end_window()
        self.counter.reset()
        try:
            mode = (self.dir / MODE_FILE).read_text().strip()
        except OSError:
            mode = "count"
        if mode in ("profile", "calls", "opcodes", "quiet", "timeline"):
            trio.lowlevel.remove_instrument(self.counter)
            self.counting = False
        if mode == "profile":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        elif mode == "calls":
            self.calls = CallCounter()
            sys.setprofile(self.calls)
        elif mode == "opcodes":
            self.opcodes = OpcodeCounter()
            sys.settrace(self.opcodes)
        elif mode == "timeline":
            try:
                extra = tuple((self.dir / POINTS_FILE).read_text().split())
            except OSError:
                extra = ()
            self.timeline = Timeline(TIMELINE_POINTS + extra)
            self.timeline.install()

    def _end_window(self) -> None:
        """Counters back on the loop, profilers off."""
        if self.calls is not None:
            sys.setprofile(None)
        if self.opcodes is not None:
            sys.settrace(None)
        if self.profiler is not None:
            self.profiler.disable()
        if self.timeline is not None:
            self.timeline.uninstall()
        if not self.counting:
            trio.lowlevel.add_instrument(self.counter)
            self.counting = True

    def dump(self, signum: int, frame: object) -> None:
        pid = os.getpid()
        self._end_window()
        if self.profiler is not None:
            self.profiler.dump_stats(self.dir / f"probe-{pid}.prof")
            self.profiler = None
        if self.calls is not None:
            self.calls.dump(self.dir / f"probe-{pid}.calls")
            self.calls = None
        if self.opcodes is not None:
            self.opcodes.dump(self.dir / f"probe-{pid}.opcodes")
            self.opcodes = None
        if self.timeline is not None:
            self.timeline.dump(self.dir / f"probe-{pid}.timeline")
            self.timeline = None
        tmp = self.dir / f"probe-{pid}.json.tmp"
        tmp.write_text(json.dumps(self.counter.snapshot()))
        tmp.rename(self.dir / f"probe-{pid}.json")  # whole or not there: the bench polls for it


def instruments() -> list[trio.abc.Instrument]:
    """The instruments for ``trio.run`` (none unless ``CPN_PROBE`` is set); installs the signal handlers."""
    where = os.environ.get(ENV_DIR)
    if not where:
        return []
    probe = _Probe(Path(where))
    signal.signal(signal.SIGUSR1, probe.start)
    signal.signal(signal.SIGUSR2, probe.dump)
    gc.callbacks.append(probe.counter.on_gc)
    return [probe.counter]
