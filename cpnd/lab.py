"""``cpnd lab``: several real gateways on loopback, from the paper's scenario or a topology file.

Also the harness the integration tests and benches use: ``Topology`` -> config files
and keys -> ``Lab`` (one ``cpnd`` process per gateway) -> wait for convergence.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from .control import ControlError, request
from .crypto import generate_key, public_key_b64, write_private_key
from .names import id_problem, service_problem
from .origin import certificate_pem, issue

CERT_DAYS = 30


@attrs.frozen
class Instance:
    id: str
    gateway: str
    service: str
    capacity: float = 50.0
    price: float = 1.0
    compute_latency_ms: float = 1.0


@attrs.frozen
class Link:
    a: str
    b: str
    rtt_ms: float = 0.0


@attrs.frozen
class Topology:
    gateways: tuple[str, ...]
    links: tuple[Link, ...]
    instances: tuple[Instance, ...] = ()
    # Extra [gateway] keys for every gateway (timers and the like).
    gateway_options: dict[str, Any] = attrs.field(factory=dict)

    def neighbours(self, gw: str) -> list[tuple[str, float]]:
        out = []
        for link in self.links:
            if link.a == gw:
                out.append((link.b, link.rtt_ms))
            elif link.b == gw:
                out.append((link.a, link.rtt_ms))
        return out


# The reference scenario (PAPER.md, "The experiment"): RTTs in ms.
PAPER_RTT = {
    "gw1": {"gw3": 4, "gw4": 6, "gw5": 6, "gw6": 6, "gw7": 10},
    "gw2": {"gw3": 6, "gw4": 4, "gw5": 4, "gw6": 4, "gw7": 2},
}
PAPER_PRICES = (2, 1, 2, 1, 2)
PAPER_COMPUTE_MS = (1, 3, 1, 3, 1)


def paper_topology() -> Topology:
    """GW1..GW7 with the paper's RTT table; s1..s5 of /yolo behind GW3..GW7."""
    links = tuple(Link(u, g, rtt) for u, row in PAPER_RTT.items() for g, rtt in row.items())
    instances = tuple(
        Instance(f"s{i + 1}", f"gw{i + 3}", "/yolo", 50.0, PAPER_PRICES[i], PAPER_COMPUTE_MS[i]) for i in range(5)
    )
    return Topology(tuple(f"gw{i}" for i in range(1, 8)), links, instances)


