"""RDA generation: human-centred VQA -> aggregation -> decomposition -> rewriting, per training
pair, as whole batches per stage, resumable after a kill.

For every training pair (image, caption):
1. VQA (T_VQA) on the image. It depends on the image alone, so it is asked once per distinct
   image and shared by the image's captions.
2. Aggregation (T_AGGR) of the caption with the VQA answers into one description.
3. Decomposition (T_DEC) of that description into independent attribute sub-sentences.
4. ``m`` rewrites (T_RWT) of every sub-sentence.

The result per caption is ``diversity_captions[i]``: a list of sub-sentences, each a list of
strings (the sub-sentence first, then its distinct rewrites), the layout the ICL authors released.

Resume: every stage keeps its usable raw answers in an append-only log under ``<out>.state/``,
keyed by the stage's input (the image's content digest, the one the MLLM cache uses, so a changed
image is asked again; caption; text), and asks the client only for keys it
lacks; the client's own cache (``<out>.state/mllm_cache`` by default) holds every usable answer as
soon as its micro-batch returns, so a kill loses at most one micro-batch. Parsing and filtering
run again from the raw answers each time, so a killed run ends with the same file as an
uninterrupted one.

Requests, answer rules, counts and the "mostly unusable" banner are the MLLM client's stage runner
(``utils.mllm.stages``), shared with THI and the search page. Unusable answers (empty,
unparseable, or not looking like a VQA reply, a sentence or a sentence set) are counted in
``parse_failures``, never become ``diversity_captions`` (the caption falls back to its own
sentences), are not kept, and are asked again by the next run; a stage with mostly unusable
answers is a loud warning in the log and in the summary.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tqdm import tqdm

from utils.errors import InputFileError, ProjectError
from utils.io import read_json

from utils.mllm import Request
from utils.mllm.identity import identity_info
from utils.mllm.images import image_digest
from utils.mllm.parsing import parse_lines, parse_vqa
from utils.mllm.prompts import PROMPT_VERSION
from utils.mllm.stages import (StageRunner, aggr_request, clean_aggregation, dec_request,
                               report_unusable, rwt_request, usable, vqa_request)

from .filters import FilterCounts, clean_pieces, split_sentences
from .store import AnswerLog, atomic_write_json


class StateMismatch(ProjectError, ValueError):
    """An RDA resume state made with other settings than this run's."""


log = logging.getLogger("rda")

STAGES = ("vqa", "aggr", "dec", "rwt")
STATE_FORMAT = 1
# Decomposed sub-sentences and rewrites are full sentences ("He is male." has 3 words); shorter
# pieces are list residue or truncated answers. VQA answers may be one word ("Female.").
MIN_WORDS = 3
IMAGE_KEYS = ("file_path", "img_path")  # CUHK-PEDES/ICFG-PEDES/UFine6926 vs RSTPReid


def image_key(record: dict, index: int) -> str:
    """The record's image field name (``file_path`` or ``img_path``)."""
    for key in IMAGE_KEYS:
        if key in record:
            return key
    raise KeyError(f"annotation record #{index} (id {record.get('id')!r}) has none of the image "
                   f"fields {IMAGE_KEYS}; is this a CUHK-PEDES-style annotation file?")


def default_paths(out_path: str) -> tuple[str, str]:
    """``(state_dir, summary_path)`` that belong to the output file ``out_path``."""
    stem = os.path.splitext(out_path)[0]
    return stem + ".state", stem + ".summary.json"


@dataclass
class Pair:
    """One training pair selected for augmentation."""

    record: int
    caption: int
    image: str  # the record's relative image path
    text: str


@dataclass
class RDASummary:
    """What a run produced; written next to the output as ``<out stem>.summary.json``."""

    records_augmented: int = 0
    pairs: int = 0
    images: int = 0
    rewrites_requested: int = 0
    limit: "int | None" = None
    requests: dict = field(default_factory=dict)
    requests_this_run: dict = field(default_factory=dict)
    parse_failures: dict = field(default_factory=dict)
    sub_sentences_per_caption: dict = field(default_factory=dict)
    rewrites_kept: dict = field(default_factory=dict)
    filtered: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    # torn or unreadable lines of the MLLM cache skipped while loading it (answers asked again)
    cache_skipped_lines: int = 0

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return dict(self.__dict__)


