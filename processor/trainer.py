"""The RDE/ICL training loop: CCD every epoch (processor/ccd_epoch.py), TAL on both embeddings,
the RDA term (its weight: processor/rda_schedule.py), evaluation, best/last checkpoints with exact
resume (processor/checkpoints.py), the log and TensorBoard (processor/train_log.py)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from datasets import build_dataloader
from datasets.noise import NoiseFileError, check_noise_file
from datasets.rda_file import require_rda_file
from model import build_model
from processor import distributed as D
from processor.ccd_epoch import CCD_LOSS_PASSES, ccd_loader, ccd_weights  # noqa: F401 (ccd_loader: tests)
from processor.checkpoints import History, resume, save_best, save_last, unwrap
from processor.evaluate import evaluate, evaluate_run
from processor.rda_schedule import rda_gamma
from processor.sync_bn import convert_sync_batchnorm
from processor.train_log import TrainLog
from solver import build_optimizer, build_scheduler
from utils import run_dir as rd
from utils.config import Config
from utils.determinism import set_seed
from utils.device import autocast, resolve_amp, resolve_device
from utils.logger import setup_logger


TRAIN_MODES = ("train", "release_icl")


def check_switches(cfg: Config) -> None:
    """Reject unknown values of the release switches before anything is written."""
    for key, choices in (("train_mode", TRAIN_MODES), ("ccd_loss_pass", CCD_LOSS_PASSES)):
        if cfg.get(key) not in choices:
            raise ValueError(f"{key}={cfg.get(key)!r}: choose one of {', '.join(choices)} (docs/DEVIATIONS.md)")


def record_noise_file(cfg: Config) -> None:
    """Check the noise file the run will read and record its sha256 in the config (saved in the
    run's config.yaml next to ``noisy_file``); a preset ``noisy_file_sha256`` must match."""
    sha = check_noise_file(float(cfg.noisy_rate or 0.0), cfg.get("noisy_file"), bool(cfg.get("noise_draw")))
    if cfg.get("noisy_file_sha256") and sha != cfg.noisy_file_sha256:
        raise NoiseFileError(f"noisy_file {cfg.get('noisy_file')} has sha256 {sha}, not noisy_file_sha256="
                         f"{cfg.noisy_file_sha256}: another permutation than the one this run was set up with")
    cfg.noisy_file_sha256 = sha


def train(cfg: Config, run_dir: str | None = None, *, progress: bool = True,
          stop_after_epoch: int | None = None) -> dict:
    """Train RDE (with RDA when the annotation carries sub-sentences) and return the history.

    ``run_dir`` defaults to ``<output_dir>/<name>``; with ``resume: true`` a run continues from
    ``last.pth`` exactly where it stopped. ``stop_after_epoch`` ends early (tests, debugging).
    """

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
    run_dir = run_dir or rd.default_run_dir(cfg)
    # One training per folder: a second one into the same name is refused at once (the lock dies
    # with its process, so a crashed run never blocks its resume).
    with rd.folder_lock(run_dir, "training") if rank == 0 else contextlib.nullcontext():
        return _train_locked(cfg, run_dir, device, rank, world, amp, progress, stop_after_epoch)


@dataclass
class _Job:
    """What every epoch of one training needs."""

    cfg: Config
    run_dir: str
    device: torch.device
    rank: int
    world: int
    amp: object
    progress: bool
    logger: object
    loaders: object
    net: torch.nn.Module
    optimizer: object
    scheduler: object
    scaler: object
    has_rda: bool


def _build(cfg: Config, run_dir: str, device, rank: int, world: int, amp, logger):
    """Loaders, the model (wrapped for DDP), and (rank 0) the saved config."""

    loaders = build_dataloader(cfg)
    model = build_model(cfg)
    if rank == 0:
        rd.save_run_config(run_dir, cfg)
        logger.info("config:\n" + json.dumps(dict(cfg), indent=1, default=str))
        logger.info("\n" + loaders.dataset.summary() if hasattr(loaders.dataset, "summary") else "")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters; device {device}, amp {amp}, world size {world}")
    net = model
    if world > 1 and cfg.get("sync_bn", True):
        # The TSE BatchNorm layers normalise (train_mode: train) with the global batch's statistics.
        logger.info(f"sync_bn: {convert_sync_batchnorm(model)} BatchNorm layers synchronised across {world} ranks")
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return loaders, model, net


def _train_locked(cfg: Config, run_dir: str, device, rank: int, world: int, amp, progress: bool,
                  stop_after_epoch: int | None) -> dict:
    """``train`` once the run folder is locked."""
    notes = rd.start_train_run(cfg, run_dir, rank)  # refuses before anything is written
    D.barrier()  # every rank checked before rank 0 writes config.yaml
    os.makedirs(run_dir, exist_ok=True)
    logger = setup_logger("ICL", rd.log_path(run_dir, "train"), rank)
    for note in notes:
        logger.info(note)
    set_seed(cfg.seed + rank)

    loaders, model, net = _build(cfg, run_dir, device, rank, world, amp, logger)
    has_rda = bool(cfg.rda) and getattr(loaders.dataset, "train_rda", None) is not None
    logger.info(f"RDA term: {'on' if has_rda else 'off'}; train_mode {cfg.train_mode}, "
                f"ccd_loss_pass {cfg.ccd_loss_pass}")
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history, start_epoch = resume(cfg, run_dir, model, optimizer, scheduler, scaler, rank, logger)
    job = _Job(cfg, run_dir, device, rank, world, amp, progress, logger, loaders, net, optimizer,
               scheduler, scaler, has_rda)
    log = TrainLog(run_dir, rank, start_epoch)
    for epoch in range(start_epoch, cfg.num_epoch + 1):
        record, ccd_info = _train_epoch(job, epoch)
        results = _evaluate_epoch(job, epoch, record, history)
        log.scalars(epoch, record["lr"], {k: record[k] for k in record["losses"]}, ccd_info, results)
        del record["losses"]
        history.epochs.append(record)
        if rank == 0:
            save_last(run_dir, net, optimizer, scheduler, scaler, epoch, history)
        D.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break

    if rank == 0:
        logger.info(f"best R1 {history.best_r1:.2f} at epoch {history.best_epoch}; run directory {run_dir}")
        if cfg.save_eval and history.best_epoch > 0 and os.path.isfile(rd.checkpoint_path(run_dir, rd.BEST)):
            evaluate_run(run_dir, device=str(device), progress=progress)
    log.close()
    return history.__dict__


def _train_epoch(job: _Job, epoch: int) -> tuple[dict, dict]:
    """CCD's weights, then one pass over the training loader; returns the epoch's record (with
    ``losses``, the names of its loss means, for the log) and CCD's noise figures."""
    cfg, loaders, net, device = job.cfg, job.loaders, job.net, job.device
    t0 = time.time()
    for obj in (loaders.train.sampler, loaders.train.dataset, getattr(loaders.train, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    ccd_info = {}
    if cfg.ccd:
        weights, ccd_info = ccd_weights(cfg, net, loaders, device, job.amp, epoch, job.rank, job.world,
                                        job.run_dir, job.logger, job.progress and job.rank == 0)
    else:
        weights = torch.ones(len(loaders.train.dataset))
    gamma = rda_gamma(epoch, cfg) if job.has_rda else None

    # The ICL release never calls model.train() (the TSE BatchNorm layers stay in eval mode,
    # running statistics frozen); the RDE release does.
    net.train(cfg.train_mode == "train")
    sums: dict[str, float] = {}
    seen = 0
    bar = tqdm(loaders.train, desc=f"epoch {epoch}/{cfg.num_epoch}", disable=not (job.progress and job.rank == 0))
    for it, batch in enumerate(bar):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        w = weights[batch["index"].cpu().long()].to(device)
        with autocast(device, job.amp):
            losses = net(batch, weights=w, aug_gamma=gamma)
        total = sum(losses.values())
        job.optimizer.zero_grad(set_to_none=True)
        job.scaler.scale(total).backward()
        job.scaler.step(job.optimizer)
        job.scaler.update()
        bs = batch["images"].shape[0]
        seen += bs
        for k, v in {"loss": total, **losses}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * bs
        if (it + 1) % cfg.log_period == 0 or it + 1 == len(loaders.train):
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
    lr = job.optimizer.param_groups[0]["lr"]
    job.scheduler.step()
    dt = time.time() - t0
    means = {k: v / max(1, seen) for k, v in sums.items()}
    job.logger.info(TrainLog.epoch_line(epoch, dt, seen * job.world, lr, means, gamma))
    record = {"epoch": epoch, "lr": lr, "seconds": dt, **means, **ccd_info}
    if gamma is not None:
        record["rda_gamma"] = gamma
    record["losses"] = list(means)
    return record, ccd_info


def _evaluate_epoch(job: _Job, epoch: int, record: dict, history: History) -> dict | None:
    """Rank 0, every ``eval_period`` epochs and the last: test metrics into ``record``; best.pth
    when R1 beats the best so far. Returns the metrics (None when not evaluated)."""
    cfg = job.cfg
    if not (job.rank == 0 and (epoch % cfg.eval_period == 0 or epoch == cfg.num_epoch)):
        return None
    results = evaluate(unwrap(job.net), job.loaders.test_img, job.loaders.test_txt, job.device, job.amp,
                       progress=job.progress, name=f"{cfg.dataset_name}-epoch{epoch}")
    record["metrics"] = results
    r1 = results["t2i"]["R1"]
    if r1 > history.best_r1:
        history.best_r1, history.best_epoch = r1, epoch
        save_best(job.run_dir, job.net, epoch, results)
    return results
