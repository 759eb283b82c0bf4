"""The run directory: the one module that knows a run's file names, formats and guards.

A run folder is the contract between the stages (docs/ARCHITECTURE.md)::

    RUN/config.yaml            resolved config, sealed by a last line "# complete: sha256 ..."
    RUN/best.pth, last.pth     weights (last.pth also optimizer, scheduler, RNG: exact resume)
    RUN/metrics.json           per-epoch metrics and the best epoch
    RUN/eval/<dataset>/<ckpt>/ one evaluation per checkpoint (``best``, ``last``), written whole,
                               stamped with its checkpoint's file name and sha256 (checkpoint.json)
    RUN/ccd/epoch_<k>.npz      CCD's per-sample clean labels of both views
    RUN/tb/, train.log, test.log
    RUN/thi/<target>/<ckpt>/<MLLM label>/   THI results of one checkpoint and one MLLM
    RUN/mllm_cache/            MLLM answers shared by THI runs of this run
    RUN/.lock                  who holds the run (train.py, test.py)

Every other module asks here for a path (``config_path``, ``checkpoint_path``, ``eval_dir``,
``ccd_file``, ``thi_dir``, ...) and reads through the readers here (``read_eval``,
``read_metrics``, ``read_ccd``, ...), whose errors name the file and what to do. Writers:
``write_eval_folder`` (a folder made complete, then renamed into place), ``save_run_config``.
Guards, called before anything is written: ``check_train_target``, ``require_run_dir``,
``folder_lock`` (one writer per folder; a crashed holder never blocks: ``fcntl.flock`` dies with
its process), ``clean_temp_files``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import yaml

from utils.io import file_sha256 as io_file_sha256
from utils.io import TEMP_PREFIX, atomic_save_npy, atomic_save_npz, atomic_write_json, atomic_write_text

from utils.config import DEFAULTS, Config, _number, check_types
from utils.errors import ProjectError

logger = logging.getLogger("ICL.run")

# ---- the names of a run's files: nowhere else (tests/test_run_files.py checks) ----
CONFIG = "config.yaml"
BEST = "best.pth"
LAST = "last.pth"
METRICS = "metrics.json"
TRAIN_LOG = "train.log"
TEST_LOG = "test.log"
TB_DIR = "tb"
CCD_DIR = "ccd"
EVAL_DIR = "eval"
THI_DIR = "thi"
MLLM_CACHE_DIR = "mllm_cache"
LOCK_FILE = ".lock"
# The rows of the release's test.py (it evaluates best.pth, then last.pth).
ROW_NAMES = {BEST: "Best", LAST: "Last"}
# One evaluation folder (eval/<dataset>/<checkpoint stem>/).
EVAL_SIMILARITY = "similarity.npy"
EVAL_Q_PIDS = "q_pids.npy"
EVAL_G_PIDS = "g_pids.npy"
EVAL_GALLERY = "gallery_feats.npz"
EVAL_CAPTIONS = "captions.json"
EVAL_IMAGE_PATHS = "image_paths.json"
EVAL_METRICS = METRICS  # same name, the evaluation's metrics
EVAL_CHECKPOINT = "checkpoint.json"
EVAL_FILES = (EVAL_SIMILARITY, EVAL_Q_PIDS, EVAL_G_PIDS, EVAL_CAPTIONS, EVAL_IMAGE_PATHS,
              EVAL_GALLERY, EVAL_METRICS, EVAL_CHECKPOINT)
# A run folder of the ICL/RDE releases: their args dumped by yaml (utils/iotools.py there).
RELEASE_CONFIG = "configs.yaml"
# A THI results folder (thi/<target>/<checkpoint stem>/<MLLM label>/; written by thi/pipeline.py).
THI_FINAL_SIMILARITY = "final_similarity.npy"
THI_COST = "cost.json"
THI_STATE = "state.json"
THI_ROUNDS = "rounds.json"
THI_SWEEP = "sweep.json"
# The last line of a saved config: a config cut short (a crash, a full disk) lacks it.
CONFIG_SEAL = "# complete: sha256 "

# Files whose presence makes a folder a run (training into it would overwrite them).
RUN_MARKERS = (CONFIG, LAST, BEST, METRICS)
# Keys that never change the trained weights nor what the run reports: may differ on resume.
RESUME_FREE = frozenset({
    "resume", "resume_change", "distributed", "name", "output_dir", "log_period", "num_workers",
    "test_batch_size", "save_eval",
    "noise_draw"})  # the permutation itself is pinned by noisy_file / noisy_file_sha256 / seed
# Keys that change the run but are legitimately changed on resume (more epochs, another GPU, data
# moved): only with an explicit ``resume_change=[key, ...]``.
RESUME_OPT_IN = frozenset({
    "num_epoch", "eval_period", "device", "amp", "root_dir", "pretrain_choice", "init_checkpoint",
    "noisy_file_sha256"})  # runs saved before the noise file was recorded have none
# Folders of the run that the trainer writes to (cleaned of temp files at the start).
_TRAIN_SUBDIRS = ("", CCD_DIR, EVAL_DIR, TB_DIR)


class RunDirError(ProjectError, RuntimeError):
    """A run folder is missing, not a run, or would be overwritten; the message says the fix."""


def is_run_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS)


def _normalise(value: Any) -> Any:
    """Compare as saved: YAML round trip (tuples -> lists, 1e-5 strings -> floats)."""
    return _number(yaml.safe_load(yaml.safe_dump(value)))


def _opt_in(cfg: Any) -> set[str]:
    value = cfg.get("resume_change") or []
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    keys = set(value)
    bad = sorted(keys - RESUME_OPT_IN - RESUME_FREE)
    if bad:
        raise RunDirError(
            f"resume_change lists {bad}, which change the model a resumed run continues; only "
            f"{sorted(RESUME_OPT_IN)} may change on resume. Start a new run (name=NEW_NAME) for other "
            "settings, optionally from these weights (init_checkpoint=RUN/best.pth)")
    return keys


def config_differences(saved: dict, cfg: dict, keys: Iterable[str] | None = None) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for keys whose values differ (missing keys in an older
    saved config count as today's default)."""
    out = {}
    for key in sorted(keys if keys is not None else set(saved) | set(cfg)):
        old = _normalise(saved.get(key, DEFAULTS.get(key)))
        new = _normalise(cfg.get(key, DEFAULTS.get(key)))
        if old != new:
            out[key] = (old, new)
    return out


