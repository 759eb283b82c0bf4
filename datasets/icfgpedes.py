"""ICFG-PEDES (Ding et al., "Semantically Self-Aligned Network for Text-to-Image Part-aware
Person Re-identification", 2021).

Layout: ``<root>/ICFG-PEDES/ICFG-PEDES.json`` and ``<root>/ICFG-PEDES/imgs/<file_path>``.
Records: ``{"split", "captions", "file_path", "processed_tokens", "id"}``; the official file has
only ``train`` (3,102 ids) and ``test`` (1,000 ids) records, so ``val`` is empty.
"""
from __future__ import annotations

from .annotations import BaseDataset


class ICFGPEDES(BaseDataset):
    """ICFG-PEDES reader; train ids start at 0 in the official file and are kept."""

    name = "ICFG-PEDES"
    anno_names = ("ICFG-PEDES.json",)
    image_dir = "imgs"
    path_field = "file_path"
