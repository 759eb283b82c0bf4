"""RSTPReid (Zhu et al., "DSSL: Deep Surroundings-person Separation Learning for Text-based
Person Retrieval", ACM MM 2021).

Layout: ``<root>/RSTPReid/data_captions.json`` and ``<root>/RSTPReid/imgs/<img_path>``.
Records: ``{"id", "img_path", "captions", "split"}`` (the path field is ``img_path``, not
``file_path``); official split 3,701 / 200 / 200 identities.
"""
from __future__ import annotations

from .annotations import BaseDataset


class RSTPReid(BaseDataset):
    """RSTPReid reader; train ids start at 0 in the official file and are kept."""

    name = "RSTPReid"
    anno_names = ("data_captions.json",)
    image_dir = "imgs"
    path_field = "img_path"
