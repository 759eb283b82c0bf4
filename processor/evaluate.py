"""Evaluation: features -> similarity -> metrics, and the eval folder THI reads."""
from __future__ import annotations

import logging

import numpy as np

from model.features import extract_image_features, extract_text_features, similarity_from_features
from utils import run_dir as rd
from utils.metrics import metrics_table, t2i_metrics

from datasets import build_eval_loaders
from model import load_run
from utils.device import resolve_amp, resolve_device

logger = logging.getLogger("ICL.eval")


def evaluate(model, img_loader, txt_loader, device, amp=None, *, out_dir=None, split: dict | None = None,
             name: str = "t2i", progress: bool = True, checkpoint: dict | None = None) -> dict:
    """Text-to-image metrics of ``model``; with ``out_dir`` also writes the eval folder (whole,
    stamped with ``checkpoint``: ``utils.run_dir.checkpoint_identity``).

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
        rd.write_eval_folder(out_dir, similarity=sim.float().numpy(), q_pids=np.asarray(q_pids),
                             g_pids=np.asarray(g_pids),
                             gallery_feats={k: v.float().numpy() for k, v in g_feats.items()},
                             metrics=results, checkpoint=checkpoint,
                             captions=None if split is None else list(split["captions"]),
                             image_paths=None if split is None else list(split["img_paths"]))
    return results


def evaluate_run(run_dir: str, *, dataset: str | None = None, root: str | None = None,
                 checkpoint: str = rd.BEST, device: str = "auto", amp: str | None = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 progress: bool = True) -> dict:
    """Evaluate a checkpoint of a run directory on its dataset or another one (cross-domain) and
    write its evaluation ``utils.run_dir.eval_dir(run_dir, dataset, checkpoint)`` (similarity,
    ids, captions, image paths, gallery features, metrics, the checkpoint's name and sha256).
    The caller holds the run's lock (test.py, the trainer)."""
    dev = resolve_device(device)
    ident = rd.checkpoint_identity(run_dir, checkpoint)  # the file the model is read from next
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
    out_dir = rd.eval_dir(run_dir, target, checkpoint)
    logger.info(f"evaluating {rd.checkpoint_path(run_dir, checkpoint)} (sha256 {ident['sha256'][:12]}) "
                f"on {target} (source {cfg.dataset_name}) into {out_dir}")
    results = evaluate(model, img_loader, txt_loader, dev, amp_dtype, out_dir=out_dir, split=split,
                       name=f"{cfg.dataset_name}->{target}" if target != cfg.dataset_name else target,
                       progress=progress, checkpoint=ident)
    return results
