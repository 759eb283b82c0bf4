"""Evaluation: features -> similarity -> metrics, and the eval folder THI reads."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from model.features import extract_image_features, extract_text_features, similarity_from_features
from utils.io import atomic_save_npy, atomic_save_npz, atomic_write_json
from utils.metrics import metrics_table, t2i_metrics

from datasets import build_eval_loaders
from model import load_run
from utils.device import resolve_amp, resolve_device

logger = logging.getLogger("ICL.eval")


def evaluate(model, img_loader, txt_loader, device, amp=None, *, out_dir=None, split: dict | None = None,
             name: str = "t2i", progress: bool = True) -> dict:
    """Text-to-image metrics of ``model``; with ``out_dir`` also writes the eval folder.

    Returns ``{"t2i": metrics, "bge": ..., "tse": ...}`` (each R1/R5/R10/mAP/mINP in percent);
    ``t2i`` is the model's retrieval similarity (RDE: mean of BGE and TSE).
    """
    g_pids, g_feats = extract_image_features(model, img_loader, device, amp, progress)
    q_pids, q_feats = extract_text_features(model, txt_loader, device, amp, progress)
    sim = similarity_from_features(q_feats, g_feats)
    results = {"t2i": t2i_metrics(sim, q_pids, g_pids)}
    if len(g_feats) > 1:
        for view in g_feats:
            results[view] = t2i_metrics(q_feats[view] @ g_feats[view].t(), q_pids, g_pids)
    rows = [(f"{name}-{k}" if k != "t2i" else name, v) for k, v in results.items()]
    logger.info("\n" + metrics_table(rows))
    if out_dir is not None:
        write_eval_dir(out_dir, sim, q_pids, g_pids, g_feats, results, split)
    return results


def write_eval_dir(out_dir, sim: torch.Tensor, q_pids, g_pids, g_feats: dict, results: dict,
                   split: dict | None) -> None:
    """The eval folder of the run-directory contract (see docs/ARCHITECTURE.md)."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_save_npy(os.path.join(out_dir, "similarity.npy"), sim.float().numpy())
    atomic_save_npy(os.path.join(out_dir, "q_pids.npy"), np.asarray(q_pids, dtype=np.int64))
    atomic_save_npy(os.path.join(out_dir, "g_pids.npy"), np.asarray(g_pids, dtype=np.int64))
    atomic_save_npz(os.path.join(out_dir, "gallery_feats.npz"),
                    **{k: v.float().numpy() for k, v in g_feats.items()})
    if split is not None:
        atomic_write_json(os.path.join(out_dir, "captions.json"), list(split["captions"]))
        atomic_write_json(os.path.join(out_dir, "image_paths.json"),
                          [os.path.abspath(p) for p in split["img_paths"]])
    atomic_write_json(os.path.join(out_dir, "metrics.json"), results)


def evaluate_run(run_dir: str, *, dataset: str | None = None, root: str | None = None,
                 checkpoint: str = "best.pth", device: str = "auto", amp: str | None = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 progress: bool = True) -> dict:
    """Evaluate a run directory on its dataset or another one (cross-domain) and write
    ``<run_dir>/eval/<dataset>/`` (similarity, ids, captions, image paths, gallery features)."""
    dev = resolve_device(device)
    model, cfg = load_run(run_dir, dev, checkpoint=checkpoint)
    target = dataset or cfg.dataset_name
    ecfg = cfg.copy()
    ecfg.dataset_name = target
    if target != cfg.dataset_name:
        ecfg.anno_file = None
    if root is not None:
        ecfg.root_dir = root
    if batch_size is not None:
        ecfg.test_batch_size = batch_size
    if num_workers is not None:
        ecfg.num_workers = num_workers
    img_loader, txt_loader, split = build_eval_loaders(ecfg, split="test")
    amp_dtype = resolve_amp(amp if amp is not None else cfg.amp, dev)
    out_dir = os.path.join(run_dir, "eval", target)
    logger.info(f"evaluating {run_dir}/{checkpoint} on {target} (source {cfg.dataset_name})")
    results = evaluate(model, img_loader, txt_loader, dev, amp_dtype, out_dir=out_dir, split=split,
                       name=f"{cfg.dataset_name}->{target}" if target != cfg.dataset_name else target,
                       progress=progress)
    return results
