"""Jobs: one subprocess each (train.py, test.py, python -m thi, ...), skipped when the run
directory already holds its result. The run directories are the cache."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union


@dataclass(frozen=True)
class Lazy:
    """A command-line value known only when earlier jobs have run (e.g. xi read from a run's
    Fig. 3 histograms); ``text`` is what a dry run prints."""

    resolve: Callable[[], str]
    text: str


Arg = Union[str, Lazy]


@dataclass
class Job:
    """One command. ``done_file`` exists once the command has finished (then it is skipped);
    ``seconds`` is the expected time (GPU seconds in the real world, CPU seconds in the mini
    world) and ``basis`` says where that estimate comes from."""

    label: str
    argv: Sequence[Arg]
    done_file: str
    seconds: float = 0.0
    basis: str = ""
    env: dict = field(default_factory=dict)

    def done(self) -> bool:
        return os.path.exists(self.done_file)

    def text(self) -> str:
        return " ".join(shlex.quote(a) if isinstance(a, str) else a.text for a in self.argv)

    def resolved(self) -> list:
        return [a if isinstance(a, str) else a.resolve() for a in self.argv]


def py(*args: Arg) -> list:
    """``python args...`` with the interpreter running us (the project venv)."""
    return [sys.executable, *args]


# Commands that can also run as a function call in this process (``--in-process``): the same
# ``main(argv)`` the script runs, without a fresh interpreter and torch import per job.
_ENTRIES = {"train.py": "train", "test.py": "test", "thi": "thi.cli", "rda": "rda.cli",
            "offline.synthpedes": "offline.synthpedes"}


def entry_point(argv: Sequence[str]):
    """(module, arguments) when ``argv`` is ``python train.py|test.py|-m thi|rda|...``, else None."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return None
    if argv[1] in ("train.py", "test.py"):
        return _ENTRIES[argv[1]], list(argv[2:])
    if argv[1] == "-m" and len(argv) > 2 and argv[2] in _ENTRIES:
        return _ENTRIES[argv[2]], list(argv[3:])
    return None


def call_in_process(module: str, args: list) -> int:
    import importlib

    try:
        code = importlib.import_module(module).main(args)
    except SystemExit as exc:  # argparse errors and explicit exits
        code = exc.code if isinstance(exc.code, int) else 1
    return int(code or 0)


class Runner:
    """Runs jobs once each (a job asked for by two tables runs once), or prints them.
    ``in_process``: call the scripts' ``main`` here instead of starting a subprocess (the mini
    world's many small jobs; the real world keeps one process per job)."""

    def __init__(self, *, dry_run: bool = False, log: Callable[[str], None] = print,
                 cwd: Optional[str] = None, in_process: bool = False):
        self.dry_run, self.log, self.cwd, self.in_process = dry_run, log, cwd, in_process
        self.seen: dict = {}
        self.timings: list = []  # (label, seconds) of the jobs run here

    def run(self, jobs: Sequence[Job]) -> list:
        """Run (or print) every job not yet seen; returns the jobs new to this runner."""
        new: list = []
        for job in jobs:
            if job.done_file in self.seen:
                continue
            self.seen[job.done_file] = job
            new.append(job)
            if self.dry_run:
                state = "cached" if job.done() else f"~{_fmt(job.seconds)}"
                self.log(f"  [{state}] {job.label}\n      {job.text()}")
                continue
            if job.done():
                self.log(f"[repro] cached: {job.label} ({job.done_file})")
                continue
            argv = job.resolved()
            self.log(f"[repro] {job.label}: {shlex.join(argv)}")
            t0 = time.perf_counter()
            entry = entry_point(argv) if self.in_process and not job.env and self.cwd is None else None
            if entry is not None:
                code = call_in_process(*entry)
            else:
                env = {**os.environ, **job.env} if job.env else None
                code = subprocess.run(argv, cwd=self.cwd, env=env).returncode
            dt = time.perf_counter() - t0
            if code != 0:
                raise RuntimeError(f"{job.label} failed (exit {code}): {shlex.join(argv)}")
            if not job.done():
                raise RuntimeError(f"{job.label} finished but {job.done_file} was not written")
            self.timings.append((job.label, dt))
        return new


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def total(jobs: Sequence[Job]) -> float:
    """Expected seconds of the jobs not yet done."""
    return sum(j.seconds for j in jobs if not j.done())
