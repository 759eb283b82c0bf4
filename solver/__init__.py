"""Optimizer and learning-rate schedule of RDE."""
from __future__ import annotations

import math

import torch

TSE_MODULES = ("visul_emb_layer", "texual_emb_layer")
TEXT_POS_EMBED = "base_model.positional_embedding"


def param_lr_wd(cfg, name: str) -> tuple[float, float]:
    """(lr, weight decay) of parameter ``name``, by the rules of the releases' ``solver/build.py``,
    applied in their order (a later rule overrides the lr of an earlier one):

    1. every parameter: ``lr``, ``weight_decay``;
    2. biases: ``lr x bias_lr_factor``, ``weight_decay_bias``;
    3. the randomly initialised TSE layers (weights and biases): ``emb_lr`` (the releases
       hard-code 1e-3; the paper configs set it) or, when ``emb_lr`` is null, ``lr x lr_factor``.
       A TSE bias keeps the bias weight decay of rule 2;
    4. ICL only: the text position embedding gets ``lr x lr_factor`` when ``text_length`` != 77
       (UFine6926's 168-token table is resized from CLIP's 77 rows).
    """
    lr, wd = cfg.lr, cfg.weight_decay
    if "bias" in name:
        lr, wd = cfg.lr * cfg.bias_lr_factor, cfg.weight_decay_bias
    if any(m in name for m in TSE_MODULES):
        lr = cfg.emb_lr if cfg.emb_lr is not None else cfg.lr * cfg.lr_factor
    if TEXT_POS_EMBED in name and int(cfg.text_length) != 77:
        lr = cfg.lr * cfg.lr_factor
    return lr, wd


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per trainable tensor with the lr and weight decay of `param_lr_wd`."""
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = param_lr_wd(cfg, name)
        groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": name})
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.alpha, cfg.beta), eps=cfg.adam_eps)
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.alpha, cfg.beta), eps=1e-8)
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optimizer={cfg.optimizer!r}: choose Adam, AdamW or SGD")


def lr_factor(epoch: int, cfg) -> float:
    """Multiplier of every group's base lr at ``epoch`` (0-based count of finished epochs)."""
    if epoch < cfg.warmup_epochs:
        if cfg.warmup_method == "constant":
            return cfg.warmup_factor
        alpha = epoch / cfg.warmup_epochs
        return cfg.warmup_factor * (1 - alpha) + alpha
    mode = cfg.lrscheduler
    if mode == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if mode == "exp":
        return cfg.gamma ** epoch
    if mode == "constant":
        return 1.0
    span = max(1, cfg.num_epoch - cfg.warmup_epochs)
    progress = (epoch - cfg.warmup_epochs) / span
    if mode == "linear":
        return 1.0 - progress
    if mode == "poly":
        return (1.0 - progress) ** cfg.power
    if mode == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lrscheduler={mode!r}: choose cosine, step, exp, poly, linear or constant")


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch; cosine with 5 linear warm-up epochs (factor 0.1) by default.

    ``target_lr`` is honoured for cosine/poly/linear as lr = target + (base - target) * factor."""
    bases = [g["lr"] for g in optimizer.param_groups]

    def make(base: float):
        def f(epoch: int) -> float:
            fac = lr_factor(epoch, cfg)
            if epoch >= cfg.warmup_epochs and cfg.lrscheduler in ("cosine", "poly", "linear") and base > 0:
                return (cfg.target_lr + (base - cfg.target_lr) * fac) / base
            return fac
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [make(b) for b in bases])
