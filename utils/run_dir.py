"""Run-directory guards: what a run folder must hold, and what train.py may do to one.

Called before anything is written, so a refused command leaves the folder as it was:

- ``check_train_target``: training into a folder that already holds a run needs ``resume=true``;
  a resume must keep every setting that shapes the model (``RESUME_FREE`` keys may change, the
  ``RESUME_OPT_IN`` keys only when listed in ``resume_change``).
- ``clean_temp_files``: ``.tmp-*`` files left by atomic writes of a killed process.
- ``require_run_dir``: what ``test.py`` / THI need from a run folder.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import yaml

from utils.io import TEMP_PREFIX

logger = logging.getLogger("ICL.run")

# Files whose presence makes a folder a run (training into it would overwrite them).
RUN_MARKERS = ("config.yaml", "last.pth", "best.pth", "metrics.json")
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
_TRAIN_SUBDIRS = ("", "ccd", "eval", "tb")


class RunDirError(RuntimeError):
    """A run folder is missing, not a run, or would be overwritten; the message says the fix."""


def is_run_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS)


def _normalise(value: Any) -> Any:
    """Compare as saved: YAML round trip (tuples -> lists, 1e-5 strings -> floats)."""
    from utils.config import _number
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
    from utils.config import DEFAULTS

    out = {}
    for key in sorted(keys if keys is not None else set(saved) | set(cfg)):
        old = _normalise(saved.get(key, DEFAULTS.get(key)))
        new = _normalise(cfg.get(key, DEFAULTS.get(key)))
        if old != new:
            out[key] = (old, new)
    return out


def check_train_target(cfg: Any, run_dir: str | os.PathLike) -> list[str]:
    """Refuse to train into an existing run without ``resume=true``, or to resume it with settings
    that differ from its ``config.yaml``. Writes nothing. Returns log lines for the accepted
    changes (to be logged once the run's logger exists)."""
    run_dir = os.fspath(run_dir)
    if not is_run_dir(run_dir):
        return []
    present = [m for m in RUN_MARKERS if os.path.exists(os.path.join(run_dir, m))]
    if not cfg.get("resume"):
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(present)}); training into it would overwrite "
            f"them. Continue it with resume=true, or train a new run with another name "
            f"(name=NEW_NAME, or --run-dir NEW_FOLDER)")
    saved_path = os.path.join(run_dir, "config.yaml")
    has_last = os.path.isfile(os.path.join(run_dir, "last.pth"))
    notes = [] if has_last else [f"resume=true but {run_dir} has no last.pth: training starts from epoch 1"]
    if not os.path.isfile(saved_path):
        if not has_last:
            return notes
        raise RunDirError(f"{run_dir} has last.pth but no config.yaml, so a resume cannot be checked "
                          "against the run's settings; restore config.yaml or train a new run (name=NEW_NAME)")
    with open(saved_path, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
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
                         f"new run (name=NEW_NAME, optionally init_checkpoint={os.path.join(run_dir, 'best.pth')})")
        as_saved = " ".join(f"{k}={yaml.safe_dump(old, default_flow_style=True).strip().removesuffix('...').strip()}"
                            for k, (old, _) in refused.items())
        fixes.insert(0, f"to resume as saved use {as_saved}")
        raise RunDirError(f"resume=true: settings differ from {saved_path}:\n{lines}\n" + "; ".join(fixes))
    return notes + [f"resume: {k} changed from {old!r} to {new!r}" for k, (old, new) in diff.items()
                    if k not in ("resume", "resume_change", "distributed")]


def clean_temp_files(run_dir: str | os.PathLike, subdirs: Iterable[str] = _TRAIN_SUBDIRS) -> list[str]:
    """Remove ``.tmp-*`` files left in ``run_dir`` (and its eval/<dataset>/ folders) by atomic writes
    of a killed process; returns the removed paths. Only at the start of a run: no writer is active."""
    removed = []
    folders = []
    for sub in subdirs:
        folder = os.path.join(run_dir, sub)
        if os.path.isdir(folder):
            folders.append(folder)
            if sub == "eval":
                folders += [os.path.join(folder, d) for d in sorted(os.listdir(folder))
                            if os.path.isdir(os.path.join(folder, d))]
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(TEMP_PREFIX) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def require_run_dir(run_dir: str | os.PathLike, checkpoint: str = "best.pth") -> None:
    """Raise ``RunDirError`` naming what is missing unless ``run_dir`` holds ``config.yaml`` and
    ``checkpoint``."""
    run_dir = os.fspath(run_dir)
    need = f"a run folder written by train.py holds config.yaml and {checkpoint} (also last.pth, metrics.json)"
    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} does not exist: {need}")
    missing = [f for f in ("config.yaml", checkpoint) if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        others = sorted(f for f in os.listdir(run_dir) if f.endswith(".pth"))
        hint = (f"; checkpoints there: {others} (pass --checkpoint NAME)" if others and "config.yaml" not in missing
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
