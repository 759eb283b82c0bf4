"""Filters for RDA's text pieces (sub-sentences and rewrites): drop empty, duplicated,
uninformative ("not visible", "cannot be determined") and gibberish pieces, and tidy the rest;
and, re-exported from ``utils.mllm.parsing`` (where the stage runner's answer rules use them),
the tests of whole answers (:func:`looks_like_vqa_reply`, :func:`looks_like_sentences`).

Gibberish: a broken or random model (or a server answering something else) returns text that
parses as lines but is no English: letter salad, token soup, markup. A piece is kept only when
most of its tokens are word-shaped (letters, a vowel, at most 20 letters) and, from three words
on, at least one of them is a common English word (:data:`COMMON_WORDS`: function words and the
vocabulary of person descriptions), which every real description sentence has.

The counters are kept by the caller (:class:`FilterCounts`) so the run summary can say how much
each rule removed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from utils.mllm.parsing import (COMMON_WORDS, looks_like_english, looks_like_sentences,
                                looks_like_vqa_reply)

__all__ = ["COMMON_WORDS", "FilterCounts", "clean_pieces", "is_uninformative",
           "looks_like_english", "looks_like_sentences", "looks_like_vqa_reply", "normalize",
           "split_sentences", "tidy"]

# Pieces that only say an attribute could not be seen carry no information for training, and an
# "unknown shoes" sub-sentence would teach the text encoder a false attribute.
_UNINFORMATIVE = re.compile(
    r"\bnot (?:clearly |fully |easily |really )?(?:visible|discernible|identifiable|apparent|"
    r"distinguishable|shown|mentioned|specified|provided)\b"
    r"|\b(?:cannot|can ?not|can't|unable to|impossible to|difficult to|hard to)\s+(?:be\s+)?"
    r"(?:see|seen|determine|determined|tell|told|identify|identified|discern|discerned|confirm"
    r"|confirmed)\b"
    r"|\bunclear\b|\bunknown\b|\bnot sure\b|\bno (?:visible )?(?:information|details?)\b"
    r"|\bnot (?:possible|able) to\b", re.I)
_SPACES = re.compile(r"\s+")
_NORM_DROP = re.compile(r"[^a-z0-9 ]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class FilterCounts:
    """How many pieces each rule removed (and how many were kept)."""

    kept: int = 0
    empty: int = 0
    duplicate: int = 0
    not_visible: int = 0
    too_short: int = 0
    gibberish: int = 0

    def as_dict(self) -> dict:
        """The counters as a plain dict (for the summary)."""
        return {"kept": self.kept, "empty": self.empty, "duplicate": self.duplicate,
                "not_visible": self.not_visible, "too_short": self.too_short,
                "gibberish": self.gibberish}


def normalize(text: str) -> str:
    """Comparison key: lower case, punctuation dropped, spaces collapsed."""
    return _SPACES.sub(" ", _NORM_DROP.sub(" ", text.lower())).strip()


def tidy(text: str) -> str:
    """Collapse whitespace, capitalise the first letter and end with a period."""
    s = _SPACES.sub(" ", text).strip().strip("\"'“”‘’").strip()
    if not s:
        return ""
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def is_uninformative(text: str) -> bool:
    """True for pieces that say an attribute is not visible / cannot be determined."""
    return bool(_UNINFORMATIVE.search(text))


def clean_pieces(pieces: list[str], counts: FilterCounts, *, exclude: tuple[str, ...] = (),
                 min_words: int = 1) -> list[str]:
    """Tidy ``pieces`` and drop empty ones, ones under ``min_words`` words, gibberish,
    uninformative ones and duplicates (of each other or of anything in ``exclude``, compared by
    :func:`normalize`); order is kept."""
    seen = {normalize(x) for x in exclude}
    out = []
    for piece in pieces:
        s = tidy(piece) if isinstance(piece, str) else ""
        key = normalize(s)
        if not key:
            counts.empty += 1
        elif len(key.split()) < min_words:
            counts.too_short += 1
        elif not looks_like_english(s):
            counts.gibberish += 1
        elif is_uninformative(s):
            counts.not_visible += 1
        elif key in seen:
            counts.duplicate += 1
        else:
            seen.add(key)
            out.append(s)
            counts.kept += 1
    return out


def split_sentences(text: str) -> list[str]:
    """Naive sentence split, the fallback decomposition when the model's answer is unusable."""
    return [s for s in _SENTENCE_END.split(_SPACES.sub(" ", text).strip()) if s]
