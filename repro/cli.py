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

import argparse
import os
import sys
import time
from typing import Optional

from utils.errors import cli_errors
from utils.io import atomic_write_text

from .figures import FIGURES
from .jobs import Runner, _fmt
from .tables import TABLES
from .worlds import MiniWorld, RealWorld, Unavailable

SUBCOMMANDS = ("table1", "table2", "table34", "table5", "table6", "rda_modes", "rde_noise",
               "fig3", "fig5", "fig6", "fig7")
# The real world's plan also holds the step that makes THI's tuned MLLM (first: THI needs it).
REAL_STEPS = ("sft",)


def _pairs(items, flag: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{flag} expects DATASET=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m repro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=(*REAL_STEPS, *SUBCOMMANDS, "all"),
                    help="table or figure (sft: the anchor-localization LoRA, real world)")
    ap.add_argument("--world", choices=("real", "mini"), default="mini")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and the expected "
                                                           "time per table; run nothing")
    ap.add_argument("--out", help="results folder (default: docs/results for mini, results for real)")
    ap.add_argument("--runs", help="run directories (default: mini: the config's runs; real: runs)")
    ap.add_argument("--subprocess", action="store_true", help="mini world: one process per job "
                    "(default there: call train.py/test.py/thi's main in this process)")
    mini = ap.add_argument_group("mini world")
    mini.add_argument("--config", default="configs/repro_mini.yaml", help="the mini world's knobs")
    mini.add_argument("--scale", default="full", help="full, or a scale of the mini config (ci)")
    mini.add_argument("--train-config", help="training config (overrides the mini config's)")
    mini.add_argument("--pretrained", help="tiny CLIP checkpoint (overrides the mini config's)")
    mini.add_argument("--seeds", type=int, help="seeds per row (default: the mini config's, 3; "
                                                "its CI scale's, 1)")
    ap.add_argument("--jobs", type=int, default=1, help="independent jobs run side by side, each "
                    "in its own process with cores/jobs threads (default 1: one at a time)")
    real = ap.add_argument_group("real world")
    real.add_argument("--root", default="data", help="data root with the benchmarks")
    real.add_argument("--datasets", default="CUHK-PEDES,ICFG-PEDES,RSTPReid,UFine6926")
    real.add_argument("--gpus", type=int, default=1, help="GPUs for training (torchrun) and vLLM")
    real.add_argument("--backend", default="vllm", choices=("vllm", "openai", "transformers"))
    real.add_argument("--mllm", help="Qwen2-VL-7B-Instruct directory (vllm, transformers)")
    real.add_argument("--lora", help="the ICL anchor-localization LoRA adapter (huggingface.co/Yangsss/ICL); "
                      "THI's starred rows, Table 6 #1 and Fig. 5-7 need it, or --merged-mllm, or "
                      "--train-lora; without any, those rows are listed as not run (Table 6 #2 runs "
                      "without it on purpose)")
    real.add_argument("--merged-mllm", help="Qwen2-VL-7B-Instruct with the ICL LoRA merged in (the "
                      "release's way) for THI's tuned rows")
    real.add_argument("--train-lora", action="store_true", help="train the LoRA here: the "
                      "anchor-localization SFT step (python -m rda sft on each dataset's ICL run, "
                      "then scripts/sft_lora.sh; about 11 h on two RTX 3090s per the supplement)")
    real.add_argument("--base-url", help="openai backend: server URL")
    real.add_argument("--served-model", help="openai backend: model name")
    real.add_argument("--rda-file", action="append", metavar="DATASET=PATH",
                      help="RDA annotation file (e.g. the authors' RDA_data); default: generate it")
    real.add_argument("--pre-checkpoint", action="append", metavar="DIR|DATASET=PATH",
                      help="group 2 (+pre): a folder holding MLLM4Text-ReID's best0/1/2.pth (the "
                           "release's choice: best0 CUHK-PEDES and UFine6926, best1 ICFG-PEDES, best2 "
                           "RSTPReid), or one DATASET=PATH per dataset")
    real.add_argument("--rde-weights", action="append", metavar="DATASET=PATH",
                      help="Table 5's RDE row from RDE's released best.pth per dataset (the row says "
                           "so); default: the RDE run trained here")
    real.add_argument("--noise-dir", default="noiseindex", help="the release's noiseindex/ folder "
                      "(copy it from the RDE release: 2024-CVPR-RDE/noiseindex)")
    real.add_argument("--irra-weights", action="append", metavar="DATASET=PATH",
                      help="Table 5: IRRA's released best.pth per dataset")
    return ap


