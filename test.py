"""Evaluate a run directory (text-to-image Rank-1/5/10, mAP, mINP) and write its eval folder.

    python test.py runs/RDE_cuhk                          # on the run's own dataset
    python test.py runs/RDE_cuhk --dataset ICFG-PEDES     # cross-domain target
    python test.py runs/rde_release --weights best.pth --config configs/rde_cuhk_pedes.yaml
        # a checkpoint of the RDE or IRRA release (or any {'model': state_dict}) becomes a run dir
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from utils.errors import cli_errors


@cli_errors("test.py")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="run directory written by train.py (or to create with --weights)")
    ap.add_argument("--dataset", help="target dataset (default: the run's own)")
    ap.add_argument("--root", help="data root (default: the run's root_dir)")
    ap.add_argument("--checkpoint", default="best.pth", help="checkpoint file inside the run directory")
    ap.add_argument("--weights", help="an external checkpoint (RDE/IRRA release) to evaluate; needs --config")
    ap.add_argument("--config", help="config for --weights (img_size, stride_size, text_length, ...)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for --weights")
    args = ap.parse_intermixed_args(argv)  # flags and key=value overrides in any order

    from processor.evaluate import evaluate_run
    from utils.logger import setup_logger

    if args.weights:
        from utils.config import load_config, save_config
        trained = [f for f in ("last.pth", "metrics.json") if os.path.exists(os.path.join(args.run_dir, f))]
        if trained:  # config.yaml and best.pth of a training run would be overwritten
            ap.error(f"{args.run_dir} holds a run trained by train.py ({', '.join(trained)}); --weights would "
                     "overwrite its config.yaml and best.pth. Pass a new folder for the external checkpoint")
        cfg = load_config(args.config, args.overrides)
        os.makedirs(args.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(args.run_dir, "config.yaml"))
        target = os.path.join(args.run_dir, args.checkpoint)
        if os.path.abspath(args.weights) != os.path.abspath(target):
            shutil.copyfile(args.weights, target)
    from utils.run_dir import RunDirError, require_run_dir
    try:  # before the log file: nothing is written into a folder that is not a run
        require_run_dir(args.run_dir, args.checkpoint)
    except RunDirError as err:
        ap.error(str(err))
    setup_logger("ICL", os.path.join(args.run_dir, "test.log"))
    evaluate_run(args.run_dir, dataset=args.dataset, root=args.root, checkpoint=args.checkpoint,
                 device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                 progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
