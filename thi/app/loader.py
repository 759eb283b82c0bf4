"""A ``SearchEngine`` from a run directory: the model rebuilt like ``test.py`` does, the gallery
features read from ``RUN/eval/DATASET/`` when present, else computed once at start-up."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from .engine import SearchEngine

logger = logging.getLogger("ICL.app")


def gallery_from_eval_dir(run_dir: str, dataset: str) -> Optional[dict]:
    """The saved gallery of ``RUN/eval/DATASET`` (features, paths, ids, test queries) or None
    when that folder is incomplete."""
    from ..cli import EVAL_FILES, load_eval_dir

    folder = os.path.join(run_dir, "eval", dataset)
    if not all(os.path.isfile(os.path.join(folder, f)) for f in EVAL_FILES):
        return None
    data = load_eval_dir(run_dir, dataset, None)
    return {"feats": data["gallery_feats"], "image_paths": data["image_paths"],
            "g_pids": data["g_pids"],
            "examples": list(zip(data["captions"], data["q_pids"].tolist())), "source": folder}


def gallery_from_dataset(model, cfg, dataset: str, root: Optional[str], device, amp,
                         progress: bool = True) -> dict:
    """Gallery features of the dataset's test split, computed with ``model`` (once)."""
    from datasets import build_eval_loaders
    from model.features import extract_image_features

    ecfg = cfg.copy()
    ecfg.dataset_name = dataset
    if dataset != cfg.dataset_name:
        ecfg.anno_file = None
    if root is not None:
        ecfg.root_dir = root
    img_loader, _, split = build_eval_loaders(ecfg, split="test")
    g_pids, feats = extract_image_features(model, img_loader, device, amp, progress)
    return {"feats": {k: v.numpy() for k, v in feats.items()},
            "image_paths": [os.path.abspath(p) for p in split["img_paths"]], "g_pids": g_pids,
            "examples": list(zip(split["captions"], np.asarray(split["caption_pids"]).tolist())),
            "source": f"computed from {dataset} (test split)"}


def build_engine(args) -> SearchEngine:
    """The engine for ``python -m thi.app`` arguments (see ``thi/app/__main__.py``)."""
    from model import load_run
    from utils.config import load_run_config
    from utils.device import resolve_amp, resolve_device
    from utils.mllm import build_client

    from ..cli import backend_options
    from ..scoring import make_score_images, make_score_texts

    if not os.path.isdir(args.run):
        raise SystemExit(f"--run {args.run} is not a directory: pass a run written by train.py "
                         f"or test.py --weights")
    cfg = load_run_config(args.run)
    dataset = args.target or cfg.dataset_name
    root = args.root or cfg.get("root_dir")
    client = None
    if args.backend != "none":
        cache_dir = args.cache_dir or os.path.join(args.run, "mllm_cache")
        options = backend_options(args, root, dataset, cache_dir)  # flag errors before loading
    device = resolve_device(args.device)
    model, cfg = load_run(args.run, device, checkpoint=args.checkpoint)
    amp = resolve_amp(cfg.get("amp"), device)
    gallery = gallery_from_eval_dir(args.run, dataset)
    if gallery is None:
        logger.info("no complete %s: computing the gallery features of %s once",
                    os.path.join(args.run, "eval", dataset), dataset)
        gallery = gallery_from_dataset(model, cfg, dataset, root, device, amp,
                                       progress=not args.no_progress)
    from .paths import relocate_image_paths

    gallery["image_paths"], moved = relocate_image_paths(
        gallery["image_paths"], args.root, load_run_config(args.run).get("root_dir"), dataset)
    if moved:
        logger.info("%s", moved)
    missing = [p for p in gallery["image_paths"][:1] if not os.path.isfile(p)]
    if missing:
        logger.warning("gallery image %s not found: thumbnails will be missing (was the "
                       "dataset moved? pass --root)", missing[0])
    score_texts = make_score_texts(model, gallery["feats"], cfg.text_length, device,
                                   batch_size=args.batch_size, amp=amp)
    score_images = make_score_images(model, gallery["feats"], cfg.img_size, device, amp=amp)
    if args.backend != "none":
        client = build_client(args.backend, **options)
    info = {"run": os.path.abspath(args.run), "dataset": dataset, "backend": args.backend,
            "gallery_source": gallery["source"]}
    return SearchEngine(gallery["image_paths"], score_texts, score_images=score_images,
                        client=client, g_pids=gallery["g_pids"], examples=gallery["examples"],
                        lam=args.lam, default_image_weight=args.image_weight, top_k=args.top_k,
                        max_sessions=args.max_sessions, max_rounds=args.rounds,
                        temperature=args.temperature, max_tokens=args.max_tokens, info=info,
                        image_root=root)
