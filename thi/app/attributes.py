"""Attribute queries: answers to THI's 15 VQA questions, typed as form fields, -> one sentence.

Each field takes a short answer ("female", "long black", "a red short-sleeved shirt") or a
whole sentence; "no"/"none" gives the question's negative sentence, "yes" its generic one, an
empty field nothing. The sentences read like the VQA sub-sentences THI aggregates, so the text
encoder meets the phrasing it was trained on (SynthPEDES captions parse back to the same
attributes; tested).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from utils.mllm.prompts import VQA_QUESTIONS


@dataclass(frozen=True)
class Field:
    """One VQA question as a form field: ``key`` (the form name is ``attr_<key>``), the
    question, a placeholder, the sentence ``template`` for a short answer ``{a}``, the
    ``noun`` appended when the answer names none of ``nouns``, and the negative/yes sentences."""

    key: str
    question: str
    placeholder: str
    template: str
    negative: Optional[str] = None
    affirmative: Optional[str] = None
    noun: str = ""
    nouns: tuple = ()
    article: bool = False


FIELDS = (
    Field("gender", VQA_QUESTIONS[0], "female", "The person is {a}."),
    Field("hair", VQA_QUESTIONS[1], "long black", "The person has {a}.", noun="hair",
          nouns=("hair", "bald")),
    Field("upper", VQA_QUESTIONS[2], "red short-sleeved shirt", "The person is wearing {a}.",
          article=True),
    Field("lower", VQA_QUESTIONS[3], "long blue jeans", "The person is wearing {a}."),
    Field("pattern", VQA_QUESTIONS[4], "striped", "The person's clothes have {a}.",
          "There are no patterns on the person's clothes.", None, noun="pattern",
          nouns=("pattern", "logo", "stripes", "print"), article=True),
    Field("shoes", VQA_QUESTIONS[5], "white sneakers", "The person is wearing {a}.",
          noun="shoes", nouns=("shoes", "sneakers", "boots", "sandals", "heels", "slippers")),
    Field("glasses", VQA_QUESTIONS[6], "black", "The person wears {a}.",
          "The person does not wear glasses.", "The person wears glasses.", noun="glasses",
          nouns=("glasses", "sunglasses", "spectacles")),
    Field("scarf", VQA_QUESTIONS[7], "red", "The person is wearing {a}.",
          "The person is not wearing a scarf.", "The person is wearing a scarf.", noun="scarf",
          nouns=("scarf",), article=True),
    Field("held", VQA_QUESTIONS[8], "black umbrella", "The person is holding {a} in the hand.",
          "The person is not holding anything in the hand.",
          "The person is holding something in the hand.", article=True),
    Field("bag", VQA_QUESTIONS[9], "black backpack", "The person carries {a}.",
          "The person does not carry a bag.", "The person carries a backpack.", noun="bag",
          nouns=("bag", "backpack", "handbag", "purse", "suitcase"), article=True),
    Field("hat", VQA_QUESTIONS[10], "white", "The person wears {a}.",
          "The person does not wear a hat.", "The person wears a hat.", noun="hat",
          nouns=("hat", "cap", "beanie", "helmet"), article=True),
    Field("belt", VQA_QUESTIONS[11], "brown", "The person wears {a}.",
          "The person does not wear a belt.", "The person wears a belt.", noun="belt",
          nouns=("belt", "waistband"), article=True),
    Field("action", VQA_QUESTIONS[12], "walking", "The person is {a}."),
    Field("background", VQA_QUESTIONS[13], "a street", "The background is {a}."),
    Field("others", VQA_QUESTIONS[14], "no", "There are {a} in the background.",
          "There are no other people in the background.",
          "There are other people in the background.", noun="people",
          nouns=("people", "persons", "pedestrians", "crowd")),
)
FIELD_KEYS = tuple(f.key for f in FIELDS)
_NO = {"no", "none", "nothing", "nobody", "n/a", "na", "not", "without"}
_YES = {"yes", "y", "true"}
_SENTENCE_START = re.compile(r"^(the|this|he|she|his|her|there|they|it)\s", re.I)
MAX_ANSWER_CHARS = 200


def _with_article(phrase: str) -> str:
    if re.match(r"^(a|an|the|some|two|three|his|her|\d+)\b", phrase, re.I):
        return phrase
    plural = phrase.endswith("s") and not phrase.endswith(("ss", "us"))
    if plural:
        return phrase
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def answer_to_sentence(field: Field, answer: str) -> str:
    """One field's sentence ("" for an empty answer)."""
    a = " ".join(str(answer).split()).strip(" .")
    if not a:
        return ""
    low = a.lower()
    if low in _NO or low.startswith(("no,", "no ")):
        if field.negative:
            return field.negative
        if low in _NO:
            return ""  # "no" to an open question ("what hairstyle?") says nothing
    if low in _YES:
        return field.affirmative or ""
    if _SENTENCE_START.match(a) and len(a.split()) >= 4:
        return a[0].upper() + a[1:] + "."  # already a sentence: keep the person's wording
    words = set(re.findall(r"[a-z]+", low))
    if field.noun and not words & set(field.nouns):
        a = f"{a} {field.noun}"
    if field.article:
        a = _with_article(a)
    return field.template.format(a=a)


def attributes_to_text(answers: Mapping[str, str]) -> str:
    """The query sentence of a filled attribute form ``{key: answer}``; keys are ``FIELD_KEYS``.

    Raises ValueError naming an unknown key or an over-long answer; an all-empty form gives "".
    """
    unknown = sorted(set(answers) - set(FIELD_KEYS))
    if unknown:
        raise ValueError(f"unknown attribute field(s) {', '.join(unknown)}; valid fields: "
                         f"{', '.join(FIELD_KEYS)}")
    sentences = []
    for field in FIELDS:
        answer = answers.get(field.key) or ""
        if len(answer) > MAX_ANSWER_CHARS:
            raise ValueError(f"attribute {field.key!r}: answers are at most {MAX_ANSWER_CHARS} "
                             f"characters")
        sentence = answer_to_sentence(field, answer)
        if sentence:
            sentences.append(sentence)
    return " ".join(sentences)
