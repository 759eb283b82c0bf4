"""What the SFT data needs from a trained run: the training pairs as the run saw them, CCD's
clean labels, and the model's top-k training images per training caption.

Imports torch and the model only inside the functions that need them, so ``rda.sft`` and the RDA
generator stay light.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets import ImageDataset, TextDataset, build_dataset, build_transforms
from datasets.noise import build_noise_index, permute_captions
from model import load_run
from model.features import extract_image_features, extract_text_features, similarity_from_features
from utils import run_dir as rd
from utils.device import resolve_device

from .sft import topk_indices

latest_ccd_file = rd.latest_ccd_file  # RUN/ccd/epoch_<k>.npz with the largest k (or None)

log = logging.getLogger("rda")


@dataclass
class TrainPairs:
    """The training split as parallel lists: captions (in ``dataset.train`` order) and the
    distinct training images (indexed by the reader's ``image_id``)."""

    captions: list
    caption_pids: np.ndarray
    caption_images: np.ndarray
    image_paths: list
    image_pids: np.ndarray


def training_pairs(dataset, *, noisy_rate: float = 0.0, noisy_file: Optional[str] = None,
                   seed: int = 0, noise_draw: bool = False) -> TrainPairs:
    """``dataset.train`` as :class:`TrainPairs`, with the captions shuffled exactly as training
    shuffled them when the run injected noisy correspondences (``noisy_rate`` > 0): CCD's labels
    refer to those pairs."""
    train = dataset.train
    captions = [item[3] for item in train]
    if noisy_rate:
        index = build_noise_index(len(train), float(noisy_rate), noisy_file, int(seed), draw=noise_draw)
        captions = permute_captions(captions, index)
    num_images = 1 + max((item[1] for item in train), default=-1)
    image_paths: list = [None] * num_images
    image_pids = np.zeros(num_images, dtype=np.int64)
    for pid, image_id, path, _ in train:
        image_paths[image_id] = path
        image_pids[image_id] = pid
    if any(p is None for p in image_paths):
        raise ValueError("the dataset's train image ids are not contiguous from 0; "
                         "cannot index training images")
    return TrainPairs(captions=captions,
                      caption_pids=np.asarray([item[0] for item in train], dtype=np.int64),
                      caption_images=np.asarray([item[1] for item in train], dtype=np.int64),
                      image_paths=image_paths, image_pids=image_pids)


def clean_mask(path: str, num_pairs: int) -> np.ndarray:
    """CCD's clean label per training pair: clean in both views (BGE and TSE)."""
    z = rd.read_ccd(path)
    mask = z["clean_bge"].astype(bool) & z["clean_tse"].astype(bool)
    if mask.shape != (num_pairs,):
        raise ValueError(f"{path} has clean labels for {mask.shape[0]} pairs but the training split "
                         f"has {num_pairs}; was the run trained on another dataset or annotation file?")
    return mask


@dataclass
class RunInputs:
    """Everything ``make_anchor_sft`` needs, computed from a run directory."""

    pairs: TrainPairs
    top_indices: np.ndarray
    clean: Optional[np.ndarray]
    ccd_file: Optional[str]
    cfg: Any


def train_top_indices(model, pairs: TrainPairs, cfg, device, *, top_k: int = 10,
                      batch_size: int = 128, chunk: int = 2048, progress: bool = True) -> np.ndarray:
    """The model's ``top_k`` training images per training caption ([C, top_k], best first).

    The similarity is the retrieval one (RDE: mean of the BGE and TSE cosines), computed in
    caption chunks so that CUHK-PEDES' 68k x 34k matrix never exists at once.
    """
    transform = build_transforms(cfg.img_size, aug=False, is_train=False)
    images = DataLoader(ImageDataset(pairs.image_pids.tolist(), pairs.image_paths, transform),
                        batch_size=batch_size, shuffle=False)
    texts = DataLoader(TextDataset(pairs.caption_pids.tolist(), pairs.captions,
                                   int(getattr(cfg, "text_length", 77))),
                       batch_size=batch_size, shuffle=False)
    _, g = extract_image_features(model, images, device, progress=progress)
    _, q = extract_text_features(model, texts, device, progress=progress)
    n = len(pairs.captions)
    out = np.empty((n, min(top_k, len(pairs.image_paths))), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            block = {k: v[start:start + chunk] for k, v in q.items()}
            sim = similarity_from_features(block, g).numpy()
            out[start:start + len(sim)] = topk_indices(sim, top_k)
    return out


def load_run_inputs(run_dir: str, *, root: Optional[str] = None, dataset_name: Optional[str] = None,
                    anno_file: Optional[str] = None, device: str = "cpu", checkpoint: str = rd.BEST,
                    top_k: int = 10, batch_size: int = 128, use_ccd: bool = True,
                    progress: bool = True) -> RunInputs:
    """Rebuild the run's model and training pairs, rank the training images for every training
    caption, and read the latest CCD clean labels (when the run has them and the dataset is the
    run's own)."""
    dev = resolve_device(device)
    model, cfg = load_run(run_dir, dev, checkpoint=checkpoint)
    own = dataset_name is None or dataset_name == cfg.dataset_name
    name = cfg.dataset_name if dataset_name is None else dataset_name
    dataset = build_dataset(name, root if root is not None else cfg.root_dir,
                            anno_file if anno_file is not None else (cfg.anno_file if own else None))
    noisy_rate = float(getattr(cfg, "noisy_rate", 0.0) or 0.0) if own else 0.0
    pairs = training_pairs(dataset, noisy_rate=noisy_rate,
                           noisy_file=getattr(cfg, "noisy_file", None),
                           seed=int(getattr(cfg, "seed", 0)), noise_draw=bool(cfg.get("noise_draw", False)))
    clean, ccd = None, None
    if use_ccd:
        ccd = rd.latest_ccd_file(run_dir)
        if ccd is None:
            log.warning("%s has no CCD record (%s): every training pair counts as clean", run_dir,
                        rd.ccd_file(run_dir, 1).replace("_1.", "_*."))
        elif not own:
            log.warning("CCD labels of %s belong to %s, not %s: every pair counts as clean",
                        run_dir, cfg.dataset_name, name)
            ccd = None
        else:
            clean = clean_mask(ccd, len(pairs.captions))
            log.info("CCD clean labels from %s: %d of %d pairs clean in both views",
                     ccd, int(clean.sum()), len(clean))
    top = train_top_indices(model, pairs, cfg, dev, top_k=top_k, batch_size=batch_size,
                            progress=progress)
    return RunInputs(pairs=pairs, top_indices=top, clean=clean, ccd_file=ccd, cfg=cfg)