def failed_start(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds a start that failed before its first checkpoint (config.yaml,
    logs, perhaps a CCD record, but no best.pth/last.pth): nothing to keep or resume."""
    run_dir = os.fspath(run_dir)
    return is_run_dir(run_dir) and not any(
        os.path.isfile(checkpoint_path(run_dir, c)) for c in (BEST, LAST))


def check_train_target(cfg: Any, run_dir: str | os.PathLike) -> list[str]:
    """Refuse to train into an existing run without ``resume=true``, or to resume it with settings
    that differ from its ``config.yaml``. Writes nothing. Returns log lines for the accepted
    changes (to be logged once the run's logger exists). A failed start (no checkpoint yet) is
    reused, whatever its settings."""
    run_dir = os.fspath(run_dir)
    if not is_run_dir(run_dir):
        return []
    if failed_start(run_dir):
        return [f"{run_dir} holds a start that failed before its first checkpoint "
                f"({', '.join(m for m in RUN_MARKERS if os.path.exists(os.path.join(run_dir, m)))}, "
                f"no {BEST}/{LAST}): reusing the folder for this run"]
    present = [m for m in RUN_MARKERS if os.path.exists(os.path.join(run_dir, m))]
    if not cfg.get("resume"):
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(present)}); training into it would overwrite "
            f"them. Continue it with resume=true, or train a new run with another name "
            f"(name=NEW_NAME, or --run-dir NEW_FOLDER)")
    saved_path = config_path(run_dir)
    has_last = os.path.isfile(checkpoint_path(run_dir, LAST))
    notes = [] if has_last else [f"resume=true but {run_dir} has no {LAST}: training starts from epoch 1"]
    if not os.path.isfile(saved_path):
        if not has_last:
            return notes
        raise RunDirError(f"{run_dir} has {LAST} but no {CONFIG}, so a resume cannot be checked "
                          f"against the run's settings; restore {CONFIG} or train a new run (name=NEW_NAME)")
    saved = read_saved_config(run_dir)
    allowed = _opt_in(cfg)
    diff = config_differences(saved, cfg)
    refused = {k: v for k, v in diff.items() if k not in RESUME_FREE and k not in allowed}
    if refused:
        lines = "\n".join(f"  {k}: saved {old!r}, now {new!r}" for k, (old, new) in refused.items())
        opt = sorted(k for k in refused if k in RESUME_OPT_IN)
        fixes = []
        if opt:
            fixes.append(f"to change {', '.join(opt)} on purpose add resume_change=[{','.join(opt)}]")
        other = sorted(k for k in refused if k not in RESUME_OPT_IN)
        if other:
            fixes.append(f"{', '.join(other)} shape(s) the model the run continues: to change it, start a "
                         f"new run (name=NEW_NAME, optionally init_checkpoint={checkpoint_path(run_dir, BEST)})")
        as_saved = " ".join(f"{k}={yaml.safe_dump(old, default_flow_style=True).strip().removesuffix('...').strip()}"
                            for k, (old, _) in refused.items())
        fixes.insert(0, f"to resume as saved use {as_saved}")
        raise RunDirError(f"resume=true: settings differ from {saved_path}:\n{lines}\n" + "; ".join(fixes))
    return notes + [f"resume: {k} changed from {old!r} to {new!r}" for k, (old, new) in diff.items()
                    if k not in ("resume", "resume_change", "distributed")]


def clean_temp_files(folder: str | os.PathLike, subdirs: Iterable[str] = _TRAIN_SUBDIRS) -> list[str]:
    """Remove ``.tmp-*`` files and folders left in ``folder`` (and the ``subdirs`` below it; under
    ``eval`` every dataset folder and evaluation) by writes of a killed process; returns the
    removed paths. Call it holding the folder's lock (``folder_lock``): no other writer is live."""
    folder = os.fspath(folder)
    removed = []
    folders = []
    for sub in subdirs:
        path = os.path.join(folder, sub)
        if os.path.isdir(path):
            folders.append(path)
            if sub == EVAL_DIR:
                for d in sorted(os.listdir(path)):
                    ds = os.path.join(path, d)
                    if os.path.isdir(ds) and not d.startswith(TEMP_PREFIX):
                        folders.append(ds)
                        folders += [os.path.join(ds, e) for e in sorted(os.listdir(ds))
                                    if os.path.isdir(os.path.join(ds, e)) and not e.startswith(TEMP_PREFIX)]
    for path in folders:
        for name in sorted(os.listdir(path)):
            item = os.path.join(path, name)
            if not name.startswith(TEMP_PREFIX):
                continue
            if os.path.isdir(item):
                shutil.rmtree(item, ignore_errors=True)
            else:
                os.remove(item)
            removed.append(item)
    return removed


def require_run_dir(run_dir: str | os.PathLike, checkpoint: str = BEST) -> None:
    """Raise ``RunDirError`` naming what is missing unless ``run_dir`` holds ``config.yaml`` and
    ``checkpoint``; a run folder without any checkpoint is named as a failed start."""
    run_dir = os.fspath(run_dir)
    need = f"a run folder written by train.py holds {CONFIG} and {checkpoint} (also {LAST}, {METRICS})"
    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} does not exist: {need}")
    missing = [f for f in (CONFIG, checkpoint) if not os.path.isfile(os.path.join(run_dir, f))]
    if CONFIG in missing and os.path.isfile(os.path.join(run_dir, RELEASE_CONFIG)):
        missing.remove(CONFIG)  # a release's run folder: its settings come from configs.yaml
    if missing:
        if failed_start(run_dir) and CONFIG not in missing:
            raise RunDirError(f"{run_dir} holds a training start that failed before its first "
                              f"checkpoint (no .pth file; see {log_path(run_dir)}): nothing to "
                              f"evaluate. Fix the cause and run the same train.py command again: "
                              f"it reuses the folder")
        others = checkpoints_in(run_dir)
        hint = (f"; checkpoints there: {others} (pass --checkpoint NAME)" if others and CONFIG not in missing
                else "; to evaluate a released checkpoint pass --weights FILE --config YAML")
        raise RunDirError(f"{run_dir} is not a run directory: {', '.join(missing)} missing ({need}){hint}")


def start_train_run(cfg: Any, run_dir: str | os.PathLike, rank: int = 0) -> list[str]:
    """The checks at the start of training (before anything is written): refuse to overwrite or
    to resume with other settings, then (rank 0) remove temp files of a killed write. Returns
    lines to log once the run's logger exists."""
    notes = check_train_target(cfg, run_dir)
    if rank == 0:
        removed = clean_temp_files(run_dir)
        if removed:
            notes.append(f"removed {len(removed)} temp file(s) left by a killed write: {removed}")
    return notes


# ---- paths ----

def default_run_dir(cfg: Any) -> str:
    """``<output_dir>/<name>``: where train.py puts a run without ``--run-dir``."""
    return os.path.join(os.fspath(cfg.get("output_dir")), str(cfg.get("name")))


def config_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), CONFIG)


