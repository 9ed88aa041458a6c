"""Edge admission (sans-IO): slot tables, reclaim order, the flood tally, the descriptor budget."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpnd.admission import SlotTable, Tally, descriptor_reserve, http_client_budget

ROOT = Path(__file__).resolve().parent.parent


def test_admission_core_does_not_import_trio() -> None:
    tree = ast.parse((ROOT / "cpnd" / "admission.py").read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "trio" not in imported and "socket" not in imported


def test_busy_slots_are_never_taken_back_when_the_table_refuses() -> None:
    t = SlotTable(limit=3, per_source=10)
    slots = [t.admit(f"10.0.0.{i}").slot for i in range(3)]
    for s in slots:
        t.set_idle(s, False)
    assert t.idle == 0
    adm = t.admit("10.0.0.9")
    assert adm.slot is None and adm.reason == "limit" and not adm.evicted
    assert len(t) == 3 and all(s.held for s in slots)


def test_the_longest_idle_is_reclaimed_first() -> None:
    t = SlotTable(limit=3, per_source=10)
    a, b, c = (t.admit(src).slot for src in ("x", "y", "z"))
    for s in (a, b, c):
        t.set_idle(s, False)
    t.set_idle(b, True)  # b idle first, then a: b has waited longest
    t.set_idle(a, True)
    adm = t.admit("w")
    assert adm.slot is not None and adm.evicted == (b,) and adm.reason == "limit"
    assert not b.held and a.held and len(t) == 3
    t.release(b)  # its task ends later: nothing is counted twice
    assert len(t) == 3
    w = adm.slot
    adm = t.admit("v")
    assert adm.evicted == (a,)
    assert t.admit("u").evicted == (w,)  # a newcomer is idle until its first byte; c, busy, stays
    assert c.held


def test_newcomers_count_as_idle_until_they_speak() -> None:
    t = SlotTable(limit=2, per_source=10)
    first = t.admit("x").slot
    second = t.admit("y").slot
    adm = t.admit("z")
    assert adm.evicted == (first,) and second.held


def test_per_source_cap_takes_back_that_source_own_idle_slot() -> None:
    t = SlotTable(limit=100, per_source=2)
    other = t.admit("b").slot  # idle, and older than anything from "a"
    a1, a2 = t.admit("a").slot, t.admit("a").slot
    adm = t.admit("a")
    assert adm.evicted == (a1,) and adm.reason == "per_source" and other.held and a2.held
    assert t.count("a") == 2
    for s in (a2, adm.slot):
        t.set_idle(s, False)
    refused = t.admit("a")
    assert refused.slot is None and refused.reason == "per_source"
    assert t.admit("c").slot is not None  # another source is not held back


def test_evict_busy_takes_the_oldest_silent_first_then_the_oldest() -> None:
    t = SlotTable(limit=3, per_source=3, evict_busy=True)
    a, b, c = (t.admit(src).slot for src in ("1", "2", "3"))
    t.set_idle(a, False)  # a spoke (a real handshake); b and c are silent
    adm = t.admit("4")
    assert adm.evicted == (b,)  # silent before older-but-speaking
    for s in (c, adm.slot):
        t.set_idle(s, False)
    adm = t.admit("5")
    assert adm.evicted == (a,)  # all speaking: the oldest
    assert adm.slot is not None  # never refused


def test_sources_are_forgotten_with_their_last_slot() -> None:
    t = SlotTable(limit=10, per_source=10)
    slots = [t.admit(f"10.0.{i}.1").slot for i in range(10)]
    for s in slots:
        t.release(s)
    assert len(t) == 0 and not t._sources  # noqa: SLF001 - bounded by slots held, not sources seen


def test_a_lowered_limit_refuses_without_evicting_busy_ones() -> None:
    t = SlotTable(limit=4, per_source=4)
    for src in "abcd":
        t.set_idle(t.admit(src).slot, False)
    t.limit = 2
    assert t.admit("e").slot is None and len(t) == 4


def test_tally_logs_the_first_in_full_then_one_line_a_second() -> None:
    tally = Tally(1.0)
    assert tally.note("refused", 10.0)
    assert not any(tally.note("refused", 10.0 + i / 1000) for i in range(1, 500))
    assert tally.flush(10.5) is None  # the second is not over
    line = tally.flush(11.0)
    assert line == "499 more in the last 1 s: 499 refused"
    for i in range(300):
        tally.note("refused" if i % 3 else "reclaimed", 11.2 + i / 1000)
    assert tally.flush(11.5) is None
    assert tally.flush(12.0) == "300 more in the last 1 s: 200 refused, 100 reclaimed"
    assert tally.flush(13.0) is None  # quiet: nothing to say
    assert tally.note("refused", 20.0)  # a new spell starts in full


@pytest.mark.parametrize("nofile,local,expected", [(256, 1, 30), (256, 0, 94), (1024, 1, 414), (65536, 1, 32670)])
def test_http_budget_keeps_a_reserve(nofile: int, local: int, expected: int) -> None:
    reserve = descriptor_reserve(peers=1, preauth=64, local_instances=local, pool_idle_per_instance=32,
                                 control_clients=32, metrics_clients=16)
    assert http_client_budget(nofile, reserve, local) == expected
    assert http_client_budget(64, reserve, local) == 1  # never zero: the gateway still serves someone
