"""Test-time human-centred interaction (THI, Algorithm 1 of ICL) on a base similarity matrix.

Each round r = 1..K: (1) anchor localization, asked in one batch, on candidate r of the
queries that can still get an anchor (see ``gating``); (2) human-centred VQA, once per new
anchor, on the anchor image; (3) aggregation of the parsed answers with the original query into
the refined query; (4) Eq. 6 re-ranking of the new refined queries (``rerank``). With an output
folder the state is saved after every stage, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.io import atomic_save_npy, atomic_write_json
from utils.mllm.identity import identity_info
from utils.mllm.parsing import parse_vqa, parse_yes_no
# The stage requests and answer rules live with the MLLM client; re-exported for THI's callers.
from utils.mllm.stages import (StageRunner, aggr_request, clean_aggregation, loc_request,
                               report_unusable, usable, vqa_request)

from . import defaults, gating, report
from .rerank import check_lambda, rerank_rows
from .state import THIState, fingerprint, load_similarity, load_state, save_state

__all__ = ["THIResult", "aggr_request", "ask_one", "clean_aggregation", "loc_request",
           "refine_query", "run_thi", "vqa_request"]

TOP_K_SAVED = defaults.TOP_K_SAVED


@dataclass
class THIResult:
    """What THI produced.

    ``similarity``: the final re-ranked [Q, G] matrix, a float32 numpy array (rows of queries
    without a refined text equal the base similarity). ``anchors``: int64 [Q], the anchor's
    gallery index or -1. ``anchor_round``: int64 [Q], the 1-based round of the anchor or 0.
    ``refined``: the refined text per query or None (no anchor, or the VQA/aggregation answer
    was unusable: such a query keeps its anchor in ``anchors`` but its base similarity).
    ``rounds``: per round ``round``, ``calls`` / ``uncached`` / ``parse_failures`` per stage
    (``loc``, ``vqa``, ``aggr``), ``asked``, ``new_anchors``, ``seconds``, ``mllm_seconds`` and,
    with ids, ``metrics`` (R1, R5, R10, mAP, mINP, rSum). ``base_metrics`` likewise or None.
    ``cost``: the cost report (see ``report.cost_report``). ``warnings``: stages whose answers
    were mostly unparseable, one line each (also in ``cost.json`` and the log).
    """

    similarity: np.ndarray
    anchors: np.ndarray
    refined: list
    rounds: list
    anchor_round: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    base_metrics: Optional[dict] = None
    cost: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def _as_matrix(similarity) -> np.ndarray:
    if hasattr(similarity, "detach"):  # a torch tensor, on any device
        similarity = similarity.detach().float().cpu().numpy()
    sim = np.asarray(similarity, dtype=np.float32)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a [Q, G] matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains NaN or inf; check the run's similarity.npy")
    return sim


def _client_stats(client) -> dict:
    stats = getattr(client, "stats", None)
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return dict(stats)
    return {k: getattr(stats, k) for k in ("calls", "requests", "cache_hits", "cache_misses")
            if hasattr(stats, k)}


def ask_one(client, stage: str, request, *, temperature: float = 0.01,
            max_tokens: int = 512) -> str:
    """One request of ``stage`` (loc, vqa, aggr) through the shared stage runner, cached only
    when usable, as ``run_thi``'s stages are."""
    return StageRunner(client, temperature=temperature, max_tokens=max_tokens).ask_one(stage,
                                                                                       request)


def refine_query(client, caption: str, anchor_image, *, temperature: float = 0.01,
                 max_tokens: int = 512) -> tuple[list, str]:
    """Steps 2 and 3 for one query whose anchor is known: ``(subtexts, refined text)``.

    The same requests and answer rules as ``run_thi``; an unusable VQA answer gives ``([], "")``
    (no aggregation asked), an unusable aggregation answer ``(subtexts, "")``.
    """
    runner = StageRunner(client, temperature=temperature, max_tokens=max_tokens)
    answer = runner.ask_one("vqa", vqa_request(anchor_image))
    if not usable("vqa", answer):
        return [], ""
    subtexts = parse_vqa(answer)
    answer = runner.ask_one("aggr", aggr_request(caption, subtexts))
    return subtexts, clean_aggregation(answer) if usable("aggr", answer) else ""


def _new_record(round_no: int) -> dict:
    zero = {s: 0 for s in report.STAGE_NAMES}
    return {"round": round_no, "asked": 0, "new_anchors": 0, "calls": dict(zero),
            "uncached": dict(zero), "parse_failures": dict(zero), "seconds": 0.0,
            "mllm_seconds": 0.0}


