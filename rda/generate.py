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
keyed by the stage's input (image path, caption, text), and asks the client only for keys it
lacks; the client's own cache (``<out>.state/mllm_cache`` by default) holds every usable answer as
soon as its micro-batch returns, so a kill loses at most one micro-batch. Parsing and filtering
run again from the raw answers each time, so a killed run ends with the same file as an
uninterrupted one.

Unusable answers (empty, unparseable, or not looking like a VQA reply, a sentence or a sentence
set: see ``filters``) are counted in ``parse_failures``, never become ``diversity_captions`` (the
caption falls back to its own sentences), are not kept, and are asked again by the next run; a
stage with mostly unusable answers is a loud warning in the log and in the summary.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from utils.errors import InputFileError, ProjectError
from utils.io import read_json
from utils.mllm import Request
from utils.mllm.parsing import parse_lines, parse_vqa
from utils.mllm.prompts import PROMPT_VERSION, aggr_prompt, dec_prompt, rwt_prompt, vqa_prompt

from .filters import (FilterCounts, clean_pieces, looks_like_english, looks_like_sentences,
                      looks_like_vqa_reply, split_sentences)
from .store import AnswerLog, atomic_write_json


class StateMismatch(ProjectError, ValueError):
    """An RDA resume state made with other settings than this run's."""


log = logging.getLogger("rda")

