"""Model building and checkpoint loading.

``build_model(cfg)`` starts from an OpenAI CLIP checkpoint (``pretrain_choice``);
``load_run(run_dir)`` rebuilds a trained model from its saved config and weights alone (the
backbone's shape is read from the checkpoint, so the CLIP file is not needed again).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from model.rde import RDE
from utils.run_dir import BEST, checkpoint_path, checkpoints_in

from model.clip import CLIP, infer_config, load_clip, resize_text_pos_embed
from utils.io import torch_load
from utils.run_dir import load_run_config

logger = logging.getLogger("ICL.model")

__all__ = ["RDE", "build_model", "load_checkpoint", "load_init_checkpoint", "load_run", "read_state_dict"]

TEXT_POS_KEY = "base_model.positional_embedding"
INIT_TEXT_POS = ("interpolate", "skip")


def _rde(cfg, base) -> RDE:
    return RDE(base, select_ratio=cfg.select_ratio, tse_embed_dim=cfg.tse_embed_dim,
               loss_name=cfg.loss_names.split("+")[0].strip(), tau=cfg.tau, margin=cfg.margin,
               temperature=cfg.temperature)


def build_model(cfg) -> RDE:
    """RDE on a CLIP loaded from ``cfg.pretrain_choice`` (then ``cfg.init_checkpoint``, if set)."""
    base = load_clip(cfg.pretrain_choice, image_size=tuple(cfg.img_size), stride=cfg.stride_size,
                     text_length=cfg.text_length, text_pos=cfg.get("clip_text_pos", "interpolate"))
    model = _rde(cfg, base)
    if cfg.get("init_checkpoint"):
        load_init_checkpoint(model, cfg.init_checkpoint, text_pos=cfg.get("init_text_pos", "interpolate"))
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: ours (``{"model": sd, ...}``), the RDE/IRRA
    releases' (``{"model": sd}``, possibly fp16 and with DDP's ``module.`` prefix) or a bare
    state dict; tensors returned in float32."""
    obj: Any = torch_load(path, weights_only=False)
    sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: no state dict found (expected a dict of tensors or {{'model': ...}})")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def load_checkpoint(model: RDE, path: str | os.PathLike, strict_backbone: bool = True) -> dict:
    """Load ours, the RDE release's or IRRA's weights into ``model``.

    The backbone (``base_model.*``) must match exactly. TSE layers are loaded when present;
    when absent (IRRA, plain CLIP fine-tunes) the model falls back to the global (BGE)
    similarity. Returns ``{"missing": [...], "unexpected": [...], "tse": bool}``.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    base_keys = {k for k in own if k.startswith("base_model.")}
    if not any(k.startswith("base_model.") for k in sd):
        raise ValueError(f"{path}: no 'base_model.*' weights; is it an RDE/IRRA/ICL checkpoint?")
    bad_shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad_shape:
        detail = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape[:5])
        raise RuntimeError(f"{path}: shapes differ from the model built from the config: {detail}. "
                           "Check img_size, stride_size and text_length.")
    missing_base = sorted(base_keys - set(sd))
    if strict_backbone and missing_base:
        raise RuntimeError(f"{path}: backbone weights missing: {missing_base[:10]}")
    tse_keys = {k for k in own if k.startswith(("visul_emb_layer.", "texual_emb_layer."))}
    has_tse = tse_keys <= set(sd)
    load = {k: v for k, v in sd.items() if k in own and (has_tse or k not in tse_keys)}
    model.load_state_dict(load, strict=False)
    model.use_tse = has_tse
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        logger.info(f"{path}: ignored {len(unexpected)} keys the retrieval model does not use "
                    f"(e.g. {unexpected[:3]})")
    if not has_tse:
        logger.info(f"{path}: no TSE layers; retrieval uses the global (BGE) similarity only")
    return {"missing": missing_base, "unexpected": unexpected, "tse": has_tse}


def load_init_checkpoint(model: RDE, path: str | os.PathLike, text_pos: str = "interpolate") -> dict:
    """Start training from a TIReID checkpoint (``+pre`` in the ICL release), non-strictly.

    Reads ``{'model': sd}`` with or without DDP ``module.`` prefixes. Every key the model has with
    the same shape is loaded. A text position table of another length (a 77-token checkpoint
    into UFine6926's 168-token model) is linearly interpolated (``text_pos="interpolate"``) or
    left as the model built it from CLIP (``"skip"``, the release). Any other shape mismatch is
    an error naming the keys. Returns and logs ``{"loaded", "interpolated", "skipped", "missing",
    "unexpected"}`` (key lists); ``missing``: model keys the checkpoint lacks (kept as built).
    """
    if text_pos not in INIT_TEXT_POS:
        raise ValueError(f"init_text_pos={text_pos!r}: choose one of {', '.join(INIT_TEXT_POS)}")
    sd = read_state_dict(path)
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "interpolated": [], "skipped": [], "missing": [],
                                    "unexpected": sorted(k for k in sd if k not in own)}
    load = {}
    bad = []
    for key, value in sd.items():
        if key not in own:
            continue
        if value.shape == own[key].shape:
            load[key] = value
            report["loaded"].append(key)
        elif key == TEXT_POS_KEY and value.dim() == 2 and value.shape[1] == own[key].shape[1]:
            if text_pos == "skip":
                report["skipped"].append(key)
            else:
                load[key] = resize_text_pos_embed(value, own[key].shape[0])
                report["interpolated"].append(key)
        else:
            bad.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    if bad:
        raise RuntimeError(f"init_checkpoint {path}: shapes differ from the model built from the config: "
                           f"{', '.join(bad[:5])}. Check img_size, stride_size, tse_embed_dim.")
    if not any(k.startswith("base_model.") for k in load):
        raise ValueError(f"init_checkpoint {path}: no 'base_model.*' weights match; is it an RDE/ICL/IRRA checkpoint?")
    report["missing"] = sorted(k for k in own if k not in load and k not in report["skipped"])
    model.load_state_dict(load, strict=False)
    logger.info(f"init_checkpoint {path}: loaded {len(report['loaded'])} tensors, interpolated "
                f"{report['interpolated'] or 'none'}, skipped {report['skipped'] or 'none'}; "
                f"{len(report['missing'])} model tensors not in the checkpoint (kept as built)"
                + (f" e.g. {report['missing'][:3]}" if report["missing"] else "")
                + f", {len(report['unexpected'])} checkpoint tensors unused"
                + (f" e.g. {report['unexpected'][:3]}" if report["unexpected"] else ""))
    return report


def build_from_weights(cfg, path: str | os.PathLike) -> RDE:
    """RDE whose backbone shape is read from a checkpoint's ``base_model.*`` weights."""
    sd = read_state_dict(path)
    base_sd = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    if not base_sd:
        raise ValueError(f"{path}: no 'base_model.*' weights to rebuild the backbone from")
    # The weights were fine-tuned at the run's input sizes: no position-embedding resizing.
    base = CLIP(infer_config(base_sd, tuple(cfg.img_size), cfg.stride_size, cfg.text_length))
    model = _rde(cfg, base)
    load_checkpoint(model, path)
    return model


def load_run(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
             checkpoint: str = BEST) -> tuple[RDE, Any]:
    """(model in eval mode on ``device``, resolved config) of a run directory."""
    cfg = load_run_config(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    if not os.path.isfile(path):
        others = checkpoints_in(run_dir)
        raise FileNotFoundError(f"{path} not found (checkpoints in {run_dir}: {others or 'none'}); "
                                "train first or pass --checkpoint")
    model = build_from_weights(cfg, path)
    return model.to(device).eval(), cfg
