"""Feature extraction for retrieval: loaders in, L2-normalised embeddings out.

Works with any model that has ``image_embeddings``/``text_embeddings`` (RDE: BGE and TSE) or
only ``encode_image``/``encode_text`` (plain CLIP, IRRA: BGE alone).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.device import autocast


@torch.no_grad()
def _extract(loader: Iterable, fn, device: torch.device, amp: torch.dtype | None,
             desc: str, progress: bool) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    pids, feats = [], {}
    for pid, x in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, amp):
            out = fn(x.to(device, non_blocking=True))
        for name, f in out.items():
            feats.setdefault(name, []).append(F.normalize(f.float(), dim=-1).cpu())
        pids.append(torch.as_tensor(pid))
    return torch.cat(pids).numpy(), {k: torch.cat(v) for k, v in feats.items()}


def _uses_tse(model) -> bool:
    return hasattr(model, "image_embeddings") and getattr(model, "use_tse", True)


def _image_fn(model):
    if _uses_tse(model):
        return lambda x: dict(zip(("bge", "tse"), model.image_embeddings(x)))
    return lambda x: {"bge": model.encode_image(x)}


def _text_fn(model):
    if _uses_tse(model):
        return lambda x: dict(zip(("bge", "tse"), model.text_embeddings(x)))
    return lambda x: {"bge": model.encode_text(x)}


def extract_image_features(model, loader, device, amp=None, progress=True):
    """(pids [G], {"bge": [G, D], "tse": [G, D']}) for an image loader of (pid, image)."""
    model.eval()
    return _extract(loader, _image_fn(model), device, amp, "image features", progress)


def extract_text_features(model, loader, device, amp=None, progress=True):
    """(pids [Q], {"bge": [Q, D], "tse": [Q, D']}) for a text loader of (pid, token ids)."""
    model.eval()
    return _extract(loader, _text_fn(model), device, amp, "text features", progress)


def similarity_from_features(q: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> torch.Tensor:
    """Retrieval similarity [Q, G]: the mean over the embeddings both sides have (RDE: BGE, TSE)."""
    names = [k for k in ("bge", "tse") if k in q and k in g]
    if not names:
        raise ValueError("no common embedding between queries and gallery")
    return sum(q[k] @ g[k].t() for k in names) / len(names)


@torch.no_grad()
def text_similarity(model, ids: torch.Tensor, gallery: dict[str, torch.Tensor], device,
                    amp=None, batch_size: int = 256) -> torch.Tensor:
    """Similarity of new query token ids [n, L] to saved gallery features (THI's re-encoding)."""
    model.eval()
    fn = _text_fn(model)
    out = []
    for start in range(0, ids.shape[0], batch_size):
        with autocast(device, amp):
            feats = fn(ids[start:start + batch_size].to(device))
        q = {k: F.normalize(v.float(), dim=-1).cpu() for k, v in feats.items()}
        out.append(similarity_from_features(q, gallery))
    if not out:
        return torch.zeros(0, next(iter(gallery.values())).shape[0])
    return torch.cat(out)


@torch.no_grad()
def image_similarity(model, images: torch.Tensor, gallery: dict[str, torch.Tensor], device,
                     amp=None, batch_size: int = 64) -> torch.Tensor:
    """Similarity of query images [n, 3, H, W] (already transformed) to saved gallery features:
    image -> image retrieval with the image encoder, on the same rule as text queries."""
    model.eval()
    fn = _image_fn(model)
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast(device, amp):
            feats = fn(images[start:start + batch_size].to(device))
        q = {k: F.normalize(v.float(), dim=-1).cpu() for k, v in feats.items()}
        out.append(similarity_from_features(q, gallery))
    if not out:
        return torch.zeros(0, next(iter(gallery.values())).shape[0])
    return torch.cat(out)
