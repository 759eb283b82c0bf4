"""Reading what train.py / test.py / python -m thi wrote (the run-directory contract of
docs/ARCHITECTURE.md); nothing here computes a model output."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np

from datasets.bases import draw_rda_caption
from thi.threshold import choose_xi
from utils import run_dir as rd
from utils.tokenizer import get_tokenizer

from .stats import per_query

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


_FIX = "run the job that writes it (python -m repro ... without --dry-run), or check the run directory"


def _json(path: str):
    return rd.read_json(path, _FIX)


def training_done(run_dir: str) -> bool:
    """True when train.py finished every epoch of the run's config and evaluated the best one."""
    if not os.path.isfile(rd.metrics_path(run_dir)) or not os.path.isfile(rd.config_path(run_dir)):
        return False
    cfg = rd.read_saved_config(run_dir)
    epochs = rd.read_metrics(run_dir).get("epochs", [])
    if not epochs or int(epochs[-1]["epoch"]) < int(cfg.get("num_epoch", 0)):
        return False
    return rd.eval_complete(run_dir, str(cfg.get("dataset_name")))


def eval_metrics(run_dir: str, target: str, checkpoint: str = rd.BEST) -> dict:
    """R1..mINP of the checkpoint's evaluation on ``target`` (the model's retrieval similarity, t2i)."""
    m = rd.read_eval_metrics(run_dir, target, checkpoint)["t2i"]
    return {k: float(m[k]) for k in METRICS}


def best_and_last(run_dir: str) -> dict:
    """The RDE tables' "Best" (the epoch of the best test R1, as the releases select) and "Last"
    (the final epoch) metrics, from metrics.json."""
    data = rd.read_metrics(run_dir)
    evaluated = [e for e in data["epochs"] if e.get("metrics")]
    if not evaluated:
        raise ValueError(f"{rd.metrics_path(run_dir)} holds no evaluated epoch")
    best = max(evaluated, key=lambda e: e["metrics"]["t2i"]["R1"])
    last = evaluated[-1]
    pick = lambda e: {k: float(e["metrics"]["t2i"][k]) for k in METRICS}  # noqa: E731
    return {"best": pick(best), "last": pick(last), "best_epoch": int(best["epoch"]),
            "last_epoch": int(last["epoch"])}


def thi_rounds(thi_dir: str) -> dict:
    """``{"base": metrics, "rounds": [metrics after round 1..K]}`` of a THI results folder."""
    data = _json(os.path.join(thi_dir, rd.THI_ROUNDS))
    rounds = [r["metrics"] for r in data["rounds"] if r.get("metrics")]
    return {"base": data["base"], "rounds": rounds}


def thi_metrics(thi_dir: str) -> dict:
    """Metrics after the last THI round."""
    r = thi_rounds(thi_dir)
    last = r["rounds"][-1] if r["rounds"] else r["base"]
    return {k: float(last[k]) for k in METRICS}


def load_eval(run_dir: str, target: str, checkpoint: str = rd.BEST) -> dict:
    """Similarity, ids, captions and image paths of a checkpoint's evaluation."""
    return rd.read_eval(run_dir, target, checkpoint)


def top1_stats(similarity: np.ndarray, q_pids, g_pids) -> dict:
    """Top-1 similarity of every query and whether that top-1 image is a correct match
    (the data of the paper's Fig. 3)."""
    sim = np.asarray(similarity, dtype=np.float32)
    idx = sim.argmax(axis=1)
    top1 = sim[np.arange(sim.shape[0]), idx]
    correct = np.asarray(g_pids)[idx] == np.asarray(q_pids)
    return {"top1": top1, "correct": correct}


def xi_crossover(top1: np.ndarray, correct: np.ndarray) -> float:
    """The Fig. 3 threshold (where the correct and wrong top-1 histograms cross): THI's own rule,
    ``thi.threshold.choose_xi``, so the mini paper and the demo pick xi the same way."""
    return choose_xi(top1, correct)


def xi_of_run(run_dir: str, target: str) -> float:
    """xi chosen from the run's own Fig. 3 histograms (mini world)."""
    ev = load_eval(run_dir, target)
    st = top1_stats(ev["similarity"], ev["q_pids"], ev["g_pids"])
    return xi_crossover(st["top1"], st["correct"])


def sweep_grid(sweep_dir: str) -> dict:
    return _json(os.path.join(sweep_dir, rd.THI_SWEEP))


def first_correct_rank(similarity: np.ndarray, q_pids, g_pids) -> np.ndarray:
    """1-based rank of the first correct gallery image per query."""
    order = np.argsort(-np.asarray(similarity), axis=1, kind="stable")
    hits = np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None]
    return hits.argmax(axis=1) + 1


def maybe(fn, *args) -> Optional[dict]:
    """``fn(*args)`` or None when its files are missing (a table row not run yet)."""
    try:
        return fn(*args)
    except FileNotFoundError:
        return None


def eval_target(run_dir: str) -> str:
    """The dataset a training run evaluated itself on (its config's dataset_name)."""
    return str(rd.read_saved_config(run_dir).get("dataset_name"))


def eval_per_query(run_dir: str, target: str) -> dict:
    """Per-query R1..mINP values of the best checkpoint's evaluation (``repro.stats.per_query``)."""
    ev = load_eval(run_dir, target)
    return per_query(ev["similarity"], ev["q_pids"], ev["g_pids"])


def thi_per_query(run_dir: str, target: str, thi_dir: str) -> dict:
    """Per-query values after THI: its final similarity with the eval folder's identities."""
    ev = load_eval(run_dir, target)
    sim_path = os.path.join(thi_dir, rd.THI_FINAL_SIMILARITY)
    if not os.path.isfile(sim_path):
        raise FileNotFoundError(f"{sim_path} is missing: run the THI job that writes it")
    return per_query(rd.read_npy(sim_path, "run its THI job again (python -m repro ...)"),
                     ev["q_pids"], ev["g_pids"])


def token_lengths(rda_file: str, text_length: int = 77) -> dict:
    """CLIP-token lengths (start and end tokens included) of the original captions and of the
    RDA captions of an RDA annotation file: n, mean, median, p90, max, % over ``text_length``."""
    data = _json(rda_file)
    tok = get_tokenizer()
    rng = random.Random(0)
    orig, rda = [], []
    for rec in data:
        subs = rec.get("diversity_captions")
        if subs is None:
            continue
        orig += list(rec["captions"])
        rda += [draw_rda_caption(s, rng) for s in subs]  # as training draws one (seeded)

    def summary(texts):
        n = np.array([len(tok.encode(t)) + 2 for t in texts]) if texts else np.zeros(0)
        if n.size == 0:
            return {"n": 0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0, "over_pct": 0.0}
        return {"n": int(n.size), "mean": float(n.mean()), "median": float(np.median(n)),
                "p90": float(np.percentile(n, 90)), "max": int(n.max()),
                "over_pct": float(100.0 * (n > text_length).mean())}

    return {"original": summary(orig), "rda": summary(rda)}


def thi_records(thi_dir: str) -> list:
    """Every THI round's record (queries asked, new anchors, calls, metrics) from rounds.json."""
    return list(_json(os.path.join(thi_dir, rd.THI_ROUNDS))["rounds"])
