"""Data loaders for training and evaluation from a flat config."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, SequentialSampler

from . import build_dataset
from .annotations import BaseDataset
from .bases import ImageDataset, ImageTextDataset, TextDataset
from .noise import build_noise_index, permute_captions
from .sampler import DistributedRandomIdentitySampler, RandomIdentitySampler, ShuffleSampler, dist_info
from .transforms import build_transforms

logger = logging.getLogger("ICL.datasets")

_MISSING = object()


def _get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """``cfg.key`` for attribute-style configs (dicts also accepted)."""
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    if value is _MISSING:
        raise KeyError(f"config key '{key}' is missing; set it in the experiment YAML or as {key}=...")
    return value


@dataclass
class Loaders:
    """Everything training needs from the data side.

    ``train``: shuffled/identity-sampled augmented pairs; ``train_eval``: the same (noisy) pairs
    in order, test transform, no augmentation, batches carry ``index`` (CCD's per-sample
    losses); ``test_img`` / ``test_txt``: the evaluation split (``val_dataset``, default test);
    ``noisy_mask``: bool [N], True for pairs whose caption was shuffled in.
    """

    train: DataLoader
    train_eval: DataLoader
    test_img: DataLoader
    test_txt: DataLoader
    num_classes: int
    dataset: BaseDataset
    noisy_mask: np.ndarray

    def set_epoch(self, epoch: int) -> None:
        """Reseed the train sampler and the per-sample augmentation for ``epoch``."""
        self.train.sampler.set_epoch(epoch)
        self.train.dataset.set_epoch(epoch)


def _dataset_from_cfg(cfg: Any) -> BaseDataset:
    return build_dataset(_get(cfg, "dataset_name"), _get(cfg, "root_dir"), _get(cfg, "anno_file", None))


def _eval_loaders(split: dict, cfg: Any) -> tuple[DataLoader, DataLoader]:
    transform = build_transforms(_get(cfg, "img_size"), aug=False, is_train=False)
    batch_size = _get(cfg, "test_batch_size", 512)
    workers = _get(cfg, "num_workers", 0)
    img = DataLoader(ImageDataset(split["image_pids"], split["img_paths"], transform),
                     batch_size=batch_size, shuffle=False, num_workers=workers)
    txt = DataLoader(TextDataset(split["caption_pids"], split["captions"], _get(cfg, "text_length", 77)),
                     batch_size=batch_size, shuffle=False, num_workers=workers)
    return img, txt


def _train_sampler(pids: list[int], cfg: Any, seed: int) -> tuple[Any, int]:
    """(sampler, per-rank batch size) for the configured sampler and DDP setting."""
    batch_size = _get(cfg, "batch_size")
    sampler_name = _get(cfg, "sampler", "random")
    distributed = bool(_get(cfg, "distributed", False))
    rank, world = dist_info() if distributed else (0, 1)
    if distributed and world == 1:
        logger.warning("distributed=True but no process group is initialised; sampling as a single process")
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the world size ({world})")
    if sampler_name == "identity":
        num_instance = _get(cfg, "num_instance", 4)
        if distributed:
            sampler = DistributedRandomIdentitySampler(pids, batch_size, num_instance, seed, rank, world)
        else:
            sampler = RandomIdentitySampler(pids, batch_size, num_instance, seed)
        logger.info("identity sampler: %d ids x %d instances per batch", batch_size // world // num_instance,
                    num_instance)
    elif sampler_name == "random":
        sampler = ShuffleSampler(len(pids), seed, rank, world)
    else:
        raise ValueError(f"config key 'sampler' must be 'random' or 'identity', got {sampler_name!r}")
    return sampler, batch_size // world


def build_dataloader(cfg: Any) -> Loaders:
    """Build the training, train-evaluation and test loaders described by ``cfg``.

    Keys: ``dataset_name, root_dir, anno_file, img_size, img_aug, txt_aug, text_length,
    batch_size, test_batch_size, num_workers, sampler, num_instance, distributed, noisy_rate,
    noisy_file, noise_draw, seed, rda, val_dataset``.
    """
    dataset = _dataset_from_cfg(cfg)
    # Before any training: a missing split would otherwise fail after a whole epoch.
    dataset.require_split("train", "training")
    dataset.require_split(_get(cfg, "val_dataset", "test"), "evaluated during training, val_dataset")
    seed = int(_get(cfg, "seed", 0))
    train = dataset.train
    rda = dataset.train_rda
    if _get(cfg, "rda", False) == "required" and rda is None:
        raise ValueError(f"rda=required but {dataset.anno_path} has no 'diversity_captions' for the train split; "
                         "pass the RDA annotation file as anno_file=PATH (see datasets/rda_file.py)")
    if _get(cfg, "rda", False) and rda is None:
        logger.warning("rda=True but %s has no 'diversity_captions'; training without RDA captions",
                       dataset.anno_path)
    if not _get(cfg, "rda", False):
        rda = None

    noisy_rate = float(_get(cfg, "noisy_rate", 0.0) or 0.0)
    index = build_noise_index(len(train), noisy_rate, _get(cfg, "noisy_file", None), seed,
                              draw=bool(_get(cfg, "noise_draw", False)))
    noisy_mask = index != np.arange(len(train))
    captions = permute_captions([item[3] for item in train], index)
    train = [(pid, image_id, path, caption) for (pid, image_id, path, _), caption in zip(train, captions)]
    if rda is not None:
        rda = permute_captions(rda, index)
    if noisy_rate > 0:
        logger.info("noisy correspondence: %d of %d pairs shuffled (rate %.2f)", int(noisy_mask.sum()),
                    len(train), noisy_rate)

    workers = _get(cfg, "num_workers", 0)
    text_length = _get(cfg, "text_length", 77)
    img_size = _get(cfg, "img_size")
    train_set = ImageTextDataset(train, build_transforms(img_size, aug=bool(_get(cfg, "img_aug", False)),
                                                         is_train=True),
                                 text_length=text_length, txt_aug=bool(_get(cfg, "txt_aug", False)),
                                 rda=rda, seed=seed)
    sampler, batch_size = _train_sampler([item[0] for item in train], cfg, seed)
    # Workers are not persistent: each epoch's workers copy the dataset after set_epoch.
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=workers,
                              drop_last=False)

    eval_set = ImageTextDataset(train, build_transforms(img_size, is_train=False), text_length=text_length,
                                seed=seed)
    train_eval = DataLoader(eval_set, batch_size=batch_size, sampler=SequentialSampler(eval_set),
                            num_workers=workers)

    test_img, test_txt = _eval_loaders(dataset.split(_get(cfg, "val_dataset", "test")), cfg)
    return Loaders(train=train_loader, train_eval=train_eval, test_img=test_img, test_txt=test_txt,
                   num_classes=len(dataset.train_id_container), dataset=dataset, noisy_mask=noisy_mask)


def build_eval_loaders(cfg: Any, split: str = "test") -> tuple[DataLoader, DataLoader, dict]:
    """Gallery and query loaders of one split of ``cfg.dataset_name`` -> (img, txt, split dict).

    For cross-domain evaluation pass a config whose ``dataset_name`` / ``root_dir`` name the
    target dataset.
    """
    dataset = _dataset_from_cfg(cfg)
    dataset.require_split(split, "evaluated")
    split_dict = dataset.split(split)
    img, txt = _eval_loaders(split_dict, cfg)
    return img, txt, split_dict