def checkpoint_path(run_dir: str | os.PathLike, checkpoint: str = BEST) -> str:
    """``RUN/<checkpoint>`` (a name inside the run; an absolute path stays as it is)."""
    return os.path.join(os.fspath(run_dir), checkpoint)


def metrics_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), METRICS)


def log_path(run_dir: str | os.PathLike, job: str = "train") -> str:
    """``RUN/train.log`` or ``RUN/test.log``."""
    return os.path.join(os.fspath(run_dir), {"train": TRAIN_LOG, "test": TEST_LOG}[job])


def tb_dir(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), TB_DIR)


def mllm_cache_dir(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), MLLM_CACHE_DIR)


def checkpoint_stem(checkpoint: str) -> str:
    """``best.pth`` -> ``best``: the folder name of a checkpoint's evaluation and THI results."""
    stem = os.path.splitext(os.path.basename(os.fspath(checkpoint)))[0]
    if not stem or stem.startswith("."):
        raise RunDirError(f"checkpoint {checkpoint!r}: expected a file name such as best.pth")
    return stem


def eval_dir(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST) -> str:
    """``RUN/eval/<dataset>/<checkpoint stem>/``: the evaluation of one checkpoint."""
    return os.path.join(os.fspath(run_dir), EVAL_DIR, dataset, checkpoint_stem(checkpoint))


