"""One runner for the MLLM stages of THI, RDA and the search page.

A stage is one kind of question: anchor localization (``loc``, Yes/No), human-centred VQA
(``vqa``), aggregation (``aggr``), decomposition (``dec``) and rewriting (``rwt``). This module
owns, once for all callers:

- the requests of each stage (``loc_request`` ... ``rwt_request``);
- what makes an answer of each stage usable (:data:`USABLE`): an unusable answer is returned
  and counted but never cached as an answer, so the next run asks it again;
- :class:`StageRunner`, which sends a stage's requests (optionally in chunks, each handed to a
  callback before the next is sent) and counts them per stage (:class:`StageCounts`: asked,
  answered by the model, from the cache, unusable, MLLM seconds);
- :func:`report_unusable`, the log line for a stage's unusable answers and the loud
  "MOSTLY UNUSABLE" banner when more than :data:`MOSTLY_UNUSABLE` of them are.

Where THI and RDA used to differ the stricter rule won: a VQA answer must read as English
(``looks_like_vqa_reply``, RDA's rule; THI took any parsed sentence), an aggregation answer
loses an "Output:"/"Answer:" label (THI's) and wrapping quotes (RDA's), has its whitespace
collapsed (THI's) and must read as English (RDA's): gibberish is never a refined query nor a
training description.
"""
from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .base import Request
from .parsing import (looks_like_english, looks_like_sentences, looks_like_vqa_reply, parse_lines,
                      parse_vqa, parse_yes_no)
from .prompts import aggr_prompt, dec_prompt, loc_prompt, rwt_prompt, vqa_prompt

STAGES = ("loc", "vqa", "aggr", "dec", "rwt")
# A stage whose answers are unusable more often than this gets the loud banner.
MOSTLY_UNUSABLE = 0.5
BANNER = "!" * 78
_OUTPUT_LABEL = re.compile(r"^\s*(?:output|answer)\s*[:：]\s*", re.I)
_QUOTES = "\"'“”"


# --- requests -----------------------------------------------------------------------------
def loc_request(caption: str, image) -> Request:
    """Anchor localization: does ``caption`` describe ``image`` (a path or PIL image)?"""
    return Request(loc_prompt(caption), image=image)


def vqa_request(image) -> Request:
    """Human-centred VQA: the 15 questions on ``image``."""
    return Request(vqa_prompt(), image=image)


def aggr_request(caption: str, subtexts: Sequence[str]) -> Request:
    """Aggregation: the original ``caption`` and parsed VQA ``subtexts`` -> one description."""
    return Request(aggr_prompt(caption, list(subtexts)))


def dec_request(text: str) -> Request:
    """Decomposition of a description into attribute sub-sentences."""
    return Request(dec_prompt(text))


def rwt_request(sentence: str, m: int) -> Request:
    """``m`` rewrites of one sub-sentence."""
    return Request(rwt_prompt(sentence, m))


# --- what counts as a usable answer --------------------------------------------------------
def clean_aggregation(answer) -> str:
    """The description in an aggregation answer: without an echoed "Output:"/"Answer:" label
    and wrapping quotes, whitespace collapsed ("" for a non-string)."""
    if not isinstance(answer, str):
        return ""
    text = _OUTPUT_LABEL.sub("", answer.strip()).strip().strip(_QUOTES)
    return " ".join(text.split())


def _usable_loc(answer: str) -> bool:
    return parse_yes_no(answer) is not None


def _usable_vqa(answer: str) -> bool:
    return looks_like_vqa_reply(parse_vqa(answer))


def _usable_aggr(answer: str) -> bool:
    text = clean_aggregation(answer)
    return bool(text) and looks_like_english(text)


def _usable_lines(answer: str) -> bool:
    return looks_like_sentences(parse_lines(answer))


# One rule per stage; everything else is unusable: counted, not cached, asked again next run.
USABLE: "dict[str, Callable[[str], bool]]" = {
    "loc": _usable_loc, "vqa": _usable_vqa, "aggr": _usable_aggr, "dec": _usable_lines,
    "rwt": _usable_lines}


def usable(stage: str, answer) -> bool:
    """Whether ``answer`` is a usable answer of ``stage`` (see :data:`USABLE`)."""
    return isinstance(answer, str) and USABLE[stage](answer)


