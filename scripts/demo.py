"""The embedded default, end to end on CPU in a few minutes:

1. generate the SynthPEDES benchmark (CUHK-PEDES format + attribute sidecar) under work/data,
2. write a tiny random CLIP in OpenAI's checkpoint layout (no download),
3. train RDE on it (configs/synthpedes_tiny.yaml) and evaluate the best epoch (test.py),
4. run THI with the simulated MLLM and print the per-round table.

    python scripts/demo.py [--work work] [--epochs 12] [key=value config overrides]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def thi_command(run_dir: str, target: str, data_root: str, attributes: str, xi: float,
                progress: bool) -> list[str]:
    """The demo's ``python -m thi`` command. Its xi is the demo's own, so it writes its own
    folder (``RUN/thi/TARGET/demo``): the commands of docs/THI.md, with the paper's xi, then
    run after it instead of meeting a folder of other settings."""
    cmd = [sys.executable, "-m", "thi", "--run", run_dir, "--target", target, "--root", data_root,
           "--backend", "simulated", "--attributes", attributes, "--xi", f"{xi:.4f}",
           "--out", os.path.join(run_dir, "thi", target, "demo")]
    return cmd if progress else cmd + ["--no-progress"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work", help="folder for data, the tiny CLIP and runs")
    ap.add_argument("--num-ids", type=int, default=300, help="SynthPEDES identities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-thi", action="store_true")
    ap.add_argument("--no-progress", action="store_true", help="logs only, no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/synthpedes_tiny.yaml")
    args = ap.parse_args(argv)
    os.chdir(ROOT)

    from datasets.synthpedes import generate
    from model.tiny_clip import write_random_clip
    from processor.evaluate import evaluate_run
    from processor.trainer import train
    from utils.config import load_config

    data_root = os.path.join(args.work, "data")
    synth = os.path.join(data_root, "SynthPEDES")
    if not os.path.isfile(os.path.join(synth, "reid_raw.json")):
        print(f"[demo] generating SynthPEDES ({args.num_ids} identities) in {synth}")
        generate(synth, num_ids=args.num_ids, images_per_id=2, seed=args.seed)
    clip_path = os.path.join(args.work, "pretrained", "tiny_clip.pt")
    if not os.path.isfile(clip_path):
        print(f"[demo] writing a tiny random CLIP to {clip_path}")
        os.makedirs(os.path.dirname(clip_path), exist_ok=True)
        write_random_clip(clip_path)

    cfg = load_config("configs/synthpedes_tiny.yaml",
                      [f"root_dir={data_root}", f"output_dir={os.path.join(args.work, 'runs')}",
                       f"pretrain_choice={clip_path}", "resume=true", *args.overrides])
    run_dir = os.path.join(cfg.output_dir, cfg.name)
    print(f"[demo] training {run_dir}")
    progress = not args.no_progress
    train(cfg, run_dir, progress=progress)
    eval_dir = os.path.join(run_dir, "eval", cfg.dataset_name)
    if not os.path.isfile(os.path.join(eval_dir, "similarity.npy")):
        print("[demo] evaluating the best checkpoint (python test.py)")
        evaluate_run(run_dir, progress=progress)
    if not args.skip_thi:
        import numpy as np

        # The paper's xi (0.5) is on the scale of a fine-tuned CLIP's similarities; a tiny model's
        # scale differs, so the demo gates at the median top-1 similarity of its own base ranking.
        xi = float(np.median(np.load(os.path.join(eval_dir, "similarity.npy")).max(axis=1)))
        print(f"[demo] xi = {xi:.3f} (median top-1 base similarity)")
        print("[demo] THI with the simulated MLLM (python -m thi)")
        cmd = thi_command(run_dir, cfg.dataset_name, data_root, synth, xi, progress)
        print("[demo] " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
