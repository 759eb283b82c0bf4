"""SFT data for THI's anchor localization: (caption, image) -> "Yes"/"No", as a LLaMA-Factory
sharegpt dataset.

Positives pair a caption with its own image; hard negatives pair a caption with an image of
another identity that the retrieval model ranks among the caption's top-k. Only captions that
CCD marks clean are used (``clean`` mask), since a noisy pair would teach the MLLM a wrong "Yes".
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from utils.mllm.prompts import loc_prompt

from .store import atomic_write_json

YES, NO = "Yes", "No"


def topk_indices(similarity, k: int, *, chunk: int = 4096) -> np.ndarray:
    """Indices of the ``k`` most similar images per caption, best first ([C, k], int64).

    Ties go to the lower image index (stable sort), so the result does not depend on the
    platform. Done in caption chunks to bound memory.
    """
    sim = np.asarray(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a [captions, images] matrix, got shape {sim.shape}")
    k = min(int(k), sim.shape[1])
    out = np.empty((sim.shape[0], k), dtype=np.int64)
    for start in range(0, sim.shape[0], chunk):
        block = np.asarray(sim[start:start + chunk], dtype=np.float64)
        out[start:start + len(block)] = np.argsort(-block, axis=1, kind="stable")[:, :k]
    return out


def anchor_record(caption: str, image_path: str, label: str, **meta) -> dict:
    """One sharegpt record: ``<image>`` + T_LOC(caption) -> ``label``, plus ``label`` and ``meta``
    (LLaMA-Factory ignores columns that ``dataset_info.json`` does not map)."""
    if label not in (YES, NO):
        raise ValueError(f"label must be {YES!r} or {NO!r}, got {label!r}")
    return {
        "messages": [{"role": "user", "content": "<image>" + loc_prompt(caption)},
                     {"role": "assistant", "content": label}],
        "images": [image_path],
        "label": label,
        **meta,
    }


def make_anchor_sft(captions: Sequence[str], caption_pids: Sequence[int],
                    caption_images: Sequence[int], image_paths: Sequence[str],
                    image_pids: Sequence[int], similarity, *, clean=None, positives: int,
                    negatives: int, top_k: int = 10, seed: int = 0,
                    top_indices=None) -> list[dict]:
    """Anchor-localization SFT records (shuffled), ``positives`` "Yes" and ``negatives`` "No".

    ``caption_images[i]``: index in ``image_paths`` of caption i's own image. ``similarity``: the
    retrieval model's [captions, images] matrix; for large datasets pass ``top_indices`` instead
    ([captions, >= top_k] image indices, best first; ``similarity`` may then be None).
    ``clean``: optional 0/1 mask over captions; only clean captions are used.

    Positives: distinct captions drawn at random, each with its own image. Negatives: distinct
    captions drawn at random among those with at least one other-identity image in their top
    ``top_k``, each with one of those images drawn at random. Each record also carries
    ``caption_index`` and ``image_index``. Raises ValueError when the pool is too small.
    """
    n = len(captions)
    caption_pids = np.asarray(caption_pids)
    caption_images = np.asarray(caption_images, dtype=np.int64)
    image_pids = np.asarray(image_pids)
    if not (len(caption_pids) == len(caption_images) == n):
        raise ValueError(f"captions ({n}), caption_pids ({len(caption_pids)}) and caption_images "
                         f"({len(caption_images)}) must have the same length")
    if len(image_paths) != len(image_pids):
        raise ValueError(f"image_paths ({len(image_paths)}) and image_pids ({len(image_pids)}) "
                         f"must have the same length")
    if n and (caption_images.min() < 0 or caption_images.max() >= len(image_paths)):
        raise ValueError("caption_images holds indices outside image_paths")
    if positives < 0 or negatives < 0 or top_k < 1:
        raise ValueError(f"positives ({positives}) and negatives ({negatives}) must be >= 0 and "
                         f"top_k ({top_k}) >= 1")
    if top_indices is None:
        if similarity is None:
            raise ValueError("give the [captions, images] similarity or precomputed top_indices")
        shape = np.shape(similarity)
        if shape != (n, len(image_paths)):
            raise ValueError(f"similarity has shape {shape}; expected (captions, images) = "
                             f"({n}, {len(image_paths)})")
        top = topk_indices(similarity, top_k)
    else:
        top = np.asarray(top_indices, dtype=np.int64)
        if top.ndim != 2 or top.shape[0] != n or top.shape[1] < min(top_k, len(image_paths)):
            raise ValueError(f"top_indices has shape {top.shape}; expected ({n}, >= {top_k})")
        top = top[:, :top_k]

    if clean is None:
        eligible = np.arange(n)
    else:
        clean = np.asarray(clean)
        if clean.shape != (n,):
            raise ValueError(f"clean mask has shape {clean.shape}; expected ({n},) (one flag per caption)")
        eligible = np.flatnonzero(clean.astype(bool))

    rng = np.random.default_rng(seed)
    if positives > len(eligible):
        raise ValueError(f"asked for {positives} positives but only {len(eligible)} (clean) captions "
                         f"are available; lower positives")
    records = []
    for c in rng.choice(eligible, size=positives, replace=False):
        img = int(caption_images[c])
        records.append(anchor_record(captions[c], image_paths[img], YES,
                                     caption_index=int(c), image_index=img))

    candidates = {int(c): top[c][image_pids[top[c]] != caption_pids[c]] for c in eligible}
    pool = np.array([c for c in eligible if len(candidates[int(c)])], dtype=np.int64)
    if negatives > len(pool):
        raise ValueError(f"asked for {negatives} negatives but only {len(pool)} (clean) captions have "
                         f"an image of another identity in their top-{top_k}; lower negatives")
    for c in rng.choice(pool, size=negatives, replace=False):
        img = int(rng.choice(candidates[int(c)]))
        records.append(anchor_record(captions[c], image_paths[img], NO,
                                     caption_index=int(c), image_index=img))
    return [records[i] for i in rng.permutation(len(records))]


def dataset_info_entry(file_name: str) -> dict:
    """The ``dataset_info.json`` entry of a sharegpt dataset with one image column."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content",
                 "user_tag": "user", "assistant_tag": "assistant"},
    }


