"""``python -m thi``: THI on a saved run directory, and ``python -m thi sweep``: a lambda/xi grid.

    python -m thi --run runs/RDE_cuhk --target CUHK-PEDES --root data --backend vllm \
        --model /models/Qwen2-VL-7B-Instruct --lora /models/icl_lora --tensor-parallel-size 1
    python -m thi sweep --run runs/RDE_cuhk --target CUHK-PEDES --root data --backend simulated \
        --lams 0.5,0.6,0.7,0.8,0.9 --xis 0.4,0.45,0.5,0.55,0.6

The run's checkpoint must have been evaluated on the target first (``python test.py RUN
--dataset TARGET --root ROOT`` writes ``RUN/eval/TARGET/best/``); THI reads the base similarity,
ids, captions, image paths and gallery features of that checkpoint's evaluation (refused when it
was made from another checkpoint) and re-encodes refined queries with the same checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from utils import run_dir as rd

from utils.errors import cli_errors

from .defaults import LAMBDA, ROUNDS, TARGET_XI, XI, xi_for
from .state import SettingsChanged

from utils.mllm.identity import label
from utils.mllm.cli_options import client_options
from model import load_run
from utils.run_dir import load_run_config
from utils.device import resolve_amp, resolve_device
from utils.mllm import build_client
from .scoring import make_score_texts
from .pipeline import run_thi
from .queries import apply_queries, queries_subfolder
from .report import rounds_table
from .sweep import format_sweep, parse_grid, run_sweep

BACKENDS = ("simulated", "vllm", "openai", "transformers")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run", required=True, help="run directory (config.yaml, best.pth, eval/)")
    ap.add_argument("--target", help="target dataset (default: the run's own dataset)")
    ap.add_argument("--root", help="data root (default: the run's root_dir)")
    ap.add_argument("--checkpoint", default=rd.BEST, help="checkpoint inside the run directory; "
                    "THI uses its evaluation and writes RUN/thi/TARGET/<checkpoint stem>/")
    ap.add_argument("--backend", required=True, choices=BACKENDS, help="MLLM backend")
    ap.add_argument("--model", help="MLLM directory (vllm, transformers), e.g. "
                                    "Qwen2-VL-7B-Instruct")
    ap.add_argument("--lora", help="LoRA adapter directory (vllm, transformers): the ICL LoRA "
                                   "served unmerged on the base model in --model")
    ap.add_argument("--merged", action="store_true",
                    help="--model is the ICL LoRA merged into Qwen2-VL-7B-Instruct (the release's way, "
                         "LLaMA-Factory export); the results folder and table say so")
    ap.add_argument("--no-lora", action="store_true",
                    help="the MLLM is the base model without the ICL LoRA (Table 6 #2, an ablation); "
                         "the results folder and table say so")
    ap.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    ap.add_argument("--served-model", help="model name on the server (openai backend); with "
                                           "'vllm serve --enable-lora' the adapter's name")
    ap.add_argument("--dtype", choices=DTYPES, help="vllm/transformers weight dtype (default "
                    "float32 without a CUDA GPU: fast on CPU, no bf16 casts; else the backend's "
                    "default, bfloat16 for vLLM and the folder's dtype for transformers)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs for vLLM")
    ap.add_argument("--concurrency", type=int, default=32, help="openai backend: requests in "
                                                                "flight (the server batches them)")
    ap.add_argument("--attributes", help="simulated backend: SynthPEDES attributes.json or its "
                                         "folder (default ROOT/TARGET/attributes.json)")
    ap.add_argument("--error-rate", type=float, default=0.0, help="simulated backend: answer "
                                                                  "error probability")
    ap.add_argument("--seed", type=int, default=0, help="simulated backend: error seed")
    ap.add_argument("--mllm-profile", help="simulated backend: per-stage error profile, a name "
                    "(oracle, tiny-qwen2vl, untuned-tiny-qwen2vl) or loc_yes_true=..,"
                    "loc_yes_false=..,vqa_accuracy=..,aggr_faithful=..")
    ap.add_argument("--aggregation", choices=("keep", "concise"), default="keep",
                    help="simulated backend: aggregation keeps every new answer, or stays "
                         "within the text length (the prompt's 'concise')")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help=f"K, interaction rounds (paper: {ROUNDS})")
    ap.add_argument("--temperature", type=float, default=0.01)
    ap.add_argument("--release-sampling", action="store_true",
                    help="vllm/transformers: sample at --temperature as the release does (vLLM at 0.01, "
                         "unseeded there); default: below 0.05 decode greedily (reproducible)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="MLLM reply limit (the release: 2048)")
    ap.add_argument("--cache-dir", help="MLLM response cache (default RUN/mllm_cache)")
    ap.add_argument("--micro-batch", type=int, help="requests per MLLM call; each call's answers "
                    "are cached before the next, so a kill loses at most one (default: 64 "
                    "simulated, 256 vllm, the batch size for transformers; openai caches every "
                    "answer as it arrives)")
    ap.add_argument("--no-retry-unusable", action="store_true",
                    help="reuse cached empty or unparseable answers of an earlier run instead of "
                         "asking the MLLM again (default: ask again)")
    ap.add_argument("--device", default="auto", help="device for re-encoding refined queries")
    ap.add_argument("--batch-size", type=int, default=256, help="text encoding batch size")
    ap.add_argument("--no-progress", action="store_true")


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the THI run parser, the sweep parser)."""
    run = argparse.ArgumentParser(prog="python -m thi", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--lam", type=float, default=LAMBDA, help=f"Eq. 6's lambda (paper: {LAMBDA})")
    run.add_argument("--xi", type=float, help="threshold on the top-1 similarity (default "
                     f"{XI}; by target: {TARGET_XI})")
    run.add_argument("--out", help="results folder (default RUN/thi/TARGET/CKPT/LABEL, CKPT the "
                                   "checkpoint's stem (best), LABEL naming the backend and model, "
                                   "e.g. vllm-Qwen2-VL-7B-Instruct+icl_lora)")
    run.add_argument("--eq6-one-at", default="anchor", choices=("anchor", "top1"),
                     help="where Eq. 6 sets the refined similarity to 1: the anchor (both codebases, "
                          "default) or the base top-1 image (the paper's Eq. 6 as printed)")
    run.add_argument("--ask", default="needed", choices=("needed", "unrefined", "all"),
                     help="who is asked the localization question (same anchors; 'unrefined' "
                          "is the release's schedule)")
    sweep = argparse.ArgumentParser(prog="python -m thi sweep",
                                    description="THI over a grid of lambda and xi (Fig. 5), "
                                                "reusing cached MLLM answers")
    _common(sweep)
    sweep.add_argument("--lams", default="0.5,0.6,0.7,0.8,0.9")
    sweep.add_argument("--xis", default="0.4,0.45,0.5,0.55,0.6")
    sweep.add_argument("--out", help="results folder (default RUN/thi/TARGET/CKPT/LABEL/sweep)")
    for parser in (run, sweep):
        parser.add_argument("--queries", help="JSON file of one's own text queries instead of "
                                              "the target's test queries (e.g. a session "
                                              "exported by `python -m thi.app`; thi/queries.py)")
    return run, sweep


def load_eval_dir(run_dir: str, target: str, root: Optional[str],
                  checkpoint: str = rd.BEST) -> dict:
    """The evaluation of ``checkpoint`` on ``target`` (``utils.run_dir.read_eval``: refused when
    missing, garbled or made from another checkpoint, naming the file and the command)."""
    data = rd.read_eval(run_dir, target, checkpoint, root)
    captions = data["captions"]
    empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise ValueError(f"{os.path.join(data['folder'], rd.EVAL_CAPTIONS)}: {len(empty)} empty "
                         f"queries (first: #{empty[0]}); THI needs a text per query: fix the "
                         f"dataset's annotation file and run "
                         f"`{rd.eval_command(run_dir, target, checkpoint, root)}` again")
    return data


def check_tuning(args) -> None:
    """``--lora``, ``--merged`` and ``--no-lora`` name one way the MLLM was (not) tuned."""
    given = [f for f, on in (("--lora", bool(getattr(args, "lora", None))),
                             ("--merged", getattr(args, "merged", False)),
                             ("--no-lora", getattr(args, "no_lora", False))) if on]
    if len(given) > 1:
        raise SystemExit(f"{' and '.join(given)} exclude each other: --lora ADAPTER (the ICL LoRA on the base "
                         "model), --merged (--model holds the LoRA merged in), or --no-lora (the base model)")


def tuning_note(args) -> str:
    """One line naming the MLLM's tuning, printed above THI's table."""
    if getattr(args, "no_lora", False):
        return "MLLM without the ICL LoRA (--no-lora: Table 6 #2, an ablation, not the paper's THI)"
    if getattr(args, "merged", False):
        return f"MLLM: the ICL LoRA merged into {args.model} (--merged, the release's setting)"
    if getattr(args, "lora", None):
        return f"MLLM: {args.model} + the ICL LoRA adapter {args.lora} (served unmerged)"
    return ""


def mllm_label(args) -> str:
    """The default results-folder name of the chosen MLLM: backend and model (and adapter, or
    ``+merged`` / ``+nolora``), so that different backends and models never share a results folder."""
    if args.backend == "simulated":
        rate = getattr(args, "error_rate", 0.0) or 0.0
        prof = getattr(args, "mllm_profile", None)
        aggr = getattr(args, "aggregation", "keep")
        tag = (f"err{rate:g}-seed{args.seed}" if rate else
               f"{prof}-seed{args.seed}".replace("=", "").replace(",", "-") if prof else None)
        if aggr != "keep":
            tag = f"{tag}-{aggr}" if tag else aggr
        return label("simulated", tag)
    tag = ("+nolora" if getattr(args, "no_lora", False) else "+merged" if getattr(args, "merged", False)
           else None)
    if args.backend == "openai":
        return label("openai", args.served_model, tag).replace("-+", "+")
    sampled = "sampled" if getattr(args, "release_sampling", False) else None  # the release's decoding
    return label(args.backend, args.model, f"+{os.path.basename(os.path.normpath(args.lora))}"
                 if args.lora else tag, sampled).replace("-+", "+")


def backend_options(args, root: Optional[str], target: str, cache_dir: str) -> dict:
    """``build_client`` options for the chosen backend; errors name the missing flag (the
    simulated backend's attributes default to ROOT/TARGET/attributes.json)."""
    return client_options(args, os.path.join(root, target) if root else None, cache_dir)


def _prepare(args, default_out: str):
    """Shared set-up: run config, eval folder, model scorer, MLLM client, output folder."""
    if not os.path.isdir(args.run):
        raise SystemExit(f"--run {args.run} is not a directory: pass a run written by train.py "
                         f"or test.py --weights")
    cfg = load_run_config(args.run)
    target = args.target or cfg.dataset_name
    root = args.root or cfg.get("root_dir")
    data = load_eval_dir(args.run, target, root, args.checkpoint)
    cache_dir = args.cache_dir or rd.mllm_cache_dir(args.run)
    options = backend_options(args, root, target, cache_dir)  # flag errors before any loading
    device = resolve_device(args.device)
    model, cfg = load_run(args.run, device, checkpoint=args.checkpoint)
    score = make_score_texts(model, data["gallery_feats"], cfg.text_length, device,
                             batch_size=args.batch_size, amp=resolve_amp(cfg.get("amp"), device))
    if getattr(args, "queries", None):
        data = apply_queries(data, args.queries, score)
        default_out = os.path.join(queries_subfolder(args.queries), default_out)
    client = build_client(args.backend, **options)
    out = args.out or rd.thi_dir(args.run, target, args.checkpoint, mllm_label(args),
                                 *([default_out] if default_out else []))
    return target, data, score, client, out


@cli_errors("python -m thi")
def main(argv: Optional[list] = None) -> int:
    """Entry point of ``python -m thi`` (and ``python -m thi sweep``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_ap, sweep_ap = build_parsers()
    is_sweep = bool(argv) and argv[0] == "sweep"
    args = (sweep_ap if is_sweep else run_ap).parse_args(argv[1:] if is_sweep else argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    check_tuning(args)
    target, data, score, client, out = _prepare(args, "sweep" if is_sweep else "")
    progress = not args.no_progress
    common = dict(rounds=args.rounds, q_pids=data["q_pids"], g_pids=data["g_pids"], out_dir=out,
                  temperature=args.temperature, max_tokens=args.max_tokens, progress=progress,
                  checkpoint=data["checkpoint"])
    try:
        with rd.folder_lock(out, "THI (python -m thi)"):
            rd.clean_temp_tree(out)
            _run(args, is_sweep, target, data, score, client, out, common)
    except SettingsChanged as refusal:  # a refusal, not a bug: the message alone, exit 2
        print(f"python -m thi: error: {refusal}", file=sys.stderr)
        return 2
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
    return 0


def _run(args, is_sweep: bool, target: str, data: dict, score, client, out: str, common: dict) -> None:
    """THI or the sweep, with the results folder locked."""
    if is_sweep:
        result = run_sweep(data["similarity"], data["captions"], data["image_paths"], client,
                           score, lams=parse_grid(args.lams, "--lams"),
                           xis=parse_grid(args.xis, "--xis"), **common)
        print(format_sweep(result))
        print(f"sweep saved to {os.path.join(out, rd.THI_SWEEP)} and sweep.csv")
    else:
        xi = args.xi if args.xi is not None else xi_for(target)
        result = run_thi(data["similarity"], data["captions"], data["image_paths"], client,
                         score, lam=args.lam, xi=xi, ask=args.ask, one_at=args.eq6_one_at, **common)
        if result.rounds and result.rounds[-1].get("metrics"):
            if tuning_note(args):
                print(tuning_note(args))
            print(rounds_table(result.base_metrics, result.rounds))
        print(f"THI results in {out}: rounds.json/csv, final_similarity.npy, rankings.npy, "
              f"queries.jsonl, cost.json, thi.log")
        for line in result.warnings:
            print(f"WARNING: {line}")