def eval_file(run_dir: str | os.PathLike, dataset: str, name: str = EVAL_METRICS,
              checkpoint: str = BEST) -> str:
    """One file of a checkpoint's evaluation (``metrics.json`` marks it written: the folder is
    renamed into place whole)."""
    return os.path.join(eval_dir(run_dir, dataset, checkpoint), name)


def ccd_file(run_dir: str | os.PathLike, epoch: int) -> str:
    return os.path.join(os.fspath(run_dir), CCD_DIR, f"epoch_{int(epoch)}.npz")


def latest_ccd_file(run_dir: str | os.PathLike) -> Optional[str]:
    """``RUN/ccd/epoch_<k>.npz`` with the largest k, or None."""
    files = glob.glob(os.path.join(os.fspath(run_dir), CCD_DIR, "epoch_*.npz"))
    numbered = [(int(m.group(1)), f) for f in files if (m := re.search(r"epoch_(\d+)\.npz$", f))]
    return max(numbered)[1] if numbered else None


def thi_dir(run_dir: str | os.PathLike, target: str, checkpoint: str = BEST, *parts: str) -> str:
    """``RUN/thi/<target>/<checkpoint stem>/<parts...>``: THI results of one checkpoint (the
    parts name the MLLM and the variant: ``simulated``, ``vllm-Qwen2-VL-7B-Instruct+lora``)."""
    return os.path.join(os.fspath(run_dir), THI_DIR, target, checkpoint_stem(checkpoint), *parts)


def checkpoints_in(run_dir: str | os.PathLike) -> list[str]:
    run_dir = os.fspath(run_dir)
    return sorted(f for f in os.listdir(run_dir) if f.endswith(".pth")) if os.path.isdir(run_dir) else []


# ---- errors that name the file ----

class RunFileError(RunDirError):
    """A run file is cut short, garbled or of another checkpoint; the message names it and what
    to do."""


class MissingRunFile(FileNotFoundError):
    """A run file is missing; the message names it and the command that writes it."""


# What a reader of a run may raise: a refusal with its fix (entry points print it, no traceback).
RUN_ERRORS = (RunDirError, MissingRunFile)


