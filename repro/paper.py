"""The published numbers (``docs/paper/*.csv``, one number per line) and lookups into them."""
from __future__ import annotations

import csv
import os
from functools import lru_cache
from typing import Optional

PAPER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "paper")
FILES = {"icl1": "icl_table1.csv", "icl2": "icl_table2.csv", "icl3": "icl_table3.csv",
         "icl4": "icl_table4.csv", "icl5": "icl_table5.csv", "icl6": "icl_table6.csv",
         "rde_noise": "rde_table1_noise.csv", "rde_ablation": "rde_table2_ablation.csv"}


@lru_cache(maxsize=None)
def load(key: str) -> tuple:
    """All rows of one published table (dicts of the CSV's columns, ``value`` as float)."""
    if key not in FILES:
        raise KeyError(f"unknown paper table {key!r}; known: {sorted(FILES)}")
    path = os.path.join(PAPER_DIR, FILES[key])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: docs/paper/ holds the published numbers "
                                f"(see docs/paper/README.md)")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [dict(r, value=float(r["value"])) for r in csv.DictReader(f)]
    return tuple(rows)


def lookup(key: str, metric: str, **where) -> Optional[float]:
    """The one published number of ``key`` with ``metric`` and every ``where`` column equal
    (compared as strings); None when the paper prints none; an error when several match."""
    want = {k: str(v) for k, v in where.items()}
    hits = [r for r in load(key) if r["metric"] == metric
            and all(r.get(k) == v for k, v in want.items())]
    if len(hits) > 1:
        raise ValueError(f"{FILES[key]}: {len(hits)} rows match {metric} {want}; add a column")
    return hits[0]["value"] if hits else None


def metrics(key: str, names, **where) -> dict:
    """``{metric: value or None}`` for several metrics of one row."""
    return {m: lookup(key, m, **where) for m in names}
