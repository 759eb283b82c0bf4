"""The embedded default, end to end on CPU:

1. generate the SynthPEDES benchmark (CUHK-PEDES format + attribute sidecar) under work/data,
2. pre-train the tiny CLIP CLIP-style on SynthPEDES-pretrain, a corpus from another
   distribution (scripts/pretrain_tiny_clip.py; OpenAI's checkpoint layout, no download),
3. fine-tune RDE from it with the paper's settings (TAL, tau 0.015, CCD;
   configs/synthpedes_mini.yaml) and evaluate the best epoch (test.py),
4. choose xi the paper's way: from the top-1 similarity histograms of correct vs wrong
   retrievals (Fig. 3), here on the val split (thi/threshold.py),
5. run THI with the simulated MLLM at that xi and print the per-round table.

Torch's thread count is pinned (``--threads``, default 1): CPU results are bit-identical run to
run for a given seed and thread count, but another count sums floats in another order and the
trained model drifts. The demo prints the count and the machine next to its numbers.

    python scripts/demo.py [--work work] [--threads 1] [key=value overrides of configs/synthpedes_mini.yaml]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import run_dir as rd  # noqa: E402
from utils.determinism import DEFAULT_THREADS  # noqa: E402


def thi_command(run_dir: str, target: str, data_root: str, attributes: str, xi: float,
                progress: bool) -> list[str]:
    """The demo's ``python -m thi`` command. Its xi is the demo's own, so it writes its own
    folder (``RUN/thi/TARGET/best/demo``): the commands of docs/THI.md, with the default xi (the release script's), then
    run after it instead of meeting a folder of other settings."""
    cmd = [sys.executable, "-m", "thi", "--run", run_dir, "--target", target, "--root", data_root,
           "--backend", "simulated", "--attributes", attributes, "--xi", f"{xi:.4f}",
           "--out", rd.thi_dir(run_dir, target, rd.BEST, "demo")]
    return cmd if progress else cmd + ["--no-progress"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work", help="folder for data, the tiny CLIP and runs")
    ap.add_argument("--num-ids", type=int, default=300, help="SynthPEDES identities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch/BLAS threads (pinned: the numbers depend on it)")
    ap.add_argument("--skip-thi", action="store_true")
    ap.add_argument("--no-progress", action="store_true", help="logs only, no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/synthpedes_mini.yaml")
    args = ap.parse_args(argv)
    os.chdir(ROOT)

    from utils.determinism import machine_description, pin_threads

    pin_threads(args.threads)
    print(f"[demo] {args.threads} torch threads (pinned) on {machine_description()}")

    from offline.synthpedes import generate
    from processor.evaluate import evaluate_run
    from processor.trainer import train
    from utils.config import load_config

    progress = not args.no_progress
    data_root = os.path.join(args.work, "data")
    synth = os.path.join(data_root, "SynthPEDES")
    if not os.path.isfile(os.path.join(synth, "reid_raw.json")):
        print(f"[demo] generating SynthPEDES ({args.num_ids} identities) in {synth}")
        generate(synth, num_ids=args.num_ids, images_per_id=2, seed=args.seed)
    clip_path = os.path.join(args.work, "pretrained", "tiny_clip_synthpretrain.pt")
    pretrain = [sys.executable, os.path.join("scripts", "pretrain_tiny_clip.py"), "--out", clip_path,
                "--threads", str(args.threads)] + ([] if progress else ["--no-progress"])
    print("[demo] " + " ".join(pretrain))
    subprocess.run(pretrain, check=True)   # skips when the checkpoint exists

    cfg = load_config("configs/synthpedes_mini.yaml",
                      ["name=demo_synthpedes", f"root_dir={data_root}", f"output_dir={os.path.join(args.work, 'runs')}",
                       f"pretrain_choice={clip_path}", f"seed={args.seed}", "resume=true", *args.overrides])
    run_dir = rd.default_run_dir(cfg)
    print(f"[demo] fine-tuning {run_dir} (TAL, tau {cfg.tau}, CCD {'on' if cfg.ccd else 'off'})")
    train(cfg, run_dir, progress=progress)
    if not rd.eval_complete(run_dir, cfg.dataset_name):
        print("[demo] evaluating the best checkpoint (python test.py)")
        evaluate_run(run_dir, progress=progress)
    if not args.skip_thi:
        # xi the paper's way (Fig. 3): correct retrievals have higher top-1 similarities than
        # wrong ones; xi is where their histograms cross. Read on val, so test stays unseen.
        from thi.threshold import xi_from_split

        xi, stats = xi_from_split(run_dir, "val", progress=progress)
        print(f"[demo] xi = {xi:.4f}: where the val top-1 similarity histograms of correct "
              f"({stats['correct']}/{stats['queries']}, mean {stats['mean_top1_correct']:.3f}) and wrong "
              f"(mean {stats['mean_top1_wrong']:.3f}) retrievals cross")
        print("[demo] THI with the simulated MLLM (python -m thi)")
        cmd = thi_command(run_dir, cfg.dataset_name, data_root, synth, xi, progress)
        print("[demo] " + " ".join(cmd))
        subprocess.run(cmd, check=True)   # inherits the pinned OMP_NUM_THREADS
    print(f"[demo] measured with {args.threads} torch threads on {machine_description()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
