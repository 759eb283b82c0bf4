"""The options of ``python -m repro`` and the world they build (shared by the command and its
``preflight`` sub-command)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from .worlds import MiniWorld, RealWorld

SUBCOMMANDS = ("table1", "table2", "table34", "table5", "table6", "rda_modes", "rde_noise",
               "fig3", "fig5", "fig6", "fig7")
# The real world's plan also holds the step that makes THI's tuned MLLM (first: THI needs it).
REAL_STEPS = ("sft",)


def pairs(items, flag: str) -> dict:
    """DATASET=PATH values of ``flag`` -> {dataset: path}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{flag} expects DATASET=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``python -m repro`` (``description``: the command's help text)."""
    ap = argparse.ArgumentParser(prog="python -m repro", description=description,
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
    """The world the parsed options describe: the mini world from its config, or the real runs."""
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
                     mllm_args=mllm, lora=args.lora, rda_files=pairs(args.rda_file, "--rda-file"),
                     pre_checkpoint=pre_checkpoints(args.pre_checkpoint),
                     irra_weights=pairs(args.irra_weights, "--irra-weights"),
                     rde_weights=pairs(args.rde_weights, "--rde-weights"), noise_dir=args.noise_dir,
                     merged_mllm=args.merged_mllm, train_lora=args.train_lora, base_mllm=args.mllm)


def pre_checkpoints(items):
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
