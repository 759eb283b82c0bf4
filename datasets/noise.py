"""Synthetic noisy correspondence, as in RDE's experiments.

A fraction ``noisy_rate`` of the training pairs is selected and their captions are shuffled
among themselves, so a selected image gets the caption of another selected pair. The
permutation is stored as RDE stores it: a ``.npy`` int array ``index`` of length N where pair
``i`` receives the caption of pair ``index[i]``; ``index[i] != i`` marks a noisy pair.

The noisy tables of the papers come from the permutations both releases ship in
``noiseindex/<dataset>_<rate>.npy`` (identical files in QinYang79/RDE ``2024-CVPR-RDE/noiseindex/``
and QinYang79/ICL ``2025-CVPR-ICL/noiseindex/``; int64, 1-D). They load unchanged and are checked
against :data:`RELEASE_NOISE_SHA256`. A named file that is missing is an error: a new permutation
is drawn only on request (``noise_draw: true``) and never under one of the release's names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from .annotations import TrainItem

from utils.errors import InputFileError
from utils.io import atomic_save_npy, file_sha256

logger = logging.getLogger("ICL.datasets")
T = TypeVar("T")

# The one home of the released noise files' identity (repro/preflight reads it):
# file name -> (number of training pairs, sha256 of the .npy file).
RELEASE_NOISE_FILES: dict[str, tuple[int, str]] = {
    "CUHK-PEDES_0.2.npy": (68126, "82919f1ad5e7126aeb1d83f6133e0ae090ba16a5396edab01e7e79e03bfba700"),
    "CUHK-PEDES_0.5.npy": (68126, "2ad253163961d83d4f0c06eec51086365006eb9014eae77f97d3bd945aedfba2"),
    "CUHK-PEDES_0.8.npy": (68126, "5a7cc89fa6d10200231fce3a5f49a243e0797ae8cd143610cdea3fd03a0c850b"),
    "ICFG-PEDES_0.2.npy": (34674, "80b294a4721e086a63781473c55ebe51350e628bcbce7c26d519752a7cada2a9"),
    "ICFG-PEDES_0.5.npy": (34674, "e785165bf9620d25c75a911f616a5390fff0c65e691be8a0690304fbc18ba61a"),
    "ICFG-PEDES_0.8.npy": (34674, "5230c2ad75734f350e5cef76aee55a764cb77f4a8b8064e0aefdd259b0a6b830"),
    "RSTPReid_0.2.npy": (37010, "6be11826bc88bca2198905ddc62024b437a06a7d4a5bbe56aee53934eac62b7f"),
    "RSTPReid_0.5.npy": (37010, "ad1e4f4261df9307ffc9dd352c2d6673d2ed04c89eeeab307d0fc31d7545938c"),
    "RSTPReid_0.8.npy": (37010, "9715ed73d5cad01986da967d2b2ee72200be4bd396530adb51835ee7fefcb476"),
}
RELEASE_NOISE_SHA256: dict[str, str] = {name: sha for name, (_, sha) in RELEASE_NOISE_FILES.items()}
RELEASE_NOISE_WHERE = ("noiseindex/ of the RDE release (github.com/QinYang79/RDE, folder 2024-CVPR-RDE/noiseindex/; "
                       "the ICL release holds the same files in 2025-CVPR-ICL/noiseindex/)")


class NoiseFileError(ValueError):
    """A noise file that is missing, a release-named file that is not the release's, or a
    permutation that would be drawn silently or under a release name; the message says the fix."""


def is_release_name(path: str | os.PathLike) -> bool:
    """True when the file name is one of the release's ``noiseindex/`` names."""
    return Path(path).name in RELEASE_NOISE_FILES


def release_noise_name(dataset: str, rate: float) -> str:
    """``CUHK-PEDES_0.2.npy`` (the release's naming, rate printed as run_rde.sh does)."""
    return f"{dataset}_{float(rate)}.npy"


