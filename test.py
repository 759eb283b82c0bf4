"""Evaluate a run directory (text-to-image Rank-1/5/10, mAP, mINP) and write each checkpoint's
evaluation (``RUN/eval/<dataset>/best/``, ``.../last/``).

    python test.py runs/RDE_cuhk                          # Best and Last (best.pth, last.pth), one table
    python test.py runs/RDE_cuhk --checkpoint best.pth    # one checkpoint
    python test.py runs/RDE_cuhk --dataset ICFG-PEDES     # cross-domain target
    python test.py logs/CUHK-PEDES/20241113_RDE_...       # a release's run folder (configs.yaml + best.pth)
    python test.py runs/rde_release --weights best.pth --config configs/rde_cuhk_pedes.yaml
        # a checkpoint of the RDE or IRRA release (or any {'model': state_dict}) becomes a run dir
"""
from __future__ import annotations

import argparse
import shutil
import sys

from utils import run_dir as rd
from utils.errors import cli_errors


@cli_errors("test.py")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="run directory written by train.py (or to create with --weights)")
    ap.add_argument("--dataset", help="target dataset (default: the run's own)")
    ap.add_argument("--root", help="data root (default: the run's root_dir)")
    ap.add_argument("--checkpoint", help=f"one checkpoint file inside the run directory (default: "
                                         f"{rd.BEST} and {rd.LAST}, the Best and Last rows)")
    ap.add_argument("--weights", help="an external checkpoint (RDE/IRRA release) to evaluate; needs --config")
    ap.add_argument("--config", help="config for --weights (img_size, stride_size, text_length, ...)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for --weights")
    args = ap.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    first = args.checkpoint or rd.BEST
    try:  # before the lock and the log file: nothing is written into a folder that is not a run
        if not args.weights:
            rd.require_run_dir(args.run_dir, first)
        else:  # the config is checked before the lock makes the folder: a bad one writes nothing
            from utils.config import load_config

            cfg = load_config(args.config, args.overrides)
        with rd.folder_lock(args.run_dir, "evaluation (test.py)"):
            if args.weights:
                _adopt_weights(ap, args, first, cfg)
            rd.require_run_dir(args.run_dir, first)
            return _evaluate(args)
    except rd.RunDirError as err:  # a refusal with its fix: no traceback
        ap.error(str(err))


def _adopt_weights(ap: argparse.ArgumentParser, args, checkpoint: str, cfg) -> None:
    """Make ``args.run_dir`` a run of the external checkpoint ``--weights`` (never over a trained run)."""
    import os

    trained = [f for f in (rd.LAST, rd.METRICS) if os.path.exists(os.path.join(args.run_dir, f))]
    if trained:  # config.yaml and best.pth of a training run would be overwritten
        ap.error(f"{args.run_dir} holds a run trained by train.py ({', '.join(trained)}); --weights would "
                 f"overwrite its {rd.CONFIG} and {rd.BEST}. Pass a new folder for the external checkpoint")
    rd.save_run_config(args.run_dir, cfg)
    target = rd.checkpoint_path(args.run_dir, checkpoint)
    if os.path.abspath(args.weights) != os.path.abspath(target):
        shutil.copyfile(args.weights, target)


def _evaluate(args) -> int:
    """Evaluate the chosen checkpoint(s) under the run's lock; print Best/Last in one table."""
    import logging
    import os

    from processor.evaluate import evaluate_run
    from utils.logger import setup_logger
    from utils.metrics import metrics_table

    removed = rd.clean_temp_files(args.run_dir, ("", rd.EVAL_DIR))
    logger = setup_logger("ICL", rd.log_path(args.run_dir, "test"))
    if removed:
        logger.info(f"removed {len(removed)} temp file(s) left by a killed write: {removed}")
    if args.checkpoint:
        checkpoints = [args.checkpoint]
    else:
        checkpoints = [c for c in (rd.BEST, rd.LAST) if os.path.isfile(rd.checkpoint_path(args.run_dir, c))]
    rows = []
    for ckpt in checkpoints:
        results = evaluate_run(args.run_dir, dataset=args.dataset, root=args.root, checkpoint=ckpt,
                               device=args.device, batch_size=args.batch_size,
                               num_workers=args.num_workers, progress=not args.no_progress)
        rows.append((rd.ROW_NAMES.get(ckpt, ckpt), results["t2i"]))
    logging.getLogger("ICL").info("\n" + metrics_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
