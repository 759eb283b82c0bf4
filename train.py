"""Train RDE / ICL (RDE + RDA) on one benchmark.

    python train.py --config configs/icl_cuhk_pedes.yaml root_dir=data anno_file=data/CUHK-PEDES/reid_raw.rda.json
    torchrun --nproc_per_node 2 train.py --config configs/rde_cuhk_pedes.yaml  # RDE, two GPUs
"""
from __future__ import annotations

import argparse
import sys

from utils.config import load_config
from utils.errors import cli_errors


@cli_errors("train.py")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML under configs/ (defaults: utils/config.py)")
    ap.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    ap.add_argument("overrides", nargs="*", help="key=value settings that override the config")
    args = ap.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    from datasets.noise import NoiseFileError
    from utils.run_dir import RunDirError
    try:
        cfg = load_config(args.config, args.overrides)  # types checked here, before anything is written
    except (ValueError, KeyError, FileNotFoundError) as err:  # ConfigError is a ValueError
        ap.error(str(err).strip('"'))
    from processor.trainer import train
    try:
        train(cfg, args.run_dir, progress=not args.no_progress)
    except (RunDirError, NoiseFileError) as err:  # a refusal with its fix: no traceback
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
