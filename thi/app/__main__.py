"""``python -m thi.app``: serve the interactive search page over a trained run.

    python -m thi.app --run work/runs/demo_synthpedes --root work/data --dataset SynthPEDES \
        --backend simulated --port 7860
    python -m thi.app --run runs/ICL_CUHK-PEDES_n0.0 --root data --dataset CUHK-PEDES \
        --backend openai --base-url http://localhost:8000/v1 --served-model icl

Then open http://127.0.0.1:7860/ (the JSON API is described at /api/docs). The gallery is the
dataset's test split: its features come from RUN/eval/DATASET/ (``python test.py``) when
present, else they are computed once at start-up. ``--backend none`` serves without an MLLM
(search only: confirming a candidate needs the MLLM's description of it).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..defaults import LAMBDA


def build_parser() -> argparse.ArgumentParser:
    from ..cli import BACKENDS, _common

    ap = argparse.ArgumentParser(prog="python -m thi.app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ap)  # the same run, backend and device flags as `python -m thi`
    ap.add_argument("--dataset", dest="target", help="gallery dataset (same as --target; default: "
                                                     "the run's own)")
    for action in ap._actions:  # one more backend choice: no MLLM at all
        if action.dest == "backend":
            action.choices = (*BACKENDS, "none")
    ap.add_argument("--lam", type=float, default=LAMBDA, help=f"Eq. 6's lambda (paper: {LAMBDA})")
    ap.add_argument("--image-weight", type=float, default=0.5,
                    help="default weight of the image similarity for text + image queries")
    ap.add_argument("--top-k", type=int, default=20, help="results shown per page")
    ap.add_argument("--max-sessions", type=int, default=64,
                    help="sessions kept in memory (least recently used dropped first)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.logger import setup_logger

    from . import create_app
    from .launch import serve
    from .loader import build_engine

    logger = setup_logger("ICL")
    engine = build_engine(args)
    logger.info("serving %d gallery images of %s (%s) on http://%s:%d/", engine.num_gallery,
                engine.info["dataset"], engine.info["gallery_source"], args.host, args.port)
    try:
        serve(create_app(engine), args.host, args.port)
    finally:
        close = getattr(engine.client, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
