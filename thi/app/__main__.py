"""``python -m thi.app``: serve the interactive search page over a trained run.

    python -m thi.app --run work/runs/demo_synthpedes --root work/data --dataset SynthPEDES \
        --backend simulated --port 7860
    python -m thi.app --run runs/ICL_CUHK-PEDES_n0.0 --root data --dataset CUHK-PEDES \
        --backend openai --base-url http://localhost:8000/v1 --served-model icl

Then open http://127.0.0.1:7860/ (the JSON API is described at /api/docs). The gallery is the
dataset's test split: its features come from RUN/eval/DATASET/ (``python test.py``) when
present, else they are computed once at start-up. ``--backend none`` serves without an MLLM
(search only: confirming a candidate needs the MLLM's description of it).

Bound to a loopback address (the default) the page answers only to loopback Host names.
With ``--host 0.0.0.0`` (or any non-loopback address) it warns, and requires an access token:
``--token``, or one generated and printed at start-up.
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
    for action in ap._actions:
        if action.dest == "backend":  # one more backend choice: no MLLM at all
            action.choices = (*BACKENDS, "none")
        if action.dest == "rounds":  # the page's meaning of K: answers per search
            action.default = 100
            action.help = ("answers per search session (then a new search starts over; "
                           "default 100)")
    ap.add_argument("--lam", type=float, default=LAMBDA, help=f"Eq. 6's lambda (paper: {LAMBDA})")
    ap.add_argument("--image-weight", type=float, default=0.5,
                    help="default weight of the image similarity for text + image queries")
    ap.add_argument("--top-k", type=int, default=20, help="results shown per page")
    ap.add_argument("--max-sessions", type=int, default=64,
                    help="sessions kept in memory (least recently used dropped first)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default loopback; beyond it a token is required)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--token", help="access token the page and the API require (default: none "
                                    "on loopback; generated and printed beyond it)")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="one more Host name the server answers to (repeatable), e.g. the "
                         "machine's name behind a reverse proxy")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.logger import setup_logger

    from . import create_app
    from .launch import serve
    from .loader import build_engine

    from ..cli import check_tuning, tuning_note
    from .access import plan_access

    logger = setup_logger("ICL")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    policy = plan_access(args.host, args.token, args.allow_host)  # flag errors before loading
    check_tuning(args)
    engine = build_engine(args)
    if tuning_note(args):  # --lora / --merged / --no-lora: shown on the page as in THI's table
        engine.info["mllm_tuning"] = tuning_note(args)
        logger.info("%s", tuning_note(args))
    logger.info("serving %d gallery images of %s (%s) on http://%s:%d/", engine.num_gallery,
                engine.info["dataset"], engine.info["gallery_source"], args.host, args.port)
    for note in policy.notes:
        logger.warning("%s", note)
    if policy.token is not None:
        logger.warning("open http://%s:%d/?token=%s", "127.0.0.1" if args.host in
                       ("0.0.0.0", "::") else args.host, args.port, policy.token)
    try:
        serve(create_app(engine, policy=policy), args.host, args.port)
    finally:
        close = getattr(engine.client, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
