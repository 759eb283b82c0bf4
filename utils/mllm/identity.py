"""What an MLLM's answers depend on, as data: content digests of model and adapter folders, and
helpers that turn a client's identity into a dict (for result folders) and a short folder label.

Why digests and not paths: a LoRA retrained into the same folder, or another model copied to the
same path, answers differently; its path does not change, its weights do. The digest covers the
top-level files that define a model (weights, configs, tokenizer files), not logs or checkpoint
subfolders. Files up to ``FULL_HASH_BYTES`` are hashed whole; larger ones (the shards of a 7B
model) by their size and ``SAMPLES`` evenly spaced 1 MiB blocks, first and last included: a
retrained or different model changes bytes everywhere, and a 15 GB model is read in well under a
second instead of a minute.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

FULL_HASH_BYTES = 64 * 2 ** 20
SAMPLES = 16
BLOCK = 2 ** 20
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")
# Top-level files besides weights that change what the model answers.
DEFINING_NAME = re.compile(r"config|tokenizer|vocab|merges|chat_template|special_tokens", re.I)


def _file_digest(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(SAMPLES):
                f.seek((size - BLOCK) * i // (SAMPLES - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def folder_digest(folder: "str | os.PathLike[str]") -> str:
    """A 16-hex-digit digest of the files that define the model or adapter in ``folder``
    (see the module docstring); the same folder content gives the same digest anywhere."""
    folder = os.fspath(folder)
    h = hashlib.sha256()
    names = sorted(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue  # checkpoint-*/ and runs/ subfolders are training by-products
        if not (name.endswith(WEIGHT_EXTENSIONS) or DEFINING_NAME.search(name)):
            continue  # logs, README, training results: not part of the model
        size = os.path.getsize(path)
        h.update(json.dumps([name, size, _file_digest(path, size)]).encode())
    return h.hexdigest()[:16]


def local_identity(backend: str, model_dir, adapter_dir, dtype: str) -> dict:
    """What a local engine's answers depend on: the model folder and the adapter folder (each with
    its content digest) and the dtype."""
    return {"backend": backend, "model": str(model_dir), "model_digest": folder_digest(model_dir),
            "adapter": None if adapter_dir is None else str(adapter_dir),
            "adapter_digest": None if adapter_dir is None else folder_digest(adapter_dir),
            "dtype": dtype}


def identity_info(client) -> dict:
    """The identity of ``client`` as a flat dict (``client.identity_info()`` when it has one,
    else its ``identity()`` string, else its type): what a THI or RDA results folder records
    and compares."""
    info = getattr(client, "identity_info", None)
    if callable(info):
        return dict(info())
    ident = getattr(client, "identity", None)
    if callable(ident):
        return {"identity": ident()}
    return {"client": type(client).__name__}


def canonical(info: dict) -> str:
    """One string for a dict identity (sorted keys): what goes into cache keys."""
    return json.dumps(info, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def piped(info: dict) -> str:
    """``backend|key=value|...``: a readable one-line identity of a local backend."""
    return "|".join([str(info.get("backend"))] + [f"{k}={v}" for k, v in info.items()
                                                  if k != "backend"])


def label(*parts: "str | None") -> str:
    """A folder name from parts such as backend, model and adapter names: the non-empty parts
    joined by ``-``, characters other than letters, digits, ``.``, ``_`` and ``+`` replaced."""
    text = "-".join(os.path.basename(os.path.normpath(p)) if os.sep in p else p
                    for p in (str(x) for x in parts if x))
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "mllm"
