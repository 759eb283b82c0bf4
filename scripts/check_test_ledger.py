"""After the pytest runs of `make test`: did every collected test run and pass somewhere?

Each run with ICL_TEST_LEDGER=DIR wrote DIR/run-*.json (tests/conftest.py): the tests it
collected (with their markers), those it deselected, and each test's outcome. Over all runs,
every collected test that is not marked ``gpu`` must have passed in at least one of them.
A test that no invocation selects (e.g. a new marker left out of the Makefile's -m
expressions), that skipped, or that failed is listed, and the exit status is 1.

    python scripts/check_test_ledger.py work/test-ledger
"""
from __future__ import annotations

import glob
import json
import os
import sys

EXEMPT_MARKERS = {"gpu"}


def check(ledger_dir: str) -> tuple[list[str], dict]:
    files = sorted(glob.glob(os.path.join(ledger_dir, "run-*.json")))
    if not files:
        return [f"no run-*.json in {ledger_dir}: were the pytest runs started with ICL_TEST_LEDGER={ledger_dir}?"], {}
    collected: dict[str, set] = {}
    passed: set[str] = set()
    seen: dict[str, set] = {}
    for path in files:
        run = json.load(open(path))
        for node, markers in run["collected"].items():
            collected.setdefault(node, set()).update(markers)
        for node, outcome in run["outcomes"].items():
            seen.setdefault(node, set()).add(outcome)
            if outcome == "passed":
                passed.add(node)
    problems = []
    for node in sorted(collected):
        if collected[node] & EXEMPT_MARKERS or node in passed:
            continue
        how = ", ".join(sorted(seen[node])) if node in seen else "never selected by any run (deselected)"
        problems.append(f"{node}: {how}")
    counts = {"runs": len(files), "collected": len(collected), "passed": len(passed),
              "exempt": sum(bool(m & EXEMPT_MARKERS) for m in collected.values())}
    return problems, counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    problems, counts = check(argv[0])
    if counts:
        print(f"[ledger] {counts['runs']} pytest runs: {counts['collected']} tests collected, "
              f"{counts['passed']} passed, {counts['exempt']} gpu-only exempt")
    if problems:
        print(f"[ledger] {len(problems)} tests did not pass in any run:\n  " + "\n  ".join(problems))
        return 1
    print("[ledger] every collected test passed in one of the runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