def load_topology(path: Path) -> Topology:
    """Read a topology file: ``[[gateways]] id``, ``[[links]] a b rtt_ms``, ``[[instances]] ...``."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    try:
        gws = tuple(g["id"] for g in data.get("gateways", []))
        links = tuple(Link(link["a"], link["b"], float(link.get("rtt_ms", 0))) for link in data.get("links", []))
        instances = tuple(
            Instance(i["id"], i["gateway"], i["service"], float(i.get("capacity", 50)), float(i.get("price", 1)),
                     float(i.get("compute_latency_ms", 1)))
            for i in data.get("instances", [])
        )
        options = dict(data.get("gateway", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: missing or bad field {exc}") from None
    for g in gws:
        if id_problem(g):
            raise ValueError(f"{path}: gateway id {g!r}: {id_problem(g)}")
    for link in links:
        if link.a not in gws or link.b not in gws:
            raise ValueError(f"{path}: link {link.a}-{link.b} names an unknown gateway")
    for i in instances:
        if i.gateway not in gws or service_problem(i.service):
            raise ValueError(f"{path}: instance {i.id}: unknown gateway or bad service path")
    return Topology(gws, links, instances, options)


START_ATTEMPTS = 3  # a lab's start, when another process took one of the ports it was given


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports the OS reports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@attrs.define
class GatewaySpec:
    id: str
    config: Path
    control: Path
    listen: str
    http: str
    public_key: str
    metrics: str


def write_lab(topo: Topology, workdir: Path, *, selection: str = "per-request",
              instance_url: Callable[[Instance], str] | None = None, trust: bool = True) -> dict[str, GatewaySpec]:
    """Keys and one config file per gateway of ``topo`` under ``workdir``.

    ``trust``: a domain key (``domain.key``, every gateway's trust anchor) and a certificate per
    gateway naming its services (``<id>.cert``), so that every route in the lab is ``valid``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3 * len(topo.gateways))
    specs: dict[str, GatewaySpec] = {}
    domain = generate_key() if trust else None
    if domain is not None:
        write_private_key(workdir / "domain.key", domain, force=True)
    for n, gw in enumerate(topo.gateways):
        key = generate_key()
        write_private_key(workdir / f"{gw}.key", key, force=True)
        services = sorted({i.service for i in topo.instances if i.gateway == gw})
        if domain is not None and services:
            cert = issue(domain, key.public_key().public_bytes_raw(), services, int(time.time()) + CERT_DAYS * 86400, gw)
            (workdir / f"{gw}.cert").write_text(certificate_pem(cert))
        specs[gw] = GatewaySpec(gw, workdir / f"{gw}.toml", workdir / f"{gw}.sock",
                                f"127.0.0.1:{ports[3 * n]}", f"127.0.0.1:{ports[3 * n + 1]}", public_key_b64(key),
                                f"127.0.0.1:{ports[3 * n + 2]}")
    for gw, spec in specs.items():
        lines = ["[gateway]", f"id = {_toml_value(gw)}", f'listen = "{spec.listen}"', f'http_listen = "{spec.http}"',
                 f'metrics_listen = "{spec.metrics}"',
                 f'control_socket = "{spec.control.name}"', f'key_file = "{gw}.key"', f'selection = "{selection}"']
        options = dict(topo.gateway_options)
        if domain is not None:
            options.setdefault("trust_anchors", [public_key_b64(domain)])
            if (workdir / f"{gw}.cert").exists() and any(i.gateway == gw for i in topo.instances):
                options.setdefault("cert_file", f"{gw}.cert")
        if instance_url is None:
            options.setdefault("health_interval_ms", 0)  # placeholder URLs: nothing to probe
        lines += [f"{k} = {_toml_value(v)}" for k, v in options.items()]
        for peer, rtt in topo.neighbours(gw):
            lines += ["", "[[peers]]", f"id = {_toml_value(peer)}", f'address = "{specs[peer].listen}"',
                      f'public_key = "{specs[peer].public_key}"']
            if rtt:
                lines.append(f"emulated_rtt_ms = {rtt!r}")
        by_service: dict[str, list[Instance]] = {}
        for inst in topo.instances:
            if inst.gateway == gw:
                by_service.setdefault(inst.service, []).append(inst)
        for svc, insts in by_service.items():
            lines += ["", "[[services]]", f"path = {_toml_value(svc)}"]
            for inst in insts:
                url = instance_url(inst) if instance_url else f"http://127.0.0.1:9/{inst.id}"
                lines += ["[[services.instances]]", f"id = {_toml_value(inst.id)}", f"url = {_toml_value(url)}",
                          f"capacity = {inst.capacity!r}", f"price = {inst.price!r}",
                          f"compute_latency_ms = {inst.compute_latency_ms!r}"]
        spec.config.write_text("\n".join(lines) + "\n")
    return specs


def add_outside_peer(spec: GatewaySpec, peer_id: str, key_path: Path) -> None:
    """Give a peer from outside the lab (the interop suite, a test's hand-driven session) a key
    at ``key_path`` and add it to ``spec``'s config as a passive peer: it dials, the gateway never does."""
    key = generate_key()
    write_private_key(key_path, key, force=True)
    with open(spec.config, "a") as f:
        f.write(f'\n[[peers]]\nid = {_toml_value(peer_id)}\naddress = "127.0.0.1:9"\n'
                f'public_key = "{public_key_b64(key)}"\npassive = true\n')


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the thread that started us dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own clean-up is all there is


