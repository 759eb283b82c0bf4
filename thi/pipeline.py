"""Test-time human-centred interaction (THI, Algorithm 1 of ICL) on a base similarity matrix.

Each round r = 1..K: (1) anchor localization, asked in one batch, on candidate r of the
queries that can still get an anchor (see ``gating``); (2) human-centred VQA, once per new
anchor, on the anchor image; (3) aggregation of the parsed answers with the original query into
the refined query; (4) Eq. 6 re-ranking of the new refined queries (``rerank``). With an output
folder the state is saved after every stage, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from . import gating, report
from .rerank import check_lambda, rerank_rows
from .state import THIState, fingerprint, load_similarity, load_state, save_state

TOP_K_SAVED = 10
# A stage whose answers are unparseable more often than this gets a loud warning (log, summary).
MOSTLY_UNPARSEABLE = 0.5
_OUTPUT_PREFIX = re.compile(r"^\s*(?:output|answer)\s*[:：]\s*", re.I)


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


def clean_aggregation(answer) -> str:
    """The refined query from an aggregation answer ("" when unusable)."""
    if not isinstance(answer, str):
        return ""
    text = _OUTPUT_PREFIX.sub("", answer.strip())
    return " ".join(text.split())


def _takes_accept(client) -> bool:
    """Whether ``client.generate`` takes ``accept=`` (our clients do; a bare stand-in may not)."""
    try:
        params = inspect.signature(client.generate).parameters
    except (TypeError, ValueError):
        return False
    return "accept" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _usable_loc(answer: str) -> bool:
    from utils.mllm.parsing import parse_yes_no
    return parse_yes_no(answer) is not None


def _usable_vqa(answer: str) -> bool:
    from utils.mllm.parsing import parse_vqa
    return bool(parse_vqa(answer))


def _usable_aggr(answer: str) -> bool:
    return bool(clean_aggregation(answer))


# What makes an answer of each stage usable: the rest is counted as a parse failure, returned
# for this run, not cached as an answer, and asked again by the next run.
USABLE = {"loc": _usable_loc, "vqa": _usable_vqa, "aggr": _usable_aggr}


def loc_request(caption: str, image):
    """Step 1's request: does ``caption`` describe ``image`` (a candidate's path)?"""
    from utils.mllm import Request
    from utils.mllm.prompts import loc_prompt

    return Request(loc_prompt(caption), image=image)


def vqa_request(image):
    """Step 2's request: the 15 human-centred questions on the anchor ``image``."""
    from utils.mllm import Request
    from utils.mllm.prompts import vqa_prompt

    return Request(vqa_prompt(), image=image)


def aggr_request(caption: str, subtexts: Sequence[str]):
    """Step 3's request: the original ``caption`` and the parsed VQA ``subtexts`` -> one query."""
    from utils.mllm import Request
    from utils.mllm.prompts import aggr_prompt

    return Request(aggr_prompt(caption, list(subtexts)))


def ask_one(client, stage: str, request, *, temperature: float = 0.01,
            max_tokens: int = 512) -> str:
    """One request of ``stage`` (loc, vqa, aggr), cached only when usable (``USABLE``), as
    ``run_thi``'s stages do."""
    extra = {"accept": USABLE[stage]} if _takes_accept(client) else {}
    return client.generate([request], temperature=temperature, max_tokens=max_tokens,
                           **extra)[0]


def refine_query(client, caption: str, anchor_image, *, temperature: float = 0.01,
                 max_tokens: int = 512) -> tuple[list, str]:
    """Steps 2 and 3 for one query whose anchor is known: ``(subtexts, refined text)``.

    The same requests and parsers as ``run_thi``; an unusable VQA answer gives ``([], "")``
    (no aggregation asked), an unusable aggregation answer ``(subtexts, "")``.
    """
    from utils.mllm.parsing import parse_vqa

    opts = {"temperature": temperature, "max_tokens": max_tokens}
    subtexts = parse_vqa(ask_one(client, "vqa", vqa_request(anchor_image), **opts))
    if not subtexts:
        return [], ""
    return subtexts, clean_aggregation(ask_one(client, "aggr", aggr_request(caption, subtexts),
                                               **opts))


