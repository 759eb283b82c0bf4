"""THI's defaults (the paper's Sec. 4.2 and 4.6; xi from the release's run script), defined once: the command lines, the search
page, ``repro`` and the benchmarks import them from here."""
from __future__ import annotations

LAMBDA = 0.8  # Eq. 6: S_hat = lambda * S(q, v) + (1 - lambda) * S(q_hat, v)
XI = 0.5  # the anchor gate on the top-1 similarity: the release script's (the paper: 'in the range of 0.5-0.6')
TARGET_XI = {"ICFG-PEDES": 0.55}  # where the release's run script uses another xi
ROUNDS = 5  # K, interaction rounds
TOP_K_SAVED = 10  # rankings.npy keeps each query's top-10 gallery indices


def xi_for(target: str) -> float:
    """The release script's xi for ``target`` (0.55 for ICFG-PEDES, else 0.5)."""
    return TARGET_XI.get(target, XI)
