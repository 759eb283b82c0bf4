"""``python -m rda generate ...`` (RDA annotation file) and ``python -m rda sft ...`` (LLaMA-Factory
anchor-localization dataset from a trained run). ``--help`` on each lists the options."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from utils import run_dir as rd
from utils.errors import cli_errors
from utils.mllm.cli_options import client_options

from datasets import build_dataset
from utils.mllm import build_client
from .generate import default_paths, run_rda
import numpy as np
from .run_data import load_run_inputs
from .sft import make_anchor_sft, write_llamafactory_dataset
from utils.io import atomic_write_json

from utils.io import read_json

BACKENDS = ("vllm", "openai", "transformers", "simulated")

# SFT records per class ("Yes" and "No" each) when --positives/--negatives are not given. The
# paper: 40,000 for CUHK-PEDES, 15,000 for ICFG-PEDES, RSTPReid and UFine6926 (read here as per
# class). SynthPEDES is the tiny test benchmark: its whole pool.
SFT_DEFAULTS = {"CUHK-PEDES": 40000, "ICFG-PEDES": 15000, "RSTPReid": 15000, "UFine6926": 15000}


def _client_args(ap: argparse.ArgumentParser) -> None:
    """MLLM options (the same flag names as ``python -m thi``)."""
    ap.add_argument("--backend", required=True, choices=BACKENDS, help="MLLM backend")
    ap.add_argument("--model", help="MLLM directory (vllm, transformers), e.g. Qwen2-VL-7B-Instruct")
    ap.add_argument("--lora", help="LoRA adapter directory (vllm, transformers)")
    ap.add_argument("--dtype", help="vllm/transformers weight dtype (default float32 without a "
                                    "CUDA GPU, else the backend's)")
    ap.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    ap.add_argument("--served-model", help="model name on the server (openai backend)")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="openai backend: requests in flight (the server batches them)")
    ap.add_argument("--micro-batch", type=int, help="requests per MLLM call, cached before the "
                    "next (default: the backend's; openai caches each answer as it arrives)")
    ap.add_argument("--no-retry-unusable", action="store_true",
                    help="reuse cached empty or unparseable answers instead of asking again")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs for vLLM")
    ap.add_argument("--attributes", help="simulated backend: SynthPEDES attributes.json "
                                         "(default ROOT/DATASET/attributes.json)")
    ap.add_argument("--error-rate", type=float, default=0.0, help="simulated backend: error rate")
    ap.add_argument("--seed", type=int, default=0, help="simulated backend: error seed")
    ap.add_argument("--mllm-profile", help="simulated backend: per-stage error profile (a name "
                                           "or k=v pairs, see python -m thi --help)")
    ap.add_argument("--aggregation", choices=("keep", "concise"), default="keep",
                    help="simulated backend: aggregation keeps every new answer, or stays "
                         "within --text-length CLIP tokens (the prompt's 'concise')")
    ap.add_argument("--text-length", type=int, default=77,
                    help="simulated backend, --aggregation concise: the token budget")
    ap.add_argument("--cache-dir", help="MLLM response cache (default: next to --out)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rda", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="RDA: add diversity_captions to a dataset's annotations")
    gen.add_argument("--dataset", required=True, help="CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926 "
                                                      "or SynthPEDES")
    gen.add_argument("--root", required=True, help="data root holding DATASET/")
    gen.add_argument("--anno-file", help="annotation file to augment (default: the dataset's own)")
    gen.add_argument("--out", help="output annotation file (default: <annotation>.rda.json "
                                   "beside the input)")
    gen.add_argument("--rewrites", type=int, default=3, help="m, rewrites per sub-sentence")
    gen.add_argument("--limit", type=int, help="only the first N training pairs (whole images)")
    gen.add_argument("--temperature", type=float, default=0.01)
    gen.add_argument("--release-sampling", action="store_true",
                     help="vllm/transformers: sample at --temperature (the release's vLLM setting) "
                          "instead of decoding greedily below 0.05")
    gen.add_argument("--max-tokens", type=int, default=1024)
    gen.add_argument("--chunk-size", type=int, default=4096,
                     help="requests per MLLM batch; the resume state is saved after each")
    gen.add_argument("--no-progress", action="store_true")
    _client_args(gen)

    sft = sub.add_parser("sft", help="anchor-localization SFT data (LLaMA-Factory) from a run")
    sft.add_argument("--run", required=True, help="run directory (config.yaml, best.pth, ccd/)")
    sft.add_argument("--root", help="data root (default: the run's root_dir)")
    sft.add_argument("--dataset", help="dataset (default: the run's own)")
    sft.add_argument("--anno-file", help="annotation file (default: the run's)")
    sft.add_argument("--out", required=True, help="output folder (dataset_info.json + NAME.json)")
    sft.add_argument("--name", default="icl_anchor", help="dataset name in dataset_info.json")
    sft.add_argument("--positives", type=int, help="'Yes' records (default per dataset: "
                     + ", ".join(f"{k} {v}" for k, v in SFT_DEFAULTS.items()) + "; else all)")
    sft.add_argument("--negatives", type=int, help="'No' records (default as --positives)")
    sft.add_argument("--top-k", type=int, default=10, help="hard negatives come from this top-k")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--no-ccd", action="store_true", help="ignore CCD's clean labels")
    sft.add_argument("--relative-images", action="store_true",
                     help="write image paths relative to --out (default absolute)")
    sft.add_argument("--checkpoint", default=rd.BEST)
    sft.add_argument("--device", default="auto")
    sft.add_argument("--batch-size", type=int, default=128, help="feature extraction batch size")
    sft.add_argument("--no-progress", action="store_true")
    return ap


def run_generate(args) -> int:
    dataset = build_dataset(args.dataset, args.root, args.anno_file, check_images=False)
    records = read_json(dataset.anno_path)  # validated by build_dataset just above
    out = args.out or os.path.splitext(str(dataset.anno_path))[0] + ".rda.json"
    if os.path.abspath(out) == os.path.abspath(str(dataset.anno_path)):
        raise SystemExit(f"--out {out} is the input annotation file; choose another path")
    state_dir = default_paths(out)[0]
    cache_dir = args.cache_dir or state_dir + "/mllm_cache"
    # One generation per state folder: a second one would send every request again. A busy
    # folder (FolderBusyError) is reported by cli_errors as one message, exit 2, before the
    # client (and its cache folder) exists.
    with rd.folder_lock(state_dir, "RDA generation (python -m rda generate)"):
        rd.clean_temp_tree(state_dir)
        client = build_client(args.backend, **client_options(args, str(dataset.dataset_dir), cache_dir))
        try:
            _, summary = run_rda(records, client, image_root=str(dataset.img_dir),
                                 rewrites=args.rewrites, out_path=out, limit=args.limit,
                                 temperature=args.temperature, max_tokens=args.max_tokens,
                                 chunk_size=args.chunk_size, progress=not args.no_progress)
        finally:
            client.close()
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} (train with anno_file={out} rda=true)")
    return 0


def _count(value: Optional[int], default: Optional[int], pool: int, what: str) -> int:
    """An explicit count is used as given (too large -> make_anchor_sft says so); a default is
    capped at the available pool with a warning."""
    if value is not None:
        return value
    if default is None or default > pool:
        if default is not None:
            logging.getLogger("rda").warning("default %s %d exceeds the %d available; using %d",
                                             what, default, pool, pool)
        return pool
    return default


def run_sft(args) -> int:
    inputs = load_run_inputs(args.run, root=args.root, dataset_name=args.dataset,
                             anno_file=args.anno_file, device=args.device,
                             checkpoint=args.checkpoint, top_k=args.top_k,
                             batch_size=args.batch_size, use_ccd=not args.no_ccd,
                             progress=not args.no_progress)
    p = inputs.pairs
    name = args.dataset or inputs.cfg.dataset_name
    eligible = np.arange(len(p.captions)) if inputs.clean is None else np.flatnonzero(inputs.clean)
    neg_pool = int(sum((p.image_pids[inputs.top_indices[c]] != p.caption_pids[c]).any()
                       for c in eligible))
    default = SFT_DEFAULTS.get(name)
    positives = _count(args.positives, default, len(eligible), "positives")
    negatives = _count(args.negatives, default if args.positives is None else args.positives,
                       neg_pool, "negatives")
    records = make_anchor_sft(p.captions, p.caption_pids, p.caption_images, p.image_paths,
                              p.image_pids, None, clean=inputs.clean, positives=positives,
                              negatives=negatives, top_k=args.top_k, seed=args.seed,
                              top_indices=inputs.top_indices)
    path = write_llamafactory_dataset(records, args.out, args.name,
                                      relative_images=args.relative_images)
    info = {"dataset": name, "run": os.path.abspath(args.run), "ccd_file": inputs.ccd_file,
            "pairs": len(p.captions), "clean_pairs": int(len(eligible)), "positives": positives,
            "negatives": negatives, "top_k": args.top_k, "seed": args.seed, "file": path}
    atomic_write_json(os.path.join(args.out, f"{args.name}.meta.json"), info)
    print(json.dumps(info, indent=2))
    print(f"train with: bash scripts/sft_lora.sh train MODEL_DIR {args.out} ADAPTER_DIR "
          f"dataset={args.name}")
    return 0


@cli_errors("python -m rda")
def main(argv: Optional[list] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The openai SDK's HTTP client logs every request at INFO: thousands of lines per stage.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return run_generate(args) if args.command == "generate" else run_sft(args)


if __name__ == "__main__":
    sys.exit(main())
