"""``cpnd``: run one gateway from a config file, or a lab scenario."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import signal
import sys
import time

import trio

from . import __version__
from .aio import ListenError, leaves
from .config import load_config
from .errors import ConfigError

EXIT_CONFIG = 2
EXIT_LISTEN = 1  # a listener could not be opened (README, "Running a gateway")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "cpn", None)
        if isinstance(fields, dict):
            obj.update(fields)  # machine-readable fields of the line: event, peer, status, ...
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpnd", description="cpn gateway daemon")
    p.add_argument("--version", action="version", version=f"cpnd {__version__}")
    p.add_argument("--config", metavar="FILE.toml", help="run one gateway from this config file")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override [gateway] log_level")
    p.add_argument("--log-format", choices=["text", "json"], help="override [gateway] log_format")
    sub = p.add_subparsers(dest="command")
    lab = sub.add_parser("lab", help="run a scenario of several gateways on loopback")
    lab.add_argument("scenario", help="'paper' (the reference scenario) or a topology file (.toml)")
    lab.add_argument("--dir", help="working directory for keys, configs and sockets (default: a temporary one)")
    lab.add_argument("--selection", choices=["per-request", "per-connection", "dns-ttl"], default="per-request")
    lab.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for convergence (default 30)")
    lab.add_argument("--workers", type=int, metavar="N",
                     help="[gateway] workers = N on every gateway (default: the topology's, else 1)")
    lab.add_argument("--log-level", dest="lab_log_level", choices=["debug", "info", "warning", "error"], default="warning")
    return p


PR_SET_NAME = 15


def set_process_name(name: bytes = b"cpnd") -> None:
    """Name the process as ``ps -e``, ``top`` and ``pgrep cpnd`` see it (Linux: the comm field), however it
    was started (``python -m cpnd`` would be ``python3``); elsewhere nothing happens."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    set_process_name()
    # A reload asked for while we start must not kill us (SIGHUP's default action): the
    # config is being read fresh anyway. The daemon's own handler takes over once it runs.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = build_parser().parse_args(argv)
    if args.command == "lab":
        from .lab import run_lab

        return run_lab(args)
    if not args.config:
        print("cpnd: --config FILE.toml is required (or `cpnd lab paper`)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cpnd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{args.config}: ok ({len(config.peers)} peers, {sum(len(s.instances) for s in config.services)} instances)")
        return 0
    setup_logging(args.log_level or config.gateway.log_level, args.log_format or config.gateway.log_format)
    from .daemon import Daemon
    from .probe import instruments

    try:
        trio.run(Daemon(config).run, instruments=instruments())  # none unless CPN_PROBE is set (benches)
    except BaseException as exc:  # trio wraps what its tasks raise in (nested) exception groups
        found = leaves(exc)
        listen = next((e for e in found if isinstance(e, ListenError)), None)
        if listen is not None:
            # A busy port or an unusable control socket: an operator error, not a crash.
            print(f"cpnd: {listen}", file=sys.stderr)
            return EXIT_LISTEN
        if all(isinstance(e, KeyboardInterrupt) for e in found):
            return 130
        raise
    return 0
