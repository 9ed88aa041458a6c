"""Small trio helpers shared by the shells (never by the sans-IO cores)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from .admission import Admission, Slot, SlotTable

T = TypeVar("T")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` and its nested groups (``exc`` itself when it is no group)."""
    return _leaves(exc)


class ListenError(Exception):
    """A listener of ours could not be opened: ``<config key> <address>: <reason>``, for one line on stderr."""

    def __init__(self, what: str, address: str, reason: str) -> None:
        super().__init__(f"{what} {address}: {reason}")
        self.what = what
        self.address = address
        self.reason = reason


async def open_listeners(what: str, host: str, port: int, shown: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` whose failure (a busy port, say) names the config key and address."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(what, shown, exc.strerror or str(exc)) from None


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises its first real error as itself, not inside an ExceptionGroup.

    Request handlers raise ``HttpError``/``StreamReset`` for their callers to turn into
    responses; trio would otherwise wrap them and the ``except`` clauses would miss them.
    Groups holding only ``Cancelled`` propagate unchanged so cancellation still works.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if not real:
            raise
        raise real[0] from None


SPIN_S = 0.001
MAX_LEAD_S = 0.0005  # arm precise timers at most this much early
COMPACT_AT = 256  # withdrawn precise timers kept in the heap before it is compacted (if over half of it)
_TFD_FLAGS = 0o4000 | 0o2000000  # TFD_NONBLOCK | TFD_CLOEXEC
_CLOCK_MONOTONIC = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - raises AttributeError off Linux
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the system (glibc's malloc_trim); False if unavailable.

    Freed buffers stay in the heap otherwise: what an operator sees after a burst would be what
    was ever buffered, not what is held.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


class _PreciseTimers:
    """All precise timers of one trio run (sleepers and cancels), woken by one timerfd armed for the earliest.

    A timerfd fires at its nanosecond deadline and wakes epoll at once, where the event
    loop's own timers round up to the next millisecond; no CPU is spent waiting. The
    process still needs a moment to run after the timer fires (~0.1 ms, more on a busy
    machine): the timer is armed that much early, learnt as a moving average, and what is
    left when it fires early is spent yielding, so timers fire on time, never early.
    An entry is ``[deadline, seq, fire]``; a discarded one has ``fire`` None, and the heap is
    compacted once such entries are over half of it (a cut withdrawn in time is, mostly).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.heap: list[list[Any]] = []
        self.discarded = 0  # entries in the heap with fire None
        self.seq = 0
        self.armed = math.inf  # the deadline the timer is armed for (it fires self.lead before)
        self.lead = 0.0

    def add(self, deadline: float, fire: Callable[[], object]) -> list[Any]:
        self.seq += 1
        entry = [deadline, self.seq, fire]
        heapq.heappush(self.heap, entry)
        if deadline < self.armed:
            self._arm(deadline)
        return entry

    def discard(self, entry: list[Any]) -> None:
        """Never fire ``entry`` (if it has not fired); if it was the earliest, the timer is armed for the
        next one now (a system call, where a wake-up for nothing would cost a switch and a read)."""
        if entry[2] is None:
            return
        entry[2] = None
        self.discarded += 1
        if self.discarded > COMPACT_AT and 2 * self.discarded > len(self.heap):
            # Withdrawn entries of far deadlines (a 60 s bound answered in 10 ms) would stay until then.
            self.heap = [e for e in self.heap if e[2] is not None]
            heapq.heapify(self.heap)
            self.discarded = 0
        elif self.heap[0] is entry:
            while self.heap and self.heap[0][2] is None:
                heapq.heappop(self.heap)
                self.discarded -= 1
        else:
            return
        if not self.heap:
            self._disarm()
        elif self.heap[0][0] != self.armed:
            self._arm(self.heap[0][0])

    def _set(self, delay: float) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(delay)
        spec.it_value.tv_nsec = int((delay - int(delay)) * 1e9)
        if _LIBC.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def _arm(self, deadline: float) -> None:
        self._set(max(deadline - self.lead - trio.current_time(), 1e-6))
        self.armed = deadline

    def _disarm(self) -> None:
        self._set(0.0)  # an all-zero it_value disarms
        self.armed = math.inf

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    os.read(self.fd, 8)
                except BlockingIOError:
                    continue  # disarmed or re-armed after it fired: nothing is due
                await self._fire_due()
        finally:
            os.close(self.fd)

    async def _fire_due(self) -> None:
        target = self.armed
        if math.isfinite(target):
            late = trio.current_time() - (target - self.lead)
            self.lead = min(MAX_LEAD_S, max(0.0, self.lead + (late - self.lead) / 8))
            # Armed early on purpose: the last stretch (at most the lead) is spent
            # yielding, so that no timer ever fires before its deadline. Until the earliest
            # entry's own: one added meanwhile may be due sooner, and once the one armed for is
            # withdrawn (discard pops it), the next is due after the target: nothing to wait for.
            while self.heap and (due := self.heap[0][0]) <= target and trio.current_time() < due:
                await trio.sleep(0)
        self.armed = math.inf
        now = trio.current_time()
        while self.heap and (self.heap[0][0] <= now or self.heap[0][2] is None):
            entry = heapq.heappop(self.heap)
            fire, entry[2] = entry[2], None  # fired: a discard after this is a no-op
            if fire is None:
                self.discarded -= 1
            else:
                fire()
        if self.heap:
            self._arm(self.heap[0][0])


_TIMERS: trio.lowlevel.RunVar[_PreciseTimers | None] = trio.lowlevel.RunVar("cpn_precise_timers")


class _Runs(Protocol):
    async def run(self) -> None: ...


R = TypeVar("R", bound=_Runs)


def per_run(var: trio.lowlevel.RunVar[R | None], make: Callable[[], R | None], name: str) -> R | None:
    """This trio run's ``var``: made by ``make`` on first use, its ``run`` a system task named ``name``
    from then on; None (kept, so never tried again) where ``make`` cannot make one."""
    try:
        return var.get()
    except LookupError:
        pass
    made = make()
    if made is not None:
        trio.lowlevel.spawn_system_task(made.run, name=name)
    var.set(made)
    return made


def _new_timers() -> _PreciseTimers | None:
    fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_FLAGS) if _LIBC is not None else -1
    return _PreciseTimers(fd) if fd >= 0 else None


def _timers() -> _PreciseTimers | None:
    return per_run(_TIMERS, _new_timers, "cpn-precise-timers")


async def sleep_until_precisely(deadline: float) -> None:
    """Sleep until ``deadline`` give or take ~0.1 ms (emulated links, simulated compute).

    The event loop's timers wake up to a millisecond late (epoll rounds up), which would
    add ~1 ms to every emulated delay: a timerfd wakes on time instead. Where there is
    none (not Linux), the last millisecond is spent yielding.
    """
    if deadline <= trio.current_time():
        await trio.lowlevel.checkpoint()
        return
    timers = _timers()
    if timers is not None:
        woken = trio.Event()
        entry = timers.add(deadline, woken.set)
        try:
            await woken.wait()
        finally:
            timers.discard(entry)
        return
    if deadline - trio.current_time() > SPIN_S:
        await trio.sleep_until(deadline - SPIN_S)
    while trio.current_time() < deadline:
        await trio.sleep(0)


class cancel_precisely_at:  # noqa: N801 (used as a function: ``with cancel_precisely_at(scope, deadline):``)
    """Within this block, cancel ``scope`` at ``deadline`` give or take ~0.1 ms (None: not at all).

    For a cut the user's clock measures (a latency bound): trio's own deadline fires up to
    ~2 ms late here. ``scope``'s own deadline stays as it is (where there is no timerfd, it
    alone cuts). Leaving the block withdraws the cancel, so the scope can go on with another
    deadline (a response's body after its head). A class, not a ``@contextmanager``: it is
    entered once or twice a request (a generator's context manager costs ~90 bytecodes more).
    """

    __slots__ = ("scope", "deadline", "entry", "timers")

    def __init__(self, scope: trio.CancelScope, deadline: float | None) -> None:
        self.scope = scope
        self.deadline = deadline
        self.entry: list[Any] | None = None
        self.timers: _PreciseTimers | None = None

    def __enter__(self) -> None:
        if self.deadline is not None and (timers := _timers()) is not None:
            self.timers = timers
            self.entry = timers.add(self.deadline, self.scope.cancel)

    def __exit__(self, *exc_info: object) -> None:
        if self.entry is not None:
            self.timers.discard(self.entry)  # type: ignore[union-attr]
            self.entry = None


ACCEPT_PAUSE_S = 0.1  # after a failed accept (out of descriptors): stop accepting this long, do not spin


async def serve_accepting(listener: trio.SocketListener, on_accept: Callable[[trio.SocketStream], None],
                          on_error: Callable[[str, str], None], name: str) -> None:
    """Accept for ever, handing each connection to ``on_accept`` (which admits it and starts its task).

    Unlike ``trio.serve_listeners``, which logs every failed accept with a traceback (ten
    lines a second while descriptors run out), a failure goes to ``on_error(kind, line)``,
    which counts it; ``name`` says which listener.
    """
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "error")
            on_error(f"{name} accept errors ({code})", f"{name}: accept failed: {exc.strerror or exc}; pausing {ACCEPT_PAUSE_S:g} s")
            await trio.sleep(ACCEPT_PAUSE_S)
            continue
        on_accept(stream)


def admit_stream(slots: SlotTable, stream: trio.SocketStream) -> tuple[str, Admission] | None:
    """A new connection's source address and its admission to ``slots``: the waits of the connections
    evicted for it are cancelled, and a refused one's socket is closed (nothing read, nothing to
    reset). None when its peer is gone already (closed too)."""
    try:
        source = stream.socket.getpeername()[0]
    except OSError:
        stream.socket.close()
        return None
    adm = slots.admit(source)
    for victim in adm.evicted:
        if victim.owner is not None:
            victim.owner.cancel()
    if adm.slot is None:
        stream.socket.close()
    return source, adm


async def read_reclaimable(slots: SlotTable, slot: Slot, timeout_s: float, read: Callable[[], Awaitable[T]]) -> T | None:
    """``read()`` within ``timeout_s``, the slot idle meanwhile (a newcomer may take it back, which
    cancels the read); None when it timed out or was taken back."""
    reading = trio.CancelScope(deadline=trio.current_time() + timeout_s)
    slot.owner = reading
    slots.set_idle(slot, True)
    try:
        with reading:
            return await read()
    finally:
        slots.set_idle(slot, False)
    return None
