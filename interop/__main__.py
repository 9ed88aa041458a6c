"""python -m interop --target HOST:PORT --target-pubkey B64 --key FILE --id ID [--http HOST:PORT]
[--fuzz N] [--seed S] [--json]"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cases import CASES, Target, run_case
from .fuzz import fuzz
from .wire import load_key, parse_pub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m interop", description="check a cpn gateway against protocol-spec/")
    ap.add_argument("--target", required=True, help="HOST:PORT of the gateway's peering listener")
    ap.add_argument("--target-pubkey", required=True, help="the gateway's public key (base64)")
    ap.add_argument("--key", required=True, help="our private key file (cpnctl keygen); the target must list it")
    ap.add_argument("--id", required=True, help="our gateway id, as the target's peer list names it")
    ap.add_argument("--http", help="HOST:PORT of the gateway's HTTP ingress: also check the HTTP contract")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N", help="send N mutated inputs after the cases")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--json", action="store_true", help="one JSON object per case")
    args = ap.parse_args(argv)
    try:
        host, port = args.target.rsplit(":", 1)
        target = Target((host.strip("[]"), int(port)), parse_pub(args.target_pubkey), args.id, load_key(args.key), args.http)
    except (ValueError, OSError) as exc:
        print(f"interop: {exc}", file=sys.stderr)
        return 2
    passed = failed = 0

    def report(result: dict) -> None:
        nonlocal passed, failed
        passed += result["passed"]
        failed += not result["passed"]
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            mark = "skip" if result.get("skipped") else "ok  " if result["passed"] else "FAIL"
            extra = f"  {result['detail']}" if result["detail"] else ""
            print(f"{mark} {result['case']:<44} [{result['section']}]{extra}", flush=True)
            if "reproducer" in result:
                print(f"     reproducer: {json.dumps(result['reproducer'])}", flush=True)

    for name, section, fn in CASES:
        if args.only and args.only not in name:
            continue
        report(run_case(target, name, section, fn))
    if args.fuzz:
        start = time.monotonic()
        fuzz(target, args.fuzz, args.seed, report=report)
        took = time.monotonic() - start
        print(f"fuzz: {args.fuzz} inputs in {took:.1f} s ({args.fuzz / took:.0f}/s), seed {args.seed}", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
