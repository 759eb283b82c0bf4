"""The RDE/ICL training loop: CCD every epoch, TAL on both embeddings, the RDA term,
evaluation, best/last checkpoints with exact resume."""
from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from model import build_model
from model.rde import rda_gamma
from processor import distributed as D
from processor.ccd import consensus, gmm_params, split_clean
from processor.evaluate import evaluate
from solver import build_optimizer, build_scheduler
from utils.config import Config, save_config
from utils.device import autocast, resolve_amp, resolve_device
from utils.io import atomic_save_npz, atomic_torch_save, atomic_write_json, torch_load
from utils.logger import setup_logger
from utils.run_dir import start_train_run


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class History:
    epochs: list = field(default_factory=list)
    best_r1: float = -1.0
    best_epoch: int = 0


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def per_sample_losses(model, loader, device, amp, size: int, rank: int, world: int,
                      progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair losses of both views over the training set (eval mode, no grad); sharded over ranks."""
    net = _unwrap(model)
    net.eval()
    loss_a = torch.zeros(size, dtype=torch.float64)
    loss_b = torch.zeros(size, dtype=torch.float64)
    for n, batch in enumerate(tqdm(loader, desc="CCD losses", disable=not progress, leave=False)):
        if n % world != rank:
            continue
        idx = batch["index"].long()
        with autocast(device, amp):
            la, lb = net.per_sample_losses(batch["images"].to(device), batch["caption_ids"].to(device),
                                           batch["pids"].to(device))
        loss_a[idx] = la.double().cpu()
        loss_b[idx] = lb.double().cpu()
    if world > 1:
        loss_a = D.all_reduce_sum(loss_a.to(device)).cpu()
        loss_b = D.all_reduce_sum(loss_b.to(device)).cpu()
    return loss_a.numpy(), loss_b.numpy()


TRAIN_MODES = ("train", "release_icl")
CCD_LOSS_PASSES = ("train_loader", "eval_transform")
# CCD's pass over the training loader draws its own augmentations, not the training pass's ones
# (the releases iterate the loader twice per epoch, drawing afresh each time).
CCD_EPOCH_OFFSET = 1_000_000


def check_switches(cfg: Config) -> None:
    """Reject unknown values of the release switches before anything is written."""
    for key, choices in (("train_mode", TRAIN_MODES), ("ccd_loss_pass", CCD_LOSS_PASSES)):
        if cfg.get(key) not in choices:
            raise ValueError(f"{key}={cfg.get(key)!r}: choose one of {', '.join(choices)} (docs/DEVIATIONS.md)")


def ccd_loader(loaders, cfg, epoch: int) -> torch.utils.data.DataLoader:
    """The training pairs in shuffled batches of ``batch_size`` (seeded by epoch), for CCD.

    ``ccd_loss_pass: eval_transform``: the test transform, no token masking (ours);
    ``train_loader``: the training augmentation (image and token), fresh draws, as both releases.
    Per-sample TAL depends on the other pairs of the batch: in dataset order a batch holds
    one or two identities and has almost no negatives, so CCD uses mixed batches as training does."""
    if cfg.ccd_loss_pass == "train_loader":
        dataset = copy.copy(loaders.train.dataset)
        dataset.set_epoch(CCD_EPOCH_OFFSET + epoch)
    else:
        dataset = loaders.train_eval.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=order.tolist(),
                                       num_workers=loaders.train_eval.num_workers)


def ccd_weights(cfg, model, loaders, device, amp, epoch, rank, world, run_dir, logger, progress):
    """CCD: GMM split of each view's losses, consensus of the two -> per-pair 0/1 weights."""
    size = len(loaders.train_eval.dataset)
    la, lb = per_sample_losses(model, ccd_loader(loaders, cfg, epoch), device, amp, size, rank, world,
                               progress)
    params = gmm_params(cfg.noisy_rate, cfg.dataset_name)
    clean_a = split_clean(la, seed=cfg.seed, **params)
    clean_b = split_clean(lb, seed=cfg.seed, **params)
    gen = np.random.default_rng([cfg.seed, epoch])
    weights = np.asarray(consensus(clean_a, clean_b, gen), dtype=np.float32)
    noisy = getattr(loaders, "noisy_mask", None)
    msg = (f"CCD epoch {epoch}: clean BGE {clean_a.mean():.3f}, TSE {clean_b.mean():.3f}, "
           f"consensus weight 1 for {weights.mean():.3f} of {size} pairs")
    extra = {}
    if noisy is not None and np.asarray(noisy).any():
        noisy = np.asarray(noisy).astype(bool)
        pred_noisy = weights == 0
        tp = float((pred_noisy & noisy).sum())
        extra = {"noisy_precision": tp / max(1.0, pred_noisy.sum()), "noisy_recall": tp / max(1.0, noisy.sum())}
        msg += f"; noisy pairs found: precision {extra['noisy_precision']:.3f}, recall {extra['noisy_recall']:.3f}"
    logger.info(msg)
    if rank == 0:
        arrays = {"clean_bge": clean_a.astype(np.int8), "clean_tse": clean_b.astype(np.int8), "weights": weights,
                  "loss_bge": la.astype(np.float32), "loss_tse": lb.astype(np.float32)}
        if noisy is not None:
            arrays["noisy_mask"] = np.asarray(noisy).astype(np.int8)
        atomic_save_npz(os.path.join(run_dir, "ccd", f"epoch_{epoch}.npz"), **arrays)
    return torch.from_numpy(weights), extra


def record_noise_file(cfg: Config) -> None:
    """Check the noise file the run will read and record its sha256 in the config (saved in the
    run's config.yaml next to ``noisy_file``); a preset ``noisy_file_sha256`` must match."""
    from datasets.noise import NoiseFileError, check_noise_file

    sha = check_noise_file(float(cfg.noisy_rate or 0.0), cfg.get("noisy_file"), bool(cfg.get("noise_draw")))
    if cfg.get("noisy_file_sha256") and sha != cfg.noisy_file_sha256:
        raise NoiseFileError(f"noisy_file {cfg.get('noisy_file')} has sha256 {sha}, not noisy_file_sha256="
                         f"{cfg.noisy_file_sha256}: another permutation than the one this run was set up with")
    cfg.noisy_file_sha256 = sha


def save_checkpoint(path, model, epoch, **extra) -> None:
    atomic_torch_save(path, {"model": _unwrap(model).state_dict(), "epoch": epoch, **extra})


def train(cfg: Config, run_dir: str | None = None, *, progress: bool = True,
          stop_after_epoch: int | None = None) -> dict:
    """Train RDE (with RDA when the annotation carries sub-sentences) and return the history.

    ``run_dir`` defaults to ``<output_dir>/<name>``; with ``resume: true`` a run continues from
    ``last.pth`` exactly where it stopped. ``stop_after_epoch`` ends early (tests, debugging).
    """
    from datasets import build_dataloader  # here: datasets/ knows nothing of the model
    from datasets.rda_file import require_rda_file

    device = resolve_device(cfg.device)
    rank, world = D.init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", D.local_rank())
        torch.cuda.set_device(device)
    cfg.distributed = world > 1
    amp = resolve_amp(cfg.amp, device)
    # Checked before anything is written: an ICL config must never fall back to plain captions.
    check_switches(cfg)
    rda_file = require_rda_file(cfg)
    if rda_file is not None:
        cfg.anno_file = rda_file
    record_noise_file(cfg)  # a missing noise file is refused here, before anything is written
    run_dir = run_dir or os.path.join(cfg.output_dir, cfg.name)
    notes = start_train_run(cfg, run_dir, rank)  # refuses before anything is written
    D.barrier()  # every rank checked before rank 0 writes config.yaml
    os.makedirs(run_dir, exist_ok=True)
    logger = setup_logger("ICL", os.path.join(run_dir, "train.log"), rank)
    for note in notes:
        logger.info(note)
    set_seed(cfg.seed + rank)

    loaders = build_dataloader(cfg)
    model = build_model(cfg)
    if rank == 0:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        logger.info("config:\n" + json.dumps(dict(cfg), indent=1, default=str))
        logger.info("\n" + loaders.dataset.summary() if hasattr(loaders.dataset, "summary") else "")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters; device {device}, amp {amp}, world size {world}")
    has_rda = bool(cfg.rda) and getattr(loaders.dataset, "train_rda", None) is not None
    logger.info(f"RDA term: {'on' if has_rda else 'off'}; train_mode {cfg.train_mode}, "
                f"ccd_loss_pass {cfg.ccd_loss_pass}")

    net = model
    if world > 1 and cfg.get("sync_bn", True):
        # The TSE BatchNorm layers normalise (train_mode: train) with the global batch's statistics.
        from processor.sync_bn import convert_sync_batchnorm
        logger.info(f"sync_bn: {convert_sync_batchnorm(model)} BatchNorm layers synchronised across {world} ranks")
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    history = History()
    start_epoch = 1
    last_path = os.path.join(run_dir, "last.pth")
    if cfg.resume and os.path.isfile(last_path):
        ckpt = torch_load(last_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        history = History(**ckpt["history"])
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        start_epoch = ckpt["epoch"] + 1
        logger.info(f"resumed from {last_path}: epoch {ckpt['epoch']} done, best R1 {history.best_r1:.2f}")

    tb = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # One stream per run: a resume writes to the same folder and purges the steps it redoes
        # (an epoch logged before a kill but not checkpointed would otherwise appear twice).
        tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), purge_step=start_epoch)

    for epoch in range(start_epoch, cfg.num_epoch + 1):
        t0 = time.time()
        for obj in (loaders.train.sampler, loaders.train.dataset, getattr(loaders.train, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        ccd_info = {}
        if cfg.ccd:
            weights, ccd_info = ccd_weights(cfg, net, loaders, device, amp, epoch, rank, world, run_dir, logger,
                                            progress and rank == 0)
        else:
            weights = torch.ones(len(loaders.train.dataset))
        gamma = rda_gamma(epoch, cfg.rda_gamma_start, cfg.rda_gamma_decay, cfg.rda_gamma_min) if has_rda else None

        # The ICL release never calls model.train() (the TSE BatchNorm layers stay in eval mode,
        # running statistics frozen); the RDE release does.
        net.train(cfg.train_mode == "train")
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(loaders.train, desc=f"epoch {epoch}/{cfg.num_epoch}", disable=not (progress and rank == 0))
        for it, batch in enumerate(bar):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            w = weights[batch["index"].cpu().long()].to(device)
            with autocast(device, amp):
                losses = net(batch, weights=w, aug_gamma=gamma)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            bs = batch["images"].shape[0]
            seen += bs
            for k, v in {"loss": total, **losses}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * bs
            if (it + 1) % cfg.log_period == 0 or it + 1 == len(loaders.train):
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        dt = time.time() - t0
        means = {k: v / max(1, seen) for k, v in sums.items()}
        logger.info(f"epoch {epoch} done in {dt:.1f}s ({seen * world / dt:.1f} samples/s), lr {lr:.2e}, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + (f", rda gamma {gamma:.2f}" if gamma is not None else ""))
        record = {"epoch": epoch, "lr": lr, "seconds": dt, **means, **ccd_info}
        if gamma is not None:
            record["rda_gamma"] = gamma

        if rank == 0 and (epoch % cfg.eval_period == 0 or epoch == cfg.num_epoch):
            results = evaluate(_unwrap(net), loaders.test_img, loaders.test_txt, device, amp,
                               progress=progress, name=f"{cfg.dataset_name}-epoch{epoch}")
            record["metrics"] = results
            r1 = results["t2i"]["R1"]
            if r1 > history.best_r1:
                history.best_r1, history.best_epoch = r1, epoch
                save_checkpoint(os.path.join(run_dir, "best.pth"), net, epoch, metrics=results)
            if tb is not None:
                for k, v in results["t2i"].items():
                    tb.add_scalar(f"eval/{k}", v, epoch)
        if tb is not None:
            tb.add_scalar("train/lr", lr, epoch)
            for k, v in means.items():
                tb.add_scalar(f"train/{k}", v, epoch)
            for k, v in ccd_info.items():
                tb.add_scalar(f"ccd/{k}", v, epoch)
            tb.flush()
        history.epochs.append(record)
        if rank == 0:
            rngs = rng_state()
            atomic_torch_save(last_path, {
                "model": _unwrap(net).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "history": history.__dict__, "rng": rngs})
            atomic_write_json(os.path.join(run_dir, "metrics.json"),
                              {"best_epoch": history.best_epoch, "best_R1": history.best_r1,
                               "epochs": history.epochs})
        D.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break

    if rank == 0:
        logger.info(f"best R1 {history.best_r1:.2f} at epoch {history.best_epoch}; run directory {run_dir}")
        if cfg.save_eval and history.best_epoch > 0 and os.path.isfile(os.path.join(run_dir, "best.pth")):
            from processor.evaluate import evaluate_run
            evaluate_run(run_dir, device=str(device), progress=progress)
    if tb is not None:
        tb.close()
    return history.__dict__