@contextlib.contextmanager
def reading(path: str | os.PathLike, fix: str) -> Iterator[None]:
    """Turn any error while reading ``path`` into a ``RunFileError`` naming it and ``fix``."""
    path = os.fspath(path)
    try:
        yield
    except (RunFileError, MissingRunFile):
        raise
    except FileNotFoundError as err:
        raise MissingRunFile(f"{path} is missing: {fix}") from err
    except Exception as err:  # numpy, json, zipfile, pickle: each with its own error types
        raise RunFileError(f"{path} cannot be read ({type(err).__name__}: {err}); it is cut short "
                           f"or garbled: {fix}") from err


def read_json(path: str | os.PathLike, fix: str) -> Any:
    with reading(path, fix):
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))


def read_npy(path: str | os.PathLike, fix: str) -> np.ndarray:
    with reading(path, fix):
        return np.load(path, allow_pickle=False)


def read_npz(path: str | os.PathLike, fix: str, keys: Iterable[str] = ()) -> dict:
    """Every array of an ``.npz`` (``keys`` must be among them)."""
    with reading(path, fix):
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    missing = [k for k in keys if k not in out]
    if missing:
        raise RunFileError(f"{path} lacks {missing} (has {sorted(out)}): {fix}")
    return out


# ---- the saved config ----

def _seal(text: str) -> str:
    return CONFIG_SEAL + hashlib.sha256(text.encode("utf-8")).hexdigest() + "\n"


def config_text(cfg: dict) -> str:
    """The saved form of a resolved config: YAML, then the seal line over it."""
    text = yaml.safe_dump(dict(cfg), sort_keys=False)
    return text + _seal(text)


def save_run_config(run_dir: str | os.PathLike, cfg: dict) -> str:
    """Write ``RUN/config.yaml`` atomically, sealed; returns its path."""
    path = config_path(run_dir)
    atomic_write_text(path, config_text(cfg))
    return path


def parse_config_text(text: str, path: str) -> dict:
    """The settings of a saved config; a text without its seal (cut short, emptied, edited) is
    refused naming ``path``."""
    body, sep, last = text.rstrip("\n").rpartition("\n")
    last = last if sep else body
    body = body + "\n" if sep else ""
    if not last.startswith(CONFIG_SEAL) or _seal(body).strip() != last.strip():
        state = "is empty" if not text.strip() else (
            "was changed after it was written" if last.startswith(CONFIG_SEAL)
            else "lacks its last line '# complete: sha256 ...' (cut short by a crash or a full "
                 "disk, or written by hand or by an older version)")
        raise RunFileError(
            f"{path} {state}: the run's settings cannot be trusted. If the run never trained "
            f"(no best.pth/last.pth), delete the folder and train again; if every setting is there, "
            f"seal it: python -c \"import utils.run_dir as r; r.seal_config('{path}')\"")
    try:
        data = yaml.safe_load(body) or {}
    except yaml.YAMLError as err:
        raise RunFileError(f"{path} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: a saved config must be a mapping of key: value")
    return data


def read_saved_config(run_dir: str | os.PathLike) -> dict:
    """The settings ``RUN/config.yaml`` holds (checked whole, see ``parse_config_text``); a
    release run folder's ``configs.yaml`` when there is no ``config.yaml``."""
    path = config_path(run_dir)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(os.fspath(run_dir), RELEASE_CONFIG)):
        return read_release_config(run_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {os.fspath(run_dir)} a run directory "
                                f"written by train.py?")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path} is not UTF-8 text ({err}); restore it or train the run again") from err
    return parse_config_text(text, path)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config atomically, sealed (``config_text``)."""
    atomic_write_text(path, config_text(cfg))


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a run saved (refused when cut short, naming the file); missing keys
    (older runs) take today's defaults."""
    data = read_saved_config(run_dir)
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(data)
    return Config(cfg)


def seal_config(path: str | os.PathLike) -> None:
    """Add the seal line to a config that a person checked is complete."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.rstrip("\n").rpartition("\n")[2].startswith(CONFIG_SEAL):
        text = text.rstrip("\n").rpartition("\n")[0] + "\n"
    atomic_write_text(path, text + _seal(text))


# ---- a release's run folder (configs.yaml + best.pth) ----

# Release args that only steer training or IRRA's MLM head: no effect on the evaluated model.
RELEASE_TRAINING_ONLY = frozenset({"local_rank", "resume_ckpt_file", "training", "cmt_depth",
                                   "masked_token_rate", "masked_token_unchanged_rate"})
# Release args with one value we support.
RELEASE_FIXED = {"vocab_size": 49408}
# The args that shape the evaluated model or its test data: refused when they do not type-check.
RELEASE_EVAL_KEYS = frozenset({"dataset_name", "img_size", "stride_size", "text_length",
                               "select_ratio", "loss_names", "temperature", "val_dataset"})
# What the release hard-codes (no arg): RDE's TSE embedding size.
RELEASE_IMPLIED = {"tse_embed_dim": 1024}


class _ReleaseLoader(yaml.SafeLoader):
    """Safe YAML plus the ``!!python/tuple`` tag that ``yaml.dump(vars(args))`` writes for
    ``img_size`` (a tuple in the releases' argparse defaults)."""


_ReleaseLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: list(loader.construct_sequence(node)))


