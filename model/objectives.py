"""Per-sample matching losses of RDE (TAL, TRL, InfoNCE, SDM).

Every loss takes `scores`, the [B, B] cosine-similarity matrix of a batch with rows = texts and
columns = images (scores[i, j] = cos(text_i, image_j); pair b is text b with image b), and
`pids` [B]; items with the same pid are positives of each other. Every loss returns a
per-pair tensor of shape [B] (RDE's CCD fits its GMM on these and weights them by the
consensus labels). Entry b combines the text-to-image direction (row b) and the
image-to-text direction (column b): summed for TAL, TRL and SDM, averaged for InfoNCE, as in
RDE's `compute_*_per`.

Differences from RDE's code, all numerically irrelevant for cosine scores and batches that
contain at least one negative per row:
- log-sum-exp and log-softmax replace exp-then-log (RDE clamps the sum at 1e36 instead);
- a row with no negative at all (every item shares its pid) contributes 0 to TAL/TRL with a
  zero, finite gradient, where RDE's code produces log(0);
- TRL's hardest negative is the maximum over the negatives only; RDE takes the maximum of
  `mask * scores`, which counts the masked positives as 0 and so floors it at 0.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _check(scores: torch.Tensor, pids: Optional[torch.Tensor], name: str) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name}: scores must be a square [B, B] text x image matrix, got {tuple(scores.shape)}")
    if pids is not None and pids.reshape(-1).shape[0] != scores.shape[0]:
        raise ValueError(f"{name}: pids has {pids.numel()} entries for a batch of {scores.shape[0]}")


def positive_mask(pids: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: True where the two batch items share a pid (diagonal included)."""
    pids = pids.reshape(-1)
    return pids.unsqueeze(0) == pids.unsqueeze(1)


def cosine_scores(text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
    """[B, B] cosine similarities, rows = texts, columns = images (RDE's `scores`)."""
    return F.normalize(text_feats, dim=-1) @ F.normalize(image_feats, dim=-1).t()


def _weighted_positive(sim: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    # Softmax weights over a row's positives, treated as constants (RDE detaches them).
    alpha = torch.softmax((sim / tau).masked_fill(~pos, float("-inf")), dim=1).detach()
    return (alpha * sim).sum(1)


def _tal_direction(sim: torch.Tensor, pos: torch.Tensor, tau: float, margin: float) -> torch.Tensor:
    neg = ~pos
    has_neg = neg.any(1)
    # Rows without negatives get harmless logits so log-sum-exp (and its gradient) stays finite.
    logits = (sim / tau).masked_fill(~neg, float("-inf")).masked_fill(~has_neg.unsqueeze(1), 0.0)
    loss = (tau * torch.logsumexp(logits, dim=1) - _weighted_positive(sim, pos, tau) + margin).clamp(min=0)
    return torch.where(has_neg, loss, torch.zeros_like(loss))


def tal_loss(scores: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """Triplet Alignment Loss per pair, [B] (both directions summed).

    Per direction and anchor: max(0, m - sum_p alpha_p s_p + tau * log sum_n exp(s_n / tau)),
    alpha = softmax over the anchor's positives of s_p / tau (detached), n over its negatives.
    """
    _check(scores, pids, "tal_loss")
    pos = positive_mask(pids)
    return _tal_direction(scores, pos, tau, margin) + _tal_direction(scores.t(), pos, tau, margin)


def _trl_direction(sim: torch.Tensor, pos: torch.Tensor, tau: float, margin: float) -> torch.Tensor:
    neg = ~pos
    has_neg = neg.any(1)
    hardest = sim.masked_fill(~neg, float("-inf")).max(1).values
    hardest = torch.where(has_neg, hardest, torch.zeros_like(hardest))
    loss = (margin + hardest - _weighted_positive(sim, pos, tau)).clamp(min=0)
    return torch.where(has_neg, loss, torch.zeros_like(loss))


def trl_loss(scores: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """Hardest-negative triplet ranking loss per pair, [B] (both directions summed).

    Per direction and anchor: max(0, m + max_n s_n - sum_p alpha_p s_p), alpha as in TAL.
    """
    _check(scores, pids, "trl_loss")
    pos = positive_mask(pids)
    return _trl_direction(scores, pos, tau, margin) + _trl_direction(scores.t(), pos, tau, margin)


def infonce_loss(scores: torch.Tensor, pids: Optional[torch.Tensor] = None, logit_scale: float = 50.0) -> torch.Tensor:
    """CLIP's InfoNCE per pair, [B]: mean of the two directions' -log softmax at the diagonal.

    Only the diagonal is positive (pids are accepted for a uniform signature and ignored), as
    in RDE.
    """
    _check(scores, pids, "infonce_loss")
    logits = logit_scale * scores
    t2i = -torch.diagonal(F.log_softmax(logits, dim=1))
    i2t = -torch.diagonal(F.log_softmax(logits.t(), dim=1))
    return (t2i + i2t) / 2


def sdm_loss(
    scores: torch.Tensor, pids: torch.Tensor, logit_scale: float = 50.0, epsilon: float = 1e-8
) -> torch.Tensor:
    """IRRA's Similarity Distribution Matching per pair, [B] (both directions summed).

    Per anchor: KL(softmax(logit_scale * s) || q), q uniform over the anchor's positives
    (epsilon inside the log of q, as IRRA).
    """
    _check(scores, pids, "sdm_loss")
    pos = positive_mask(pids).to(scores.dtype)
    log_target = torch.log(pos / pos.sum(1, keepdim=True) + epsilon)

    def direction(logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        return (log_p.exp() * (log_p - log_target)).sum(1)

    logits = logit_scale * scores
    return direction(logits.t()) + direction(logits)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "TAL": tal_loss,
    "TRL": trl_loss,
    "InfoNCE": infonce_loss,
    "SDM": sdm_loss,
}
_KNOWN_OPTIONS = {"tau", "margin", "logit_scale", "epsilon"}


def compute_loss(name: str, scores: torch.Tensor, pids: torch.Tensor, **kw) -> torch.Tensor:
    """Per-pair loss [B] of the loss called `name` (case-insensitive key of LOSSES).

    Accepts any of tau, margin, logit_scale, epsilon and passes each loss the ones it takes,
    so a caller can hand over all hyper-parameters of a config at once.
    """
    by_lower = {k.lower(): k for k in LOSSES}
    key = by_lower.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    unknown = set(kw) - _KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"compute_loss: unknown option(s) {sorted(unknown)}; valid: {sorted(_KNOWN_OPTIONS)}")
    fn = LOSSES[key]
    accepted = inspect.signature(fn).parameters
    return fn(scores, pids, **{k: v for k, v in kw.items() if k in accepted})
