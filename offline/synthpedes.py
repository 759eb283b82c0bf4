"""SynthPEDES: a procedural, fully known text-to-image person ReID dataset.

``generate(out_dir)`` draws identities with fixed attributes (look-alike identities that
differ in one or two attributes are generated next to each other, so retrieval is not
trivial), several images per identity (held object, action, background and bystanders vary
per image; pose, scale, offset, brightness, noise and blur too) and captions from varied
templates (complete ones and vague ones naming two or three attributes). It writes the
CUHK-PEDES format, so every reader, loader and script runs on it unchanged:

    out_dir/reid_raw.json     [{"split", "captions", "file_path", "id" (from 1), "processed_tokens"}]
    out_dir/imgs/<file_path>
    out_dir/attributes.json   {"version": 1, "schema": SCHEMA, "images": {file_path: {attr: value}},
                               "boxes": {file_path: {"upper"|"lower"|"head": [x0, y0, x1, y1]}}}

The attributes let a simulated MLLM answer the paper's VQA questions about an image
(``answer_sentence``) and read attributes back from text (``parse_caption``).
Command line: ``python -m offline.synthpedes OUT_DIR --num-ids 60 --seed 0``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from utils.io import atomic_write_json

from datasets.annotations import BaseDataset

from .synth_render import render_person
from .synth_schema import (ATTRIBUTES_VERSION, QUESTION_ATTRIBUTES, SCHEMA, identity_key, mutate_identity,
                           sample_identity, sample_image_attributes)
from .synth_text import answer_sentence, compose_caption, parse_caption

__all__ = ["SCHEMA", "QUESTION_ATTRIBUTES", "answer_sentence", "parse_caption", "compose_caption",
           "generate", "SynthPEDES", "ATTRIBUTES_VERSION"]

_DETAIL_WEIGHTS = {"full": 0.4, "medium": 0.35, "vague": 0.25}


class SynthPEDES(BaseDataset):
    """Reader for a generated SynthPEDES folder ``<root>/SynthPEDES/`` (CUHK-PEDES format)."""

    name = "SynthPEDES"
    anno_names = ("reid_raw.json",)
    image_dir = "imgs"
    path_field = "file_path"


def _identities(num_ids: int, rng: random.Random) -> list[dict[str, str]]:
    """Identities in small look-alike clusters (a base and up to two variants of it)."""
    out: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(out) < num_ids:
        cluster = [sample_identity(rng)]
        for _ in range(rng.choice((0, 1, 1, 2))):
            cluster.append(mutate_identity(cluster[0], rng))
        for ident in cluster:
            key = identity_key(ident)
            if key not in seen and len(out) < num_ids:
                seen.add(key)
                out.append(ident)
    return out


def _split_counts(num_ids: int, splits: Sequence[float]) -> tuple[int, int, int]:
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {splits!r}")
    total = float(sum(splits))
    n_train = int(round(num_ids * splits[0] / total))
    n_val = int(round(num_ids * splits[1] / total))
    n_test = num_ids - n_train - n_val
    if n_train < 1 or n_test < 1 or n_test < 0:
        raise ValueError(f"num_ids={num_ids} with splits={tuple(splits)} leaves an empty train or test split")
    return n_train, n_val, n_test


def generate(out_dir: str | os.PathLike, *, num_ids: int = 60, images_per_id: int = 4, captions_per_image: int = 2,
             image_size: tuple[int, int] = (128, 64), splits: Sequence[float] = (0.6, 0.1, 0.3),
             seed: int = 0, progress: bool = False) -> Path:
    """Write a SynthPEDES dataset to ``out_dir`` (deterministic per ``seed``) and return it.

    ``image_size`` is (H, W). Identities are split in order: the first ``splits[0]`` of them
    train, then val, then test. The annotation and attribute files are written last and
    atomically, so a folder with ``reid_raw.json`` is complete.
    """
    if num_ids < 2 or images_per_id < 1 or captions_per_image < 1:
        raise ValueError("num_ids must be >= 2, images_per_id and captions_per_image >= 1")
    out = Path(out_dir)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    identities = _identities(num_ids, rng)
    n_train, n_val, _ = _split_counts(num_ids, splits)

    records, image_attrs, boxes = [], {}, {}
    for k, identity in enumerate(tqdm(identities, desc="SynthPEDES identities", disable=not progress)):
        pid = k + 1
        split = "train" if k < n_train else "val" if k < n_train + n_val else "test"
        for j in range(images_per_id):
            attrs = sample_image_attributes(identity, rng)
            file_path = f"p{pid:04d}/{pid:04d}_{j:02d}.png"
            image, box = render_person(attrs, rng, image_size)
            target = out / "imgs" / file_path
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="PNG")
            details = rng.choices(list(_DETAIL_WEIGHTS), weights=list(_DETAIL_WEIGHTS.values()),
                                  k=captions_per_image)
            captions = [compose_caption(attrs, rng, detail)[0] for detail in details]
            records.append({
                "split": split,
                "captions": captions,
                "file_path": file_path,
                "processed_tokens": [re.findall(r"[a-z]+(?:-[a-z]+)*", c.lower()) for c in captions],
                "id": pid,
            })
            image_attrs[file_path] = attrs
            boxes[file_path] = box

    atomic_write_json(out / "attributes.json", {"version": ATTRIBUTES_VERSION, "schema": SCHEMA,
                                                 "images": image_attrs, "boxes": boxes})
    atomic_write_json(out / "reid_raw.json", records, indent=None)
    return out


def load_attributes(dataset_dir: str | os.PathLike) -> dict:
    """Read ``attributes.json`` of a generated folder (checks the version)."""
    path = Path(dataset_dir) / "attributes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; generate the dataset with "
                                f"`python -m offline.synthpedes {Path(dataset_dir)}`")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != ATTRIBUTES_VERSION:
        raise ValueError(f"{path}: attributes version {data.get('version')!r}, this code reads "
                         f"{ATTRIBUTES_VERSION}; regenerate the dataset")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offline.synthpedes",
                                     description="Generate a SynthPEDES dataset (CUHK-PEDES format).")
    parser.add_argument("out_dir", help="output folder, e.g. data/SynthPEDES")
    parser.add_argument("--num-ids", type=int, default=60)
    parser.add_argument("--images-per-id", type=int, default=4)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--splits", type=float, nargs=3, default=(0.6, 0.1, 0.3),
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = generate(args.out_dir, num_ids=args.num_ids, images_per_id=args.images_per_id,
                   captions_per_image=args.captions_per_image, image_size=tuple(args.image_size),
                   splits=tuple(args.splits), seed=args.seed, progress=True)
    n_images = args.num_ids * args.images_per_id
    print(f"wrote {n_images} images of {args.num_ids} identities to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
