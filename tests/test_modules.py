"""The module structure of cpnd/: no import cycle (type-only and function-level imports included),
and the sans-IO cores never reach trio or sockets, directly or through another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cpnd"

# Every module that decides without doing I/O: protocol, policy, parsing, the gateway core and
# its simulated network. The rest (daemon, the data plane's parts, streams, control, metrics, aio, ...)
# are trio shells.
CORES = ("admission", "channels", "clients", "config", "crypto", "errors", "fairshare", "fleet", "forwarded", "gateway", "grpcmap", "heads", "health", "histogram", "limits",
         "sourcerate",
         "load", "loglimit", "names", "origin", "planner", "policy", "preface", "registry", "rib", "ribfeed", "seal", "selection",
         "session", "status", "tls",
         "tunnel", "vnet", "whole", "wire")
IO = {"trio", "socket", "select", "selectors", "asyncio", "subprocess", "threading"}


def imports(module: str) -> tuple[set[str], set[str]]:
    """(cpnd modules, other top-level modules) that ``module`` imports anywhere in its text."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    local: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (local if alias.name.startswith("cpnd.") else other).add(alias.name.removeprefix("cpnd.").split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("cpnd"):
                other.add((node.module or "").split(".")[0])
            elif node.module in (None, "cpnd"):  # from . import x: a module, or a name of the package
                local |= {a.name if (PKG / f"{a.name}.py").exists() else "__init__" for a in node.names}
            else:
                local.add(node.module.removeprefix("cpnd.").split(".")[0])
    return local, other


def graph() -> dict[str, set[str]]:
    return {p.stem: imports(p.stem)[0] for p in PKG.glob("*.py")}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cpnd_has_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_cores_never_import_trio_or_sockets() -> None:
    g = graph()
    for mod in CORES:
        local, other = imports(mod)
        assert not other & IO, f"{mod} imports {other & IO}"
        assert local <= set(CORES) | {"__init__"}, f"core {mod} imports the shell modules {local - set(CORES)}"
    assert set(CORES) <= set(g)


def test_every_module_is_a_core_or_a_known_shell() -> None:
    shells = {"__init__", "__main__", "aio", "attempts", "body", "cli", "control", "daemon", "dataplane", "egress",
              "h1", "h2edge", "h2io", "h2up", "hangups", "lab", "main", "metrics", "pending", "inprocess", "plane", "probe", "registration", "relay", "simulate", "streams",
              "tlsstream", "transit", "users", "worker", "workers", "handoff", "channelio"}
    assert set(graph()) == set(CORES) | shells  # a new module says which it is


def test_no_module_is_named_like_a_standard_library_one() -> None:
    """A module named like the standard library's (``select``, ``pipes``) reads as that one in a traceback
    or an import line; ``import select`` inside the package would get the standard one all the same."""
    import sys

    clash = sorted(p.stem for p in PKG.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clash, f"cpnd/ modules named like standard library ones: {clash}"



MAX_FUNCTION_LINES = 60


def long_functions(source: str, name: str) -> list[str]:
    """``name:function (lines)`` for every function in ``source`` longer than ``MAX_FUNCTION_LINES``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    found = [f for p in sorted(PKG.glob("*.py")) for f in long_functions(p.read_text(), p.name)]
    assert not found, "functions over a screen: " + ", ".join(found)


def test_the_length_check_counts_a_functions_lines() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    assert long_functions(f"def f():\n{body}", "m") == []
    assert long_functions(f"async def g():\n{body}    return 1\n", "m") == [f"m:g ({MAX_FUNCTION_LINES + 1} lines)"]
