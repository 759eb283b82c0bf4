"""``python -m repro SUBCOMMAND``: reproduce one table or figure of the paper (or ``all``).

    python -m repro table1 --world mini                       # the mini paper, docs/results/
    python -m repro all --world mini --scale ci --runs /tmp/r --out /tmp/o   # CI size
    python -m repro table1 --world real --root data --mllm /models/Qwen2-VL-7B-Instruct \
        --lora /models/icl_lora --gpus 2 --dry-run               # commands + expected GPU time

Sub-commands: table1 (CUHK/ICFG/RSTP, groups 1 and 2), table2 (UFine6926), table34
(cross-domain), table5 (THI on other base models), table6 (ablation), rda_modes (mini: RDA with
both aggregation modes, token lengths), rde_noise (0/0.2/0.5/0.8), fig3 (top-1 similarity
histograms, xi), fig5 (Rank@Avg over xi and over lambda), fig6 (per THI round), fig7 (top-10
before/after THI), all. Mini world: every row runs with --seeds seeds; effects carry a 95%
interval and a verdict. Run directories are the cache: a finished run is reused only when its
resolved config is the same (its record beside the result says which config made it).
The `preflight TABLES...` sub-command checks every input of those tables (repro/preflight.py).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from utils.errors import cli_errors
from utils.io import atomic_write_text

from .figures import FIGURES
from .jobs import Runner, _fmt
from .options import REAL_STEPS, SUBCOMMANDS, build_parser, make_world
from .preflight import main as preflight_main
from .provenance import collect, provenance_footer_lines
from .tables import TABLES
from .worlds import REAL_BASIS, Unavailable

def _run_jobs_first(todo: tuple, world, runner: Runner, jobs: int, out: str) -> None:
    """Plan every sub-command, then run all their jobs side by side; the sub-commands then find
    every job done and only write their files."""
    funcs = {**TABLES, **FIGURES}
    planner = Runner(dry_run=True, log=lambda _msg: None)
    for name in todo:
        try:
            funcs[name](world, planner, out)
        except Unavailable:
            pass
    print(f"[repro] {len(planner.seen)} jobs, {jobs} side by side")
    runner.run(list(planner.seen.values()))


def _print_dry_run(world, summary: list, skipped: list) -> None:
    """The expected time per sub-command, what is not run as configured, and the basis."""
    unit = (f"wall-clock time on {world.gpus} GPU(s)" if world.name == "real"
            else "CPU time (2 cores)")
    print(f"\nexpected {unit} per table (jobs not done yet; a job shared by two tables "
          f"is counted at the first):")
    for name, n, secs in summary:
        print(f"  {name:10s} {n:3d} jobs  {_fmt(secs)}")
    print(f"  total      {_fmt(sum(s for _, _, s in summary))}")
    if skipped:
        print("not run as configured (each listed above with its reason; the time is what its own "
              "jobs would add):")
        for name, n, secs in skipped:
            print(f"  {name:10s} {n:3d} items {'~' + _fmt(secs) if secs else 'time unknown'}")
    print(f"basis: {(world.basis() if hasattr(world, 'basis') else None) or REAL_BASIS}")


def _write_timing(world, runner: Runner, jobs: int, summary: list, seconds: float, out: str) -> None:
    """timing.md: wall seconds per sub-command and per job, with the provenance footer."""
    lines = ["# Time per sub-command", "", f"World {world.name}, scale "
             f"{getattr(world, 'scale_name', 'full')}, {len(world.seeds)} seed(s), --jobs "
             f"{jobs}; wall-clock seconds on this machine (jobs already done by an earlier "
             "sub-command, or run side by side before the sub-commands with --jobs > 1, are "
             "not counted again).", "",
             "| sub-command | seconds |", "| --- | --- |"]
    lines += [f"| {n} | {s:.0f} |" for n, _, s in summary]
    lines += [f"| total (wall, with --jobs {jobs}) | {seconds:.0f} |"]
    if runner.timings:
        lines += ["", "## Jobs run (seconds each)", "", "| job | seconds |", "| --- | --- |"]
        lines += [f"| {label} | {secs:.0f} |" for label, secs in runner.timings]
        lines += [f"| sum | {sum(s for _, s in runner.timings):.0f} |"]
    lines += ["", *provenance_footer_lines(collect([], world))]
    atomic_write_text(os.path.join(out, "timing.md"), "\n".join(lines) + "\n")


@cli_errors("python -m repro")
def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["preflight"]:  # checks the inputs only (repro/preflight.py); starts no job
        return preflight_main(argv[1:])
    args = build_parser(__doc__).parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)  # train.py, test.py and the configs are addressed from the repository root
    sys.path.insert(0, root)

    world = make_world(args)
    out = args.out or ("docs/results" if args.world == "mini" else "results")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    runner = Runner(dry_run=args.dry_run, in_process=args.world == "mini" and not args.subprocess,
                    jobs=args.jobs, logs=os.path.join(world.runs, "logs"))
    todo = ((REAL_STEPS if args.world == "real" else ()) + SUBCOMMANDS if args.what == "all"
            else (args.what,))
    funcs = {**TABLES, **FIGURES}
    summary = []
    skipped = []  # (step, rows or steps not run, the time they would take)
    t_all = time.perf_counter()
    if args.jobs > 1 and not args.dry_run:
        _run_jobs_first(todo, world, runner, args.jobs, out)
    for name in todo:
        t0 = time.perf_counter()
        try:
            res = funcs[name](world, runner, out)
        except Unavailable as exc:
            print(f"[repro] {name}: not run: {exc}"
                  + (f" (would take ~{_fmt(exc.seconds)})" if exc.seconds else ""))
            summary.append((name, 0, 0.0))
            skipped.append((name, 1, exc.seconds))
            continue
        dt = time.perf_counter() - t0
        if args.dry_run:
            summary.append((name, res["jobs"], res["seconds"]))
            if res.get("not_run"):
                skipped.append((name, res["not_run"], res.get("not_run_seconds", 0.0)))
        else:
            summary.append((name, None, dt))
            print(f"[repro] {name}: done in {dt:.0f} s -> {out}/{name}.md")
    if args.dry_run:
        _print_dry_run(world, summary, skipped)
    elif args.what == "all":
        _write_timing(world, runner, args.jobs, summary, time.perf_counter() - t_all, out)
    return 0
