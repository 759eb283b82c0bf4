"""Image transforms of IRRA / RDE (CLIP normalisation)."""
from __future__ import annotations

from typing import Sequence

import torchvision.transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transforms(img_size: Sequence[int] = (384, 128), aug: bool = False,
                     is_train: bool = True) -> T.Compose:
    """Resize to ``img_size`` = (H, W), ToTensor, CLIP Normalize.

    Training adds a horizontal flip (IRRA and RDE flip with or without ``aug``); ``aug`` further
    adds pad 10 + random crop back to (H, W) and random erasing (scale 0.02-0.4) filled with
    CLIP's mean. All randomness comes from torch's global generator, so seeding it (see
    ``ImageTextDataset``) makes a transform reproducible.
    """
    if len(img_size) != 2:
        raise ValueError(f"img_size must be [H, W], got {img_size!r}")
    height, width = int(img_size[0]), int(img_size[1])
    normalize = [T.ToTensor(), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if not is_train:
        return T.Compose([T.Resize((height, width)), *normalize])
    if not aug:
        return T.Compose([T.Resize((height, width)), T.RandomHorizontalFlip(0.5), *normalize])
    return T.Compose([
        T.Resize((height, width)),
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop((height, width)),
        *normalize,
        T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)),
    ])