def _check_inputs(sim, captions, image_paths, rounds, xi, q_pids, g_pids):
    num_q, num_g = sim.shape
    if len(captions) != num_q:
        raise ValueError(f"captions has {len(captions)} entries but similarity has {num_q} rows")
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ValueError(f"{len(empty)} of {num_q} queries have an empty caption (first: query "
                         f"{empty[0]}); THI needs a text to ask about and to refine: fix the "
                         f"annotation file and evaluate again")
    if len(image_paths) != num_g:
        raise ValueError(f"image_paths has {len(image_paths)} entries but similarity has "
                         f"{num_g} columns")
    if not 1 <= int(rounds) <= num_g:
        raise ValueError(f"rounds (--rounds, K) must be in [1, G={num_g}], got {rounds}")
    if not np.isfinite(float(xi)):
        raise ValueError(f"xi (--xi) must be a finite number, got {xi}")
    if (q_pids is None) != (g_pids is None):
        raise ValueError("pass both q_pids and g_pids (for per-round metrics) or neither")
    if q_pids is not None and (len(q_pids) != num_q or len(g_pids) != num_g):
        raise ValueError(f"q_pids/g_pids have {len(q_pids)}/{len(g_pids)} entries, expected "
                         f"{num_q}/{num_g}")


def _score(score_texts: Callable, texts: list, num_g: int) -> np.ndarray:
    rows = score_texts(texts)
    if hasattr(rows, "detach"):
        rows = rows.detach().float().cpu().numpy()
    rows = np.asarray(rows, dtype=np.float32)
    if rows.shape != (len(texts), num_g):
        raise ValueError(f"score_texts returned shape {rows.shape} for {len(texts)} texts, "
                         f"expected ({len(texts)}, {num_g})")
    return rows


# Where Eq. 6 puts S_bar = 1: the anchor (both codebases) or the base top-1 (the paper's Eq. 6).
ONE_AT = ("anchor", "top1")