def takes_accept(client) -> bool:
    """Whether ``client.generate`` takes ``accept=`` (our clients do; a bare stand-in may not)."""
    try:
        params = inspect.signature(client.generate).parameters
    except (TypeError, ValueError):
        return False
    return "accept" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# --- counting and sending ------------------------------------------------------------------
@dataclass
class StageCounts:
    """One stage's requests: ``asked`` in all, ``uncached`` (answered by the model now),
    ``cached`` (from the cache), ``unusable`` answers, ``seconds`` spent in the client."""

    asked: int = 0
    uncached: int = 0
    cached: int = 0
    unusable: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """The counts as a plain dict (for reports)."""
        return dict(self.__dict__)


def _cache_misses(client) -> "int | None":
    stats = getattr(client, "stats", None)
    if isinstance(stats, dict):
        return stats.get("cache_misses")
    return getattr(stats, "cache_misses", None) if stats is not None else None


class StageRunner:
    """Sends the requests of any stage to ``client`` with one sampling setting and counts them
    per stage in ``counts``."""

    def __init__(self, client, *, temperature: float = 0.01, max_tokens: int = 512,
                 chunk_size: Optional[int] = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.client = client
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.chunk_size = chunk_size
        self._accept = takes_accept(client)
        self.counts: "dict[str, StageCounts]" = {s: StageCounts() for s in STAGES}

    def ask(self, stage: str, requests: Sequence[Request],
            on_chunk: "Callable[[int, list], None] | None" = None) -> list:
        """The answers to ``requests`` of ``stage`` (same order). With ``chunk_size`` they are
        sent in chunks and ``on_chunk(start, answers)`` sees each chunk before the next is sent
        (to persist it). Unusable answers are returned, counted and not cached as usable."""
        if stage not in USABLE:
            raise ValueError(f"unknown MLLM stage {stage!r}; stages: {', '.join(STAGES)}")
        requests = list(requests)
        counts, out = self.counts[stage], []
        step = self.chunk_size or max(1, len(requests))
        extra = {"accept": USABLE[stage]} if self._accept else {}
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            before = _cache_misses(self.client)
            t0 = time.perf_counter()
            answers = list(self.client.generate(chunk, temperature=self.temperature,
                                                max_tokens=self.max_tokens, **extra))
            counts.seconds += time.perf_counter() - t0
            if len(answers) != len(chunk):
                raise RuntimeError(f"the MLLM client returned {len(answers)} answers for "
                                   f"{len(chunk)} {stage} requests")
            after = _cache_misses(self.client)
            # Without cache counters every request is a real call.
            fresh = (after - before) if before is not None and after is not None else len(chunk)
            counts.asked += len(chunk)
            counts.uncached += fresh
            counts.cached += len(chunk) - fresh
            counts.unusable += sum(not usable(stage, a) for a in answers)
            if on_chunk is not None:
                on_chunk(start, answers)
            out.extend(answers)
        return out

    def ask_one(self, stage: str, request: Request) -> str:
        """One request of ``stage``."""
        return self.ask(stage, [request])[0]


def report_unusable(logger: logging.Logger, where: str, bad: int, total: int, consequence: str,
                    first=None) -> Optional[str]:
    """Log that ``bad`` of ``total`` answers of a stage (``where``, e.g. "round 2, vqa") were
    unusable and what follows (``consequence``). More than :data:`MOSTLY_UNUSABLE` of them is
    the loud banner: its line is returned (for the run's summary), else None."""
    if not bad or not total:
        return None
    share = bad / total
    shown = "" if first is None else f" (first: {first!r:.120})"
    line = (f"{where}: {bad} of {total} MLLM answers ({100 * share:.0f}%) were empty, "
            f"unparseable or gibberish{shown}; {consequence}; they are not cached and are "
            f"asked again next run")
    if share > MOSTLY_UNUSABLE:
        line = (f"MOSTLY UNUSABLE: {line}. Check the model, adapter or served name (--model, "
                f"--lora, --served-model) and that it follows the prompt")
        logger.warning("%s\n%s\n%s", BANNER, line, BANNER)
        return line
    logger.warning("%s", line)
    return None
