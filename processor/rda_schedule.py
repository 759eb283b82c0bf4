"""RDA's weight schedule (ICL Sec. 3.2): L = L_m + g(e) * L_a with g(e) = max(min, start - decay * e).

The defaults (1.0, 0.03, 0.1: ICL's max(0.1, 1 - 0.03 e)) live once, in the config
(``rda_gamma_start``, ``rda_gamma_decay``, ``rda_gamma_min`` of utils/config.py); the terms it
weighs are named in ``model.rde.RDA_TERMS``.
"""
from __future__ import annotations

from typing import Any


def rda_gamma(epoch: int, cfg: Any) -> float:
    """g(epoch) of the run's config."""
    return max(float(cfg.rda_gamma_min), float(cfg.rda_gamma_start) - float(cfg.rda_gamma_decay) * epoch)