class InstanceProcs:
    """Simulated instances (``python -m cpnd.simulate``): real HTTP servers, one process each or one for a topology.

    ``die_with_parent``: children end when the starting thread does (for ``cpnd lab``, whose
    main thread starts them; not for callers that start processes from worker threads), and
    run in a session of their own: a Ctrl-C at the terminal reaches only ``cpnd lab``, which
    stops them in order.
    """

    def __init__(self, *, die_with_parent: bool = False) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}
        self.preexec = _die_with_parent if die_with_parent else None

    def _spawn(self, args: list[str], lines: int, what: str) -> tuple[subprocess.Popen[str], list[str]]:
        """Start ``python -m cpnd.simulate ARGS``; the process and its first ``lines`` ``listening`` lines."""
        p = subprocess.Popen([sys.executable, "-m", "cpnd.simulate", *args], stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, preexec_fn=self.preexec, start_new_session=self.preexec is not None)
        out = [p.stdout.readline() if p.stdout else "" for _ in range(lines)]
        if not all(line.startswith("listening ") for line in out):
            p.kill()
            p.wait()
            raise RuntimeError(f"{what} did not start")
        return p, out

    def start(self, iid: str, *, compute_ms: float = 0.0, capacity: float = 1e9, port: int = 0,
              tls: tuple[Path, Path] | None = None) -> int:
        """Start one instance; ``tls`` (certificate file, key file): it serves https://."""
        p, (line,) = self._spawn(["--id", iid, "--compute-ms", str(compute_ms), "--capacity", str(capacity),
                                  "--port", str(port), *(("--tls-cert", str(tls[0]), "--tls-key", str(tls[1])) if tls else ())],
                                 1, f"simulated instance {iid}")
        self.procs[iid] = p
        self.ports[iid] = int(line.rsplit(":", 1)[1])
        return self.ports[iid]

    def start_topology(self, topo: Topology) -> Callable[[Instance], str]:
        """Serve every instance of ``topo`` (its compute latency and capacity) from one process; the URL map.

        One process, not one each: a lab of many instances on a small machine would otherwise
        spend its CPU switching between them, and the measured compute latencies with it.
        """
        if topo.instances:
            args = [a for inst in topo.instances
                    for a in ("--instance", f"{inst.id}:{inst.compute_latency_ms}:{inst.capacity}")]
            p, lines = self._spawn(args, len(topo.instances), "simulated instances")
            for line in lines:
                _, hostport, iid = line.split()
                self.procs[iid] = p
                self.ports[iid] = int(hostport.rsplit(":", 1)[1])
        return lambda inst: f"http://127.0.0.1:{self.ports[inst.id]}/{inst.id}/detect"

    def kill(self, iid: str) -> None:
        """SIGKILL one instance (started with ``start``: those of ``start_topology`` share a process)."""
        p = self.procs[iid]
        if sum(q is p for q in self.procs.values()) > 1:
            raise ValueError(f"{iid} shares its process with other instances: start it with start() to kill it alone")
        p.kill()
        p.wait()

    def __enter__(self) -> InstanceProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        procs = list({id(p): p for p in self.procs.values()}.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Lab:
    """One real ``cpnd`` process per gateway; always reaped on exit."""

    def __init__(self, specs: dict[str, GatewaySpec], *, log_level: str = "info", die_with_parent: bool = False) -> None:
        self.specs = specs
        self.log_level = log_level
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.preexec = _die_with_parent if die_with_parent else None  # as for InstanceProcs

    def start(self, gw: str) -> None:
        spec = self.specs[gw]
        log = open(spec.config.with_suffix(".log"), "ab")
        self.procs[gw] = subprocess.Popen(
            [sys.executable, "-m", "cpnd", "--config", str(spec.config), "--log-level", self.log_level],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self.preexec,
            start_new_session=self.preexec is not None,  # as for InstanceProcs: the lab stops them itself
        )
        log.close()

    def start_all(self, *, attempts: int = START_ATTEMPTS) -> None:
        """Start every gateway. The OS chose their ports free (``free_ports``), but another process may
        bind one before the gateway does: then every port is chosen again and all start anew."""
        for attempt in range(attempts):
            logged = {gw: self._log_size(gw) for gw in self.specs}
            for gw in self.specs:
                self.start(gw)
            if attempt == attempts - 1 or not self._port_taken(logged):
                return
            self.stop_all()
            self._new_ports()

    def _log_size(self, gw: str) -> int:
        try:
            return self.specs[gw].config.with_suffix(".log").stat().st_size
        except OSError:
            return 0

    def _port_taken(self, logged: dict[str, int], timeout: float = 30.0) -> bool:
        """Wait until every gateway has bound its listeners (its status says its metrics port, bound last)
        or exited; True if one exited because a port of its was taken (its log since ``logged`` says so)."""
        waiting, deadline = set(self.specs), time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for gw in list(waiting):
                if self.procs[gw].poll() is not None:
                    if "Address already in use" in self.log(gw)[logged[gw]:]:
                        return True
                    waiting.discard(gw)  # another failure: the caller's wait reports it
                    continue
                try:  # the metrics port is the last it binds
                    if request(self.specs[gw].control, "status", timeout=1.0)["metrics_listen"] == self.specs[gw].metrics:
                        waiting.discard(gw)
                except (ControlError, KeyError, TypeError):
                    pass
            time.sleep(0.05)
        return False

    def _new_ports(self) -> None:
        """Every gateway's listen, http and metrics address on ports the OS has free now, in every config."""
        ports = iter(free_ports(3 * len(self.specs)))
        moved: dict[str, str] = {}
        for spec in self.specs.values():
            for field in ("listen", "http", "metrics"):
                new = f"127.0.0.1:{next(ports)}"
                moved[f'"{getattr(spec, field)}"'] = f'"{new}"'
                setattr(spec, field, new)
        for spec in self.specs.values():
            text = spec.config.read_text()
            for old, new in moved.items():
                text = text.replace(old, new)
            spec.config.write_text(text)

    def stop(self, gw: str, sig: int = signal.SIGTERM, timeout: float = 10.0, *, signalled: bool = False) -> int:
        proc = self.procs.pop(gw)
        if proc.poll() is None:
            if not signalled:
                proc.send_signal(sig)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def stop_all(self) -> None:
        for gw in list(self.procs):
            if self.procs[gw].poll() is None:
                self.procs[gw].send_signal(signal.SIGTERM)
        for gw in list(self.procs):
            self.stop(gw, signalled=True)

    def dead(self) -> list[str]:
        return [gw for gw, p in self.procs.items() if p.poll() is not None]

    def log(self, gw: str) -> str:
        try:
            return self.specs[gw].config.with_suffix(".log").read_text(errors="replace")
        except OSError:
            return ""

    def query(self, gw: str, cmd: str, **args: Any) -> Any:
        return request(self.specs[gw].control, cmd, **args)

    def routes(self, gw: str) -> list[dict[str, Any]]:
        return self.query(gw, "show-routes")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Poll ``predicate`` (control-socket errors count as false) until true or fail."""
        deadline = time.monotonic() + timeout
        while True:
            dead = self.dead()
            if dead:
                raise RuntimeError(f"gateway {dead[0]} exited:\n{self.log(dead[0])[-2000:]}")
            try:
                if predicate():
                    return
            except ControlError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)

    def converged(self, topo: Topology, gateways: Iterable[str] | None = None) -> bool:
        """Every session between running gateways is up and every RIB holds a best route to every instance, up."""
        want = {(i.service, i.gateway, i.id) for i in topo.instances if i.gateway in self.procs}
        for gw in gateways if gateways is not None else self.procs:
            peers = {p["id"]: p["state"] for p in self.query(gw, "show-peers")}
            if any(peers.get(n) != "established" for n, _ in topo.neighbours(gw) if n in self.procs):
                return False
            have = {(r["service"], r["origin"], r["instance"]) for r in self.routes(gw) if r["best"] and not r["down"]}
            if have != want:
                return False
        return True

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def run_lab(args: argparse.Namespace) -> int:
    """The body of ``cpnd lab SCENARIO``: start, wait for convergence, serve until interrupted."""
    topo = _lab_topology(args)
    if topo is None:
        return 2
    tmp = None
    if args.dir:
        workdir = Path(args.dir).resolve()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cpn-lab-")
        workdir = Path(tmp.name)
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # If this process is killed outright, its gateways and instances must not live on.
    insts = InstanceProcs(die_with_parent=True)
    lab: Lab | None = None
    try:
        urls = insts.start_topology(topo)
        specs = write_lab(topo, workdir, selection=args.selection, instance_url=urls)
        lab = Lab(specs, log_level=args.lab_log_level, die_with_parent=True)
        lab.start_all()
        for gw, spec in specs.items():
            print(f"{gw} http={spec.http} control={spec.control}", flush=True)
        return _serve_lab(args, lab, topo, workdir, stop)
    finally:
        if lab is not None:
            lab.stop_all()
        insts.stop_all()
        for s, h in old.items():
            signal.signal(s, h)
        if tmp is not None:
            tmp.cleanup()
        sys.stdout.flush()


def _lab_topology(args: argparse.Namespace) -> Topology | None:
    """The scenario's topology (the paper's, or a file's), with ``--workers``; None: said why on stderr."""
    if args.scenario == "paper":
        topo = paper_topology()
    else:
        try:
            topo = load_topology(Path(args.scenario))
        except ValueError as exc:
            print(f"cpnd lab: {exc}", file=sys.stderr)
            return None
    if getattr(args, "workers", None):
        topo = attrs.evolve(topo, gateway_options={**topo.gateway_options, "workers": args.workers})
    return topo


def _serve_lab(args: argparse.Namespace, lab: Lab, topo: Topology, workdir: Path, stop: dict[str, bool]) -> int:
    """Wait for the lab to converge, say ``ready``, then watch its gateways until ``stop``; the exit status."""
    try:
        lab.wait_for(lambda: stop["flag"] or lab.converged(topo), args.timeout, "every RIB to converge")
        if getattr(args, "workers", None):  # and every worker serving (a worker's start takes a second or so)
            lab.wait_for(lambda: stop["flag"] or all(w["report_age_ms"] is not None for gw in lab.specs
                                                     for w in lab.query(gw, "status")["workers"]),
                         args.timeout, "every worker to report")
    except (TimeoutError, RuntimeError) as exc:
        print(f"cpnd lab: {exc}; logs in {workdir}", file=sys.stderr)
        return 1
    if stop["flag"]:
        return 130
    print("ready", flush=True)
    while not stop["flag"]:
        if lab.dead():
            gw = lab.dead()[0]
            print(f"cpnd lab: {gw} exited:\n{lab.log(gw)[-2000:]}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    return 0
