"""Measure the release switches of docs/DEVIATIONS.md on SynthPEDES, side by side.

    .venv/bin/python scripts/measure_switches.py --out work/measure_switches [--epochs 5] [--seeds 0]

A tiny random CLIP is first warm-started on clean pairs (InfoNCE, 30 epochs, as the demo: the
role CLIP's pre-training plays for the paper), then fine-tuned on SynthPEDES with 40% of the
captions shuffled (noisy_rate 0.4, image and token augmentation on) under each combination of
``train_mode`` (train | release_icl) and ``ccd_loss_pass`` (eval_transform | train_loader).
Printed per variant: CCD's precision and recall at finding the shuffled pairs (mean over epochs
and last epoch) and the final test R1 / mAP. One thread, fixed seeds: the numbers repeat.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _cfg(**items):
    from utils.config import load_config

    return load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="work/measure_switches")
    ap.add_argument("--epochs", type=int, default=5, help="noisy fine-tuning epochs per variant")
    ap.add_argument("--warm-epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the noisy runs")
    ap.add_argument("--noisy-rate", type=float, default=0.4)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from offline.synthpedes import generate
    from offline.tiny_clip import write_random_clip
    from processor.trainer import train

    out = os.path.abspath(args.out)
    data, clip = os.path.join(out, "data"), os.path.join(out, "tiny_clip.pt")
    if not os.path.isfile(os.path.join(data, "SynthPEDES", "reid_raw.json")):
        generate(os.path.join(data, "SynthPEDES"), num_ids=300, images_per_id=2, seed=0)
    if not os.path.isfile(clip):
        write_random_clip(clip)
    common = dict(dataset_name="SynthPEDES", root_dir=data, output_dir=out, pretrain_choice=clip,
                  img_size=[64, 32], tse_embed_dim=64, batch_size=32, test_batch_size=128, num_workers=0,
                  adam_eps=1e-8, lr_factor=2.0, log_period=1000, device="cpu", save_eval=False)
    warm = os.path.join(out, "warm")
    if not os.path.isfile(os.path.join(warm, "best.pth")):
        print(f"warm start: InfoNCE on clean pairs, {args.warm_epochs} epochs", flush=True)
        train(_cfg(**common, loss_names="InfoNCE", temperature=0.07, ccd=False, lr=2e-3, img_aug=False,
                   txt_aug=False, num_epoch=args.warm_epochs, warmup_epochs=1, eval_period=args.warm_epochs,
                   seed=0), warm, progress=False)

    rows = []
    for seed, mode, ccd_pass in itertools.product([int(s) for s in args.seeds.split(",")],
                                                  ("train", "release_icl"), ("eval_transform", "train_loader")):
        name = f"{mode}_{ccd_pass}_s{seed}"
        run = os.path.join(out, name)
        result = os.path.join(run, "metrics.json")
        if not os.path.isfile(result) or json.load(open(result))["epochs"][-1]["epoch"] < args.epochs:
            print(f"run {name}", flush=True)
            train(_cfg(**common, loss_names="InfoNCE", temperature=0.07, lr=1e-4, warmup_epochs=0,
                       num_epoch=args.epochs, eval_period=args.epochs, img_aug=True, txt_aug=True,
                       noisy_rate=args.noisy_rate, noisy_file=os.path.join(out, f"noise_{args.noisy_rate}.npy"), noise_draw=True,
                       init_checkpoint=os.path.join(warm, "best.pth"), train_mode=mode, ccd_loss_pass=ccd_pass,
                       seed=seed), run, progress=False)
        epochs = json.load(open(result))["epochs"]
        last = epochs[-1]
        rows.append({"train_mode": mode, "ccd_loss_pass": ccd_pass, "seed": seed,
                     "precision_mean": sum(e["noisy_precision"] for e in epochs) / len(epochs),
                     "recall_mean": sum(e["noisy_recall"] for e in epochs) / len(epochs),
                     "precision_last": last["noisy_precision"], "recall_last": last["noisy_recall"],
                     "R1": last["metrics"]["t2i"]["R1"], "mAP": last["metrics"]["t2i"]["mAP"]})
    from utils.io import atomic_write_json
    atomic_write_json(os.path.join(out, "summary.json"), rows)
    print(f"\nSynthPEDES, noisy_rate {args.noisy_rate}, {args.epochs} epochs from the warm start "
          "(CCD precision/recall: mean over epochs / last epoch)")
    print("| train_mode | ccd_loss_pass | seed | CCD precision | CCD recall | R1 | mAP |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['train_mode']} | {r['ccd_loss_pass']} | {r['seed']} | {r['precision_mean']:.3f} / "
              f"{r['precision_last']:.3f} | {r['recall_mean']:.3f} / {r['recall_last']:.3f} | {r['R1']:.2f} | "
              f"{r['mAP']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
