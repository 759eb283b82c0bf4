"""Synthetic noisy correspondence, as in RDE's experiments.

A fraction ``noisy_rate`` of the training pairs is selected and their captions are shuffled
among themselves, so a selected image gets the caption of another selected pair. The
permutation is stored as RDE stores it: a ``.npy`` int array ``index`` of length N where pair
``i`` receives the caption of pair ``index[i]``; ``index[i] != i`` marks a noisy pair. RDE's
released ``noiseindex/*.npy`` files load unchanged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from .annotations import TrainItem

logger = logging.getLogger("ICL.datasets")
T = TypeVar("T")


def _check_index(index: np.ndarray, num: int, path: Path) -> np.ndarray:
    if index.ndim != 1 or index.shape[0] != num:
        raise ValueError(f"noisy_file {path} holds an index of shape {index.shape} but the train set has "
                         f"{num} pairs; it was made for another dataset or annotation file. Delete it "
                         "(a new one is created) or set noisy_file to the file made for this dataset.")
    if not np.issubdtype(index.dtype, np.integer) or not np.array_equal(np.sort(index), np.arange(num)):
        raise ValueError(f"noisy_file {path} is not a permutation of 0..{num - 1}; "
                         "delete it to create a new one")
    return index.astype(np.int64)


def build_noise_index(num: int, noisy_rate: float, noisy_file: str | os.PathLike | None = None,
                      seed: int = 0) -> np.ndarray:
    """The caption permutation ``[num]``: loaded from ``noisy_file`` when it exists, else drawn
    from ``seed`` (and saved to ``noisy_file`` when one is given). Identity when rate is 0."""
    if not 0.0 <= noisy_rate <= 1.0:
        raise ValueError(f"noisy_rate must be in [0, 1], got {noisy_rate}")
    if noisy_rate == 0:
        return np.arange(num, dtype=np.int64)
    path = Path(noisy_file) if noisy_file is not None else None
    if path is not None and path.is_file():
        logger.info("loading the noisy-pair index from %s", path)
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            from utils.errors import InputFileError
            raise InputFileError(f"noisy_file {path} cannot be read as a .npy index ({type(err).__name__}: "
                                 f"{err}); it is truncated or not an index file. Delete it (a new one is "
                                 "drawn from the seed) or point noisy_file at the right file") from err
        return _check_index(index, num, path)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(num)[: int(noisy_rate * num)]
    index = np.arange(num, dtype=np.int64)
    index[selected] = rng.permutation(selected)
    if path is not None:
        from utils.io import atomic_save_npy

        atomic_save_npy(path, index)
        logger.info("saved the noisy-pair index (rate %.2f, seed %d) to %s", noisy_rate, seed, path)
    return index


def permute_captions(items: Sequence[T], index: np.ndarray) -> list[T]:
    """``items[index[i]]`` for every i: moves per-caption data (e.g. RDA sub-sentences) along
    with the captions."""
    return [items[j] for j in index.tolist()]


def inject_noise(train: Sequence[TrainItem], noisy_rate: float, noisy_file: str | os.PathLike | None = None,
                 seed: int = 0) -> tuple[list[TrainItem], np.ndarray]:
    """Shuffle the captions of ``noisy_rate`` of the pairs -> ``(noisy_train, noisy_mask)``.

    ``noisy_mask`` is a bool array, True where the pair's caption came from another pair.
    """
    index = build_noise_index(len(train), noisy_rate, noisy_file, seed)
    noisy = [(pid, image_id, path, train[j][3])
             for (pid, image_id, path, _), j in zip(train, index.tolist())]
    mask = index != np.arange(len(train))
    if noisy_rate > 0:
        realised = float(mask.mean()) if len(mask) else 0.0
        logger.info("noisy correspondence: rate %.3f -> %d noisy of %d pairs", noisy_rate, int(mask.sum()),
                    len(mask))
        if abs(realised - noisy_rate) > 0.05:
            logger.warning("the noisy-pair index gives a noisy fraction of %.3f, not the configured "
                           "noisy_rate %.3f (noisy_file %s was made for another rate?)",
                           realised, noisy_rate, noisy_file)
    return noisy, mask
