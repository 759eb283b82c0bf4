"""Torch datasets: the training pairs (with per-sample seeded augmentation) and the two
evaluation sides (gallery images, query captions)."""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.images import read_rgb

from .annotations import SubSentences, TrainItem
from .text_aug import txt_aug as augment_tokens


def read_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (16-bit scaled, not clipped); every error names the file."""
    return read_rgb(path)


def _tokenize(caption: str, text_length: int) -> torch.Tensor:
    # Imported lazily: the tokenizer loads its BPE vocabulary on first use.
    from utils.tokenizer import tokenize

    return tokenize(caption, text_length=text_length, truncate=True)


def sample_seeds(seed: int, epoch: int, index: int, n: int = 3) -> list[int]:
    """``n`` independent 63-bit seeds derived from (seed, epoch, index)."""
    seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])
    return [int(s) for s in seq.generate_state(n, dtype=np.uint64) >> np.uint64(1)]


def draw_rda_caption(sub_sentences: SubSentences, rng: random.Random) -> str:
    """RDA caption: the sub-sentences in random order, one random alternative of each,
    joined with spaces."""
    order = list(range(len(sub_sentences)))
    rng.shuffle(order)
    return " ".join(rng.choice(sub_sentences[i]) for i in order)


class ImageTextDataset(Dataset):
    """Training pairs -> ``{"pids", "image_ids", "images", "caption_ids", "index"}`` (+
    ``"aug_caption_ids"`` when ``rda`` is given).

    Every random choice of a sample (image transform, token augmentation, RDA draw) comes from
    generators seeded by (seed, epoch, index): a sample is the same whatever the number of
    workers or the order of access, and a resumed run sees bit-identical batches. Call
    ``set_epoch`` before iterating each epoch (with non-persistent workers, which copy the
    dataset when an epoch's iterator starts).
    """

    def __init__(self, train: Sequence[TrainItem], transform: Callable | None, text_length: int = 77,
                 txt_aug: bool = False, rda: Sequence[SubSentences] | None = None, seed: int = 0) -> None:
        if rda is not None and len(rda) != len(train):
            raise ValueError(f"rda has {len(rda)} entries but the train set has {len(train)} pairs; "
                             "they must be aligned (one sub-sentence list per caption)")
        self.train = list(train)
        self.transform = transform
        self.text_length = text_length
        self.txt_aug = txt_aug
        self.rda = rda
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the next accesses use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.train)

    def _text(self, caption: str, rng: random.Random) -> torch.Tensor:
        ids = _tokenize(caption, self.text_length)
        return augment_tokens(ids, rng) if self.txt_aug else ids

    def __getitem__(self, index: int) -> dict:
        pid, image_id, img_path, caption = self.train[index]
        img_seed, txt_seed, rda_seed = sample_seeds(self.seed, self.epoch, index)
        image = read_image(img_path)
        if self.transform is not None:
            # torchvision draws from torch's global CPU generator: fork it so the seed stays
            # local, and seed only that generator (torch.manual_seed would also reseed CUDA).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(img_seed)
                image = self.transform(image)
        item = {
            "pids": pid,
            "image_ids": image_id,
            "images": image,
            "caption_ids": self._text(caption, random.Random(txt_seed)),
            "index": index,
        }
        if self.rda is not None:
            rng = random.Random(rda_seed)
            aug_caption = draw_rda_caption(self.rda[index], rng)
            item["aug_caption_ids"] = self._text(aug_caption, rng)
        return item


class ImageDataset(Dataset):
    """Gallery side: ``(pid, image)``."""

    def __init__(self, pids: Sequence[int], img_paths: Sequence[str], transform: Callable | None) -> None:
        if len(pids) != len(img_paths):
            raise ValueError(f"{len(pids)} pids for {len(img_paths)} image paths")
        self.pids = list(pids)
        self.img_paths = list(img_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        image = read_image(self.img_paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return self.pids[index], image


class TextDataset(Dataset):
    """Query side: ``(pid, caption_ids)``."""

    def __init__(self, pids: Sequence[int], captions: Sequence[str], text_length: int = 77) -> None:
        if len(pids) != len(captions):
            raise ValueError(f"{len(pids)} pids for {len(captions)} captions")
        self.pids = list(pids)
        self.captions = list(captions)
        self.text_length = text_length

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return self.pids[index], _tokenize(self.captions[index], self.text_length)
