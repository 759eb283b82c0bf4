"""THI cost on SynthPEDES with the simulated MLLM: MLLM calls per query of three schedules that
give the same anchors, and THI's own overhead per query without the MLLM's time.

* ours ("needed"): only queries that can still get an anchor are asked each round;
* the release ("unrefined"): every query without a refined text, every round;
* naive ("all"): all K candidates of every query.

    python scripts/bench_thi.py                        # generated SynthPEDES, model-free similarity
    python scripts/bench_thi.py --num-ids 1000 --error-rate 0.1
    python scripts/bench_thi.py --run work/runs/demo_synthpedes --root work/data   # a trained run

Without ``--run`` the base similarity is model-free (``offline.synthetic.AttributeSimilarity``:
attribute overlap, scaled, plus noise), so nothing needs training. Each schedule gets a fresh
client without a cache, so every request is a real (simulated) MLLM call.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from thi.defaults import LAMBDA, ROUNDS, XI  # noqa: E402  (needs ROOT on the path)

SCHEMES = (("ours", "needed"), ("release", "unrefined"), ("naive", "all"))


class TimedClient:
    """Times the wrapped client's generate() (the MLLM's share of the wall time)."""

    def __init__(self, client):
        self.client, self.seconds = client, 0.0

    @property
    def stats(self):
        return self.client.stats

    def generate(self, requests, **kw):
        t0 = time.perf_counter()
        try:
            return self.client.generate(requests, **kw)
        finally:
            self.seconds += time.perf_counter() - t0


class TimedScorer:
    """Times the text scorer (the retrieval model's share of the wall time)."""

    def __init__(self, score):
        self.score, self.seconds = score, 0.0

    def __call__(self, texts):
        t0 = time.perf_counter()
        try:
            return self.score(texts)
        finally:
            self.seconds += time.perf_counter() - t0


def _inputs(args):
    """(similarity, captions, image_paths, q_pids, g_pids, score_texts, attributes dir, source)."""
    if args.run:
        from model import load_run
        from thi.cli import load_eval_dir
        from thi.scoring import make_score_texts
        from utils.device import resolve_device

        data = load_eval_dir(args.run, args.target, args.root)
        device = resolve_device(args.device)
        model, cfg = load_run(args.run, device)
        score = make_score_texts(model, data["gallery_feats"], cfg.text_length, device)
        attributes = args.attributes or os.path.join(args.root or cfg.root_dir, args.target)
        return (data["similarity"], data["captions"], data["image_paths"], data["q_pids"],
                data["g_pids"], score, attributes, f"run {args.run}")
    from datasets import build_dataset
    from offline.synthpedes import generate
    from offline.synthetic import AttributeSimilarity

    root = args.root or tempfile.mkdtemp(prefix="bench_thi_")
    synth = os.path.join(root, "SynthPEDES")
    if not os.path.isfile(os.path.join(synth, "reid_raw.json")):
        generate(synth, num_ids=args.num_ids, images_per_id=args.images_per_id, seed=args.seed)
    test = build_dataset("SynthPEDES", root).test
    score = AttributeSimilarity(synth, test["img_paths"], scale=args.scale, noise=args.noise,
                                seed=args.seed)
    return (score(test["captions"]), test["captions"], test["img_paths"], test["caption_pids"],
            test["image_pids"], score, synth,
            f"model-free similarity (scale {args.scale}, noise {args.noise})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-ids", type=int, default=400, help="SynthPEDES identities (30%% test)")
    ap.add_argument("--images-per-id", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.45)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--run", help="use this run's eval folder and model instead")
    ap.add_argument("--target", default="SynthPEDES")
    ap.add_argument("--root", help="data root (default: a temporary folder)")
    ap.add_argument("--attributes", help="attributes.json for the simulated MLLM (with --run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--error-rate", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--lam", type=float, default=LAMBDA)
    ap.add_argument("--xi", type=float, default=XI)
    args = ap.parse_args(argv)

    import numpy as np
    from prettytable import PrettyTable

    from thi import run_thi
    from utils.mllm import build_client

    sim, captions, images, q_pids, g_pids, score, attributes, source = _inputs(args)
    num_q = len(captions)
    print(f"THI cost on SynthPEDES: {num_q} queries, {len(images)} gallery images, K={args.rounds},"
          f" lambda={args.lam}, xi={args.xi}, MLLM error rate {args.error_rate}; base: {source}")

    def run(ask, with_ids=True):
        client = TimedClient(build_client("simulated", attributes=attributes,
                                          error_rate=args.error_rate, seed=args.seed))
        scorer = TimedScorer(score)
        t0 = time.perf_counter()
        res = run_thi(sim, captions, images, client, scorer, lam=args.lam, xi=args.xi,
                      rounds=args.rounds, q_pids=q_pids if with_ids else None,
                      g_pids=g_pids if with_ids else None, progress=False, ask=ask)
        wall = time.perf_counter() - t0
        return res, wall, client.seconds, scorer.seconds

    # Warm-up (imports, first-call allocations) on a few queries, so no schedule pays for it.
    warm = build_client("simulated", attributes=attributes, seed=args.seed)
    run_thi(sim[:16], captions[:16], images, warm, score, rounds=args.rounds, q_pids=q_pids[:16],
            g_pids=g_pids, progress=False)

    table = PrettyTable(["schedule", "loc", "vqa", "aggr", "calls/query", "loc/query",
                         "same anchors", "R1", "mAP", "total ms/q", "MLLM ms/q", "scorer ms/q",
                         "THI overhead ms/q"])
    ref = None
    for name, ask in SCHEMES:
        res, wall, mllm, scorer = run(ask)
        ref = res if ref is None else ref
        calls = res.cost["calls_total"]
        final = res.rounds[-1]["metrics"]
        table.add_row([f"{name} ({ask})", calls["loc"], calls["vqa"], calls["aggr"],
                       f"{calls['all'] / num_q:.2f}", f"{calls['loc'] / num_q:.2f}",
                       "yes" if np.array_equal(res.anchors, ref.anchors) else "NO",
                       f"{final['R1']:.2f}", f"{final['mAP']:.2f}",
                       f"{1e3 * wall / num_q:.3f}", f"{1e3 * mllm / num_q:.3f}",
                       f"{1e3 * scorer / num_q:.3f}",
                       f"{1e3 * (wall - mllm - scorer) / num_q:.3f}"])
    base = ref.base_metrics
    print(f"base model: R1 {base['R1']:.2f}  mAP {base['mAP']:.2f}; anchored "
          f"{int((ref.anchors >= 0).sum())}/{num_q}, refined "
          f"{sum(t is not None for t in ref.refined)}")
    print(table.get_string())
    res, wall, mllm, scorer = run("needed", with_ids=False)
    print(f"ours without per-round metrics (no ids): THI overhead "
          f"{1e3 * (wall - mllm - scorer) / num_q:.3f} ms/query (MLLM {1e3 * mllm / num_q:.3f}, "
          f"scorer {1e3 * scorer / num_q:.3f} ms/query)")
    print("overhead = wall time - MLLM client time - text scorer time: gating, prompts, parsing, "
          "Eq. 6 and (in the table) the per-round metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
