"""UFine6926 (Zuo et al., "UFineBench: Towards Text-based Person Retrieval with Ultra-fine
Granularity", CVPR 2024).

Records (UFineBench's README): ``{"split", "id", "file_path": "images/1.jpg", "captions"}``,
two long captions per image; ids from 1. ``file_path`` already includes the ``images/`` folder,
so paths are relative to the dataset folder itself:
``<root>/UFine6926/<annotation json>`` and ``<root>/UFine6926/images/...``.
The release is obtained by licence request and its JSON name is not fixed by the README; the
reader accepts the names below (first found wins) or any file given as ``anno_file``;
``UFine6926_Annotations_1024.json`` is the name the ICL release's reader opens.
"""
from __future__ import annotations

from .annotations import BaseDataset


class UFine6926(BaseDataset):
    """UFine6926 reader; train pids are the train ids' ranks (``id - 1`` when they start at 1)."""

    name = "UFine6926"
    anno_names = ("ufine6926.json", "UFine6926.json", "ufine6926_anno.json", "reid_raw.json",
                  "UFine6926_Annotations_1024.json")
    image_dir = ""
    path_field = "file_path"
