"""A model-free retrieval similarity on SynthPEDES, for tests, benchmarks and demos without a run.

The similarity of a text to an image is a scale times the fraction of the attributes the
text states (read with ``offline.synthpedes.parse_caption``) that the image has, plus Gaussian
noise over the gallery seeded by (seed, text), so a text always gets the same scores. Vague
captions tie many images and the noise breaks the ties wrongly, so the base ranking is
imperfect; a refined query that states more attributes of the anchor image narrows the ranking,
as a real text encoder would. Base and refined queries go through the same function, so they
are on one scale.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np


def _image_key(path: str) -> str:
    norm = os.path.abspath(os.fspath(path)).replace(os.sep, "/")
    if "/imgs/" not in norm:
        raise ValueError(f"{path}: not a SynthPEDES image (expected a path under imgs/)")
    return norm.rsplit("/imgs/", 1)[1]


class AttributeSimilarity:
    """``score_texts(texts) -> [n, G]`` float32 over the gallery ``image_paths``.

    ``attributes``: SynthPEDES ``attributes.json`` or its folder; ``scale``: the similarity of
    a perfect match before noise (0.45 puts top-1 similarities on both sides of xi = 0.5);
    ``noise``: standard deviation of the noise; ``seed``: the noise seed.
    """

    def __init__(self, attributes: str, image_paths: Sequence[str], scale: float = 0.45,
                 noise: float = 0.1, seed: int = 0):
        from offline.synth_text import parse_caption

        path = os.fspath(attributes)
        if os.path.isdir(path):
            path = os.path.join(path, "attributes.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: SynthPEDES attributes.json not found (generate the "
                                    f"dataset with `python -m offline.synthpedes OUT_DIR`)")
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
        try:
            self.gallery = [images[_image_key(p)] for p in image_paths]
        except KeyError as exc:
            raise KeyError(f"gallery image {exc} is not in {path}") from exc
        self._parse = parse_caption
        self.scale, self.noise, self.seed = float(scale), float(noise), int(seed)

    def _noise(self, text: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}|{text}".encode("utf-8")).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return rng.normal(0.0, self.noise, len(self.gallery))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.gallery)), dtype=np.float32)
        for i, text in enumerate(texts):
            said = self._parse(text)
            if said:
                match = [sum(attrs.get(k) == v for k, v in said.items()) for attrs in self.gallery]
                out[i] = self.scale * np.asarray(match, dtype=np.float32) / len(said)
            out[i] += self._noise(text).astype(np.float32)
        return out
