"""Algorithm 1's gating, as pure functions on arrays (no MLLM, no I/O).

Per query q the candidates are the top-K gallery items of the *base* similarity, the same K in
every round, and ``top1[q]`` is the base similarity of the first one. Round r (0-based) asks
"does the caption describe candidate r?" and a "Yes" makes candidate r the anchor when

* r == 0 and ``top1 > xi`` (a confident base ranking whose first candidate is confirmed), or
* r > 0, every earlier answer was "No" and ``top1 <= xi`` (an unconfident ranking whose first
  confirmed candidate is a lower one).

Consequences the schedule uses: an anchor is final, a "Yes" that does not anchor closes the
query for good, and a query with ``top1 > xi`` can only be anchored in round 0. So besides the
release's schedule (every query without an anchor, every round) we can ask only the queries
that can still get an anchor; the answers that decide the gating are the same, hence the same
anchors with far fewer calls.
"""
from __future__ import annotations

import numpy as np

from utils.metrics import topk

# "needed": only queries that can still get an anchor (ours); "unrefined": every query without
# an anchor, every round (the ICL release); "all": every query every round (all K candidates).
ASK_SCHEMES = ("needed", "unrefined", "all")


def candidates(similarity, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery indices per query ([Q, k] int64, best first; ties by gallery order) and
    the top-1 base similarity ([Q] float64)."""
    values, index = topk(similarity, k)
    return index.numpy().astype(np.int64), values[:, 0].double().numpy()


def can_still_anchor(round_idx: int, rounds: int, top1: np.ndarray, xi: float,
                     anchors: np.ndarray, said_yes: np.ndarray) -> np.ndarray:
    """[Q] bool: queries whose answer in round ``round_idx`` can still matter.

    Round 0 matters for every query when more rounds follow (a "Yes" there closes a query with
    ``top1 <= xi``); in the last round only a query that could be anchored by it matters.
    """
    open_ = (anchors < 0) & ~said_yes
    confident = top1 > xi
    if round_idx == 0:
        return open_ & (confident | (rounds > 1))
    return open_ & ~confident


def ask_mask(scheme: str, round_idx: int, rounds: int, top1: np.ndarray, xi: float,
             anchors: np.ndarray, said_yes: np.ndarray) -> np.ndarray:
    """[Q] bool: queries asked the localization question in round ``round_idx`` by ``scheme``."""
    if scheme == "needed":
        return can_still_anchor(round_idx, rounds, top1, xi, anchors, said_yes)
    if scheme == "unrefined":
        return anchors < 0
    if scheme == "all":
        return np.ones(len(anchors), dtype=bool)
    raise ValueError(f"unknown ask scheme {scheme!r}; valid schemes: {', '.join(ASK_SCHEMES)}")


def decide(round_idx: int, yes: np.ndarray, top1: np.ndarray, xi: float,
           anchors: np.ndarray, said_yes_before: np.ndarray) -> np.ndarray:
    """[n] bool: which asked queries become anchored this round.

    All arrays are aligned with the asked queries: ``yes`` this round's answers (an unparseable
    answer counts as "No"), ``top1``/``anchors``/``said_yes_before`` their rows of the state
    before this round.
    """
    yes = np.asarray(yes, dtype=bool)
    fresh = (np.asarray(anchors) < 0) & ~np.asarray(said_yes_before, dtype=bool)
    confident = np.asarray(top1) > xi
    if round_idx == 0:
        return yes & fresh & confident
    return yes & fresh & ~confident
