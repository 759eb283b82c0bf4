"""A lambda x xi grid of THI (the paper's Fig. 5) that asks the MLLM only what the grid needs.

xi changes which queries get anchors, so THI runs once per xi; lambda only changes Eq. 6, so
every lambda of one xi reuses that run's refined texts (scored once). Localization questions
(caption, candidate image) are the same for every xi, so the response cache answers most of
them after the first xi, and a repeated sweep asks nothing.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from utils import run_dir as rd

from . import defaults, report
from .pipeline import _score, run_thi
from .rerank import check_lambda, rerank

from utils.io import atomic_write_json, atomic_write_text
from utils.metrics import t2i_metrics


@dataclass
class SweepResult:
    """``grid[(xi, lam)]``: metrics (R1, R5, R10, mAP, mINP, rSum; None without ids) and the
    number of anchored/refined queries; ``calls[xi]``: MLLM requests and uncached requests of
    that xi's run; ``base``: the base model's metrics."""

    lams: list
    xis: list
    grid: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    base: Optional[dict] = None


def parse_grid(text: str, name: str) -> list:
    """"0.5,0.6" -> [0.5, 0.6]; an error naming the option on anything else."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise ValueError(f"{name}: no values in {text!r}")
    return values


def run_sweep(similarity, captions: Sequence[str], image_paths: Sequence[str], client,
              score_texts: Callable, *, lams: Sequence[float], xis: Sequence[float],
              rounds: int = defaults.ROUNDS, q_pids=None, g_pids=None, out_dir: Optional[str] = None,
              temperature: float = 0.01, max_tokens: int = 2048,
              progress: bool = True, checkpoint: Optional[dict] = None) -> SweepResult:
    """Evaluate every (xi, lambda) pair; with ``out_dir`` each xi's THI run lives (resumable)
    in ``out_dir/xi<xi>_lam<first lambda>`` and the grid is saved as sweep.json / sweep.csv."""
    lams = [check_lambda(v) for v in lams]
    xis = [float(v) for v in xis]
    if not lams or not xis:
        raise ValueError("a sweep needs at least one lambda and one xi")
    base = np.asarray(similarity.detach().cpu().numpy() if hasattr(similarity, "detach")
                      else similarity, dtype=np.float32)
    result = SweepResult(lams=lams, xis=xis)
    with_ids = q_pids is not None
    for xi in xis:
        sub = os.path.join(out_dir, f"xi{xi:g}_lam{lams[0]:g}") if out_dir else None
        res = run_thi(base, captions, image_paths, client, score_texts, lam=lams[0], xi=xi,
                      rounds=rounds, q_pids=q_pids, g_pids=g_pids, out_dir=sub,
                      temperature=temperature, max_tokens=max_tokens, progress=progress,
                      checkpoint=checkpoint)
        result.base = res.base_metrics
        result.calls[xi] = {"requests": res.cost["calls_total"]["all"],
                            "uncached": res.cost["uncached_total"]["all"]}
        idx = np.array([q for q, t in enumerate(res.refined) if t is not None], dtype=np.int64)
        rows = _score(score_texts, [res.refined[q] for q in idx], base.shape[1]) if idx.size \
            else np.zeros((0, base.shape[1]), dtype=np.float32)
        for lam in lams:
            sim = rerank(base, idx, rows, res.anchors, lam)
            m = report.with_rsum(t2i_metrics(sim, q_pids, g_pids)) if with_ids else None
            result.grid[(xi, lam)] = {"metrics": m, "anchored": int((res.anchors >= 0).sum()),
                                      "refined": int(idx.size)}
    if out_dir:
        write_sweep(out_dir, result)
    return result


def format_sweep(result: SweepResult) -> str:
    """The R1 and mAP grids (rows xi, columns lambda) and the MLLM requests per xi."""
    parts = []
    if result.base is not None:
        parts.append(f"base: R1 {result.base['R1']:.2f}  mAP {result.base['mAP']:.2f}")
        values = {k: v["metrics"] for k, v in result.grid.items()}
        for metric in ("R1", "mAP"):
            parts.append(report.grid_table(values, result.lams, result.xis, metric))
    calls = ", ".join(f"xi {xi:g}: {c['requests']} ({c['uncached']} uncached)"
                      for xi, c in result.calls.items())
    parts.append(f"MLLM requests per xi: {calls}")
    return "\n".join(parts)


def write_sweep(out_dir: str, result: SweepResult) -> None:
    """``sweep.json`` (everything) and ``sweep.csv`` (one row per grid point)."""
    points = [{"xi": xi, "lam": lam, **v} for (xi, lam), v in result.grid.items()]
    atomic_write_json(os.path.join(out_dir, rd.THI_SWEEP),
                      {"lams": result.lams, "xis": result.xis, "base": result.base,
                       "points": points,
                       "calls": [{"xi": xi, **c} for xi, c in result.calls.items()]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["xi", "lam", *report.METRICS, "anchored", "refined", "requests_of_xi",
                     "uncached_of_xi"])
    for p in points:
        m = p["metrics"] or {}
        writer.writerow([p["xi"], p["lam"], *(round(m[k], 4) if m else "" for k in report.METRICS),
                         p["anchored"], p["refined"], result.calls[p["xi"]]["requests"],
                         result.calls[p["xi"]]["uncached"]])
    atomic_write_text(os.path.join(out_dir, "sweep.csv"), buf.getvalue())
