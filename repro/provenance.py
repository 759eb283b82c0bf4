"""Where a result file's numbers come from: the commit (and whether the tree had uncommitted
changes), the command, each run's directory, config identity and seed, package versions, the
machine and its thread count. Written into every result file (json, csv header, md footer)."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import version
from typing import Sequence

import torch

from .report import provenance_footer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@lru_cache(maxsize=1)
def _git() -> tuple:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    # results and run folders are outputs, not sources: they do not make the tree dirty
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)docs/results"))
    return commit, dirty


@lru_cache(maxsize=1)
def _packages() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "transformers", "scikit-learn"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a package that is not installed is simply not listed
            continue
    return out


def machine() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    torch_threads = torch.get_num_threads()
    return (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}), OMP_NUM_THREADS {threads}, torch threads "
            f"{torch_threads}")


def collect(jobs: Sequence, world=None, command: str = "") -> dict:
    """The provenance of a result made from ``jobs`` (``repro.jobs.Job``)."""
    commit, dirty = _git()
    runs = []
    for j in jobs:
        if j.seed is None and not j.label.startswith(("train", "THI", "evaluate", "RDA")):
            continue
        rec = j.recorded() or {}
        runs.append({"dir": j.run_dir or os.path.dirname(j.done_file), "identity": j.key(),
                     "seed": j.seed, "label": j.label, "seconds": rec.get("seconds")})
    return {"commit": commit, "dirty": dirty,
            "command": command or " ".join(["python", "-m", "repro", *map(shlex.quote, sys.argv[1:])])
            if os.path.basename(sys.argv[0]) in ("__main__.py", "repro") else command or shlex.join(sys.argv),
            "machine": machine(), "packages": _packages(),
            "world": getattr(world, "name", None), "scale": getattr(world, "scale_name", None),
            "seeds": list(getattr(world, "seeds", ())), "runs": runs}


def provenance_footer_lines(prov: dict) -> list:
    return provenance_footer(prov)
