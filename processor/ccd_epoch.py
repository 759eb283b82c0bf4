"""CCD's pass of one epoch: per-pair losses of both views over the training set, each view's
2-component GMM split, the consensus -> per-pair 0/1 weights, and the epoch's record in
``RUN/ccd/epoch_<k>.npz`` (processor/ccd.py holds the GMM and the consensus themselves)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from tqdm import tqdm

from processor import distributed as D
from processor.ccd import consensus, gmm_params, split_clean
from processor.checkpoints import unwrap
from utils import run_dir as rd
from utils.device import autocast

CCD_LOSS_PASSES = ("train_loader", "eval_transform")
# CCD's pass over the training loader draws its own augmentations, not the training pass's ones
# (the releases iterate the loader twice per epoch, drawing afresh each time).
CCD_EPOCH_OFFSET = 1_000_000


@torch.no_grad()
def per_sample_losses(model, loader, device, amp, size: int, rank: int, world: int,
                      progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair losses of both views over the training set (eval mode, no grad); sharded over ranks."""
    net = unwrap(model)
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


def _noise_found(weights: np.ndarray, noisy) -> dict:
    """Precision and recall of CCD's noisy pairs (weight 0) against the injected ones."""
    noisy = np.asarray(noisy).astype(bool)
    pred_noisy = weights == 0
    tp = float((pred_noisy & noisy).sum())
    return {"noisy_precision": tp / max(1.0, pred_noisy.sum()), "noisy_recall": tp / max(1.0, noisy.sum())}


def ccd_weights(cfg, model, loaders, device, amp, epoch, rank, world, run_dir, logger, progress):
    """CCD: GMM split of each view's losses, consensus of the two -> per-pair 0/1 weights (and,
    with injected noise, how many noisy pairs it found); rank 0 records the epoch."""
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
        extra = _noise_found(weights, noisy)
        msg += f"; noisy pairs found: precision {extra['noisy_precision']:.3f}, recall {extra['noisy_recall']:.3f}"
    logger.info(msg)
    if rank == 0:
        arrays = {"clean_bge": clean_a.astype(np.int8), "clean_tse": clean_b.astype(np.int8), "weights": weights,
                  "loss_bge": la.astype(np.float32), "loss_tse": lb.astype(np.float32)}
        if noisy is not None:
            arrays["noisy_mask"] = np.asarray(noisy).astype(np.int8)
        rd.write_ccd(run_dir, epoch, arrays)
    return torch.from_numpy(weights), extra
