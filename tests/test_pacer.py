"""The load pacer on a virtual clock: sampling noise is not re-advertised, real steps are
(protocol-spec/selection.md, "Load advertisement")."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from cpnd.config import Config, load_config
from cpnd.crypto import generate_key, write_private_key
from cpnd.gateway import _pacers
from cpnd.load import NOISE_CAP, NOISE_K, LoadPacer, RateWindow, load_moved

POLL_S = 0.05  # the gateway core looks at its instances' loads this often
CAPACITY = 50.0


def pacer(capacity: float = CAPACITY) -> LoadPacer:
    # 0.25 s, not the default 0.2: the virtual clock's times then add up exactly
    return LoadPacer(min_interval_s=0.25, load_threshold=0.05, refresh_s=5.0, capacity=capacity)


def poisson_adverts(rate: float, pacer_capacity: float, seconds: float, seed: int) -> list[float]:
    """When the pacer re-advertised an instance that Poisson arrivals at a steady ``rate`` reach,
    on capacity 50 (the pacer told ``pacer_capacity``),
    its load read as the daemon reads it (one-second count over capacity, 3 decimals) every poll."""
    rng = random.Random(seed)
    window = RateWindow()
    p = pacer(pacer_capacity)
    at, next_arrival, out = 0.0, rng.expovariate(rate), []
    for tick in range(round(seconds / POLL_S)):
        at = tick * POLL_S
        while next_arrival <= at:
            window.add(next_arrival)
            next_arrival += rng.expovariate(rate)
        reading = (round(window.count(at) / CAPACITY, 3), 0.0, 1000.0)
        if p.should_advertise(at, *reading):
            p.advertised(at, *reading)
            out.append(at)
    return out


def test_poisson_noise_is_not_readvertised_every_interval() -> None:
    # 30 req/s on capacity 50: the count's sd is 5.5 requests, 0.11 of load, twice the threshold.
    warm = 3.0
    noisy = [t for t in poisson_adverts(30.0, CAPACITY, 63.0, seed=7) if t >= warm]
    # The threshold alone (pacer told no capacity: no noise allowance) re-advertises noise ~3 times a second ...
    plain = [t for t in poisson_adverts(30.0, 0.0, 63.0, seed=7) if t >= warm]
    assert len(plain) / 60 > 2.0
    # ... the pacer about once a second or less (it could every 0.25 s: 4 a second).
    assert len(noisy) / 60 < 1.2
    assert len(noisy) < len(plain) / 2


def test_large_capacity_keeps_the_threshold() -> None:
    # 600 req/s on capacity 1000: the count's noise (0.05 of load at 2 sd) is about the threshold's.
    assert load_moved(0.66, 0.6, 1000.0, 0.05)
    assert not load_moved(0.64, 0.6, 1000.0, 0.05)


def test_step_of_a_fifth_of_capacity_goes_at_the_next_interval() -> None:
    p = pacer()
    p.advertised(10.0, 0.6, 0.0, 1000)
    assert not p.should_advertise(10.25, 0.72, 0.0, 1000)  # 6 requests at 30: within the count's noise
    assert not p.should_advertise(10.125, 0.8, 0.0, 1000)  # a step, but within the interval
    assert p.should_advertise(10.25, 0.8, 0.0, 1000)  # 20 % of capacity: at the interval
    assert p.should_advertise(10.25, 0.4, 0.0, 1000)  # and down
    assert p.should_advertise(10.25, 0.6, 0.2, 1000)  # latency-bound demand likewise


def test_idle_and_full_are_news_whatever_the_noise() -> None:
    p = pacer()
    p.advertised(0.0, 0.9, 0.0, 1000)
    assert not p.should_advertise(0.25, 0.98, 0.0, 1000)  # 4 requests more: noise
    assert p.should_advertise(0.25, 1.0, 0.0, 1000)  # full
    p.advertised(0.25, 1.0, 0.0, 1000)
    assert p.should_advertise(0.5, 0.9, 0.0, 1000)  # no longer full
    p.advertised(1.0, 0.1, 0.0, 1000)
    assert p.should_advertise(1.25, 0.0, 0.0, 1000)  # idle
    p.advertised(1.25, 0.0, 0.0, 1000)
    assert not p.should_advertise(1.5, 0.04, 0.0, 1000)  # below the threshold, as ever
    assert p.should_advertise(1.5, 0.06, 0.0, 1000)  # busy again
    p.advertised(2.0, 0.5, 1.2, 1000)
    assert not p.should_advertise(2.25, 0.5, 1.3, 1000)  # demand beyond capacity, still beyond it: noise
    assert p.should_advertise(2.25, 0.5, 0.9, 1000)  # demand back within capacity


def test_refresh_still_carries_a_change_within_the_noise() -> None:
    p = pacer()
    p.advertised(0.0, 0.6, 0.0, 1000)
    assert not p.should_advertise(4.9, 0.7, 0.0, 1000)
    assert p.should_advertise(5.0, 0.7, 0.0, 1000)
    p.advertised(5.0, 0.7, 0.0, 1000)
    assert not p.should_advertise(10.0, 0.7, 0.0, 1000)  # nothing changed: nothing to refresh


def test_reload_gives_a_staying_instance_its_new_capacity_and_pace(tmp_path) -> None:
    write_private_key(tmp_path / "g.key", generate_key(), force=True)

    def config(capacity: int, gateway: str = "") -> Config:
        path = tmp_path / f"c{capacity}.toml"
        path.write_text(f'[gateway]\nid = "g"\nlisten = "127.0.0.1:0"\nkey_file = "g.key"\n{gateway}[[services]]\npath = "/s"\n'
                        f'[[services.instances]]\nid = "i"\nurl = "http://127.0.0.1:1"\ncapacity = {capacity}\n')
        return load_config(path)

    first = _pacers(config(50), {})
    assert (first["i"].capacity, first["i"].min_interval_s, first["i"].load_threshold) == (50, 0.2, 0.05)
    first["i"].advertised(1.0, 0.5, 0.0, 1000)
    again = _pacers(config(5000, "load_adv_interval_ms = 1000\nload_change_threshold = 0.1\n"), first)
    assert again["i"] is first["i"] and again["i"].last_load == 0.5  # what was advertised stays known
    assert (again["i"].capacity, again["i"].min_interval_s, again["i"].load_threshold) == (5000, 1.0, 0.1)


loads = st.floats(0.0, 1.5, allow_nan=False)  # bload (demand) may exceed 1
capacities = st.floats(1.0, 10_000.0)
thresholds = st.floats(0.001, 0.5)


@given(loads, loads, capacities, thresholds)
def test_moved_is_the_rule_as_specified(new: float, old: float, capacity: float, threshold: float) -> None:
    moved = abs(new - old)
    got = load_moved(new, old, capacity, threshold)
    assert got == load_moved(old, new, capacity, threshold)  # the same either way
    if moved < threshold:
        assert not got  # the threshold stays a floor
    elif moved >= NOISE_CAP or (new == 0.0) != (old == 0.0) or (new >= 1.0) != (old >= 1.0):
        assert got  # a step of NOISE_CAP, or to or from idle or full, always counts
    else:
        assert got == (moved >= NOISE_K * math.sqrt(max(new, old) / capacity))


@given(st.lists(st.tuples(st.floats(0.01, 0.5), loads, loads), min_size=1, max_size=40))
def test_pacer_never_within_the_interval_and_never_holds_a_step(steps: list[tuple[float, float, float]]) -> None:
    p = pacer()
    now, last = 0.0, -math.inf
    for gap, load, bload in steps:
        now += gap
        step = max(abs(load - p.last_load), abs(bload - p.last_bload)) >= NOISE_CAP
        due = now - p.last_at >= p.min_interval_s
        if p.should_advertise(now, load, bload, 1000):
            assert now - last >= p.min_interval_s
            p.advertised(now, load, bload, 1000)
            last = now
        else:
            assert not (step and due)


def test_why_names_what_moved() -> None:
    p = pacer()
    p.advertised(0.0, 0.5, 0.2, 1000)
    assert p.why(0.25, 0.8, 0.2, 1000) == "load"
    assert p.why(0.25, 0.5, 0.5, 1000) == "bload"
    assert p.why(0.25, 0.5, 0.2, 1100) == "compute"
    assert p.why(0.25, 0.55, 0.2, 1000) is None  # within the noise
    assert p.why(5.0, 0.55, 0.2, 1000) == "refresh"