def make_world(args):
    if args.world == "mini":
        return MiniWorld.from_file(args.config, runs=args.runs, scale=args.scale,
                                   train_config=args.train_config, pretrained=args.pretrained,
                                   seeds=args.seeds)
    mllm = ["--backend", args.backend]
    if args.backend == "openai":
        if not args.dry_run and not (args.base_url and args.served_model):
            raise SystemExit("--backend openai needs --base-url and --served-model")
        mllm += ["--base-url", args.base_url or "<url>", "--served-model", args.served_model or "<model>"]
    else:
        if not args.dry_run and not args.mllm:
            raise SystemExit(f"--backend {args.backend} needs --mllm (the Qwen2-VL directory)")
        mllm += ["--model", args.mllm or "<Qwen2-VL-7B-Instruct>"]
        if args.backend == "vllm":
            mllm += ["--tensor-parallel-size", str(args.gpus)]
    datasets = [d for d in args.datasets.split(",") if d]
    if sum(bool(x) for x in (args.lora, args.merged_mllm, args.train_lora)) > 1:
        raise SystemExit("--lora, --merged-mllm and --train-lora exclude each other")
    return RealWorld(root=args.root, runs=args.runs or "runs", datasets=datasets, gpus=args.gpus,
                     mllm_args=mllm, lora=args.lora, rda_files=_pairs(args.rda_file, "--rda-file"),
                     pre_checkpoint=_pre_checkpoints(args.pre_checkpoint),
                     irra_weights=_pairs(args.irra_weights, "--irra-weights"),
                     rde_weights=_pairs(args.rde_weights, "--rde-weights"), noise_dir=args.noise_dir,
                     merged_mllm=args.merged_mllm, train_lora=args.train_lora, base_mllm=args.mllm)


def _pre_checkpoints(items):
    """--pre-checkpoint values -> a folder, or {dataset: file} ("" for a folder among files)."""
    if not items:
        return None
    out = {}
    for item in items:
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
        elif os.path.isfile(item):
            raise SystemExit(f"--pre-checkpoint {item} is one file: the release starts each dataset from "
                             f"its own checkpoint; give a folder holding best0/1/2.pth or DATASET=PATH")
        else:
            out[""] = item
    return out


@cli_errors("python -m repro")
def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["preflight"]:  # checks the inputs only (repro/preflight.py); starts no job
        from .preflight import main as preflight
        return preflight(argv[1:])
    args = build_parser().parse_args(argv)
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
        # plan every sub-command first, then run all their jobs side by side; the sub-commands
        # below then find every job done and only write their files
        planner = Runner(dry_run=True, log=lambda _msg: None)
        for name in todo:
            try:
                funcs[name](world, planner, out)
            except Unavailable:
                pass
        print(f"[repro] {len(planner.seen)} jobs, {args.jobs} side by side")
        runner.run(list(planner.seen.values()))
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
        basis = (world.basis() if hasattr(world, "basis") else None) or __import__(
            "repro.worlds", fromlist=["REAL_BASIS"]).REAL_BASIS
        print(f"basis: {basis}")
    elif args.what == "all":
        lines = ["# Time per sub-command", "", f"World {world.name}, scale "
                 f"{getattr(world, 'scale_name', 'full')}, {len(world.seeds)} seed(s), --jobs "
                 f"{args.jobs}; wall-clock seconds on this machine (jobs already done by an earlier "
                 "sub-command, or run side by side before the sub-commands with --jobs > 1, are "
                 "not counted again).", "",
                 "| sub-command | seconds |", "| --- | --- |"]
        lines += [f"| {n} | {s:.0f} |" for n, _, s in summary]
        lines += [f"| total (wall, with --jobs {args.jobs}) | {time.perf_counter() - t_all:.0f} |"]
        if runner.timings:
            lines += ["", "## Jobs run (seconds each)", "", "| job | seconds |", "| --- | --- |"]
            lines += [f"| {label} | {secs:.0f} |" for label, secs in runner.timings]
            lines += [f"| sum | {sum(s for _, s in runner.timings):.0f} |"]
        from .provenance import collect, provenance_footer_lines

        lines += ["", *provenance_footer_lines(collect([], world))]
        atomic_write_text(os.path.join(out, "timing.md"), "\n".join(lines) + "\n")
    return 0
