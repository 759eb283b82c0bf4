"""Peak GPU memory per device of a paper config: training (weights, gradients, Adam, DDP
buckets, activations saved for backward), the CCD pass, evaluation and THI's scorer.

    python scripts/memory_plan.py --config configs/icl_cuhk_pedes.yaml --batch 64 --gpus 1 --memory 24GiB
    python scripts/memory_plan.py --config configs/*.yaml --precision release_fp16

Activations are measured on CPU at full size (ViT-B/16, the config's image size and text
length) by counting the bytes autograd saves for backward at two batch sizes; the measurement is
cached in docs/memory/measured.json (``--measure`` redoes it, about a minute per geometry on
2 cores). Method and limits: docs/MEMORY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processor.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT, GiB, PRECISIONS, geometry,  # noqa: E402
                              largest_batch, measure, parse_bytes, plan)
from utils.config import load_config  # noqa: E402

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "memory", "measured.json")
# Test splits (gallery images, text queries): the IRRA splits; UFine6926's are not in the
# releases, CUHK-PEDES's are assumed (as repro/worlds.py does).
TEST_SIZES = {"CUHK-PEDES": (3074, 6156), "ICFG-PEDES": (19848, 19848), "RSTPReid": (1000, 2000)}
PRECISION_HELP = {"fp32": "fp32 parameters, no autocast", "fp16": "fp32 parameters + fp16 autocast (ours)",
                  "bf16": "fp32 parameters + bf16 autocast (ours; amp=auto on a 3090)",
                  "release_fp16": "the releases' convert_weights: fp16 parameters, no autocast"}


def load_cache(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_measurement(cfg, path: str, remeasure: bool, log=print) -> dict:
    """The cached measurement of ``cfg``'s geometry, measured (and cached) when missing."""
    from utils.io import atomic_write_json

    entries = load_cache(path)
    geo = geometry(cfg)
    for entry in entries:
        if entry["geometry"] == geo and not remeasure:
            return entry
    log(f"measuring {json.dumps(geo)} at full size on CPU (about a minute) ...")
    entry = measure(cfg, log=log)
    entries = [e for e in entries if e["geometry"] != geo] + [entry]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, entries)
    return entry


def gib(x: float) -> str:
    return f"{x / GiB:6.2f} GiB"


def report(config: str, args, log=print) -> bool:
    """Print the plan of one config; True when training fits ``--memory``."""
    cfg = load_config(config)
    meas = cached_measurement(cfg, args.cache, args.measure, log)
    batch = args.batch or cfg.batch_size
    memory = parse_bytes(args.memory)
    gallery, queries = TEST_SIZES.get(cfg.dataset_name, TEST_SIZES["CUHK-PEDES"])
    p = plan(meas, cfg, batch, args.gpus, args.precision, eval_gallery=gallery, eval_queries=queries)
    s = p["state"]
    log(f"\n{config}: {cfg.dataset_name}, ViT-B/16 at {cfg.img_size[0]}x{cfg.img_size[1]}, "
        f"{cfg.text_length} tokens{', RDA view' if meas['geometry']['rda_view'] else ''}; "
        f"batch {batch} on {args.gpus} GPU(s) = {p['per_gpu_batch']} per GPU; "
        f"{args.precision} ({PRECISION_HELP[args.precision]})")
    rows = [("weights", s.weights), ("gradients", s.gradients), ("Adam moments", s.adam),
            ("DDP gradient buckets", s.ddp_buckets),
            (f"activations saved for backward ({p['per_gpu_batch']}/GPU)", p["activations"]),
            ("forward temporaries", p["transient"])]
    for name, value in rows:
        log(f"  {name:<44} {gib(value)}")
    log(f"  {'training peak':<44} {gib(p['train'])}   (x{1 + ALLOCATOR_SLACK:.2f} allocator slack "
        f"+ {CUDA_CONTEXT / GiB:.1f} GiB CUDA context)")
    log(f"  {'CCD pass peak':<44} {gib(p['ccd'])}")
    log(f"  {f'evaluation peak ({gallery:,} images x {queries:,} queries)':<44} {gib(p['eval'])}")
    log(f"  {'THI scorer peak (separate process)':<44} {gib(p['thi'])}")
    fits = p["peak"] <= memory
    largest = largest_batch(meas, cfg, args.gpus, args.precision, memory)
    log(f"  verdict: {'fits' if fits else 'does NOT fit'} in {args.memory} per GPU "
        f"(peak {p['peak'] / GiB:.2f} GiB); largest batch that fits: {largest} "
        f"({largest // args.gpus} per GPU)")
    if args.precision != "release_fp16":
        rel = plan(meas, cfg, batch, args.gpus, "release_fp16", eval_gallery=gallery, eval_queries=queries)
        rel_largest = largest_batch(meas, cfg, args.gpus, "release_fp16", memory)
        log(f"  vs the releases' fp16 weights: training peak {gib(rel['train']).strip()}, so fp32 master "
            f"weights + autocast cost {(p['train'] - rel['train']) / GiB:+.2f} GiB at this batch; "
            f"largest batch there {rel_largest}")
    return fits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", required=True, help="one or more configs (configs/*.yaml)")
    ap.add_argument("--batch", type=int, help="global batch size (default: the config's batch_size)")
    ap.add_argument("--gpus", type=int, default=1, help="processes/GPUs sharing the batch (DDP)")
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS,
                    help="; ".join(f"{k}: {v}" for k, v in PRECISION_HELP.items()))
    ap.add_argument("--memory", default="24GiB", help="memory per GPU, e.g. 24GiB (RTX 3090), 80GiB")
    ap.add_argument("--measure", action="store_true", help="measure again instead of using the cache")
    ap.add_argument("--cache", default=CACHE, help=f"measurement cache (default {CACHE})")
    args = ap.parse_args(argv)
    if args.gpus < 1:
        ap.error("--gpus must be >= 1")
    fits = [report(config, args) for config in args.config]
    return 0 if all(fits) else 1


if __name__ == "__main__":
    sys.exit(main())