def read_release_config(run_dir: str | os.PathLike) -> dict:
    """Our settings from a release run folder's ``configs.yaml`` (its args under the same names;
    training-only args dropped, RELEASE_IMPLIED added); an arg we cannot map is refused by name."""
    path = os.path.join(os.fspath(run_dir), RELEASE_CONFIG)
    fix = "it is the args file the ICL/RDE release writes next to best.pth (utils/iotools.py there)"
    with reading(path, fix):
        with open(path, "rb") as f:
            data = yaml.load(f.read().decode("utf-8"), Loader=_ReleaseLoader)  # noqa: S506 (safe loader)
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected the release's args as a YAML mapping")
    wrong = {k: (data[k], v) for k, v in RELEASE_FIXED.items() if k in data and data[k] != v}
    unknown = sorted(k for k in data if k not in DEFAULTS and k not in RELEASE_TRAINING_ONLY
                     and k not in RELEASE_FIXED)
    if wrong or unknown:
        lines = [f"  {k}: {old!r} (only {new!r} is supported)" for k, (old, new) in wrong.items()]
        lines += [f"  {k}: {data[k]!r} (no counterpart here)" for k in unknown]
        raise RunDirError(f"{path}: release settings that cannot be mapped to ours:\n" + "\n".join(lines)
                          + f"\nEvaluate the weights with an explicit config instead: python test.py "
                            f"NEW_FOLDER --weights {checkpoint_path(run_dir, BEST)} --config configs/....yaml")
    ours = dict(RELEASE_IMPLIED)
    for key in (k for k in data if k in DEFAULTS):
        try:
            ours.update(check_types({key: data[key]}, path))
        except (ValueError, KeyError, TypeError):
            if key in RELEASE_EVAL_KEYS:  # shapes the evaluated model or its data: never guessed
                raise
            logger.info(f"{path}: {key}={data[key]!r} not taken (training only; today's default)")
    return ours


# ---- checkpoints: identity ----

_DIGESTS: dict = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (remembered per (path, size, mtime, inode) within a process)."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = io_file_sha256(path)
    return _DIGESTS[key]


def checkpoint_identity(run_dir: str | os.PathLike, checkpoint: str = BEST) -> dict:
    """``{"file": name, "sha256": digest}``: what an evaluation or a THI run belongs to."""
    path = checkpoint_path(run_dir, checkpoint)
    if not os.path.isfile(path):
        raise RunFileError(f"{path} not found (checkpoints in {os.fspath(run_dir)}: "
                           f"{checkpoints_in(run_dir) or 'none'}); train first or pass --checkpoint")
    return {"file": os.path.basename(checkpoint), "sha256": file_sha256(path)}


# ---- one checkpoint's evaluation ----

