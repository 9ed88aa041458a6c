"""What the [[clients]] gate costs the ingress per request, in process (no sockets).

    python bench/clients_gate.py [--clients 1000] [-n 200000]

Times ``ClientTable.check`` (the Bearer header found, its SHA-256 looked up, the service prefix and
the token bucket checked, the headers without the key) and that plus the ``h11.Request`` rebuilt
without the key, as the data plane's hook does (``_parsed=True``: h11 validated the headers already),
and, for comparison, the rebuild with h11 validating them again. Best of 5 runs.
"""

from __future__ import annotations

import argparse
import hashlib
import timeit

import h11

from cpnd.clients import ClientTable, new_key
from cpnd.config import ClientConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("-n", type=int, default=200_000)
    args = ap.parse_args()
    keys = [new_key() for _ in range(args.clients)]
    table = ClientTable([ClientConfig(f"c{i}", hashlib.sha256(k.encode()).digest(), ("/yolo",), 1e9, 1e9)
                         for i, k in enumerate(keys)])
    req = h11.Request(method="POST", target="/yolo/x", headers=[
        ("host", "gw"), ("user-agent", "python-httpx/0.27"), ("accept", "*/*"), ("content-type", "application/json"),
        ("content-length", "20"), ("authorization", "Bearer " + keys[len(keys) // 2])])

    def check() -> object:
        return table.check(req.headers, "/yolo", "127.0.0.1", 1.0)

    def gate(parsed: bool) -> object:
        v = table.check(req.headers, "/yolo", "127.0.0.1", 1.0)
        return h11.Request(method=req.method, target=req.target, headers=list(v.headers), http_version=req.http_version,
                           _parsed=parsed)

    for name, fn in (("check", check), ("check + rebuild (the hook)", lambda: gate(True)),
                     ("check + rebuild, validated again", lambda: gate(False))):
        best = min(timeit.repeat(fn, number=args.n, repeat=5)) / args.n
        print(f"{name:34s} {best * 1e6:6.2f} us per request ({args.clients} clients)")


if __name__ == "__main__":
    main()
