"""The largest classes and functions of cpnd/ by lines (ast spans, docstrings and comments included).

    python scripts/sizes.py [--top 8] [paths...]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spans(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, qualified name) of every class and every function or method in ``path``."""
    tree = ast.parse(path.read_text())
    classes: list[tuple[int, str]] = []
    funcs: list[tuple[int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                classes.append((child.end_lineno - child.lineno + 1, f"{path.name}:{name}"))
                walk(child, name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                funcs.append((child.end_lineno - child.lineno + 1, f"{path.name}:{name}"))
                walk(child, name + ".")

    walk(tree, "")
    return classes, funcs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("paths", nargs="*", type=Path)
    args = ap.parse_args()
    paths = args.paths or sorted((ROOT / "cpnd").glob("*.py"))
    classes, funcs = [], []
    for p in paths:
        c, f = spans(p)
        classes += c
        funcs += f
    for title, rows in (("classes", classes), ("functions", funcs)):
        print(f"largest {title}:")
        for n, name in sorted(rows, reverse=True)[:args.top]:
            print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
