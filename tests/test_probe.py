"""The benches' event-loop probe (cpnd/probe.py): nothing unless CPN_PROBE is set; windows by signal."""

from __future__ import annotations

import json
import os
import pstats
import signal
from pathlib import Path

import pytest
import trio

from cpnd import probe


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(probe.ENV_DIR, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    assert probe.instruments() == []
    assert signal.getsignal(signal.SIGUSR1) is before  # no handler taken either


def _window(directory: Path, mode: str, steps: int) -> Path:
    """One probe window of ``mode`` around ``steps`` checkpoints of a task; the counters file."""
    (directory / probe.MODE_FILE).write_text(mode)

    async def main() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0)  # the handler runs between two bytecodes: by now it has
        async with trio.open_nursery() as nursery:
            async def worker() -> None:
                for _ in range(steps):
                    await trio.sleep(0)
            nursery.start_soon(worker, name="worker")
        await trio.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR2)
        await trio.sleep(0)

    trio.run(main, instruments=probe.instruments())
    return directory / f"probe-{os.getpid()}.json"


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(probe.ENV_DIR, str(tmp_path))
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield tmp_path
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_counts_steps_spawns_and_waits(probe_dir: Path) -> None:
    counts = json.loads(_window(probe_dir, "count", 50).read_text())
    assert counts["spawned"] >= 1
    assert counts["step_count"]["worker"] == 51  # 50 checkpoints and the last step that returns
    assert counts["steps"] >= 51 and counts["batches"] >= 50
    assert counts["sleeps"] >= 1  # the millisecond sleep blocked in epoll
    assert counts["step_s"]["worker"] > 0


def test_profile_window_dumps_a_profile_and_counts_nothing(probe_dir: Path) -> None:
    counts = json.loads(_window(probe_dir, "profile", 20).read_text())
    assert counts["steps"] == 0  # the counters were off the loop
    stats = pstats.Stats(str(probe_dir / f"probe-{os.getpid()}.prof"))
    assert any(func == "worker" for (_, _, func) in stats.stats)  # type: ignore[attr-defined]


def test_calls_window_counts_every_call_by_its_stack(probe_dir: Path) -> None:
    _window(probe_dir, "calls", 30)
    lines = (probe_dir / f"probe-{os.getpid()}.calls").read_text().splitlines()
    stacks = {line.rpartition(" ")[0]: int(line.rpartition(" ")[2]) for line in lines}
    # Each of worker's 30 checkpoints calls trio.sleep from worker's frame, below trio's loop.
    from_worker = [n for stack, n in stacks.items()
                   if stack.split(";")[-1].startswith("_window.<locals>.main.<locals>.worker (")
                   and "unrolled_run (trio/_core/_run.py" in stack]
    assert sum(from_worker) >= 30


def _worker_opcodes(directory: Path, steps: int) -> int:
    _window(directory, "opcodes", steps)
    lines = (directory / f"probe-{os.getpid()}.opcodes").read_text().splitlines()
    counts = {line.rpartition(" ")[0]: int(line.rpartition(" ")[2]) for line in lines}
    return sum(n for name, n in counts.items() if name.startswith("_window.<locals>.main.<locals>.worker ("))


def test_opcodes_window_counts_every_bytecode_by_function(probe_dir: Path) -> None:
    thirty, sixty = _worker_opcodes(probe_dir, 30), _worker_opcodes(probe_dir, 60)
    # The same loop body each time: 30 more iterations are exactly 30 times one iteration's bytecodes.
    assert sixty > thirty > 30
    assert (sixty - thirty) % 30 == 0
    assert 2 * thirty - sixty >= 0  # what runs once (the frame's start, the loop's end) is counted once


def test_opcodes_are_counted_by_phase_of_the_request() -> None:
    """A proxy's reads and writes that move data mark the phases: the request's read ("in"), its write
    upstream ("wait"), the answer's read ("out"), its write back ("after"); what comes late on the
    upstream socket after the answer left does not start a request."""
    counter = probe.OpcodeCounter()
    seen = []
    for kind, fd in (("r", 5), ("w", 7), ("r", 7), ("w", 5), ("r", 7), ("r", 5), ("w", 5)):
        counter._io(kind, fd)
        seen.append(counter.phase)
    assert seen == ["in", "wait", "out", "after", "after", "in", "after"]


