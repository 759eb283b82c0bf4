"""The shape of the code in figures: lines per package, the biggest package, imports that run
back up the layers (tests/test_layers.py's table), imports inside functions, functions over 80
lines. Library code is the packages (real ones, offline/, repro/); scripts/, tests/ and the
top-level scripts are counted apart.

    python scripts/code_stats.py [ROOT] [--list]     # ROOT: a checkout (default: this one)
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("datasets", "model", "solver", "processor", "utils", "thi", "rda", "repro", "offline")
OTHERS = ("scripts", "tests")
LONG = 80


def _layers():
    """tests/test_layers.py, the one home of the allowed arrows, loaded as a module."""
    spec = importlib.util.spec_from_file_location("_test_layers", os.path.join(REPO, "tests", "test_layers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_files(root: str, top: str) -> list[str]:
    """Every .py file under ``root/top`` (``top`` "." = the top-level scripts only)."""
    if top == ".":
        return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return found


def file_stats(path: str) -> dict:
    """lines, imports inside functions (line, module) and functions longer than LONG lines."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    inner, long_functions = [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else \
                    ["." * child.level + (child.module or "")]
                inner.append((child.lineno, ", ".join(names)))
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and child.end_lineno - child.lineno + 1 > LONG:
                long_functions.append((child.lineno, child.name, child.end_lineno - child.lineno + 1))
            visit(child, in_function or is_function)

    visit(tree, False)
    return {"lines": source.count("\n"), "inner_imports": inner, "long_functions": long_functions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=REPO, help="a checkout of the project")
    ap.add_argument("--list", action="store_true", help="also list each import inside a function "
                                                        "and each long function")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    rows, totals = [], {"library": [0, 0, 0], "other": [0, 0, 0]}
    listing = []
    for top in (*PACKAGES, *OTHERS, "."):
        files = python_files(root, top)
        if not files:
            continue
        lines = inner = long = 0
        for path in files:
            s = file_stats(path)
            lines += s["lines"]
            inner += len(s["inner_imports"])
            long += len(s["long_functions"])
            rel = os.path.relpath(path, root)
            listing += [f"  import in a function  {rel}:{n}: {m}" for n, m in s["inner_imports"]]
            listing += [f"  function over {LONG} lines  {rel}:{n}: {name} ({k} lines)"
                        for n, name, k in s["long_functions"]]
        kind = "library" if top in PACKAGES else "other"
        for i, v in enumerate((lines, inner, long)):
            totals[kind][i] += v
        rows.append((top if top != "." else "(top-level .py)", kind, lines, inner, long))
    library_lines = totals["library"][0]
    print(f"{'package':<16} {'kind':<8} {'lines':>6} {'share':>6} {'imports in functions':>21} "
          f"{'functions > ' + str(LONG) + ' lines':>22}")
    for name, kind, lines, inner, long in rows:
        share = f"{100 * lines / library_lines:.0f}%" if kind == "library" else ""
        print(f"{name:<16} {kind:<8} {lines:>6} {share:>6} {inner:>21} {long:>22}")
    for kind, (lines, inner, long) in totals.items():
        print(f"{'total ' + kind:<16} {'':<8} {lines:>6} {'':>6} {inner:>21} {long:>22}")
    biggest = max((r for r in rows if r[1] == "library"), key=lambda r: r[2])
    print(f"biggest package: {biggest[0]} ({biggest[2]} lines, {100 * biggest[2] / library_lines:.0f}% of the library)")
    back_up = _layers().arrows_back_up(root)
    print(f"imports that run back up the layers (tests/test_layers.py): {len(back_up)}")
    for line in back_up:
        print(f"  {line}")
    if args.list:
        print("\n".join(listing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
