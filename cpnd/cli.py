"""``cpnctl``: keys and a read-only view of a running gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .clients import key_sha256, new_key
from .config import control_socket_of
from .control import STATUS_KEYS, ControlError, request
from .errors import ConfigError
from .crypto import KeyFileError, generate_key, load_private_key, public_key_b64, write_private_key
from .names import service_problem


ROUTE_COLUMNS = [
    ("service", "SERVICE"), ("instance", "INSTANCE"), ("origin", "ORIGIN"), ("next_hop", "NEXT-HOP"),
    ("path", "PATH"), ("path_latency_ms", "PATH-MS"), ("compute_latency_ms", "COMP-MS"), ("load", "LOAD"),
    ("capacity", "CAP"), ("price", "PRICE"), ("label", "LABEL"), ("age_s", "AGE-S"), ("best", "BEST"),
    ("estimate_ms", "EST-MS"), ("validation", "ORIGIN"), ("state", "STATE"),
]
SERVICE_COLUMNS = [
    ("service", "SERVICE"), ("instance", "INSTANCE"), ("healthy", "HEALTHY"), ("load", "LOAD"),
    ("compute_latency_ms", "COMP-MS"), ("capacity", "CAP"), ("price", "PRICE"), ("inflight", "INFLIGHT"),
    ("refused", "REFUSED"), ("registered", "REGISTERED"), ("url", "URL"),
]
CLIENT_COLUMNS = [
    ("id", "CLIENT"), ("services", "SERVICES"), ("rate", "RATE"), ("burst", "BURST"), ("tokens", "TOKENS"),
    ("allowed", "ALLOWED"), ("forbidden", "FORBIDDEN"), ("rate_limited", "RATE-LIMITED"), ("last_seen_s", "LAST-SEEN-S"),
]
PEER_COLUMNS = [
    ("id", "PEER"), ("address", "ADDRESS"), ("state", "STATE"), ("uptime_s", "UPTIME-S"),
    ("rtt_ms", "RTT-MS"), ("routes_received", "ROUTES"), ("routes_withheld", "WITHHELD"), ("routes_invalid", "INVALID"),
    ("import", "IMPORT"), ("export", "EXPORT"), ("local_pref", "PREF"), ("last_error", "LAST-ERROR"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "path":
        return " ".join(value) if value else "local"
    if key in ("services", "import", "export"):
        return ",".join(value)
    if key == "best":
        return "*" if value else ""
    if key == "healthy":
        return "yes" if value else "NO"
    if key == "registered":
        return "yes" if value else ""
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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--socket", metavar="PATH", help="the gateway's control socket (its control_socket)")
    which.add_argument("--config", metavar="FILE.toml",
                       help="the gateway's config file: its control_socket, by default <id>.sock beside it (as cpnd)")
    sub = p.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="write a new Ed25519 private key (mode 0600) and print its public key")
    kg.add_argument("file")
    kg.add_argument("--force", action="store_true", help="overwrite an existing file")
    pk = sub.add_parser("pubkey", help="print the public key of a key file")
    pk.add_argument("file")
    ce = sub.add_parser("certify", help="issue a certificate: a domain key (trust anchor) lets a gateway's key "
                        "originate service prefixes")
    ce.add_argument("--ca", required=True, metavar="DOMAIN.key", help="the domain's private key (cpnctl keygen)")
    ce.add_argument("--pubkey", required=True, metavar="B64", help="the gateway's public key")
    ce.add_argument("--services", required=True, metavar="/a,/b", help="URL-PATH prefixes it may originate")
    ce.add_argument("--out", required=True, metavar="GW.cert")
    ce.add_argument("--id", default="", help="the gateway's id (else the certificate holds only for a gateway "
                    "whose key a receiver has in [[peers]])")
    ce.add_argument("--days", type=float, default=365.0, help="valid for this many days (default 365)")
    sub.add_parser("reload", help="make the daemon re-read its config (like SIGHUP); prints what changed")
    hk = sub.add_parser("hash-key", help="print a new random client key (or registrar token) and its SHA-256 for the config")
    hk.add_argument("--stdin", action="store_true", help="hash the key read from stdin instead of making one")
    reg = sub.add_parser("register", help="register an instance with the gateway (advertised like a configured one)")
    reg.add_argument("--service", required=True, help="its service (URL-PATH)")
    reg.add_argument("--id", required=True, help="its instance id, unique in the gateway")
    reg.add_argument("--url", required=True, help="its real http:// URL")
    reg.add_argument("--capacity", required=True, type=float, help="requests/s (a hard admission cap)")
    reg.add_argument("--price", type=float)
    reg.add_argument("--compute-latency-ms", type=float)
    reg.add_argument("--ttl-s", type=float, help="withdrawn unless registered again within this (default: never)")
    dereg = sub.add_parser("deregister", help="withdraw a registered instance")
    dereg.add_argument("--id", required=True)
    show = sub.add_parser("show", help="show routes, peers or status")
    what = show.add_subparsers(dest="what", required=True)
    routes = what.add_parser("routes", help="every path in the RIB, best marked")
    routes.add_argument("service", nargs="?", help="only this service (URL-PATH)")
    routes.add_argument("--json", action="store_true")
    peers = what.add_parser("peers", help="sessions and their state")
    peers.add_argument("--json", action="store_true")
    services = what.add_parser("services", help="this gateway's own instances: health, load, compute")
    services.add_argument("--json", action="store_true")
    clients = what.add_parser("clients", help="[[clients]]: their quotas and counters")
    clients.add_argument("--json", action="store_true")
    stats = what.add_parser("stats", help="counters since start and gauges now")
    stats.add_argument("--json", action="store_true")
    status = what.add_parser("status", help="who the gateway is: version, uptime, listeners, peers, routes")
    status.add_argument("--json", action="store_true")
    return p


NO_SOCKET = ("which gateway? give --socket PATH (its control_socket), --config FILE.toml (its config file) "
             "or set CPN_SOCKET")


def socket_path(args: argparse.Namespace) -> str | None:
    """--socket, else the control socket of --config (the rule cpnd uses), else $CPN_SOCKET; None: not told."""
    if args.socket:
        return str(args.socket)
    if args.config:
        return str(control_socket_of(args.config))
    return os.environ.get("CPN_SOCKET") or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command not in ("keygen", "pubkey", "hash-key", "certify"):
            args.socket = socket_path(args)
            if args.socket is None:
                parser.error(NO_SOCKET)
        return _run(args)
    except (ControlError, KeyFileError, ConfigError) as exc:
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
    if args.command == "certify":
        return certify(args)
    if args.command == "reload":
        print(request(args.socket, "reload")["summary"])
        return 0
    if args.command == "hash-key":
        key = sys.stdin.readline().strip() if args.stdin else new_key()
        if not key:
            print("cpnctl: hash-key --stdin: no key on stdin", file=sys.stderr)
            return 2
        print(f"key     {key}\nsha256  {key_sha256(key)}")
        return 0
    if args.command == "register":
        fields = {"service": args.service, "id": args.id, "url": args.url, "capacity": args.capacity, "price": args.price,
                  "compute_latency_ms": args.compute_latency_ms, "ttl_s": args.ttl_s}
        r = request(args.socket, "register", **{k: v for k, v in fields.items() if v is not None})
        print(f"{r['id']} of {r['service']}: {r['result']}" + (f" (ttl {r['ttl_s']:g} s)" if r["ttl_s"] else ""))
        return 0
    if args.command == "deregister":
        r = request(args.socket, "deregister", id=args.id)
        print(f"{r['id']} of {r['service']}: deregistered")
        return 0
    if args.what == "routes":
        if args.service is not None and (problem := service_problem(args.service)):
            print(f"cpnctl: service {args.service!r}: {problem}", file=sys.stderr)
            return 2
        rows = request(args.socket, "show-routes", service=args.service)
        if not args.json:
            for r in rows:  # why a path is not used: its instance is down, or it waits out a restart
                r["state"] = "down" if r.get("down") else "stale" if r.get("stale") else ""
                # On best paths: what the ingress expects a request there to take now, end to end.
                r["estimate_ms"] = r["estimate"]["total_ms"] if "estimate" in r else None
        print(json.dumps(rows, indent=1) if args.json else table(rows, ROUTE_COLUMNS))
    elif args.what == "services":
        rows = request(args.socket, "show-services")
        print(json.dumps(rows, indent=1) if args.json else table(rows, SERVICE_COLUMNS))
    elif args.what == "clients":
        rows = request(args.socket, "show-clients")
        print(json.dumps(rows, indent=1) if args.json else table(rows, CLIENT_COLUMNS))
    elif args.what == "peers":
        rows = request(args.socket, "show-peers")
        print(json.dumps(rows, indent=1) if args.json else table(rows, PEER_COLUMNS))
    elif args.what == "status":
        data = request(args.socket, "status")
        summary = {k: data.get(k) for k in STATUS_KEYS}
        print(json.dumps(summary, indent=1) if args.json else status_table(summary))
    else:
        data = request(args.socket, "stats")
        print(json.dumps(data, indent=1) if args.json else stats_table(data))
    return 0


def certify(args: argparse.Namespace) -> int:
    """``cpnctl certify``: write a certificate signed by ``--ca``; prints what it says."""
    import time

    from .crypto import parse_public_key
    from .origin import CertificateError, certificate_pem, issue

    ca = load_private_key(Path(args.ca))
    try:
        key = parse_public_key(args.pubkey).public_bytes_raw()
    except ValueError as exc:
        print(f"cpnctl: --pubkey: {exc}", file=sys.stderr)
        return 2
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    if not 0 < args.days <= 36500:
        print("cpnctl: --days: must be between 0 and 36500", file=sys.stderr)
        return 2
    try:
        cert = issue(ca, key, services, int(time.time() + args.days * 86400), args.id)
    except CertificateError as exc:
        print(f"cpnctl: {exc}", file=sys.stderr)
        return 2
    try:
        Path(args.out).write_text(certificate_pem(cert))
    except OSError as exc:
        print(f"cpnctl: {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.out}: {cert.id or 'any gateway with key'} {args.pubkey} may originate {', '.join(services)} "
          f"until {time.strftime('%Y-%m-%d', time.gmtime(cert.not_after))} (issuer {public_key_b64(ca)})")
    return 0


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m}m" if d or h or m else "") + f"{s % 60}s"


def status_table(d: dict[str, Any]) -> str:
    """``show status``: one aligned line per fact, as ``birdc show status`` prints them."""
    down = f", {d['local_instances_down']} down" if d.get("local_instances_down") else ""
    rows = [
        ("gateway", f"{d['id']} (cpnd {d['version']}, pid {d['pid']})"),
        ("uptime", _duration(d["uptime_s"])),
        ("listen", d["listen"]),
        ("http_listen", d["http_listen"] or "-"),
        ("metrics_listen", d["metrics_listen"] or "-"),
        ("control_socket", d["control_socket"]),
        ("peers", f"{d['peers_established']}/{d['peers']} established"),
        ("routes", f"{d['routes']} ({d['paths']} paths)"),
        ("services", f"{d['services']} known, {d['local_instances']} local instances{down}"),
    ]
    if d.get("workers") and len(d["workers"]) > 1:  # [gateway] workers
        ws = d["workers"]
        restarts = sum(w["restarts"] for w in ws)
        rows.append(("workers", f"{sum(w['alive'] for w in ws)}/{len(ws)} running (pids "
                                f"{', '.join(str(w['pid'] or '-') for w in ws)}), {restarts} restarts"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def stats_table(d: dict[str, Any]) -> str:
    """``show stats``: every counter and gauge, one aligned line each."""
    rows = [{"k": f"{group}.{name}", "v": value} for group in ("gateway", "http", "gauges")
            for name, value in d.get(group, {}).items()]
    return table(rows, [("k", "COUNTER"), ("v", "VALUE")])