class _Interaction:
    """The stages of Algorithm 1 for one run, on its state (saved after every stage)."""

    def __init__(self, *, state: THIState, sim_base: np.ndarray, sim: np.ndarray, captions,
                 image_paths, client, score_texts, lam: float, xi: float, rounds: int,
                 ask: str, temperature: float, max_tokens: int, out_dir: Optional[str],
                 metrics: Optional[Callable], logger, one_at: str = "anchor"):
        self.state, self.sim_base, self.sim = state, sim_base, sim
        self.captions, self.image_paths = captions, image_paths
        self.client, self.score_texts = client, score_texts
        self.lam, self.xi, self.rounds, self.ask_scheme = lam, xi, rounds, ask
        self.one_at = one_at
        self.temperature, self.max_tokens = temperature, max_tokens
        self.out_dir, self.metrics, self.logger = out_dir, metrics, logger
        self.cands, self.top1 = gating.candidates(sim_base, rounds)
        self.anchors = np.asarray(state.anchors, dtype=np.int64)
        self.said_yes = np.asarray(state.said_yes, dtype=bool)

    def checkpoint(self, next_stage: str, similarity: Optional[np.ndarray] = None) -> None:
        self.state.anchors, self.state.said_yes = self.anchors.tolist(), self.said_yes.tolist()
        self.state.stage = next_stage
        if self.out_dir:
            save_state(self.out_dir, self.state, similarity)

    def run_round(self, r: int) -> None:
        """Round ``r`` (0-based) from the stage the state names to the end."""
        if not self.state.current:
            self.state.current = _new_record(r + 1)
        for name, step, next_stage in (("loc", self.localize, "vqa"), ("vqa", self.vqa, "aggr"),
                                       ("aggr", self.aggregate, "rerank")):
            if self.state.stage == name:
                t0 = time.perf_counter()
                step(r)
                self.state.current["seconds"] += time.perf_counter() - t0
                self.checkpoint(next_stage)
        if self.state.stage == "rerank":
            self.rerank(r)

    def ask(self, r: int, stage: str, requests: list, consequence: str) -> list:
        """``stage``'s requests as one batch through the stage runner: the round's record books
        requests, uncached requests, unusable answers and MLLM seconds; unusable answers are
        reported (the banner, kept for the summary, when most are)."""
        runner = StageRunner(self.client, temperature=self.temperature,
                             max_tokens=self.max_tokens)
        answers = runner.ask(stage, requests) if requests else []
        counts, rec = runner.counts[stage], self.state.current
        rec["calls"][stage] += counts.asked
        rec["uncached"][stage] += counts.uncached
        rec["parse_failures"][stage] += counts.unusable
        rec["mllm_seconds"] += counts.seconds
        bad = [a for a in answers if not usable(stage, a)]
        banner = report_unusable(self.logger, f"round {r + 1}, {stage}", len(bad), len(answers),
                                 consequence, first=bad[0] if bad else None)
        if banner:
            rec.setdefault("warnings", []).append(banner)
        return answers

    def localize(self, r: int) -> None:
        """Step 1: ask candidate r of the queries the schedule picks; gate new anchors."""
        st, rec = self.state, self.state.current
        asked = np.flatnonzero(gating.ask_mask(self.ask_scheme, r, self.rounds, self.top1,
                                               self.xi, self.anchors, self.said_yes))
        reqs = [loc_request(self.captions[q], self.image_paths[self.cands[q, r]]) for q in asked]
        answers = self.ask(r, "loc", reqs, "they count as 'No'")
        yes = np.array([parse_yes_no(a) is True for a in answers], dtype=bool)
        new = asked[gating.decide(r, yes, self.top1[asked], self.xi, self.anchors[asked],
                                  self.said_yes[asked])]
        self.said_yes[asked] |= yes
        self.anchors[new] = self.cands[new, r]
        for q in new:
            st.anchor_round[q] = r + 1
        for q in asked:
            st.asked_ever[q] = True
        rec["asked"], rec["new_anchors"] = int(len(asked)), int(len(new))
        st.pending = [int(q) for q in new]

    def vqa(self, r: int) -> None:
        """Step 2: the 15 questions on each new anchor image, parsed into sub-sentences; a query
        whose answer is unusable keeps its base similarity."""
        st = self.state
        reqs = [vqa_request(self.image_paths[self.anchors[q]]) for q in st.pending]
        answers = self.ask(r, "vqa", reqs, "those queries keep their base similarity")
        kept = [q for q, a in zip(st.pending, answers) if usable("vqa", a)]
        for q, a in zip(st.pending, answers):
            if usable("vqa", a):
                st.subtexts[str(q)] = parse_vqa(a)
        st.pending = kept

    def aggregate(self, r: int) -> None:
        """Step 3: original query + sub-sentences -> the refined query."""
        st = self.state
        reqs = [aggr_request(self.captions[q], st.subtexts[str(q)]) for q in st.pending]
        answers = self.ask(r, "aggr", reqs, "those queries keep their base similarity")
        kept = []
        for q, a in zip(st.pending, answers):
            if usable("aggr", a):
                st.refined[q] = clean_aggregation(a)
                kept.append(q)
        st.pending = kept

    def rerank(self, r: int) -> None:
        """Step 4: Eq. 6 for this round's refined queries, metrics, the round's report."""
        st, rec = self.state, self.state.current
        t0 = time.perf_counter()
        idx = np.asarray(st.pending, dtype=np.int64)
        if idx.size:
            rows = _score(self.score_texts, [st.refined[q] for q in idx], self.sim.shape[1])
            ones = self.anchors[idx] if self.one_at == "anchor" else self.cands[idx, 0]
            self.sim[idx] = rerank_rows(self.sim_base[idx], rows, ones, self.lam)
        rec["anchored_total"] = int((self.anchors >= 0).sum())
        rec["refined_total"] = int(sum(t is not None for t in st.refined))
        if self.metrics is not None:
            rec["metrics"] = self.metrics(self.sim)
        rec["seconds"] += time.perf_counter() - t0
        previous = st.records[-1].get("metrics") if st.records else st.base_metrics
        st.records.append(rec)
        st.current, st.pending, st.round = {}, [], r + 1
        self.checkpoint("loc", self.sim)
        _log_round(self.logger, rec, st.base_metrics, previous)


def _log_round(logger, rec: dict, base_metrics: Optional[dict], previous: Optional[dict]) -> None:
    """The round's log line and, with metrics, its table against the base and last round."""
    logger.info(
        "round %d: asked %d, new anchors %d (total %d), refined %d, MLLM requests "
        "loc/vqa/aggr %d/%d/%d (uncached %d), parse failures %s, %.1fs", rec["round"],
        rec["asked"], rec["new_anchors"], rec["anchored_total"], rec["refined_total"],
        rec["calls"]["loc"], rec["calls"]["vqa"], rec["calls"]["aggr"],
        sum(rec["uncached"].values()), rec["parse_failures"], rec["seconds"])
    if rec.get("metrics") is not None:
        logger.info("\n%s", report.round_table(rec["round"], base_metrics, previous,
                                                rec["metrics"]))