class RDAGenerator:
    """Runs the four stages over ``records`` with ``client``; see :func:`generate_rda`."""

    def __init__(self, client, *, image_root: str, rewrites: int = 3,
                 state_dir: "str | None" = None, temperature: float = 0.01,
                 max_tokens: int = 1024, chunk_size: int = 4096, progress: bool = True):
        if rewrites < 1:
            raise ValueError(f"rewrites (m) must be >= 1, got {rewrites}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.client = client
        self.image_root = os.fspath(image_root)
        self.m = int(rewrites)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self.state_dir = state_dir
        if state_dir is not None:
            self._check_state_meta(state_dir)
        self.logs = {s: AnswerLog(None if state_dir is None else os.path.join(state_dir, f"{s}.jsonl"))
                     for s in STAGES}
        # This run's unusable answers: parsed (as failures) but never logged, so asked again.
        self.unusable: dict = {s: {} for s in STAGES}
        self.summary = RDASummary(rewrites_requested=self.m)
        self.runner = StageRunner(client, temperature=self.temperature,
                                  max_tokens=self.max_tokens, chunk_size=self.chunk_size)

    # --- state ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"format": STATE_FORMAT, "prompt_version": PROMPT_VERSION,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "client": identity_info(self.client)}

    def _check_state_meta(self, state_dir: str) -> None:
        """Refuse to mix answers of another model, prompt version or sampling setting."""
        path = os.path.join(state_dir, "meta.json")
        meta = self._meta()
        if os.path.exists(path):
            old = read_json(path, fix=f"delete {state_dir} to start over (its answers are asked again) "
                                      "or write to another --out")
            if not isinstance(old, dict):
                raise InputFileError(f"{path}: expected a JSON object of RDA settings, got "
                                     f"{type(old).__name__}; delete {state_dir} to start over")
            diff = [k for k in meta if old.get(k) != meta[k]]
            if diff:
                raise StateMismatch(
                    f"RDA resume state {state_dir} was made with other settings ({', '.join(diff)}: "
                    f"{ {k: old.get(k) for k in diff} } vs now { {k: meta[k] for k in diff} }); "
                    f"delete that folder to start over or write to another --out")
        else:
            atomic_write_json(path, meta, indent=2)

    # --- one stage -----------------------------------------------------------------------
    def _run_stage(self, stage: str, keys: Sequence[str],
                   make_request: Callable[[str], Request]) -> None:
        """Ask the client for every key of ``stage`` not yet answered, in chunks; each chunk's
        usable answers are persisted before the next chunk is sent."""
        answers = self.logs[stage]
        unique = list(dict.fromkeys(keys))
        pending = [k for k in unique if k not in answers]
        self.unusable[stage] = {}
        self.summary.requests[stage] = len(unique)
        self.summary.requests_this_run[stage] = len(pending)
        if not pending:
            return
        bar = tqdm(total=len(pending), desc=f"RDA {stage}", unit="req", disable=not self.progress)

        def keep(start: int, outs: list) -> None:
            chunk = pending[start:start + len(outs)]
            answers.add_many((k, a) for k, a in zip(chunk, outs) if usable(stage, a))
            self.unusable[stage].update((k, a) for k, a in zip(chunk, outs)
                                        if not usable(stage, a))
            bar.update(len(chunk))

        try:
            self.runner.ask(stage, [make_request(k) for k in pending], on_chunk=keep)
        finally:
            bar.close()

    def _answer(self, stage: str, key: str) -> str:
        """The answer to ``key``: the logged usable one, else this run's unusable one."""
        log_ = self.logs[stage]
        return log_[key] if key in log_ else self.unusable[stage].get(key, "")

    def _warn_if_mostly_unusable(self, stage: str, failed: int, total: int) -> None:
        banner = report_unusable(log, f"RDA {stage}", failed, total,
                                 "their captions fall back to their own sentences")
        if banner:
            self.summary.warnings.append(banner)

    def _image_path(self, rel: str) -> str:
        return os.path.join(self.image_root, rel)

    # --- the pipeline --------------------------------------------------------------------
    def run(self, pairs: list[Pair]) -> dict[tuple[int, int], list[list[str]]]:
        """All four stages over ``pairs``; returns ``{(record, caption): diversity_captions}``."""
        self.summary.pairs = len(pairs)
        digests = self._image_digests(pairs)
        self.failures = {st: 0 for st in STAGES}
        self.counts = {st: FilterCounts() for st in ("vqa", "dec", "rwt")}
        subtexts = self._vqa(digests)
        aggr_keys = [json.dumps([digests[p.image], p.text], ensure_ascii=False) for p in pairs]
        aggregated = self._aggregate(aggr_keys, subtexts)
        texts = list(dict.fromkeys(aggregated.values()))
        subs = self._decompose(texts)
        sentences = list(dict.fromkeys(x for t in texts for x in subs[t]))
        groups = self._rewrite(sentences)
        result = {(pair.record, pair.caption): [list(groups[x]) for x in subs[aggregated[key]]]
                  for pair, key in zip(pairs, aggr_keys)}
        self._summarise(result, [len(groups[x]) - 1 for x in sentences])
        return result

    def _image_digests(self, pairs: list[Pair]) -> dict[str, str]:
        """``{relative path: content digest}`` of every distinct image: VQA answers are keyed by
        what the image shows, so changed pixels are asked again."""
        images = list(dict.fromkeys(p.image for p in pairs))
        self.summary.images = len(images)
        missing = [r for r in images if not os.path.isfile(self._image_path(r))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} training images not found under image_root {self.image_root!r}, "
                f"e.g. {self._image_path(missing[0])!r}; check --root / the dataset's image folder")
        return {rel: image_digest(self._image_path(rel)) for rel in images}

    def _vqa(self, digests: dict[str, str]) -> dict[str, list[str]]:
        """1. VQA once per distinct image content: ``{digest: sub-sentences}``."""
        paths = {d: self._image_path(rel) for rel, d in digests.items()}
        keys = list(paths)
        self._run_stage("vqa", keys, lambda d: vqa_request(paths[d]))
        subtexts = {}
        for d in keys:
            answer = self._answer("vqa", d)
            ok = usable("vqa", answer)
            self.failures["vqa"] += not ok
            subtexts[d] = clean_pieces(parse_vqa(answer), self.counts["vqa"]) if ok else []
        self._warn_if_mostly_unusable("vqa", self.failures["vqa"], len(keys))
        return subtexts

    def _aggregate(self, aggr_keys: list[str], subtexts: dict) -> dict[str, str]:
        """2. Aggregation of each caption with its image's answers (text only):
        ``{key: description}``, the caption itself where the answer is unusable."""

        def request(key: str) -> Request:
            digest, caption = json.loads(key)
            return aggr_request(caption, subtexts[digest])

        self._run_stage("aggr", aggr_keys, request)
        aggregated = {}
        unique = list(dict.fromkeys(aggr_keys))
        for key in unique:
            answer = self._answer("aggr", key)
            ok = usable("aggr", answer)
            self.failures["aggr"] += not ok
            aggregated[key] = clean_aggregation(answer) if ok else json.loads(key)[1]
        self._warn_if_mostly_unusable("aggr", self.failures["aggr"], len(unique))
        return aggregated

    def _decompose(self, texts: list[str]) -> dict[str, list[str]]:
        """3. Decomposition into attribute sub-sentences; an unusable answer (or one whose
        pieces are all filtered) falls back to the description's own sentences."""
        self._run_stage("dec", texts, dec_request)
        subs = {}
        for text in texts:
            answer = self._answer("dec", text)
            pieces = (clean_pieces(parse_lines(answer), self.counts["dec"], min_words=MIN_WORDS)
                      if usable("dec", answer) else [])
            if not pieces:
                self.failures["dec"] += 1
                pieces = (clean_pieces(split_sentences(text), FilterCounts(), min_words=MIN_WORDS)
                          or [text])  # a caption must keep at least one sub-sentence
            subs[text] = pieces
        self._warn_if_mostly_unusable("dec", self.failures["dec"], len(texts))
        return subs

    def _rewrite(self, sentences: list[str]) -> dict[str, list[str]]:
        """4. ``m`` rewrites of every distinct sub-sentence: ``{sentence: [it, *rewrites]}``."""
        rwt_keys = [_rwt_key(self.m, x) for x in sentences]
        self._run_stage("rwt", rwt_keys, lambda k: rwt_request(_rwt_sentence(k), self.m))
        groups = {}
        for sentence, key in zip(sentences, rwt_keys):
            answer = self._answer("rwt", key)
            ok = usable("rwt", answer)
            self.failures["rwt"] += not ok
            rewrites = clean_pieces(parse_lines(answer), self.counts["rwt"], exclude=(sentence,),
                                    min_words=MIN_WORDS)[:self.m] if ok else []
            groups[sentence] = [sentence, *rewrites]
        self._warn_if_mostly_unusable("rwt", self.failures["rwt"], len(sentences))
        return groups

    def _summarise(self, result: dict, kept: list[int]) -> None:
        s = self.summary
        s.parse_failures = dict(self.failures)
        s.filtered = {k: c.as_dict() for k, c in self.counts.items()}
        s.sub_sentences_per_caption = _describe([len(v) for v in result.values()])
        s.rewrites_kept = {
            "total": sum(kept), "per_sub_sentence": _describe(kept),
            "sub_sentences_with_all_m": sum(k == self.m for k in kept),
            "fraction_of_requested": (sum(kept) / (self.m * len(kept))) if kept else 0.0,
        }


