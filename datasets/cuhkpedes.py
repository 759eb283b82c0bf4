"""CUHK-PEDES (Li et al., "Person Search with Natural Language Description", CVPR 2017).

Layout: ``<root>/CUHK-PEDES/reid_raw.json`` and ``<root>/CUHK-PEDES/imgs/<file_path>``.
Records: ``{"split", "captions", "file_path", "processed_tokens", "id"}`` with ids from 1;
official split 11,003 / 1,000 / 1,000 identities (train / val / test).
"""
from __future__ import annotations

from .annotations import BaseDataset


class CUHKPEDES(BaseDataset):
    """CUHK-PEDES reader; train pids are ``id - 1`` (contiguous from 0), as in IRRA."""

    name = "CUHK-PEDES"
    anno_names = ("reid_raw.json",)
    image_dir = "imgs"
    path_field = "file_path"
