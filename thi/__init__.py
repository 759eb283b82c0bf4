"""THI: test-time human-centred interaction (ICL, CVPR 2025, Algorithm 1 and Eq. 1-6).

``run_thi(similarity, captions, image_paths, client, score_texts, ...)`` re-ranks a base
text-to-image similarity with an MLLM in the loop; ``python -m thi`` runs it on a saved run
directory and ``python -m thi sweep`` evaluates a lambda/xi grid.
"""
from __future__ import annotations

from .pipeline import THIResult, run_thi

__all__ = ["THIResult", "run_thi"]
