"""Event-loop counters for the data-plane benches, off unless ``CPN_PROBE`` names a directory.

    CPN_PROBE=/tmp/probe cpnd --config gw.toml
    kill -USR1 PID   # start a window: what /tmp/probe/mode says (count, the default; profile; quiet)
    kill -USR2 PID   # end it: write /tmp/probe/probe-PID.json (and probe-PID.prof after profile)

Counts trio's scheduler batches, the batches that slept in epoll (wake-ups), task steps
and spawns, and the time of task steps by task name (wall time: ``perf_counter`` costs no
system call, where a CPU clock would cost two per step). In a "profile" window cProfile runs
instead, in a "quiet" one nothing (for a sampler outside, py-spy): the counters are off the
loop then, so that the profile shows cpnd, not the probe. Off (the default), ``instruments()``
is empty and nothing else runs: the event loop is not touched.
"""

from __future__ import annotations

import cProfile
import collections
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

ENV_DIR = "CPN_PROBE"
MODE_FILE = "mode"  # in the directory: what the next window does (count, profile or quiet)


class LoopCounter(trio.abc.Instrument):
    """Counts what the scheduler does between two resets; the time of steps by task name."""

    def __init__(self) -> None:
        self._step_started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.batches = 0  # io waits: one per scheduler batch (an epoll_wait call)
        self.sleeps = 0  # io waits with a timeout: the loop had nothing to run and blocked (a wake-up)
        self.steps = 0
        self.spawned = 0
        self.scheduled = 0
        self.step_s: collections.Counter[str] = collections.Counter()
        self.step_count: collections.Counter[str] = collections.Counter()
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

    def snapshot(self) -> dict[str, Any]:
        return {"seconds": time.monotonic() - self.since, "batches": self.batches, "sleeps": self.sleeps,
                "steps": self.steps, "spawned": self.spawned, "scheduled": self.scheduled,
                "step_s": dict(self.step_s), "step_count": dict(self.step_count)}


class _Probe:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.counter = LoopCounter()
        self.profiler: cProfile.Profile | None = None
        self.counting = True

    # Signal handlers run in the main thread, between two bytecodes of the trio loop: the
    # instrument calls below are as safe there as in a task (trio copies its instrument lists).

    def start(self, signum: int, frame: object) -> None:
        self._end_window()
        self.counter.reset()
        try:
            mode = (self.dir / MODE_FILE).read_text().strip()
        except OSError:
            mode = "count"
        if mode in ("profile", "quiet"):
            trio.lowlevel.remove_instrument(self.counter)
            self.counting = False
        if mode == "profile":
            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def _end_window(self) -> bool:
        """Counters back on the loop; whether a profile was running."""
        if not self.counting:
            trio.lowlevel.add_instrument(self.counter)
            self.counting = True
        if self.profiler is None:
            return False
        self.profiler.disable()
        return True

    def dump(self, signum: int, frame: object) -> None:
        pid = os.getpid()
        profiler = self.profiler
        if self._end_window():
            assert profiler is not None
            profiler.dump_stats(self.dir / f"probe-{pid}.prof")
            self.profiler = None
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
    return [probe.counter]
