"""THI's reports: the per-round metrics table (the paper's Fig. 6), rounds/cost/query files and
the log. Everything here only formats and writes; nothing decides."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from typing import Mapping, Optional, Sequence

from utils.io import atomic_write_json, atomic_write_text
from utils import run_dir as rd

from utils.metrics import metrics_table
from prettytable import PrettyTable
from utils.logger import setup_logger

METRICS = ("R1", "R5", "R10", "mAP", "mINP", "rSum")
STAGE_NAMES = ("loc", "vqa", "aggr")


def with_rsum(metrics: Mapping[str, float]) -> dict:
    """``metrics`` (as t2i_metrics gives them) plus rSum = R1 + R5 + R10."""
    out = {k: float(v) for k, v in metrics.items()}
    out["rSum"] = out["R1"] + out["R5"] + out["R10"]
    return out


def round_table(round_no: int, base: Mapping, previous: Mapping, now: Mapping) -> str:
    """Base / previous round / this round, as the release prints after every round."""
    prev_name = "base" if round_no == 1 else f"round {round_no - 1}"
    return metrics_table([("base", base), (f"previous ({prev_name})", previous),
                          (f"round {round_no}", now)], title=f"THI round {round_no}")


def rounds_table(base: Mapping, rounds: Sequence[Mapping]) -> str:
    """One row per round (the paper's Fig. 6 as a table): metrics after each round, the MLLM
    requests that round made per stage, its new anchors and its unparseable answers per stage
    (loc/vqa/aggr; unparseable localization answers count as "No")."""
    table = PrettyTable(["after", *METRICS, "loc", "vqa", "aggr", "new anchors",
                         "unparseable loc/vqa/aggr"])
    table.title = "THI per round"
    table.add_row(["base", *(f"{with_rsum(base)[k]:.2f}" for k in METRICS), "", "", "", "", ""])
    for r in rounds:
        if not r.get("metrics"):
            continue
        m = with_rsum(r["metrics"])
        calls, failed = r.get("calls", {}), r.get("parse_failures", {})
        table.add_row([f"round {r['round']}", *(f"{m[k]:.2f}" for k in METRICS),
                       *(calls.get(s, "") for s in STAGE_NAMES), r.get("new_anchors", ""),
                       "/".join(str(failed.get(s, 0)) for s in STAGE_NAMES)])
    return table.get_string()


def make_logger(log_file: Optional[str], console: bool) -> logging.Logger:
    """The ``thi`` logger, writing to ``log_file`` (appended) and, if ``console``, to stdout.
    Call :func:`close_logger` when done so the file is released."""
    return setup_logger("thi", log_file, console=console)


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def _flat_round(rec: Mapping) -> dict:
    row = {"round": rec["round"], "asked": rec.get("asked", 0),
           "new_anchors": rec.get("new_anchors", 0), "anchored_total": rec.get("anchored_total", 0),
           "refined_total": rec.get("refined_total", 0)}
    for kind in ("calls", "uncached", "parse_failures"):
        for stage in STAGE_NAMES:
            row[f"{kind}_{stage}"] = rec.get(kind, {}).get(stage, 0)
    row["seconds"] = round(float(rec.get("seconds", 0.0)), 4)
    row["mllm_seconds"] = round(float(rec.get("mllm_seconds", 0.0)), 4)
    for m in METRICS:
        row[m] = "" if rec.get("metrics") is None else round(rec["metrics"][m], 4)
    return row


def write_rounds(out_dir: str, base_metrics: Optional[Mapping], records: Sequence[Mapping]) -> None:
    """``rounds.json`` (base metrics and every round's record) and ``rounds.csv`` (one row per
    round, round 0 = the base model)."""
    atomic_write_json(os.path.join(out_dir, rd.THI_ROUNDS),
                      {"base": base_metrics, "rounds": list(records)})
    rows = []
    if base_metrics is not None:
        base = {"round": 0, "metrics": base_metrics}
        rows.append(_flat_round(base))
    rows += [_flat_round(r) for r in records]
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[-1].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(out_dir, "rounds.csv"), buf.getvalue())


def cost_report(records: Sequence[Mapping], num_queries: int, interacted: int,
                client_stats: Optional[Mapping]) -> dict:
    """MLLM calls per stage per round and in total, queries that needed interaction, seconds
    per query (all, and without the MLLM's own time), and the client's cache counters."""
    total = {s: sum(r.get("calls", {}).get(s, 0) for r in records) for s in STAGE_NAMES}
    uncached = {s: sum(r.get("uncached", {}).get(s, 0) for r in records) for s in STAGE_NAMES}
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    mllm = sum(float(r.get("mllm_seconds", 0.0)) for r in records)
    n = max(num_queries, 1)
    return {
        "queries": num_queries,
        "queries_interacted": interacted,
        "calls_per_round": [{"round": r["round"], **{s: r.get("calls", {}).get(s, 0)
                                                     for s in STAGE_NAMES}} for r in records],
        "calls_total": {**total, "all": sum(total.values())},
        "calls_per_query": sum(total.values()) / n,
        "uncached_total": {**uncached, "all": sum(uncached.values())},
        "seconds_total": seconds,
        "mllm_seconds_total": mllm,
        "seconds_per_query": seconds / n,
        "overhead_seconds_per_query": (seconds - mllm) / n,
        "seconds_per_interacted_query": seconds / max(interacted, 1),
        "client_stats": dict(client_stats) if client_stats else None,
    }


def write_queries(out_dir: str, rows: Sequence[Mapping]) -> None:
    """``queries.jsonl``: one JSON object per query."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(os.path.join(out_dir, "queries.jsonl"), text)


def grid_table(values: Mapping, lams: Sequence[float], xis: Sequence[float], metric: str) -> str:
    """A xi-by-lambda grid of one metric (the paper's Fig. 5)."""
    table = PrettyTable([f"{metric}: xi \\ lambda", *(f"{lam:g}" for lam in lams)])
    for xi in xis:
        table.add_row([f"{xi:g}", *(f"{values[(xi, lam)][metric]:.2f}" for lam in lams)])
    return table.get_string()
