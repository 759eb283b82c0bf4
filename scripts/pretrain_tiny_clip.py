"""Pre-train the tiny CLIP on SynthPEDES-pretrain and write it in OpenAI's checkpoint layout.

    python scripts/pretrain_tiny_clip.py --out work/pretrained/tiny_clip_synthpretrain.pt

The corpus (``offline/synth_pretrain.py``) is drawn from another distribution than the
SynthPEDES benchmark (other identities and clothing mixes, richer and differently worded
captions); the training is CLIP's (``offline/pretrain.py``). Skips when ``--out`` exists
(``--force`` to redo); a killed run resumes from ``<out>.state``. Deterministic for a given
``--seed`` and ``--threads`` (torch's intra-op thread count changes float summation order, so
another thread count gives slightly different weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.determinism import DEFAULT_THREADS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from offline.pretrain import PretrainSettings

    d = PretrainSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="work/pretrained/tiny_clip_synthpretrain.pt")
    ap.add_argument("--num-images", type=int, default=2500, help="corpus size (one identity per image)")
    ap.add_argument("--heldout", type=int, default=300, help="corpus pairs kept out to report Rank-1")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--width", type=int, default=d.vision_width, help="vision and text width (multiple of 64)")
    ap.add_argument("--layers", type=int, default=d.vision_layers, help="vision and text layers")
    ap.add_argument("--embed-dim", type=int, default=d.embed_dim)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch/BLAS threads (pinned: results depend on it)")
    ap.add_argument("--force", action="store_true", help="pre-train even when --out exists")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.isfile(args.out) and not args.force:
        print(f"[pretrain] {args.out} exists, skipping (--force to pre-train again)")
        return 0
    from utils.determinism import machine_description, pin_threads

    pin_threads(args.threads)
    from offline.synth_pretrain import generate_corpus
    from offline.pretrain import PretrainSettings, pretrain_clip

    settings = PretrainSettings(embed_dim=args.embed_dim, vision_width=args.width, vision_layers=args.layers,
                                text_width=args.width, text_layers=args.layers, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"[pretrain] {args.threads} torch threads on {machine_description()}")
    start = time.time()
    corpus = generate_corpus(args.num_images, seed=args.seed, image_size=settings.image_size,
                             progress=not args.no_progress)
    print(f"[pretrain] corpus: {len(corpus)} images x {len(corpus.captions[0])} captions "
          f"({time.time() - start:.0f}s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pretrain_clip(corpus.images, corpus.captions, args.out, settings, heldout=args.heldout,
                  progress=not args.no_progress)
    print(f"[pretrain] done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
