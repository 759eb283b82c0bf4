"""Text-to-image person ReID datasets: readers, transforms, samplers, loaders, SynthPEDES.

This package is named ``datasets`` like IRRA's and RDE's and shadows Hugging Face's
``datasets`` when the repository root is on the path (intended; nothing here uses HF's).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from .annotations import BaseDataset

# name -> (module, class), imported on use. The registry is how the system reaches the offline
# world (``offline/``, a guest that imports the system, never the reverse): SynthPEDES is a name
# here, not an import, so no module of datasets/ depends on offline/ (tests/test_layers.py).
# On use only, also so that ``python -m offline.synthpedes`` does not import its module twice.
_READERS: dict[str, tuple[str, str]] = {
    "CUHK-PEDES": ("datasets.cuhkpedes", "CUHKPEDES"),
    "ICFG-PEDES": ("datasets.icfgpedes", "ICFGPEDES"),
    "RSTPReid": ("datasets.rstpreid", "RSTPReid"),
    "UFine6926": ("datasets.ufine6926", "UFine6926"),
    "SynthPEDES": ("offline.synthpedes", "SynthPEDES"),
}
DATASET_NAMES: tuple[str, ...] = tuple(_READERS)


def get_reader(name: str) -> type[BaseDataset]:
    """The reader class registered as ``name``."""
    if name not in _READERS:
        raise ValueError(f"unknown dataset_name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    module, cls = _READERS[name]
    return getattr(importlib.import_module(module), cls)


def build_dataset(name: str, root: str | os.PathLike, anno_file: str | os.PathLike | None = None,
                  *, check_images: bool = True) -> BaseDataset:
    """Read benchmark ``name`` from ``root/<name>/`` (``anno_file`` overrides its annotation file)."""
    return get_reader(name)(root, anno_file=anno_file, check_images=check_images)


# The loader side imports torch/torchvision; load it only when asked for.
_LAZY = {"build_dataloader": "build", "build_eval_loaders": "build", "Loaders": "build",
         "build_transforms": "transforms", "ImageTextDataset": "bases", "ImageDataset": "bases",
         "TextDataset": "bases", "inject_noise": "noise", "RandomIdentitySampler": "sampler",
         "DistributedRandomIdentitySampler": "sampler", "ShuffleSampler": "sampler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BaseDataset", "DATASET_NAMES", "build_dataset", "get_reader", *_LAZY]