def write_eval_folder(folder: str | os.PathLike, *, similarity: np.ndarray, q_pids, g_pids,
                      gallery_feats: dict, metrics: dict, captions: Optional[list] = None,
                      image_paths: Optional[list] = None, checkpoint: Optional[dict] = None) -> None:
    """Write an evaluation as one unit: every file into a temp folder beside ``folder``, which is
    then renamed into place, so a reader sees the old evaluation or the new one, never a mix."""
    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TEMP_PREFIX}{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        atomic_save_npy(os.path.join(tmp, EVAL_SIMILARITY), np.asarray(similarity, dtype=np.float32))
        atomic_save_npy(os.path.join(tmp, EVAL_Q_PIDS), np.asarray(q_pids, dtype=np.int64))
        atomic_save_npy(os.path.join(tmp, EVAL_G_PIDS), np.asarray(g_pids, dtype=np.int64))
        atomic_save_npz(os.path.join(tmp, EVAL_GALLERY),
                        **{k: np.asarray(v, dtype=np.float32) for k, v in gallery_feats.items()})
        if captions is not None:
            atomic_write_json(os.path.join(tmp, EVAL_CAPTIONS), list(captions))
        if image_paths is not None:
            atomic_write_json(os.path.join(tmp, EVAL_IMAGE_PATHS),
                              [os.path.abspath(p) for p in image_paths])
        if checkpoint is not None:
            atomic_write_json(os.path.join(tmp, EVAL_CHECKPOINT), checkpoint)
        atomic_write_json(os.path.join(tmp, EVAL_METRICS), metrics)
        old = None
        if os.path.exists(folder):
            old = os.path.join(parent, f"{TEMP_PREFIX}old-{name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def eval_command(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST,
                 root: Optional[str] = None) -> str:
    """The command that (re)writes a checkpoint's evaluation."""
    cmd = f"python test.py {os.fspath(run_dir)} --dataset {dataset}"
    if os.path.basename(checkpoint) != BEST:
        cmd += f" --checkpoint {checkpoint}"
    return cmd + (f" --root {root}" if root else "")


def eval_complete(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST) -> bool:
    """True when the checkpoint's evaluation folder is there (written whole: metrics.json last)."""
    return os.path.isfile(eval_file(run_dir, dataset, EVAL_METRICS, checkpoint))


def check_eval_checkpoint(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST,
                          root: Optional[str] = None) -> dict:
    """The evaluation's ``checkpoint.json``, refused unless it names ``checkpoint`` as it is now
    (same file, same sha256): an evaluation is never combined with another checkpoint."""
    folder = eval_dir(run_dir, dataset, checkpoint)
    fix = f"run `{eval_command(run_dir, dataset, checkpoint, root)}`"
    legacy = os.path.join(os.fspath(run_dir), EVAL_DIR, dataset, EVAL_SIMILARITY)
    if not os.path.isdir(folder):
        if os.path.isfile(legacy):
            raise MissingRunFile(f"{os.path.dirname(legacy)} is an evaluation of an older layout that "
                                 f"does not say which checkpoint made it: {fix}")
        raise MissingRunFile(f"{folder} is missing (no evaluation of {os.path.basename(checkpoint)} "
                           f"on {dataset}): {fix} first")
    saved = read_json(os.path.join(folder, EVAL_CHECKPOINT), fix)
    now = checkpoint_identity(run_dir, checkpoint)
    if saved.get("file") != now["file"] or saved.get("sha256") != now["sha256"]:
        raise RunFileError(
            f"{folder} was made from {saved.get('file')} sha256 {str(saved.get('sha256'))[:12]}..., "
            f"but {checkpoint_path(run_dir, checkpoint)} is now sha256 {now['sha256'][:12]}... (rewritten "
            f"by a resumed training?): it is not this checkpoint's evaluation; {fix}")
    return saved


def read_eval(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST,
              root: Optional[str] = None) -> dict:
    """A checkpoint's evaluation: similarity [Q, G], q_pids, g_pids, captions, image_paths,
    gallery_feats, metrics and the checkpoint it belongs to (checked, see
    ``check_eval_checkpoint``). Every error names the file and the command that rewrites it."""
    ident = check_eval_checkpoint(run_dir, dataset, checkpoint, root)
    folder = eval_dir(run_dir, dataset, checkpoint)
    fix = f"run `{eval_command(run_dir, dataset, checkpoint, root)}` again"
    out = {"similarity": read_npy(os.path.join(folder, EVAL_SIMILARITY), fix),
           "q_pids": read_npy(os.path.join(folder, EVAL_Q_PIDS), fix),
           "g_pids": read_npy(os.path.join(folder, EVAL_G_PIDS), fix),
           "captions": read_json(os.path.join(folder, EVAL_CAPTIONS), fix),
           "image_paths": read_json(os.path.join(folder, EVAL_IMAGE_PATHS), fix),
           "gallery_feats": read_npz(os.path.join(folder, EVAL_GALLERY), fix, keys=("bge",)),
           "metrics": read_json(os.path.join(folder, EVAL_METRICS), fix),
           "checkpoint": ident, "folder": folder}
    q, g = len(out["q_pids"]), len(out["g_pids"])
    if out["similarity"].shape != (q, g) or len(out["captions"]) != q or len(out["image_paths"]) != g:
        raise RunFileError(f"{folder}: similarity {tuple(out['similarity'].shape)} does not match "
                           f"{q} queries / {len(out['captions'])} captions and {g} gallery ids / "
                           f"{len(out['image_paths'])} images: {fix}")
    return out


def read_eval_metrics(run_dir: str | os.PathLike, dataset: str, checkpoint: str = BEST) -> dict:
    """``metrics.json`` of a checkpoint's evaluation (``{"t2i": {...}, "bge": ..., "tse": ...}``)."""
    return read_json(eval_file(run_dir, dataset, EVAL_METRICS, checkpoint),
                     f"run `{eval_command(run_dir, dataset, checkpoint)}`")


# ---- metrics.json and CCD records ----

def read_metrics(run_dir: str | os.PathLike) -> dict:
    """``RUN/metrics.json`` (per-epoch records, best epoch)."""
    return read_json(metrics_path(run_dir), "it is written after every epoch: resume the training "
                                            "(resume=true) to rewrite it")


def write_metrics(run_dir: str | os.PathLike, data: dict) -> None:
    atomic_write_json(metrics_path(run_dir), data)


def write_ccd(run_dir: str | os.PathLike, epoch: int, arrays: dict) -> None:
    atomic_save_npz(ccd_file(run_dir, epoch), **arrays)


def read_ccd(path: str | os.PathLike, keys: Iterable[str] = ("clean_bge", "clean_tse")) -> dict:
    """One ``ccd/epoch_<k>.npz`` record (``keys`` required)."""
    return read_npz(path, "it is written by train.py with ccd=true each epoch: delete it to use "
                          "an earlier epoch's record, or resume the training to rewrite it", keys)


# ---- one writer per folder ----

class FolderBusyError(RunDirError):
    """Another live process holds the folder's lock; the message names it."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({info.get('what')}: {info.get('command')})")
    except (OSError, ValueError):
        return "another process (it has not written its name yet)"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[str]:
    """Hold ``folder``'s exclusive lock (``folder/.lock``) while the block runs; a second process
    is refused at once, naming the holder. The lock is ``fcntl.flock``'s: it dies with its
    process, so a crashed holder never blocks. The lock file is removed on release."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is in use by {_holder(path)}; {what} is refused so that the two do not "
                f"mix their files. Wait for it to finish or stop it (a holder that crashed has "
                f"released the lock already), or use another folder") from None
        try:  # the file we locked may have been removed by a holder releasing it: retry
            same = os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)  # releases the flock


