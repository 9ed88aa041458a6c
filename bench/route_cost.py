"""What a flooded load advertisement costs a gateway, exactly: bytecodes, by the gateway that ran them.

    python bench/route_cost.py [--seconds 20] [--changes-per-s 1]

The paper lab's seven gateways (GW1..GW7, its links and RTTs; s1..s5 behind GW3..GW7) as cpnd's own
``gateway.Gateway`` cores on ``cpnd.vnet``'s virtual network (real sessions: handshake, encrypted
records, pacing; no sockets, no trio). After convergence, an idle window, then a window as long in
which each instance's load steps between 0.3 and 0.6 ``--changes-per-s`` times a second (every step
material, whatever the pacer's noise rule). Every bytecode executed in cpnd's modules is counted by the
gateway it ran for (sys.settrace's opcode events: exact, load-independent; C code such as the AEAD and
msgpack counts as the one call that enters it). Per gateway: route entries received, those carrying
nothing newer than held (copies by another path), Loc-RIB changes, entries sent, and bytecodes of the
churn window less the idle one, per route entry received, by module.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpnd.crypto import generate_key  # noqa: E402
from cpnd.gateway import Gateway  # noqa: E402
from cpnd.lab import PAPER_RTT  # noqa: E402
from cpnd.vnet import Instances, Net, config_for  # noqa: E402

ORIGIN = {f"gw{i + 2}": f"s{i}" for i in range(1, 6)}
COUNTERS = ("route_entries_in", "route_entries_old_seq", "rib_changes", "updates_out", "load_updates")


class Counter:
    """Bytecodes by (gateway, module) while on."""

    def __init__(self) -> None:
        self.current = ""
        self.on = False
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def enter(self, gid: str) -> None:
        self.current = gid

    def _global(self, frame, event, arg):  # type: ignore[no-untyped-def]
        name = frame.f_code.co_filename
        if "/cpnd/" not in name or name.endswith("vnet.py"):
            return None
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "opcode" and self.on:
            self.counts[(self.current, Path(frame.f_code.co_filename).stem)] += 1
        return self._local

    def start(self) -> None:
        sys.settrace(self._global)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="virtual seconds of each window")
    ap.add_argument("--changes-per-s", type=float, default=1.0, help="load steps per instance per second")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()

    gws = [f"gw{i}" for i in range(1, 8)]
    keys = {g: generate_key() for g in gws}
    peers: dict[str, dict[str, float]] = {g: {} for g in gws}
    for a, row in PAPER_RTT.items():
        for b, rtt in row.items():
            peers[a][b] = peers[b][a] = rtt / 1000
    counter = Counter()
    net = Net(enter=counter.enter)
    for a in gws:
        for b, rtt in peers[a].items():
            net.delays[frozenset((a, b))] = rtt / 2
    sources = {g: Instances({ORIGIN[g]: (0.3, 0.0, 1000.0)} if g in ORIGIN else {}) for g in gws}
    cores = {}
    for i, g in enumerate(gws):
        config = config_for(g, keys[g], {p: keys[p].public_key() for p in peers[g]},
                            services={"/yolo": [ORIGIN[g]]} if g in ORIGIN else None)
        cores[g] = Gateway(config, sources[g], 0.0, seq=1, rng=random.Random(i), cpu_clock=lambda: 0.0)
        net.add(cores[g])
    net.run_while(lambda: any(len(c.rib) < 5 for c in cores.values()), limit_s=60)
    net.run_for(5.0)
    counter.start()

    def window(churn: bool) -> dict[str, dict[str, int]]:
        before = {g: {k: c.stats[k] + c.rib.counters[k] for k in COUNTERS} for g, c in cores.items()}
        counter.counts.clear()
        counter.on = True
        start = net.now
        period = 1 / args.changes_per_s
        for k, g in enumerate(ORIGIN):
            def walk(iid: str, now: float, k: int = k) -> tuple[float, float, float] | None:
                if not churn:
                    return None
                phase = int((now - start) / period + k / len(ORIGIN))
                return (0.6 if phase % 2 else 0.3, 0.0, 1000.0)
            sources[g].walk = walk
        net.run_for(args.seconds)
        counter.on = False
        for g in ORIGIN:
            sources[g].walk = None
        out: dict[str, dict[str, int]] = {}
        for g, c in cores.items():
            out[g] = {k: c.stats[k] + c.rib.counters[k] - before[g][k] for k in COUNTERS}
            out[g]["bytecodes"] = sum(n for (gid, _), n in counter.counts.items() if gid == g)
            out[g]["by_module"] = {m: n for (gid, m), n in counter.counts.most_common() if gid == g}  # type: ignore[assignment]
        return out

    idle = window(False)
    churn = window(True)
    sys.settrace(None)
    result: dict[str, object] = {"seconds": args.seconds, "changes_per_s": args.changes_per_s, "gateways": {}}
    print(f"{args.seconds:g} s virtual, each of 5 instances' load stepping {args.changes_per_s:g}/s")
    print("gw   entries_in  copies  rib_changes  entries_out  bytecodes/entry_in   (churn less idle)  top modules")
    originated = sum(churn[g]["load_updates"] for g in ORIGIN)
    for g in gws:
        c, i = churn[g], idle[g]
        n = c["route_entries_in"]
        extra = c["bytecodes"] - i["bytecodes"]
        mods = {m: c["by_module"].get(m, 0) - i["by_module"].get(m, 0) for m in c["by_module"]}  # type: ignore[union-attr]
        top = sorted(mods.items(), key=lambda kv: -kv[1])[:5]
        per = round(extra / n) if n else None
        result["gateways"][g] = {**{k: c[k] for k in COUNTERS}, "bytecodes_extra": extra, "bytecodes_per_entry_in": per,  # type: ignore[index]
                                 "by_module_per_entry_in": {m: round(v / n) for m, v in top} if n else {}}
        print(f"{g}  {n:10d}  {c['route_entries_old_seq']:6d}  {c['rib_changes']:11d}  {c['updates_out']:11d}  {per!s:>18}"
              f"   {', '.join(f'{m} {round(v / n) if n else 0}' for m, v in top)}")
    total_in = sum(churn[g]["route_entries_in"] for g in gws)
    print(f"origin re-advertisements {originated}; route entries received, all gateways: {total_in} "
          f"({total_in / max(originated, 1):.1f} per re-advertisement)")
    result["originated"], result["entries_in_total"] = originated, total_in
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
