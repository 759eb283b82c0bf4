"""Synchronised BatchNorm for DDP on any device (CUDA, and CPU with gloo).

Under DDP each process sees its share of the batch; a plain ``BatchNorm1d`` in training mode
normalises with, and accumulates running statistics of, that share only. ``SyncBatchNorm1d``
all-reduces the per-feature sum, sum of squares and count, so every rank normalises with the
statistics of the global batch and the running statistics equal those of one process on the
whole batch. The reduction is differentiable (``torch.distributed.nn.functional.all_reduce``),
so gradients flow through the global statistics. torch's own ``nn.SyncBatchNorm`` refuses CPU
tensors; this one is small (two vectors per layer per step) and runs on every backend.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics span every DDP rank (same parameters and
    buffers, so checkpoints are interchangeable with ``BatchNorm1d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats) or _world() == 1 or x.dim() != 2:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
        stats = all_reduce(stats.float())
        d = x.shape[1]
        count = stats[-1]
        mean = stats[:d] / count
        var = (stats[d:2 * d] / count - mean * mean).clamp(min=0.0)  # biased: normalises the batch
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
            unbiased = var * (count / (count - 1).clamp(min=1.0))
            self.running_mean.mul_(1 - factor).add_(factor * mean.detach().to(self.running_mean.dtype))
            self.running_var.mul_(1 - factor).add_(factor * unbiased.detach().to(self.running_var.dtype))
        y = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm1d`` under ``module`` by :class:`SyncBatchNorm1d` in place (weights,
    buffers and ``requires_grad`` kept); returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm1d:
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.to(next(iter(child.state_dict().values())).device)
            if child.affine:
                sync.weight.requires_grad_(child.weight.requires_grad)
                sync.bias.requires_grad_(child.bias.requires_grad)
            sync.train(child.training)
            setattr(module, name, sync)
            count += 1
        else:
            count += convert_sync_batchnorm(child)
    return count


__all__ = ["SyncBatchNorm1d", "convert_sync_batchnorm"]