def test_opcodes_window_tells_the_phases_apart(probe_dir: Path) -> None:
    """Over real sockets through H11Stream (its non-blocking reads and writes): the work between the
    answer's write and the next request's read is "after", not on the request's path."""
    import socket

    import h11

    from cpnd.h1 import H11Stream

    def after_the_answer() -> int:
        return sum(range(50))

    (probe_dir / probe.MODE_FILE).write_text("opcodes")

    async def main() -> None:
        user, down = socket.socketpair()
        up, instance = socket.socketpair()
        client = H11Stream(h11.SERVER, trio.SocketStream(trio.socket.from_stdlib_socket(down)))
        upstream = H11Stream(h11.CLIENT, trio.SocketStream(trio.socket.from_stdlib_socket(up)))
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0)
        user.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.receive_nowait()
        await upstream.send_all([h11.Request(method="GET", target="/", headers=[("host", "x")]), h11.EndOfMessage()])
        instance.recv(65536)
        instance.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await trio.lowlevel.wait_readable(up)
        assert upstream.receive_nowait()
        await client.send_all([h11.Response(status_code=200, headers=[("content-length", "2")]), h11.Data(data=b"ok"),
                               h11.EndOfMessage()])
        after_the_answer()
        os.kill(os.getpid(), signal.SIGUSR2)
        await trio.sleep(0)
        for s in (user, down, up, instance):
            s.close()

    trio.run(main, instruments=probe.instruments())
    phases = json.loads((probe_dir / f"probe-{os.getpid()}.opcodes.phases").read_text())
    where = {phase for phase, ops in phases["ops"].items() for name in ops
             if name.startswith("test_opcodes_window_tells_the_phases_apart.<locals>.after_the_answer (")}
    assert where == {"after"}
    assert {"in", "wait", "out", "after"} <= set(phases["ops"])


def test_timeline_window_stamps_reads_writes_steps_and_points_then_puts_everything_back(probe_dir: Path) -> None:
    import socket

    from cpnd.planner import Planner
    from cpnd.streams import Mux

    originals = os.read, os.write, Planner.plan, Mux.handle, trio.socket.SocketType
    (probe_dir / probe.MODE_FILE).write_text("timeline")
    a, b = socket.socketpair()
    fa, fb = a.fileno(), b.fileno()

    async def main() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0)
        assert os.read is not originals[0] and Planner.plan is not originals[2]  # the window is open
        os.write(a.fileno(), b"ping")
        await trio.lowlevel.wait_readable(b)
        assert os.read(b.fileno(), 10) == b"ping"
        tb = trio.socket.from_stdlib_socket(b)
        await trio.socket.from_stdlib_socket(a).send(b"pong")
        assert await tb.recv(10) == b"pong"

        async def worker() -> None:
            await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, name="worker")
        os.kill(os.getpid(), signal.SIGUSR2)
        await trio.sleep(0)

    with a, b:
        trio.run(main, instruments=probe.instruments())
    assert (os.read, os.write, Planner.plan, Mux.handle, trio.socket.SocketType) == originals  # all put back
    dump = json.loads((probe_dir / f"probe-{os.getpid()}.timeline").read_text())
    events = [tuple(e) for e in dump["events"]]
    kinds = [(e[1], e[2], e[3]) for e in events if e[1] in ("read", "write", "write<")]
    assert kinds == [("write<", fa, 4), ("write", fa, 4), ("read", fb, 4)] * 2
    assert ("step", "worker") in {(e[1], e[2]) for e in events}
    assert [e[1] for e in events].count("woke") >= 1  # the millisecond sleep blocked in epoll
    assert [e[0] for e in events] == sorted(e[0] for e in events)  # one clock, in order
    assert set(dump["fds"]) == {str(fa), str(fb)}