def run_thi(similarity, captions: Sequence[str], image_paths: Sequence[str], client,
            score_texts: Callable[[list], "np.ndarray"], *, lam: float = defaults.LAMBDA,
            xi: float = defaults.XI, rounds: int = defaults.ROUNDS, q_pids=None, g_pids=None,
            out_dir: Optional[str] = None, temperature: float = 0.01, max_tokens: int = 2048,
            progress: bool = True, ask: str = "needed", one_at: str = "anchor") -> THIResult:
    """Run THI (Algorithm 1 + Eq. 6) and return the re-ranked similarity, anchors and texts.

    ``similarity``: base [Q, G] (tensor or array); ``captions``: the Q queries;
    ``image_paths``: the G gallery images; ``client``: anything with the MLLM client's
    ``generate(requests, temperature=, max_tokens=)``; ``score_texts(texts) -> [n, G]``: the
    model's similarity of new query texts to the gallery. ``q_pids``/``g_pids`` enable
    per-round metrics. ``out_dir`` enables outputs and resuming. ``progress``: progress bar and
    log on the console. ``ask`` picks which queries are asked the localization question
    (``gating.ASK_SCHEMES``; all give the same anchors). ``one_at``: where Eq. 6 sets the refined
    similarity to 1: ``anchor`` (both codebases) or ``top1`` (the paper's Eq. 6 as printed: the
    query's top-1 image of the base ranking).
    """
    sim_base = _as_matrix(similarity)
    captions = [str(c) for c in captions]
    image_paths = [os.fspath(p) for p in image_paths]
    lam, xi, rounds = check_lambda(lam), float(xi), int(rounds)
    _check_inputs(sim_base, captions, image_paths, rounds, xi, q_pids, g_pids)
    if ask not in gating.ASK_SCHEMES:
        raise ValueError(f"ask must be one of {gating.ASK_SCHEMES}, got {ask!r}")
    if one_at not in ONE_AT:
        raise ValueError(f"one_at must be one of {ONE_AT}, got {one_at!r}")
    metrics = _metrics_fn(q_pids, g_pids)
    # The MLLM's identity belongs to the results: another model never gets this folder's results.
    fp = fingerprint(sim_base, captions, image_paths, lam=lam, xi=xi, rounds=rounds, ask=ask,
                     temperature=float(temperature), max_tokens=int(max_tokens),
                     mllm=identity_info(client), **({} if one_at == "anchor" else {"one_at": one_at}))
    state = None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        state = load_state(out_dir, fp)
    logger = report.make_logger(os.path.join(out_dir, "thi.log") if out_dir else None,
                                console=progress)
    try:
        state = _start_state(state, fp, sim_base.shape[0], rounds, out_dir, logger)
        cost_file = os.path.join(out_dir, "cost.json") if out_dir else ""
        finished_before = state.finished(rounds) and os.path.isfile(cost_file)
        sim = load_similarity(out_dir, state, sim_base) if out_dir else sim_base.copy()
        if metrics is not None and state.base_metrics is None:
            state.base_metrics = metrics(sim_base)
        logger.info("THI: %d queries, %d gallery images, K=%d, lambda=%g, xi=%g, ask=%s",
                    sim_base.shape[0], sim_base.shape[1], rounds, lam, xi, ask)
        run = _Interaction(state=state, sim_base=sim_base, sim=sim, captions=captions,
                           image_paths=image_paths, client=client, score_texts=score_texts,
                           lam=lam, xi=xi, rounds=rounds, ask=ask, temperature=temperature,
                           max_tokens=max_tokens, out_dir=out_dir, metrics=metrics,
                           logger=logger, one_at=one_at)
        _run_rounds(run, rounds, progress, logger)
        cost = None
        if finished_before:  # keep the finished run's own report (client counters included)
            with open(cost_file, encoding="utf-8") as f:
                cost = json.load(f)
        result = _result(run, client, cost)
        if out_dir and not finished_before:
            _write_outputs(out_dir, state, result, captions, image_paths, run.cands, run.top1)
        _log_done(logger, run, result)
        return result
    finally:
        report.close_logger(logger)


