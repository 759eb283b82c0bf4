"""The trainer's checkpoints: best.pth (weights of the best epoch), last.pth (everything an exact
resume needs: weights, optimizer, scheduler, scaler, history, every rank's RNG states) and the
run's metrics.json, all written through utils/run_dir.py."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from utils import run_dir as rd
from utils.determinism import rng_state, set_rng_state
from utils.io import atomic_torch_save, torch_load


@dataclass
class History:
    epochs: list = field(default_factory=list)
    best_r1: float = -1.0
    best_epoch: int = 0


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path, model, epoch, **extra) -> None:
    atomic_torch_save(path, {"model": unwrap(model).state_dict(), "epoch": epoch, **extra})


def save_best(run_dir: str, model, epoch: int, results: dict) -> None:
    save_checkpoint(rd.checkpoint_path(run_dir, rd.BEST), model, epoch, metrics=results)


def save_last(run_dir: str, net, optimizer, scheduler, scaler, epoch: int, history: History) -> None:
    """last.pth (state of the finished epoch), then metrics.json (rank 0)."""
    atomic_torch_save(rd.checkpoint_path(run_dir, rd.LAST), {
        "model": unwrap(net).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
        "history": history.__dict__, "rng": rng_state()})
    rd.write_metrics(run_dir, {"best_epoch": history.best_epoch, "best_R1": history.best_r1,
                               "epochs": history.epochs})


def resume(cfg, run_dir: str, model, optimizer, scheduler, scaler, rank: int, logger) -> tuple[History, int]:
    """(history, first epoch to run): from last.pth with ``resume: true``, else a fresh start."""
    last_path = rd.checkpoint_path(run_dir, rd.LAST)
    if not (cfg.resume and os.path.isfile(last_path)):
        return History(), 1
    ckpt = torch_load(last_path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    history = History(**ckpt["history"])
    set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    logger.info(f"resumed from {last_path}: epoch {ckpt['epoch']} done, best R1 {history.best_r1:.2f}")
    return history, ckpt["epoch"] + 1
