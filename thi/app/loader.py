"""A ``SearchEngine`` from a run directory: the model rebuilt like ``test.py`` does, the gallery
features read from the checkpoint's evaluation (``RUN/eval/DATASET/<checkpoint>/``, through
``utils.run_dir``) when present, else computed once at start-up."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from utils import run_dir as rd

from datasets import build_eval_loaders
from model import load_run
from model.features import extract_image_features
from utils.run_dir import load_run_config
from utils.device import resolve_amp, resolve_device
from utils.mllm import build_client
from utils.mllm.cli_options import client_options

from ..scoring import make_score_images, make_score_texts
from .engine import SearchEngine
from .paths import relocate_image_paths

logger = logging.getLogger("ICL.app")


def gallery_from_eval_dir(run_dir: str, dataset: str, checkpoint: str = rd.BEST) -> Optional[dict]:
    """The saved gallery of the checkpoint's evaluation on ``dataset`` (features, paths, ids,
    test queries) or None when there is none; one of another checkpoint is refused."""
    if not rd.eval_complete(run_dir, dataset, checkpoint):
        return None
    data = rd.read_eval(run_dir, dataset, checkpoint)
    return {"feats": data["gallery_feats"], "image_paths": data["image_paths"],
            "g_pids": data["g_pids"],
            "examples": list(zip(data["captions"], data["q_pids"].tolist())),
            "source": data["folder"]}


def gallery_from_dataset(model, cfg, dataset: str, root: Optional[str], device, amp,
                         progress: bool = True) -> dict:
    """Gallery features of the dataset's test split, computed with ``model`` (once)."""
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
    if not os.path.isdir(args.run):
        raise SystemExit(f"--run {args.run} is not a directory: pass a run written by train.py "
                         f"or test.py --weights")
    cfg = load_run_config(args.run)
    dataset = args.target or cfg.dataset_name
    root = args.root or cfg.get("root_dir")
    client = None
    if args.backend != "none":
        cache_dir = args.cache_dir or rd.mllm_cache_dir(args.run)
        # flag errors before loading (the simulated backend's attributes: ROOT/DATASET/)
        options = client_options(args, os.path.join(root, dataset) if root else None, cache_dir)
    device = resolve_device(args.device)
    model, cfg = load_run(args.run, device, checkpoint=args.checkpoint)
    amp = resolve_amp(cfg.get("amp"), device)
    gallery = gallery_from_eval_dir(args.run, dataset, args.checkpoint)
    if gallery is None:
        logger.info("no complete %s: computing the gallery features of %s once",
                    rd.eval_dir(args.run, dataset, args.checkpoint), dataset)
        gallery = gallery_from_dataset(model, cfg, dataset, root, device, amp,
                                       progress=not args.no_progress)

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
