"""Training samplers. All are deterministic given (seed, epoch) and shard for DDP by rank."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not valid for world size {world_size}")


class ShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` seeded by ``seed + epoch``; with ``world_size``
    > 1 every rank takes every ``world_size``-th index of the same permutation (padded by
    wrapping around so all ranks get the same count)."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank:total:self.world_size])


class RandomIdentitySampler(Sampler[int]):
    """IRRA's identity sampler: batches of ``batch_size`` = P identities x K instances.

    Per identity its indices are shuffled (sampled with replacement up to K when it has fewer)
    and cut into groups of K (a remainder is dropped); then groups of P randomly chosen
    identities that still have groups left are emitted until fewer than P remain. Consecutive
    ``batch_size`` indices therefore hold exactly K samples of each of P distinct identities.
    The draw is seeded by (seed, epoch); ``pids[i]`` is the identity of sample i.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0) -> None:
        if num_instances < 1 or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_instance ({num_instances})")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = seed
        self.epoch = 0
        self.index_of: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_of[int(pid)].append(index)
        self.pids = sorted(self.index_of)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(f"identity sampler needs at least {self.num_pids_per_batch} identities per batch "
                             f"(batch_size / num_instance) but the train set has {len(self.pids)}")
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_order(self) -> list[int]:
        """The whole epoch's index list (all ranks), cached per epoch."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        groups: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = self.index_of[pid]
            if len(idxs) < self.num_instances:
                idxs = rng.choice(idxs, size=self.num_instances, replace=True).tolist()
            idxs = rng.permutation(idxs).tolist()
            usable = len(idxs) - len(idxs) % self.num_instances
            groups[pid] = [idxs[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        available = list(self.pids)
        order: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            chosen = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            for pid in [available[i] for i in chosen]:
                order.extend(groups[pid].pop())
                if not groups[pid]:
                    available.remove(pid)
        self._cache = (self.epoch, order)
        return order

    def __len__(self) -> int:
        return len(self._epoch_order())

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_order())


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """The identity sampler under DDP: ``batch_size`` is the global batch; each rank gets
    mini-batches of ``batch_size // world_size`` (P' identities x K). All ranks draw the same
    epoch order from (seed, epoch), so no communication is needed; mini-batch j goes to rank
    ``j % world_size`` and every rank gets the same number of mini-batches."""

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        default_rank, default_world = dist_info()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        _check_rank(self.rank, self.world_size)
        if batch_size % self.world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the world size ({self.world_size})")
        self.mini_batch_size = batch_size // self.world_size
        super().__init__(pids, self.mini_batch_size, num_instances, seed)

    def _rank_order(self) -> list[int]:
        order = self._epoch_order()
        m = self.mini_batch_size
        blocks = len(order) // m
        per_rank = blocks // self.world_size
        return [i for b in range(per_rank) for i in order[(b * self.world_size + self.rank) * m:
                                                          (b * self.world_size + self.rank + 1) * m]]

    def __len__(self) -> int:
        return len(self._rank_order())

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_order())