def check_noise_file(noisy_rate: float, noisy_file: str | os.PathLike | None, draw: bool = False) -> str | None:
    """Before anything is written: the sha256 of the noise file a run will read, or None when
    none is read (rate 0, or a permutation drawn on request). Raises :class:`NoiseFileError`
    when a named file is missing (naming where the release keeps it), when a file with a
    release name is not the release's, when a drawn permutation would take a release name,
    and for a noisy run with neither file nor ``noise_draw``."""
    if not noisy_rate:
        return None
    if noisy_file is None:
        if draw:
            return None
        raise NoiseFileError(f"noisy_rate={noisy_rate} needs noisy_file=PATH (the paper's permutations: "
                         f"noiseindex/<dataset>_<rate>.npy from {RELEASE_NOISE_WHERE}), or noise_draw=true "
                         "to draw a new permutation from the seed")
    path = Path(noisy_file)
    if path.is_file():
        sha = file_sha256(path)
        expected = RELEASE_NOISE_SHA256.get(path.name)
        if expected is not None and sha != expected:
            raise NoiseFileError(
                f"noisy_file {path} has a release name but not the release's content (sha256 {sha}, the "
                f"release's is {expected}). Copy the file from {RELEASE_NOISE_WHERE}, or give your own "
                "permutation a name of its own.")
        return sha
    if not draw:
        raise NoiseFileError(
            f"noisy_file {path} not found. The paper's noisy runs read the release's permutation: copy "
            f"{path.name if is_release_name(path) else 'noiseindex/<dataset>_<rate>.npy'} from "
            f"{RELEASE_NOISE_WHERE} to {path} (e.g. `cp -r RDE/2024-CVPR-RDE/noiseindex .`). "
            "To draw a new permutation instead, set noise_draw=true and a noisy_file of your own name.")
    if is_release_name(path):
        raise NoiseFileError(f"noise_draw=true would save a new permutation as {path}, a name of the release's "
                         f"files ({RELEASE_NOISE_WHERE}); choose another noisy_file name "
                         f"(e.g. {path.with_name('drawn_' + path.name)})")
    return None


def _check_index(index: np.ndarray, num: int, path: Path) -> np.ndarray:
    if index.ndim != 1 or index.shape[0] != num:
        raise ValueError(f"noisy_file {path} holds an index of shape {index.shape} but the train set has "
                         f"{num} pairs; it was made for another dataset or annotation file. Set noisy_file "
                         "to the file made for this dataset.")
    if not np.issubdtype(index.dtype, np.integer) or not np.array_equal(np.sort(index), np.arange(num)):
        raise ValueError(f"noisy_file {path} is not a permutation of 0..{num - 1}")
    return index.astype(np.int64)


def build_noise_index(num: int, noisy_rate: float, noisy_file: str | os.PathLike | None = None,
                      seed: int = 0, draw: bool = False) -> np.ndarray:
    """The caption permutation ``[num]``: loaded from ``noisy_file`` (checked by
    :func:`check_noise_file`); drawn from ``seed`` only with ``draw=True`` (and saved to
    ``noisy_file`` when one is given, never under a release name). Identity when rate is 0."""
    if not 0.0 <= noisy_rate <= 1.0:
        raise ValueError(f"noisy_rate must be in [0, 1], got {noisy_rate}")
    if noisy_rate == 0:
        return np.arange(num, dtype=np.int64)
    check_noise_file(noisy_rate, noisy_file, draw)
    path = Path(noisy_file) if noisy_file is not None else None
    if path is not None and path.is_file():
        logger.info("loading the noisy-pair index from %s", path)
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise InputFileError(f"noisy_file {path} cannot be read as a .npy index ({type(err).__name__}: "
                                 f"{err}); it is truncated or not an index file. Delete it (a new one is "
                                 "drawn from the seed) or point noisy_file at the right file") from err
        return _check_index(index, num, path)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(num)[: int(noisy_rate * num)]
    index = np.arange(num, dtype=np.int64)
    index[selected] = rng.permutation(selected)
    if path is not None:
        atomic_save_npy(path, index)
        logger.info("drew a new noisy-pair index (rate %.2f, seed %d; noise_draw=true) and saved it to %s",
                    noisy_rate, seed, path)
    else:
        logger.info("drew a new noisy-pair index (rate %.2f, seed %d; noise_draw=true, not saved)", noisy_rate, seed)
    return index


def permute_captions(items: Sequence[T], index: np.ndarray) -> list[T]:
    """``items[index[i]]`` for every i: moves per-caption data (e.g. RDA sub-sentences) along
    with the captions."""
    return [items[j] for j in index.tolist()]


def inject_noise(train: Sequence[TrainItem], noisy_rate: float, noisy_file: str | os.PathLike | None = None,
                 seed: int = 0, draw: bool = False) -> tuple[list[TrainItem], np.ndarray]:
    """Shuffle the captions of ``noisy_rate`` of the pairs -> ``(noisy_train, noisy_mask)``.

    ``noisy_mask`` is a bool array, True where the pair's caption came from another pair.
    """
    index = build_noise_index(len(train), noisy_rate, noisy_file, seed, draw)
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
