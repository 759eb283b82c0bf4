"""The model's similarity of new (refined) query texts to a saved gallery: THI's S_bar."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from model.features import image_similarity, text_similarity
from utils.tokenizer import tokenize
from datasets.transforms import build_transforms


def _gallery_tensors(gallery_feats: Mapping[str, np.ndarray]) -> dict:
    """The saved gallery's BGE (and TSE, when present) features as float32 tensors: both views
    are kept so that scores follow the run's own rule (the mean of BGE and TSE)."""
    return {k: torch.as_tensor(np.asarray(gallery_feats[k]), dtype=torch.float32)
            for k in ("bge", "tse") if k in gallery_feats}


def make_score_texts(model, gallery_feats: Mapping[str, np.ndarray], text_length: int, device,
                     batch_size: int = 256, amp=None) -> Callable[[Sequence[str]], np.ndarray]:
    """``score_texts(texts) -> [n, G]`` float32 for ``run_thi``.

    Texts are tokenized with the run's ``text_length`` (truncated, as encoding always does),
    encoded in batches of ``batch_size`` on ``device`` and compared by cosine with the saved,
    L2-normalised gallery features: the mean of BGE and TSE when the gallery has both (RDE),
    BGE alone otherwise (plain CLIP / IRRA runs). This is the same rule that produced the
    run's base similarity, so refined and original queries live on one scale.
    """
    if "bge" not in gallery_feats:
        raise KeyError(f"gallery features lack 'bge' (have {sorted(gallery_feats)}); re-run "
                       f"test.py on the target to rewrite gallery_feats.npz")
    gallery = _gallery_tensors(gallery_feats)
    if "tse" in gallery and not getattr(model, "use_tse", True):
        # A BGE-only model cannot reproduce a BGE+TSE base similarity.
        raise ValueError("gallery_feats.npz has TSE features but the model has no TSE layers; "
                         "re-run test.py with this run's checkpoint")
    num_g = gallery["bge"].shape[0]

    def score_texts(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, num_g), dtype=np.float32)
        ids = torch.stack([tokenize(t, text_length, truncate=True) for t in texts])
        sim = text_similarity(model, ids, gallery, device, amp=amp, batch_size=batch_size)
        return sim.float().cpu().numpy()

    return score_texts


def make_score_images(model, gallery_feats: Mapping[str, np.ndarray], img_size, device,
                      batch_size: int = 64, amp=None) -> Callable[[Sequence], np.ndarray]:
    """``score_images(pil_images) -> [n, G]`` float32: image -> image similarity to the saved
    gallery, the query images resized and normalised like the gallery (``img_size`` = the
    run's [H, W]) and compared on the same rule as ``make_score_texts`` (BGE and TSE mean)."""
    gallery = _gallery_tensors(gallery_feats)
    if "bge" not in gallery:
        raise KeyError(f"gallery features lack 'bge' (have {sorted(gallery_feats)})")
    num_g = gallery["bge"].shape[0]
    transform = build_transforms(tuple(img_size), is_train=False)

    def score_images(images: Sequence) -> np.ndarray:
        images = list(images)
        if not images:
            return np.zeros((0, num_g), dtype=np.float32)
        batch = torch.stack([transform(im.convert("RGB")) for im in images])
        return image_similarity(model, batch, gallery, device, amp=amp,
                                batch_size=batch_size).float().cpu().numpy()

    return score_images