def _metrics_fn(q_pids, g_pids) -> Optional[Callable]:
    """Per-round metrics (R1, R5, R10, mAP, mINP, rSum) with ids, else None."""
    if q_pids is None:
        return None
    from utils.metrics import t2i_metrics  # torch: only for runs with ids

    q_pids, g_pids = np.asarray(q_pids, dtype=np.int64), np.asarray(g_pids, dtype=np.int64)

    def metrics(s):
        return report.with_rsum(t2i_metrics(s, q_pids, g_pids))
    return metrics


def _start_state(state: Optional[THIState], fp: dict, num_q: int, rounds: int,
                 out_dir: Optional[str], logger) -> THIState:
    """A fresh state (claiming ``out_dir`` for these inputs at once) or the resumed one."""
    if state is None:
        state = THIState.fresh(fp, num_q)
        if out_dir:
            save_state(out_dir, state)
    elif state.finished(rounds):
        logger.info("%s holds a finished THI run; returning its results", out_dir)
    else:
        logger.info("resuming %s at round %d, stage %s", out_dir, state.round + 1, state.stage)
    return state


def _run_rounds(run: _Interaction, rounds: int, progress: bool, logger) -> None:
    """The remaining rounds under a progress bar (log lines go through tqdm.write so they do
    not break it)."""
    with logging_redirect_tqdm(loggers=[logger]) if progress else nullcontext():
        with tqdm(total=rounds, initial=run.state.round, desc="THI rounds",
                  disable=not progress) as bar:
            for r in range(run.state.round, rounds):
                run.run_round(r)
                bar.update(1)


def _result(run: _Interaction, client, cost: Optional[dict]) -> THIResult:
    """The run's result; ``cost``: a finished run's saved report, else built from the records."""
    state = run.state
    interacted = int(sum(state.asked_ever))
    if cost is None:
        cost = report.cost_report(state.records, len(state.refined), interacted,
                                  _client_stats(client))
    warnings = [w for rec in state.records for w in rec.get("warnings", [])]
    cost.setdefault("warnings", warnings)
    return THIResult(similarity=run.sim, anchors=run.anchors.copy(), refined=list(state.refined),
                     rounds=list(state.records),
                     anchor_round=np.asarray(state.anchor_round, dtype=np.int64),
                     base_metrics=state.base_metrics, cost=cost, warnings=warnings)


def _log_done(logger, run: _Interaction, result: THIResult) -> None:
    logger.info("THI done: %d/%d queries interacted, %d anchored, %d refined, %.2f MLLM "
                "requests per query", int(sum(run.state.asked_ever)), len(result.refined),
                int((run.anchors >= 0).sum()), sum(t is not None for t in result.refined),
                result.cost["calls_per_query"])
    if result.warnings:
        logger.warning("THI finished WITH %d WARNING(S): stages with mostly unusable "
                       "answers; the metrics above do not show what the model can do:\n%s",
                       len(result.warnings), "\n".join(result.warnings))


def _write_outputs(out_dir: str, state: THIState, result: THIResult, captions, image_paths,
                   cands: np.ndarray, top1: np.ndarray) -> None:
    """Final similarity, top-10 rankings, per-query records, per-round metrics and the cost
    report; the state then points at final_similarity.npy (the run is complete)."""
    from utils.metrics import topk  # torch

    atomic_save_npy(os.path.join(out_dir, "final_similarity.npy"), result.similarity)
    k = min(TOP_K_SAVED, result.similarity.shape[1])
    atomic_save_npy(os.path.join(out_dir, "rankings.npy"), topk(result.similarity, k)[1].numpy())
    rows = []
    for q, caption in enumerate(captions):
        a = int(result.anchors[q])
        rows.append({"query": q, "caption": caption, "anchor": a if a >= 0 else None,
                     "anchor_image": image_paths[a] if a >= 0 else None,
                     "anchor_round": int(result.anchor_round[q]) or None,
                     "refined": result.refined[q], "subtexts": state.subtexts.get(str(q)),
                     "top1_similarity": float(top1[q]), "candidates": cands[q].tolist()})
    report.write_queries(out_dir, rows)
    report.write_rounds(out_dir, result.base_metrics, result.rounds)
    atomic_write_json(os.path.join(out_dir, "cost.json"), result.cost)
    if state.similarity_file != "final_similarity.npy":
        old = state.similarity_file
        state.similarity_file = "final_similarity.npy"
        save_state(out_dir, state)
        if old:
            try:
                os.remove(os.path.join(out_dir, old))
            except FileNotFoundError:
                pass