def _live_lock(folder: str) -> bool:
    """True when ``folder/.lock`` is held by a live process."""
    path = os.path.join(folder, LOCK_FILE)
    if not os.path.exists(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def clean_temp_tree(folder: str | os.PathLike) -> list[str]:
    """Remove ``.tmp-*`` files and folders under ``folder`` (a THI results folder or an RDA
    state folder whose lock the caller holds), skipping subfolders that another live process
    has locked (a sweep inside a THI folder); returns the removed paths."""
    folder = os.fspath(folder)
    removed = []
    for here, dirs, files in os.walk(folder):
        if here != folder and _live_lock(here):
            dirs[:] = []
            continue
        for name in list(dirs) + files:
            if name.startswith(TEMP_PREFIX):
                item = os.path.join(here, name)
                if os.path.isdir(item):
                    shutil.rmtree(item, ignore_errors=True)
                    dirs.remove(name)
                else:
                    os.remove(item)
                removed.append(item)
    return removed


def main(argv: Optional[list] = None) -> int:
    """``python -m utils.run_dir eval-ready RUN DATASET [--checkpoint best.pth]``: exit 0 when the
    checkpoint's evaluation on DATASET is there and made from the checkpoint as it is now (for
    shell scripts, which must not build run paths themselves)."""
    ap = argparse.ArgumentParser(prog="python -m utils.run_dir")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ready = sub.add_parser("eval-ready", help="is the checkpoint's evaluation there and current?")
    ready.add_argument("run")
    ready.add_argument("dataset")
    ready.add_argument("--checkpoint", default=BEST)
    args = ap.parse_args(argv)
    try:
        check_eval_checkpoint(args.run, args.dataset, args.checkpoint)
    except RUN_ERRORS as err:
        print(f"not ready: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
