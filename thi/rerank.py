"""Eq. 6 re-ranking: S_hat(q, v) = lambda * S(q, v) + (1 - lambda) * S_bar(q_hat, v).

S_bar is the model's similarity of the refined query q_hat, except at the anchor image, where
it is 1 (the MLLM confirmed that image). Queries without a refined text keep S, which is Eq. 6
with S_bar = S. Every row depends only on its own query, so rows can be re-ranked as soon as
their refined text exists; the result equals re-ranking all refined queries at the end.
"""
from __future__ import annotations

import numpy as np


def check_lambda(lam: float) -> float:
    """``lam`` as a float in [0, 1], or a ValueError naming the option."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (--lam, Eq. 6's lambda) must be in [0, 1], got {lam}")
    return lam


def rerank_rows(base_rows: np.ndarray, refined_rows: np.ndarray, anchor_cols: np.ndarray,
                lam: float) -> np.ndarray:
    """Eq. 6 for n refined queries.

    ``base_rows`` [n, G]: S of those queries; ``refined_rows`` [n, G]: the model's similarity of
    their refined texts; ``anchor_cols`` [n]: each query's anchor gallery index. Returns [n, G]
    float32; the inputs are not modified.
    """
    lam = check_lambda(lam)
    base_rows = np.asarray(base_rows, dtype=np.float32)
    s_bar = np.array(refined_rows, dtype=np.float32, copy=True)
    anchor_cols = np.asarray(anchor_cols, dtype=np.int64)
    if s_bar.shape != base_rows.shape or anchor_cols.shape != (base_rows.shape[0],):
        raise ValueError(f"rerank_rows: base {base_rows.shape}, refined {s_bar.shape} and "
                         f"anchors {anchor_cols.shape} do not match ([n, G], [n, G], [n])")
    if anchor_cols.size and (anchor_cols.min() < 0 or anchor_cols.max() >= base_rows.shape[1]):
        raise ValueError("rerank_rows: every refined query needs an anchor in [0, G)")
    s_bar[np.arange(len(anchor_cols)), anchor_cols] = 1.0
    return (lam * base_rows + (1.0 - lam) * s_bar).astype(np.float32, copy=False)


def rerank(base: np.ndarray, query_idx: np.ndarray, refined_rows: np.ndarray,
           anchors: np.ndarray, lam: float) -> np.ndarray:
    """The full re-ranked [Q, G] matrix: ``base`` with the rows ``query_idx`` replaced by Eq. 6
    (``refined_rows`` aligned with ``query_idx``, ``anchors`` a [Q] array of anchor indices)."""
    out = np.array(base, dtype=np.float32, copy=True)
    query_idx = np.asarray(query_idx, dtype=np.int64)
    if query_idx.size:
        out[query_idx] = rerank_rows(out[query_idx], refined_rows,
                                     np.asarray(anchors)[query_idx], lam)
    return out
