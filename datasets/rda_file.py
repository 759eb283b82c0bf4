"""Which RDA annotation file a run needs, checked before a run writes anything.

The ICL configs set ``rda: required``: training on plain captions would silently give RDE,
not ICL. The file is ``anno_file`` when given, else ``<root>/<dataset>/<annotation>.rda.json``,
the default output of ``python -m rda generate``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import get_reader

RDA_KEY = b'"diversity_captions"'
RDA_VALUES = (True, False, "required")


def expected_rda_file(dataset_name: str, root: str | os.PathLike) -> Path:
    """``<root>/<dataset>/<first annotation name>.rda.json`` (where `python -m rda generate` writes)."""
    reader = get_reader(dataset_name)
    stem = os.path.splitext(reader.anno_names[0])[0]
    return Path(root).expanduser() / reader.name / f"{stem}.rda.json"


def how_to_get(dataset_name: str, root: str | os.PathLike, path: Path) -> str:
    return (f"Get it one of two ways: (1) the authors' released RDA json for {dataset_name} (RDA_data.zip in "
            f"github.com/QinYang79/ICL), passed as anno_file=PATH; (2) generate it with `python -m rda "
            f"generate --dataset {dataset_name} --root {root} --backend vllm --model <Qwen2-VL-7B-Instruct dir> "
            f"--out {path}` (docs/RDA_SFT.md). To train RDE without RDA: `bash run_rde.sh ROOT DATASET GPUS rde` "
            "(configs/rde_*.yaml).")


def require_rda_file(cfg: Any) -> str | None:
    """With ``rda: required``, the RDA annotation file to train on (an error when it is missing or
    carries no ``diversity_captions``); None otherwise. Reads the file's bytes only, writes nothing."""
    mode = cfg.get("rda", True)
    if mode not in RDA_VALUES:
        raise ValueError(f"rda={mode!r}: choose true (use RDA when the annotation carries it), false, or required")
    if mode != "required":
        return None
    root, name = cfg.get("root_dir", "data"), cfg.get("dataset_name")
    given = cfg.get("anno_file")
    path = Path(given).expanduser() if given else expected_rda_file(name, root)
    where = "anno_file" if given else f"the default RDA file for root_dir={root}"
    if not path.is_file():
        raise FileNotFoundError(f"rda=required (ICL config) but the RDA annotation file {path} ({where}) does not "
                                f"exist. {how_to_get(name, root, path)}")
    with open(path, "rb") as f:
        if RDA_KEY not in f.read():
            raise ValueError(f"rda=required (ICL config) but {path} has no 'diversity_captions': it is a plain "
                             f"annotation file, not an RDA one. {how_to_get(name, root, path)}")
    return str(path)
