"""Parsers for MLLM answers. They never raise on model output: odd text gives a defined
fallback (None for Yes/No, an empty list for lists), and callers count failures with
:class:`ParseStats`.

Compared with the ICL release: Yes/No is read from the answer's first word (the release tests
``'yes' in answer.lower()``, so "No, her eyes are hidden" counted as Yes), and a VQA answer keeps
all its sentences (the release kept only the text after the first ". ").
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .prompts import VQA_QUESTIONS

log = logging.getLogger(__name__)

# Wrapping characters models put around answers: markdown emphasis, quotes, brackets.
_WRAP = "*_`\"'“”‘’«»()[]{}<>#> \t\r\n"
_YES_NO_PREFIX = re.compile(r"^(?:answer|a|response|output)\s*[:：]\s*", re.I)
_FIRST_WORD = re.compile(r"[A-Za-z]+")

_NUMBERED = re.compile(
    r"^\s*(?:[*_]{1,2})?\s*(?:Q(?:uestion)?\s*)?(\d{1,2})\s*[.)）:]\s*(?:[*_]{1,2})?\s*(.*)$", re.I)
_BULLET = re.compile(r"^\s*(?:[-*•·+](?:\s+|$)|\(?\d{1,2}[.)）]\s*|\(\d{1,2}\)\s*)")
_LEADING_YES_NO = re.compile(r"^(?:yes|no)\s*(?:[,.;:!]\s*|\s+-\s+|$)", re.I)
# A short label such as "Gender:" or "**Upper body**:" before the real answer.
_LABEL = re.compile(r"^(?:[A-Za-z/'’ -]{1,30})\s*[:：]\s+(?=\S)")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_UNINFORMATIVE = re.compile(
    r"not (?:clearly |fully |easily |readily )?(?:visible|discernible|determinable|identifiable"
    r"|apparent|shown|specified|mentioned|provided|applicable|possible to (?:determine|tell|see))"
    r"|(?:cannot|can ?not|can't|unable to|impossible to|hard to|difficult to) (?:be )?"
    r"(?:determine|determined|tell|told|see|seen|identify|identified|discern|confirm|say)"
    r"|\bnot clear\b|\bunclear\b|\bunknown\b|\bn/?a\b|\bnot sure\b|\buncertain\b"
    r"|no (?:visible )?information|insufficient", re.I)
_MARKDOWN = re.compile(r"\*\*|__|`")
# Clauses an answer hedges with: "white sneakers, but the brand is not visible".
_CLAUSE_SPLIT = re.compile(r",\s*(?:but|although|though|however|while)\s+|;\s+", re.I)
# Gibberish tests (see looks_like_english): word-shaped tokens and, from three words on, one
# common English word, which every real description sentence has.
_WORD_SHAPE = re.compile(r"[A-Za-z]{1,20}(?:['’-][A-Za-z]{1,20})*")
_VOWEL = re.compile(r"[aeiouyAEIOUY]")
_STRIP = ".,;:!?()[]{}\"'“”‘’*_`#/"
COMMON_WORDS = frozenset("""
a an the this that these those his her he she him it its they them their there here one some
is are was were be been being has have had does do did wears wearing worn wear carries carrying
carry holds holding hold seems appears looks walking standing sitting riding
and or but with without of in on at to from by for over under near behind into while also
no not yes very light dark long short pair large small both only other
person man woman men women boy girl lady guy people male female
hair shirt t-shirt top jacket coat sweater hoodie dress skirt pants trousers jeans shorts shoes
sneakers boots sandals bag backpack handbag hat cap glasses sunglasses scarf belt sleeves
sleeve sleeved collar stripes striped pattern patterns logo color colored colour background
black white red blue green yellow gray grey brown pink purple orange beige navy khaki
""".split())


def parse_yes_no(text: "str | None") -> "bool | None":
    """True/False from the answer's first word ("Yes"/"No" in any case, with markdown, quotes,
    punctuation or an "Answer:" prefix); None when the first word is neither."""
    if not isinstance(text, str):
        return None
    s = text.strip(_WRAP)
    s = _YES_NO_PREFIX.sub("", s).lstrip(_WRAP)
    m = _FIRST_WORD.match(s)
    if not m:
        return None
    word = m.group(0).lower()
    return True if word == "yes" else False if word == "no" else None


def _finish_sentence(s: str) -> str:
    s = s.strip().strip("\"'“”‘’").strip()
    s = s.rstrip(" ,;:!?-–—").strip()
    if not s:
        return ""
    s = s[0].upper() + s[1:]
    return s if s.endswith(".") else s + "."


def _clean_answer(body: str, question: "str | None") -> str:
    """One VQA answer -> one sub-sentence text ("" when nothing informative is left)."""
    s = _MARKDOWN.sub("", body).strip()
    if question and s.lower().startswith(question.lower()):
        s = s[len(question):].strip()  # the model echoed the question before answering
    label = _LABEL.match(s)
    # Strip "Gender: Female"-style labels, but keep "Backpack: color: black; ..." whole.
    if label and len(label.group(0).split()) <= 4 and ":" not in s[label.end():]:
        s = s[label.end():]
    s = _LEADING_YES_NO.sub("", s).strip()
    sentences = [x.strip() for x in _SENTENCE_SPLIT.split(s) if x.strip()]
    kept = []
    for sentence in sentences:
        if not _UNINFORMATIVE.search(sentence):
            kept.append(sentence)
            continue
        # keep the informative clauses of a hedged sentence, drop the hedge
        clauses = [c for c in _CLAUSE_SPLIT.split(sentence) if c.strip()]
        informative = [c.strip() for c in clauses if not _UNINFORMATIVE.search(c)]
        if informative and len(clauses) > 1:
            kept.append(_finish_sentence(", ".join(informative)))
    if not kept:
        return ""
    kept[0] = _LEADING_YES_NO.sub("", kept[0]).strip() or ""
    return _finish_sentence(" ".join(x for x in kept if x))


def _join_continuation(prev: str, line: str) -> str:
    stripped = _BULLET.sub("", line).strip()
    if not stripped:
        return prev
    if not prev:
        return stripped
    if stripped != line.strip() and not prev.rstrip().endswith((":", ".", ";", ",")):
        return f"{prev}; {stripped}"  # a sub-bullet list under one numbered answer
    return f"{prev} {stripped}"


def parse_vqa(text: "str | None") -> list[str]:
    """Numbered answers ("1. ", "1) ", "1.", "**1.**") -> sub-sentences, in order.

    Numbering and a leading Yes/No are dropped, every sentence of an answer is kept, the first
    letter is capitalised and a period ends it; empty and "not visible"/"cannot be determined"
    answers are skipped. Lines after a numbered line belong to that number. Text without any
    numbering gives one answer per non-empty line.
    """
    if not isinstance(text, str):
        return []
    lines = text.replace("\r\n", "\n").split("\n")
    items: list[tuple[int, str]] = []
    for line in lines:
        m = _NUMBERED.match(line)
        if m:
            items.append((int(m.group(1)), m.group(2).strip()))
        elif items and line.strip():
            items[-1] = (items[-1][0], _join_continuation(items[-1][1], line))
    if not items:  # unnumbered: one answer per line (bullets allowed), headers dropped
        items = [(0, _BULLET.sub("", ln).strip()) for ln in lines
                 if ln.strip() and not ln.strip().endswith(":")]
    out = []
    for number, body in items:
        question = VQA_QUESTIONS[number - 1] if 1 <= number <= len(VQA_QUESTIONS) else None
        sentence = _clean_answer(body, question)
        if sentence:
            out.append(sentence)
    return out


def parse_lines(text: "str | None") -> list[str]:
    """Line list for decomposition/rewriting: bullets, numbering, quotes, markdown and empty or
    header ("...:") lines removed; duplicates (ignoring case and spacing) dropped, order kept."""
    if not isinstance(text, str):
        return []
    out, seen = [], set()
    for line in text.replace("\r\n", "\n").split("\n"):
        s = _MARKDOWN.sub("", line).strip()
        s = _BULLET.sub("", s).strip()
        s = s.strip("\"'“”‘’").strip()
        if not any(ch.isalnum() for ch in s) or s.endswith(":"):
            continue
        norm = " ".join(s.lower().split())
        if norm not in seen:
            seen.add(norm)
            out.append(s)
    return out


@dataclass
class ParseStats:
    """Counts of parsed / unparseable answers per kind ("loc", "vqa", ...), logging the first
    ``max_logged`` failures of each kind so a bad prompt or model shows up early."""

    max_logged: int = 3
    ok: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def record(self, kind: str, success: bool, raw: "str | None" = None) -> None:
        """Count one answer of ``kind``; ``raw`` is the model output (logged on failure)."""
        bucket = self.ok if success else self.failed
        bucket[kind] = bucket.get(kind, 0) + 1
        if not success:
            shown = self.examples.setdefault(kind, [])
            if len(shown) < self.max_logged:
                shown.append(raw)
                log.warning("unparseable %s answer (#%d): %.200r", kind, self.failed[kind], raw)

    def summary(self) -> dict:
        """{kind: {"ok": n, "failed": n}} for reports."""
        kinds = sorted(set(self.ok) | set(self.failed))
        return {k: {"ok": self.ok.get(k, 0), "failed": self.failed.get(k, 0)} for k in kinds}


def looks_like_english(text: str) -> bool:
    """True when ``text`` reads as English words (see the module docstring), False for
    gibberish."""
    tokens = [t.strip(_STRIP) for t in text.split()]
    tokens = [t for t in tokens if t]
    if not tokens:
        return False
    shaped = sum(bool(_WORD_SHAPE.fullmatch(t) and _VOWEL.search(t)) for t in tokens)
    if shaped < 0.8 * len(tokens):
        return False
    if len(tokens) < 3:
        return True  # "Female.", "Black backpack.": VQA answers may be one or two words
    return any(t.lower() in COMMON_WORDS for t in tokens)


def looks_like_vqa_reply(parsed: list[str]) -> bool:
    """A VQA answer parsed into sub-sentences (``parse_vqa``) is a reply when it has any and
    most of them read as English."""
    return bool(parsed) and sum(map(looks_like_english, parsed)) * 2 > len(parsed)


def looks_like_sentences(lines: list[str]) -> bool:
    """A decomposition or rewriting answer parsed into lines is a sentence set when it has
    any and most of them read as English."""
    return looks_like_vqa_reply(lines)