def _rwt_key(m: int, sentence: str) -> str:
    return f"{m}\t{sentence}"


def _rwt_sentence(key: str) -> str:
    return key.split("\t", 1)[1]


def _describe(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def select_pairs(records: list[dict], *, limit: "int | None" = None,
                 splits: Sequence[str] = ("train",)) -> tuple[list[int], list[Pair]]:
    """The records to augment (indices, in file order) and their pairs.

    ``limit`` takes the first ``limit`` training pairs, rounded up to whole records: an image's
    captions share one VQA answer and a record must carry one entry per caption.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of pairs, got {limit}")
    chosen, pairs = [], []
    for i, rec in enumerate(records):
        if rec.get("split") not in splits:
            continue
        if limit is not None and len(pairs) >= limit:
            break
        captions = rec.get("captions")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"annotation record #{i} (id {rec.get('id')!r}): 'captions' must be "
                             f"a list of strings")
        rel = rec[image_key(rec, i)]
        chosen.append(i)
        pairs.extend(Pair(i, j, rel, c) for j, c in enumerate(captions))
    return chosen, pairs


def generate_rda(records: list[dict], client, *, image_root: "str | os.PathLike[str]",
                 rewrites: int = 3, out_path: "str | os.PathLike[str] | None" = None,
                 limit: "int | None" = None, temperature: float = 0.01, max_tokens: int = 1024,
                 chunk_size: int = 4096, splits: Sequence[str] = ("train",),
                 progress: bool = True) -> list[dict]:
    """Add ``diversity_captions`` to the training records of an annotation list (see
    :func:`run_rda`, which also returns the run summary)."""
    return run_rda(records, client, image_root=image_root, rewrites=rewrites, out_path=out_path,
                   limit=limit, temperature=temperature, max_tokens=max_tokens,
                   chunk_size=chunk_size, splits=splits, progress=progress)[0]


def run_rda(records: list[dict], client, *, image_root: "str | os.PathLike[str]",
            rewrites: int = 3, out_path: "str | os.PathLike[str] | None" = None,
            limit: "int | None" = None, temperature: float = 0.01, max_tokens: int = 1024,
            chunk_size: int = 4096, splits: Sequence[str] = ("train",),
            progress: bool = True) -> tuple[list[dict], dict]:
    """Add ``diversity_captions`` to the training records; returns ``(records, summary)``.

    ``records``: annotation records (``id``, ``file_path`` or ``img_path`` relative to
    ``image_root``, ``captions``, ``split``). Records whose split is in ``splits`` get
    ``diversity_captions`` (one entry per caption: a list of sub-sentences, each
    ``[sub_sentence, *rewrites]``, at most ``rewrites`` distinct rewrites); the others are returned
    unchanged. ``limit``: only the first ``limit`` training pairs (rounded up to whole records) are
    augmented; later training records are returned unchanged, without ``diversity_captions`` (the
    dataset readers then use such a caption as its own RDA view).

    With ``out_path`` the result is written there atomically, the resume state goes to
    ``<out stem>.state/`` and the summary to ``<out stem>.summary.json``; a second call with the
    same ``out_path`` sends only the requests the first one did not finish.
    """
    state_dir = summary_path = None
    if out_path is not None:
        out_path = os.fspath(out_path)
        state_dir, summary_path = default_paths(out_path)
    gen = RDAGenerator(client, image_root=os.fspath(image_root), rewrites=rewrites,
                       state_dir=state_dir, temperature=temperature, max_tokens=max_tokens,
                       chunk_size=chunk_size, progress=progress)
    chosen, pairs = select_pairs(records, limit=limit, splits=splits)
    augmented = gen.run(pairs)
    gen.summary.records_augmented = len(chosen)
    gen.summary.limit = limit
    stats = getattr(client, "stats", None)
    gen.summary.cache_skipped_lines = int(stats.get("cache_skipped_lines", 0)
                                          if isinstance(stats, dict) else 0)

    chosen_set = set(chosen)
    out = []
    for i, rec in enumerate(records):
        if i in chosen_set:
            rec = copy.deepcopy(rec)
            rec["diversity_captions"] = [augmented[(i, j)] for j in range(len(rec["captions"]))]
        out.append(rec)

    summary = gen.summary.as_dict()
    log.info("RDA summary: %s", json.dumps(summary))
    if out_path is not None:
        atomic_write_json(out_path, out, indent=None)  # CUHK-PEDES-sized: keep it compact
        atomic_write_json(summary_path, summary, indent=2)
    return out, summary