class _Stage:
    """Sends one stage's requests as one batch and books calls, misses and MLLM time."""

    def __init__(self, client, record: dict, temperature: float, max_tokens: int):
        self.client, self.record = client, record
        self.temperature, self.max_tokens = temperature, max_tokens
        self.accept = _takes_accept(client)

    def ask(self, stage: str, requests: list) -> list:
        if not requests:
            return []
        before = _client_stats(self.client).get("cache_misses")
        t0 = time.perf_counter()
        extra = {"accept": USABLE[stage]} if self.accept else {}
        answers = list(self.client.generate(requests, temperature=self.temperature,
                                            max_tokens=self.max_tokens, **extra))
        self.record["mllm_seconds"] += time.perf_counter() - t0
        if len(answers) != len(requests):
            raise RuntimeError(f"the MLLM client returned {len(answers)} answers for "
                               f"{len(requests)} {stage} requests")
        after = _client_stats(self.client).get("cache_misses")
        self.record["calls"][stage] += len(requests)
        # Without cache counters every request is a real call.
        self.record["uncached"][stage] += (after - before) if before is not None else len(requests)
        return answers


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
        stage = _Stage(self.client, self.state.current, self.temperature, self.max_tokens)
        for name, step, next_stage in (("loc", self.localize, "vqa"), ("vqa", self.vqa, "aggr"),
                                       ("aggr", self.aggregate, "rerank")):
            if self.state.stage == name:
                t0 = time.perf_counter()
                step(r, stage)
                self.state.current["seconds"] += time.perf_counter() - t0
                self.checkpoint(next_stage)
        if self.state.stage == "rerank":
            self.rerank(r)

    def localize(self, r: int, stage: _Stage) -> None:
        """Step 1: ask candidate r of the queries the schedule picks; gate new anchors."""
        from utils.mllm.parsing import parse_yes_no

        st, rec = self.state, self.state.current
        asked = np.flatnonzero(gating.ask_mask(self.ask_scheme, r, self.rounds, self.top1,
                                               self.xi, self.anchors, self.said_yes))
        reqs = [loc_request(self.captions[q], self.image_paths[self.cands[q, r]]) for q in asked]
        answers = stage.ask("loc", reqs)
        parsed = [parse_yes_no(a) for a in answers]
        self.check_parsed(r, "loc", answers, [p is not None for p in parsed],
                          "they count as 'No'")
        yes = np.array([p is True for p in parsed], dtype=bool)  # unparseable counts as "No"
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

    def vqa(self, r: int, stage: _Stage) -> None:
        """Step 2: the 15 questions on each new anchor image, parsed into sub-sentences."""
        from utils.mllm.parsing import parse_vqa

        st = self.state
        reqs = [vqa_request(self.image_paths[self.anchors[q]]) for q in st.pending]
        kept, answers, ok = [], stage.ask("vqa", reqs), []
        for q, answer in zip(st.pending, answers):
            subtexts = parse_vqa(answer)
            ok.append(bool(subtexts))
            if subtexts:
                st.subtexts[str(q)] = subtexts
                kept.append(q)
            # else nothing usable: the query keeps its base similarity
        self.check_parsed(r, "vqa", answers, ok, "those queries keep their base similarity")
        st.pending = kept

    def aggregate(self, r: int, stage: _Stage) -> None:
        """Step 3: original query + sub-sentences -> the refined query."""
        st = self.state
        reqs = [aggr_request(self.captions[q], st.subtexts[str(q)]) for q in st.pending]
        kept, answers, ok = [], stage.ask("aggr", reqs), []
        for q, answer in zip(st.pending, answers):
            text = clean_aggregation(answer)
            ok.append(bool(text))
            if text:
                st.refined[q] = text
                kept.append(q)
        self.check_parsed(r, "aggr", answers, ok, "those queries keep their base similarity")
        st.pending = kept

    def check_parsed(self, r: int, stage: str, answers: list, ok: list, consequence: str) -> None:
        """Count the unusable answers of ``stage``; warn, loudly when most are unusable (and
        keep that warning for the summary)."""
        rec = self.state.current
        bad = [a for a, good in zip(answers, ok) if not good]
        rec["parse_failures"][stage] += len(bad)
        if not bad:
            return
        share = len(bad) / len(answers)
        line = (f"round {r + 1}, {stage}: {len(bad)} of {len(answers)} MLLM answers "
                f"({100 * share:.0f}%) were empty or unparseable (first: {bad[0]!r:.120}); "
                f"{consequence}; they are not cached and are asked again next run")
        if share > MOSTLY_UNPARSEABLE:
            line = (f"MOSTLY UNPARSEABLE: {line}. Check the model, adapter or served name "
                    f"(--model, --lora, --served-model) and that it follows the prompt")
            rec.setdefault("warnings", []).append(line)
            self.logger.warning("!" * 78 + "\n%s\n" + "!" * 78, line)
        else:
            self.logger.warning("%s", line)

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
        self.logger.info(
            "round %d: asked %d, new anchors %d (total %d), refined %d, MLLM requests "
            "loc/vqa/aggr %d/%d/%d (uncached %d), parse failures %s, %.1fs", r + 1, rec["asked"],
            rec["new_anchors"], rec["anchored_total"], rec["refined_total"], rec["calls"]["loc"],
            rec["calls"]["vqa"], rec["calls"]["aggr"], sum(rec["uncached"].values()),
            rec["parse_failures"], rec["seconds"])
        if self.metrics is not None:
            self.logger.info("\n%s", report.round_table(r + 1, st.base_metrics, previous,
                                                        rec["metrics"]))


