"""Choosing THI's similarity threshold xi the paper's way (ICL, Sec. 3.2 and Fig. 3).

The paper plots, per benchmark, the histogram of the top-1 similarity S(q, v1) of queries whose
top-1 gallery image is correct and of those whose top-1 is wrong, observes that correct
retrievals sit at higher similarities, and gates the interaction with a threshold xi on that
axis (round 0 confirms confident rankings, top1 > xi; later rounds refine unconfident ones,
top1 <= xi). It sets xi in 0.5-0.6 for CLIP ViT-B/16 fine-tuned on CUHK-PEDES.

A model of another scale (a tiny CLIP, another backbone) has its own similarity axis, so the
number does not transfer; the rule does. ``choose_xi`` reads xi off the two histograms: the
threshold where they cross, i.e. the one that misplaces the fewest queries (correct ones at or
below it, wrong ones above it). Compute it on a split that is not the one reported (SynthPEDES
has ``val``), so the test numbers stay honest.
"""
from __future__ import annotations

import numpy as np

from datasets import build_eval_loaders
from model import load_run
from model.features import extract_image_features, extract_text_features, similarity_from_features


def top1_outcomes(similarity: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 similarity [Q], whether the top-1 gallery item has the query's identity [Q])."""
    sim = np.asarray(similarity)
    best = sim.argmax(axis=1)
    top1 = sim[np.arange(len(sim)), best]
    return top1.astype(np.float64), np.asarray(g_pids)[best] == np.asarray(q_pids)


def choose_xi(top1: np.ndarray, correct: np.ndarray) -> float:
    """The threshold between the correct and wrong top-1 similarity histograms (Fig. 3): the
    value minimising (#correct with top1 <= xi) + (#wrong with top1 > xi), taken midway between
    the two neighbouring similarities (the middle of the best run when several tie)."""
    top1 = np.asarray(top1, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if top1.ndim != 1 or top1.shape != correct.shape or len(top1) == 0:
        raise ValueError("top1 and correct must be non-empty 1-D arrays of the same length")
    order = np.argsort(top1, kind="stable")
    s, c = top1[order], correct[order]
    # Threshold between s[k-1] and s[k] (k = 0..n): the first k queries fall at or below it.
    misplaced = np.concatenate([[0], np.cumsum(c)]) + np.concatenate([np.cumsum((~c)[::-1])[::-1], [0]])
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]          # no threshold between equal similarities
    misplaced = np.where(valid, misplaced, np.iinfo(np.int64).max)
    best = np.flatnonzero(misplaced == misplaced.min())
    k = int(best[len(best) // 2])
    if k == 0:
        return float(s[0] - 1e-6)
    if k == len(s):
        return float(s[-1])
    return float(0.5 * (s[k - 1] + s[k]))


def similarity_histograms(top1: np.ndarray, correct: np.ndarray, bins: int = 20) -> dict:
    """Counts of correct and wrong top-1 similarities on shared bins (the data of Fig. 3)."""
    top1 = np.asarray(top1, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.histogram_bin_edges(top1, bins=bins)
    return {"edges": edges.tolist(),
            "correct": np.histogram(top1[correct], edges)[0].tolist(),
            "wrong": np.histogram(top1[~correct], edges)[0].tolist()}


def xi_from_split(run_dir: str, split: str = "val", *, device: str = "cpu", progress: bool = False) -> tuple[float, dict]:
    """``choose_xi`` on a run's best checkpoint, scored on ``split`` of its own dataset (not the
    reported test split). Returns (xi, stats with the counts, mean top-1 similarity of correct and
    wrong retrievals, and the histograms)."""
    model, cfg = load_run(run_dir, device)
    img_loader, txt_loader, _ = build_eval_loaders(cfg, split=split)
    g_pids, g_feats = extract_image_features(model, img_loader, device, None, progress)
    q_pids, q_feats = extract_text_features(model, txt_loader, device, None, progress)
    sim = similarity_from_features(q_feats, g_feats).float().cpu().numpy()
    top1, correct = top1_outcomes(sim, np.asarray(q_pids), np.asarray(g_pids))
    stats = {"split": split, "queries": int(len(top1)), "correct": int(correct.sum()),
             "mean_top1_correct": float(top1[correct].mean()) if correct.any() else float("nan"),
             "mean_top1_wrong": float(top1[~correct].mean()) if (~correct).any() else float("nan"),
             "histograms": similarity_histograms(top1, correct)}
    return choose_xi(top1, correct), stats