STAGES = ("vqa", "aggr", "dec", "rwt")
STATE_FORMAT = 1
# Decomposed sub-sentences and rewrites are full sentences ("He is male." has 3 words); shorter
# pieces are list residue or truncated answers. VQA answers may be one word ("Female.").
MIN_WORDS = 3
# A stage whose answers are unusable more often than this is a loud warning.
MOSTLY_UNUSABLE = 0.5
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

    # --- state ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        from utils.mllm.identity import identity_info
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
    def _run_stage(self, stage: str, keys: Sequence[str], make_request: Callable[[str], Request],
                   accept: Callable[[str], bool]) -> None:
        """Ask the client for every key of ``stage`` not yet answered, in chunks; each chunk's
        usable answers (``accept``) are persisted before the next chunk is sent."""
        answers = self.logs[stage]
        import inspect
        try:
            params = inspect.signature(self.client.generate).parameters
            extra = ({"accept": accept} if "accept" in params
                     or any(p.kind is p.VAR_KEYWORD for p in params.values()) else {})
        except (TypeError, ValueError):
            extra = {}
        unique = list(dict.fromkeys(keys))
        pending = [k for k in unique if k not in answers]
        self.unusable[stage] = {}
        self.summary.requests[stage] = len(unique)
        self.summary.requests_this_run[stage] = len(pending)
        if not pending:
            return
        from tqdm import tqdm
        bar = tqdm(total=len(pending), desc=f"RDA {stage}", unit="req", disable=not self.progress)
        try:
            for start in range(0, len(pending), self.chunk_size):
                chunk = pending[start:start + self.chunk_size]
                outs = self.client.generate([make_request(k) for k in chunk],
                                            temperature=self.temperature, max_tokens=self.max_tokens,
                                            **extra)
                if len(outs) != len(chunk):
                    raise RuntimeError(f"MLLM client returned {len(outs)} answers for {len(chunk)} "
                                       f"{stage} requests")
                good = [(k, a) for k, a in zip(chunk, outs) if isinstance(a, str) and accept(a)]
                self.unusable[stage].update((k, a) for k, a in zip(chunk, outs)
                                            if not (isinstance(a, str) and accept(a)))
                answers.add_many(good)
                bar.update(len(chunk))
        finally:
            bar.close()

    def _answer(self, stage: str, key: str) -> str:
        """The answer to ``key``: the logged usable one, else this run's unusable one."""
        log_ = self.logs[stage]
        return log_[key] if key in log_ else self.unusable[stage].get(key, "")

    def _warn_if_mostly_unusable(self, stage: str, failed: int, total: int) -> None:
        if total and failed / total > MOSTLY_UNUSABLE:
            line = (f"MOSTLY UNUSABLE: {failed} of {total} RDA {stage} answers were empty, "
                    f"unparseable or gibberish; their captions fall back to their own "
                    f"sentences. Check the model (--model, --lora, --served-model) and that it "
                    f"follows the prompt; these answers are asked again next run")
            self.summary.warnings.append(line)
            log.warning("%s\n%s\n%s", "!" * 78, line, "!" * 78)
        elif failed:
            log.warning("%d of %d RDA %s answers were empty, unparseable or gibberish (asked "
                        "again next run)", failed, total, stage)

    def _image_path(self, rel: str) -> str:
        return os.path.join(self.image_root, rel)

    # --- the pipeline --------------------------------------------------------------------
    def run(self, pairs: list[Pair]) -> dict[tuple[int, int], list[list[str]]]:
        """All four stages over ``pairs``; returns ``{(record, caption): diversity_captions}``."""
        s = self.summary
        s.pairs = len(pairs)
        images = list(dict.fromkeys(p.image for p in pairs))
        s.images = len(images)
        missing = [r for r in images if r not in self.logs["vqa"]
                   and not os.path.isfile(self._image_path(r))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} training images not found under image_root {self.image_root!r}, "
                f"e.g. {self._image_path(missing[0])!r}; check --root / the dataset's image folder")
        failures = {st: 0 for st in STAGES}
        counts = {st: FilterCounts() for st in ("vqa", "dec", "rwt")}

        # 1. VQA, once per distinct image.
        self._run_stage("vqa", images, lambda rel: Request(vqa_prompt(), image=self._image_path(rel)),
                        _usable_vqa)
        subtexts = {}
        for rel in images:
            parsed = parse_vqa(self._answer("vqa", rel))
            usable = looks_like_vqa_reply(parsed)
            failures["vqa"] += not usable
            subtexts[rel] = clean_pieces(parsed, counts["vqa"]) if usable else []
        self._warn_if_mostly_unusable("vqa", failures["vqa"], len(images))

        # 2. Aggregation of each caption with its image's answers (text only).
        aggr_keys = [json.dumps([p.image, p.text], ensure_ascii=False) for p in pairs]

        def aggr_request(key: str) -> Request:
            rel, caption = json.loads(key)
            return Request(aggr_prompt(caption, subtexts[rel]))

        self._run_stage("aggr", aggr_keys, aggr_request, _usable_aggr)
        aggregated = {}
        unique_aggr = list(dict.fromkeys(aggr_keys))
        for key in unique_aggr:
            text = _strip_output_label(self._answer("aggr", key))
            usable = bool(text) and looks_like_english(text)
            failures["aggr"] += not usable
            aggregated[key] = text if usable else json.loads(key)[1]  # else the caption itself
        self._warn_if_mostly_unusable("aggr", failures["aggr"], len(unique_aggr))

        # 3. Decomposition into attribute sub-sentences.
        texts = list(dict.fromkeys(aggregated.values()))
        self._run_stage("dec", texts, lambda t: Request(dec_prompt(t)), _usable_lines)
        subs = {}
        for text in texts:
            lines = parse_lines(self._answer("dec", text))
            pieces = (clean_pieces(lines, counts["dec"], min_words=MIN_WORDS)
                      if looks_like_sentences(lines) else [])
            if not pieces:  # unusable answer: fall back to the description's own sentences
                failures["dec"] += 1
                pieces = (clean_pieces(split_sentences(text), FilterCounts(), min_words=MIN_WORDS)
                          or [text])  # a caption must keep at least one sub-sentence
            subs[text] = pieces
        self._warn_if_mostly_unusable("dec", failures["dec"], len(texts))

        # 4. m rewrites of every distinct sub-sentence.
        sentences = list(dict.fromkeys(x for t in texts for x in subs[t]))
        rwt_keys = [_rwt_key(self.m, x) for x in sentences]
        self._run_stage("rwt", rwt_keys, lambda k: Request(rwt_prompt(_rwt_sentence(k), self.m)),
                        _usable_lines)
        groups = {}
        for sentence, key in zip(sentences, rwt_keys):
            lines = parse_lines(self._answer("rwt", key))
            usable = looks_like_sentences(lines)
            failures["rwt"] += not usable
            rewrites = clean_pieces(lines, counts["rwt"], exclude=(sentence,),
                                    min_words=MIN_WORDS)[:self.m] if usable else []
            groups[sentence] = [sentence, *rewrites]
        self._warn_if_mostly_unusable("rwt", failures["rwt"], len(sentences))

        # Assemble per caption and summarise.
        result = {}
        for pair, key in zip(pairs, aggr_keys):
            result[(pair.record, pair.caption)] = [list(groups[x]) for x in subs[aggregated[key]]]
        per_caption = [len(v) for v in result.values()]
        kept = [len(groups[x]) - 1 for x in sentences]
        s.parse_failures = failures
        s.filtered = {k: c.as_dict() for k, c in counts.items()}
        s.sub_sentences_per_caption = _describe(per_caption)
        s.rewrites_kept = {
            "total": sum(kept), "per_sub_sentence": _describe(kept),
            "sub_sentences_with_all_m": sum(k == self.m for k in kept),
            "fraction_of_requested": (sum(kept) / (self.m * len(kept))) if kept else 0.0,
        }
        return result


def _usable_vqa(answer: str) -> bool:
    return looks_like_vqa_reply(parse_vqa(answer))


def _usable_aggr(answer: str) -> bool:
    text = _strip_output_label(answer)
    return bool(text) and looks_like_english(text)


def _usable_lines(answer: str) -> bool:
    return looks_like_sentences(parse_lines(answer))


def _rwt_key(m: int, sentence: str) -> str:
    return f"{m}\t{sentence}"


def _rwt_sentence(key: str) -> str:
    return key.split("\t", 1)[1]


def _strip_output_label(text: str) -> str:
    """An aggregation answer without an echoed "Output:" label and surrounding quotes."""
    s = (text or "").strip()
    if s.lower().startswith("output:"):
        s = s[len("output:"):].strip()
    return s.strip("\"'“”").strip()


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
