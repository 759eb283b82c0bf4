"""Statistics of the mini paper: per-query metrics, mean and spread over seeds, paired effects with
a 95% interval, and the verdict an effect earns.

The interval of an effect (row A - row B, both run with the same seeds on the same data) is a
paired bootstrap over seeds and queries: each draw resamples the seeds (with replacement) and,
independently, the test queries (with replacement, the same queries for A and B and for every
seed), and averages the per-query differences of the drawn (seed, query) cells. Its 2.5 and 97.5
percentiles are the interval. It covers both sources of noise a reader cares about: another
training seed, and another draw of test queries. With one seed it is a bootstrap over queries.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

PER_QUERY = ("R1", "R5", "R10", "mAP", "mINP")
DRAWS = 2000
VERDICTS = ("paper's direction", "opposite", "within noise")


def per_query(similarity: np.ndarray, q_pids, g_pids) -> dict:
    """Each query's hit@1/5/10, AP and INP in percent: their means are R1, R5, R10, mAP, mINP
    (IRRA's definitions, as ``utils.metrics``)."""
    sim = np.asarray(similarity, dtype=np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None]
    n_pos = hits.sum(axis=1)
    if (n_pos == 0).any():
        raise ValueError("a query has no correct gallery image: per-query metrics undefined")
    ranks = np.arange(1, hits.shape[1] + 1)
    cum = np.cumsum(hits, axis=1)
    ap = (hits * cum / ranks).sum(axis=1) / n_pos
    last = hits.shape[1] - np.argmax(hits[:, ::-1], axis=1)  # 1-based rank of the last positive
    first = np.argmax(hits, axis=1) + 1
    return {"R1": 100.0 * (first <= 1), "R5": 100.0 * (first <= 5), "R10": 100.0 * (first <= 10),
            "mAP": 100.0 * ap, "mINP": 100.0 * n_pos / last}


def mean_spread(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation over seeds; None with one seed)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def paired_interval(hi: np.ndarray, lo: np.ndarray, *, draws: int = DRAWS, seed: int = 0) -> dict:
    """Effect ``hi - lo`` from (seeds x queries) per-query values of two rows; its paired
    bootstrap 95% interval over seeds and queries (see the module doc)."""
    hi, lo = np.atleast_2d(np.asarray(hi, float)), np.atleast_2d(np.asarray(lo, float))
    if hi.shape != lo.shape:
        raise ValueError(f"paired rows differ in shape: {hi.shape} vs {lo.shape}")
    d = hi - lo
    n_seeds, n_q = d.shape
    rng = np.random.default_rng(seed)
    w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=draws) / n_seeds
    w_q = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=draws) / n_q
    boot = np.einsum("bs,sq,bq->b", w_seed, d, w_q)
    lo_ci, hi_ci = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci": [float(lo_ci), float(hi_ci)], "seeds": int(n_seeds),
            "queries": int(n_q), "per_seed": [float(x) for x in d.mean(axis=1)]}


def verdict(ci: Optional[Sequence[float]], paper: Optional[float]) -> str:
    """"paper's direction" or "opposite" only when the interval excludes 0; "within noise"
    otherwise; "-" when there is no interval or the paper reports no change."""
    if ci is None or paper is None or abs(paper) < 1e-9:
        return "-"
    lo, hi = ci
    if lo <= 0.0 <= hi:
        return "within noise"
    return "paper's direction" if (lo > 0) == (paper > 0) else "opposite"
