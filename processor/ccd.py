"""Consensus Clean Division (CCD) of RDE: which training pairs to trust this epoch.

Each view (BGE, TSE) splits the per-pair losses with a two-component Gaussian mixture: a
pair is clean for that view when the low-mean component explains it with probability > 0.5.
The two views then vote: pairs both call clean get weight 1, pairs both call noisy weight 0,
and a disagreement is settled by a fair coin.
"""

from __future__ import annotations

import logging
import warnings
from typing import Union

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

logger = logging.getLogger(__name__)

Generator = Union[np.random.Generator, torch.Generator]


def gmm_params(noisy_rate: float, dataset_name: str) -> dict:
    """GaussianMixture settings RDE uses: a tighter, longer fit above 40% noise or on RSTPReid."""
    if float(noisy_rate) > 0.4 or str(dataset_name).lower() == "rstpreid":
        return {"max_iter": 100, "tol": 1e-4, "reg_covar": 1e-6}
    return {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}


def _as_1d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array with one value per training pair, got shape {arr.shape}")
    return arr


def clean_probability(
    per_sample_losses, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4, seed: int = 0
) -> np.ndarray:
    """Posterior of the low-mean GMM component for each min-max normalised loss, [N] float64."""
    loss = _as_1d(per_sample_losses, "per_sample_losses").astype(np.float64)
    if loss.size < 2:
        raise ValueError(f"per_sample_losses: need at least 2 losses to fit a 2-component GMM, got {loss.size}")
    if not np.isfinite(loss).all():
        bad = int((~np.isfinite(loss)).sum())
        raise ValueError(f"per_sample_losses: {bad} values are NaN or infinite; check the loss computation (e.g. AMP overflow)")
    span = loss.max() - loss.min()
    if span == 0:
        raise ValueError("per_sample_losses: all values are identical, a GMM cannot split them (split_clean keeps all clean)")
    x = ((loss - loss.min()) / span).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        # RDE stops EM after 10 iterations on purpose at low noise; that is not a failure.
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]


def split_by_probability(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """1 where prob > threshold, else 0 (int64), with RDE's (from NCR) 1% rule.

    When no pair falls at or below the threshold (nothing would be noisy), the threshold
    becomes the (N // 100)-th smallest probability (0-based), so the N // 100 + 1 least
    likely clean pairs, plus any tied with the last of them, are marked noisy.
    """
    prob = _as_1d(prob, "prob")
    if prob.size and prob.min() > threshold:
        threshold = np.sort(prob)[prob.size // 100]
        logger.info("CCD: no pair estimated noisy; marking the lowest 1%% (%d pairs) noisy", prob.size // 100 + 1)
    return (prob > threshold).astype(np.int64)


def split_clean(
    per_sample_losses, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4, seed: int = 0
) -> np.ndarray:
    """Clean (1) / noisy (0) label per pair from one view's per-sample losses, [N] int64.

    Min-max normalise, fit a 2-component GaussianMixture (seeded), clean = posterior of the
    low-mean component > 0.5, then the 1% rule of `split_by_probability`. Identical losses
    (where RDE's normalisation divides by zero) carry no signal: every pair is kept clean.
    """
    loss = _as_1d(per_sample_losses, "per_sample_losses")
    if loss.size >= 2 and np.isfinite(loss).all() and loss.min() == loss.max():
        logger.warning("CCD: all %d per-sample losses are identical; keeping every pair clean", loss.size)
        return np.ones(loss.size, dtype=np.int64)
    prob = clean_probability(loss, max_iter=max_iter, tol=tol, reg_covar=reg_covar, seed=seed)
    return split_by_probability(prob)


def consensus(pred_a, pred_b, generator: Generator) -> np.ndarray:
    """Per-pair weight from two views' 0/1 labels: both 1 -> 1, both 0 -> 0, else a coin flip.

    The coins come from `generator` (numpy Generator or torch Generator), one per disagreeing
    pair in index order, so a seeded generator gives a reproducible result. Returns float32.
    """
    a = _as_1d(pred_a, "pred_a").astype(np.int64)
    b = _as_1d(pred_b, "pred_b").astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"consensus: pred_a has {a.size} labels but pred_b has {b.size}")
    for name, p in (("pred_a", a), ("pred_b", b)):
        if not np.isin(p, (0, 1)).all():
            raise ValueError(f"consensus: {name} must hold only 0 (noisy) and 1 (clean)")
    votes = a + b
    disagree = np.flatnonzero(votes == 1)
    if isinstance(generator, np.random.Generator):
        coins = generator.integers(0, 2, size=disagree.size)
    elif isinstance(generator, torch.Generator):
        coins = torch.randint(0, 2, (disagree.size,), generator=generator).numpy()
    else:
        raise TypeError(f"consensus: generator must be a numpy or torch Generator, got {type(generator).__name__}")
    weights = (votes == 2).astype(np.float32)
    weights[disagree] = coins.astype(np.float32)
    return weights