def write_llamafactory_dataset(records: list[dict], out_dir: "str | os.PathLike[str]",
                               name: str = "icl_anchor", *, relative_images: bool = False) -> str:
    """Write ``<out_dir>/<name>.json`` and add ``name`` to ``<out_dir>/dataset_info.json`` (other
    entries there are kept). Returns the dataset file's path.

    Image paths are written as given (absolute paths work anywhere); with ``relative_images`` they
    are made relative to ``out_dir``, which LLaMA-Factory resolves against ``media_dir`` (by
    default its ``dataset_dir``), so the folder can be moved together with the images.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if relative_images:
        records = [{**r, "images": [os.path.relpath(os.path.abspath(p), out_dir) for p in r["images"]]}
                   for r in records]
    info_path = os.path.join(out_dir, "dataset_info.json")
    info = {}
    if os.path.exists(info_path):
        from utils.io import read_json
        info = read_json(info_path, fix="delete it (it is rewritten with this dataset; other datasets "
                                        "listed in it must then be exported again) or choose another --out")
        if not isinstance(info, dict):
            from utils.errors import InputFileError
            raise InputFileError(f"{info_path}: expected LLaMA-Factory's dataset_info object, got "
                                 f"{type(info).__name__}; delete it or choose another --out")
    file_name = f"{name}.json"  # written after dataset_info.json was read: a refusal writes nothing
    atomic_write_json(os.path.join(out_dir, file_name), records, indent=1)
    info[name] = dataset_info_entry(file_name)
    atomic_write_json(info_path, info, indent=2)
    return os.path.join(out_dir, file_name)