def run_thi(similarity, captions: Sequence[str], image_paths: Sequence[str], client,
            score_texts: Callable[[list], "np.ndarray"], *, lam: float = 0.8, xi: float = 0.5,
            rounds: int = 5, q_pids=None, g_pids=None, out_dir: Optional[str] = None,
            temperature: float = 0.01, max_tokens: int = 2048, progress: bool = True,
            ask: str = "needed", one_at: str = "anchor") -> THIResult:
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
    from contextlib import nullcontext

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    sim_base = _as_matrix(similarity)
    captions = [str(c) for c in captions]
    image_paths = [os.fspath(p) for p in image_paths]
    lam, xi, rounds = check_lambda(lam), float(xi), int(rounds)
    _check_inputs(sim_base, captions, image_paths, rounds, xi, q_pids, g_pids)
    if ask not in gating.ASK_SCHEMES:
        raise ValueError(f"ask must be one of {gating.ASK_SCHEMES}, got {ask!r}")
    if one_at not in ONE_AT:
        raise ValueError(f"one_at must be one of {ONE_AT}, got {one_at!r}")
    num_q = sim_base.shape[0]
    metrics = None
    if q_pids is not None:
        from utils.metrics import t2i_metrics
        q_pids, g_pids = np.asarray(q_pids, dtype=np.int64), np.asarray(g_pids, dtype=np.int64)

        def metrics(s):
            return report.with_rsum(t2i_metrics(s, q_pids, g_pids))

    from utils.mllm.identity import identity_info

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
        if state is None:
            state = THIState.fresh(fp, num_q)
            if out_dir:  # claim the folder for these inputs and settings at once
                save_state(out_dir, state)
        elif state.finished(rounds):
            logger.info("%s holds a finished THI run; returning its results", out_dir)
        else:
            logger.info("resuming %s at round %d, stage %s", out_dir, state.round + 1, state.stage)
        cost_file = os.path.join(out_dir, "cost.json") if out_dir else ""
        finished_before = state.finished(rounds) and os.path.isfile(cost_file)
        sim = load_similarity(out_dir, state, sim_base) if out_dir else sim_base.copy()
        if metrics is not None and state.base_metrics is None:
            state.base_metrics = metrics(sim_base)
        logger.info("THI: %d queries, %d gallery images, K=%d, lambda=%g, xi=%g, ask=%s",
                    num_q, sim_base.shape[1], rounds, lam, xi, ask)
        run = _Interaction(state=state, sim_base=sim_base, sim=sim, captions=captions,
                           image_paths=image_paths, client=client, score_texts=score_texts,
                           lam=lam, xi=xi, rounds=rounds, ask=ask, temperature=temperature,
                           max_tokens=max_tokens, out_dir=out_dir, metrics=metrics,
                           logger=logger, one_at=one_at)
        # Log lines go through tqdm.write so they do not break the progress bar.
        with logging_redirect_tqdm(loggers=[logger]) if progress else nullcontext():
            with tqdm(total=rounds, initial=state.round, desc="THI rounds",
                      disable=not progress) as bar:
                for r in range(state.round, rounds):
                    run.run_round(r)
                    bar.update(1)

        interacted = int(sum(state.asked_ever))
        if finished_before:  # keep the finished run's own report (client counters included)
            with open(cost_file, encoding="utf-8") as f:
                cost = json.load(f)
        else:
            cost = report.cost_report(state.records, num_q, interacted, _client_stats(client))
        warnings = [w for rec in state.records for w in rec.get("warnings", [])]
        cost.setdefault("warnings", warnings)
        result = THIResult(similarity=run.sim, anchors=run.anchors.copy(),
                           refined=list(state.refined), rounds=list(state.records),
                           anchor_round=np.asarray(state.anchor_round, dtype=np.int64),
                           base_metrics=state.base_metrics, cost=cost, warnings=warnings)
        if out_dir and not finished_before:
            _write_outputs(out_dir, state, result, captions, image_paths, run.cands, run.top1)
        logger.info("THI done: %d/%d queries interacted, %d anchored, %d refined, %.2f MLLM "
                    "requests per query", interacted, num_q, int((run.anchors >= 0).sum()),
                    sum(t is not None for t in state.refined), cost["calls_per_query"])
        if warnings:
            logger.warning("THI finished WITH %d WARNING(S): stages with mostly unparseable "
                           "answers; the metrics above do not show what the model can do:\n%s",
                           len(warnings), "\n".join(warnings))
        return result
    finally:
        report.close_logger(logger)


def _write_outputs(out_dir: str, state: THIState, result: THIResult, captions, image_paths,
                   cands: np.ndarray, top1: np.ndarray) -> None:
    """Final similarity, top-10 rankings, per-query records, per-round metrics and the cost
    report; the state then points at final_similarity.npy (the run is complete)."""
    from utils.io import atomic_save_npy, atomic_write_json
    from utils.metrics import topk

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
