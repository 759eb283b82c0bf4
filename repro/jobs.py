"""Jobs: one subprocess each (train.py, test.py, python -m thi, ...), skipped when the run
directory already holds its result from the same resolved config. The run directories are the
cache: a job's ``identity`` (a digest of its resolved command and the files it reads by content)
is recorded beside its result (``DONE_FILE.job.json``); a result recorded for another identity
is never reused. ``Runner(jobs=N)`` runs up to N independent jobs side by side."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from utils.io import atomic_write_json


@dataclass(frozen=True)
class Lazy:
    """A command-line value known only when earlier jobs have run (e.g. xi read from a run's
    Fig. 3 histograms); ``text`` is what a dry run prints."""

    resolve: Callable[[], str]
    text: str


Arg = Union[str, Lazy]


class StaleResult(RuntimeError):
    """A finished result in a folder that the current configuration would overwrite."""


def digest(*parts) -> str:
    """A short digest of ``parts`` (their JSON), for config identities and folder names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def chain(jobs: Sequence["Job"]) -> list:
    """Mark each job as needing the jobs before it in ``jobs`` (a build's list: data, backbone,
    RDA file, training, evaluation, THI), unless it already names its needs."""
    out = []
    for i, job in enumerate(jobs):
        if job.after is None:
            job.after = [j.done_file for j in jobs[:i]]
        out.append(job)
    return out


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
    identity: str = ""            # digest of the resolved config; "" = the command's text
    seed: Optional[int] = None
    run_dir: str = ""             # the folder the job writes (provenance)
    after: Optional[list] = None  # done files of the jobs it needs (None: every earlier job)

    @property
    def stamp(self) -> str:
        return self.done_file + ".job.json"

    def key(self) -> str:
        return self.identity or digest(self.text())

    def recorded(self) -> Optional[dict]:
        """What the job's record says of the finished result (None: no record)."""
        try:
            with open(self.stamp, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        """Finished with this identity. A result recorded for another identity is an error for a
        folder whose name does not carry the identity (the job would overwrite it)."""
        if not os.path.exists(self.done_file):
            return False
        rec = self.recorded()
        if rec is None:
            return True  # written before records existed, or by hand
        if rec.get("identity") != self.key():
            raise StaleResult(f"{self.done_file} was made by another configuration of '{self.label}' "
                              f"(recorded {rec.get('identity')}, now {self.key()}): remove "
                              f"{self.run_dir or os.path.dirname(self.done_file)} or pass another --runs")
        return True

    def record(self, seconds: float) -> None:
            atomic_write_json(self.stamp, {"identity": self.key(), "label": self.label,
                                       "command": self.text(), "seed": self.seed,
                                       "seconds": round(seconds, 2)})

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
                 cwd: Optional[str] = None, in_process: bool = False, jobs: int = 1,
                 logs: Optional[str] = None):
        self.dry_run, self.log, self.cwd, self.in_process = dry_run, log, cwd, in_process
        self.jobs, self.logs = max(1, int(jobs)), logs
        self.seen: dict = {}
        self.timings: list = []  # (label, seconds) of the jobs run here

    def run(self, jobs: Sequence[Job]) -> list:
        """Run (or print) every job not yet seen; returns the jobs new to this runner."""
        new: list = []
        todo: list = []
        for job in jobs:
            if job.done_file in self.seen:
                continue
            self.seen[job.done_file] = job
            new.append(job)
            if self.dry_run:
                try:
                    state = "cached" if job.done() else f"~{_fmt(job.seconds)}"
                except StaleResult as exc:  # the real run stops there; a dry run lists it
                    state = f"stale: {exc}"
                self.log(f"  [{state}] {job.label}\n      {job.text()}")
                continue
            if job.done():
                self.log(f"[repro] [cached] {job.label} ({job.done_file})")
                continue
            todo.append(job)
        if self.jobs > 1 and len(todo) > 1:
            self._run_parallel(todo)
        else:
            for job in todo:
                self._run_one(job)
        return new

    def _run_one(self, job: Job) -> None:
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
        if not os.path.exists(job.done_file):
            raise RuntimeError(f"{job.label} finished but {job.done_file} was not written")
        job.record(dt)
        self.timings.append((job.label, dt))

    def _run_parallel(self, todo: list) -> None:
        """Up to ``self.jobs`` subprocesses at a time, each started when the jobs it needs are
        done, each with ``cores // jobs`` threads; a job's output goes to its log file."""
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        names = {j.done_file for j in todo}
        pending, running, finished = list(todo), {}, set()
        logs = self.logs or "."
        os.makedirs(logs, exist_ok=True)
        failed = None
        while pending or running:
            for job in list(pending):
                if failed or len(running) >= self.jobs:
                    break
                needs = [d for d in (job.after or []) if d in names and d not in finished]
                if job.after is None:  # every earlier job of the list
                    needs = [j.done_file for j in todo[:todo.index(job)] if j.done_file not in finished]
                if needs:
                    continue
                pending.remove(job)
                argv = job.resolved()
                env = {**os.environ, **job.env, "OMP_NUM_THREADS": str(threads),
                       "MKL_NUM_THREADS": str(threads)}
                path = os.path.join(logs, re.sub(r"[^A-Za-z0-9_.-]+", "_", job.label)[:120] + ".log")
                fh = open(path, "w", encoding="utf-8")
                self.log(f"[repro] start {job.label} ({threads} thread(s), log {path}): {shlex.join(argv)}")
                proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
                running[proc] = (job, time.perf_counter(), fh, path, argv)
            if not running:
                if pending and not failed:
                    raise RuntimeError("jobs wait on each other: " + ", ".join(j.label for j in pending))
                break
            time.sleep(0.5)
            for proc in list(running):
                if proc.poll() is None:
                    continue
                job, t0, fh, path, argv = running.pop(proc)
                fh.close()
                dt = time.perf_counter() - t0
                if proc.returncode != 0 or not os.path.exists(job.done_file):
                    failed = failed or (f"{job.label} failed (exit {proc.returncode}; log {path}): "
                                        f"{shlex.join(argv)}")
                    continue
                job.record(dt)
                finished.add(job.done_file)
                self.timings.append((job.label, dt))
                self.log(f"[repro] done {job.label} in {dt:.0f} s")
        if failed:
            raise RuntimeError(failed)


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def total(jobs: Sequence[Job]) -> float:
    """Expected seconds of the jobs not yet done."""
    def pending(j):
        try:
            return not j.done()
        except StaleResult:  # would be redone once its folder is removed
            return True
    return sum(j.seconds for j in jobs if pending(j))
