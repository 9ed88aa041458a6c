"""``cpnctl``: keys and a read-only view of a running gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .control import ControlError, request
from .crypto import KeyFileError, generate_key, load_private_key, public_key_b64, write_private_key
from .names import service_problem

DEFAULT_SOCKET = os.environ.get("CPN_SOCKET", "/run/cpn/cpnd.sock")

ROUTE_COLUMNS = [
    ("service", "SERVICE"), ("instance", "INSTANCE"), ("origin", "ORIGIN"), ("next_hop", "NEXT-HOP"),
    ("path", "PATH"), ("path_latency_ms", "PATH-MS"), ("compute_latency_ms", "COMP-MS"), ("load", "LOAD"),
    ("capacity", "CAP"), ("price", "PRICE"), ("label", "LABEL"), ("age_s", "AGE-S"), ("best", "BEST"),
]
SERVICE_COLUMNS = [
    ("service", "SERVICE"), ("instance", "INSTANCE"), ("healthy", "HEALTHY"), ("load", "LOAD"),
    ("compute_latency_ms", "COMP-MS"), ("capacity", "CAP"), ("price", "PRICE"), ("inflight", "INFLIGHT"),
    ("refused", "REFUSED"), ("url", "URL"),
]
PEER_COLUMNS = [
    ("id", "PEER"), ("address", "ADDRESS"), ("state", "STATE"), ("uptime_s", "UPTIME-S"),
    ("rtt_ms", "RTT-MS"), ("routes_received", "ROUTES"), ("routes_withheld", "WITHHELD"), ("last_error", "LAST-ERROR"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "path":
        return " ".join(value) if value else "local"
    if key == "best":
        return "*" if value else ""
    if key == "healthy":
        return "yes" if value else "NO"
    if key == "load":
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:g}" if key in ("capacity", "price") else f"{value:.2f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """An aligned text table, like ``birdc show route all``."""
    cells = [[h for _, h in columns]] + [[_cell(k, r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpnctl", description="control and inspect a cpnd gateway")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the gateway's control_socket (default {DEFAULT_SOCKET}, or $CPN_SOCKET)")
    sub = p.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="write a new Ed25519 private key (mode 0600) and print its public key")
    kg.add_argument("file")
    kg.add_argument("--force", action="store_true", help="overwrite an existing file")
    pk = sub.add_parser("pubkey", help="print the public key of a key file")
    pk.add_argument("file")
    sub.add_parser("reload", help="make the daemon re-read its config (like SIGHUP); prints what changed")
    show = sub.add_parser("show", help="show routes, peers or status")
    what = show.add_subparsers(dest="what", required=True)
    routes = what.add_parser("routes", help="every path in the RIB, best marked")
    routes.add_argument("service", nargs="?", help="only this service (URL-PATH)")
    routes.add_argument("--json", action="store_true")
    peers = what.add_parser("peers", help="sessions and their state")
    peers.add_argument("--json", action="store_true")
    services = what.add_parser("services", help="this gateway's own instances: health, load, compute")
    services.add_argument("--json", action="store_true")
    stats = what.add_parser("stats", help="counters (same as status)")
    stats.add_argument("--json", action="store_true")
    status = what.add_parser("status", help="gateway summary")
    status.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ControlError, KeyFileError) as exc:
        print(f"cpnctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        key = generate_key()
        write_private_key(Path(args.file), key, force=args.force)
        print(public_key_b64(key))
        return 0
    if args.command == "pubkey":
        print(public_key_b64(load_private_key(Path(args.file))))
        return 0
    if args.command == "reload":
        print(request(args.socket, "reload")["summary"])
        return 0
    if args.what == "routes":
        if args.service is not None and (problem := service_problem(args.service)):
            print(f"cpnctl: service {args.service!r}: {problem}", file=sys.stderr)
            return 2
        rows = request(args.socket, "show-routes", service=args.service)
        print(json.dumps(rows, indent=1) if args.json else table(rows, ROUTE_COLUMNS))
    elif args.what == "services":
        rows = request(args.socket, "show-services")
        print(json.dumps(rows, indent=1) if args.json else table(rows, SERVICE_COLUMNS))
    elif args.what == "peers":
        rows = request(args.socket, "show-peers")
        print(json.dumps(rows, indent=1) if args.json else table(rows, PEER_COLUMNS))
    else:
        data = request(args.socket, "status")
        print(json.dumps(data, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0
