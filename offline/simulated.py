"""A simulated MLLM that answers ICL's prompts from SynthPEDES's attribute table.

It recognises the template of each request (T_LOC, T_VQA, T_AGGR, T_DEC, T_RWT) and answers
from the image's known attributes (localization, VQA) or from the text (aggregation,
decomposition, rewriting), so THI and RDA run end to end on a laptop. A configurable error
rate makes it wrong on purpose (a flipped Yes/No, a hallucinated attribute value), drawn
deterministically from (seed, request content): answers do not depend on batch order or size.

Error profiles (``profile``) replace the one error rate by a per-stage confusion, so that THI is
scored with an MLLM that errs the way a measured one does: localization says Yes on a share of
the pairs the attributes match (``loc_yes_true``) and of those they do not (``loc_yes_false``),
VQA answers are right with ``vqa_accuracy`` (else one attribute is hallucinated), aggregation is
faithful with ``aggr_faithful`` (else one stated value is swapped). ``PROFILES`` names the
measured ones. ``aggregation``: "keep" (the caption plus every new answer, as before) or
"concise" (what T_AGGR asks for: "continuous and concise" text, here the caption plus new facts
while the whole stays within ``text_length`` CLIP tokens; no sentence is cut).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import string
from typing import Mapping, Optional

from utils.mllm.base import BaseClient, MLLMError, Request
from utils.mllm.prompts import T_AGGR, T_DEC, T_LOC, T_RWT, T_VQA
from utils.tokenizer import get_tokenizer

from .synth_schema import ATTRIBUTES_VERSION, QUESTION_ATTRIBUTES, SCHEMA
from .synth_text import answer_sentence, parse_caption

NEUTRAL_ANSWER = "I'm sorry, I cannot answer that."
AGGREGATIONS = ("keep", "concise")

# Per-stage error profiles: (localization Yes on teacher-Yes pairs, Yes on teacher-No pairs,
# VQA accuracy, aggregation faithfulness). "oracle": never errs (an upper bound).
# "tiny-qwen2vl": MEASURED, the greedy answers of the tiny Qwen2-VL fine-tuned on this simulated
# MLLM's answers (offline/tiny_icl.py's doc: 64 prompts per kind on the CI fixtures' test
# split; Yes on 70% of the teacher's Yes and 20% of its No pairs, VQA 100%, aggregation 97%).
# "untuned-tiny-qwen2vl": MEASURED, the same tiny Qwen2-VL before its tuning (random weights),
# which never answers Yes (tiny_icl.py's doc): no anchor, so THI changes nothing; its VQA and
# aggregation are never reached (set to 0 and 0).
PROFILES = {
    "oracle": {"loc_yes_true": 1.0, "loc_yes_false": 0.0, "vqa_accuracy": 1.0, "aggr_faithful": 1.0},
    "tiny-qwen2vl": {"loc_yes_true": 0.70, "loc_yes_false": 0.20, "vqa_accuracy": 1.0,
                     "aggr_faithful": 0.97},
    "untuned-tiny-qwen2vl": {"loc_yes_true": 0.0, "loc_yes_false": 0.0, "vqa_accuracy": 0.0,
                             "aggr_faithful": 0.0},
}
PROFILE_KEYS = ("loc_yes_true", "loc_yes_false", "vqa_accuracy", "aggr_faithful")


def resolve_profile(profile) -> "Optional[dict]":
    """A profile name of ``PROFILES``, a dict, or "k=v,k=v" -> the four rates (None: none)."""
    if profile in (None, ""):
        return None
    if isinstance(profile, str):
        if profile in PROFILES:
            return dict(PROFILES[profile])
        if "=" not in profile:
            raise ValueError(f"unknown MLLM error profile {profile!r}; named ones: "
                             f"{sorted(PROFILES)}, or k=v pairs of {PROFILE_KEYS}")
        profile = dict(kv.split("=", 1) for kv in profile.split(","))
    out = {k: float(profile[k]) for k in PROFILE_KEYS if k in profile}
    unknown = set(profile) - set(PROFILE_KEYS)
    if unknown or len(out) != len(PROFILE_KEYS):
        raise ValueError(f"an MLLM error profile needs exactly {PROFILE_KEYS}, got {sorted(profile)}")
    bad = {k: v for k, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"MLLM error profile rates must be in [0, 1]: {bad}")
    return out
REWRITE_STYLES = ("lines", "numbered", "chatty")
ATTRIBUTES_FILE = "attributes.json"


def _template_regex(template: str) -> "re.Pattern[str]":
    """A regex matching ``template`` with each ``{field}`` captured (``{m}`` as digits)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(rf"(?P<{field}>\d+)" if field == "m" else rf"(?P<{field}>.*)")
    return re.compile("".join(parts), re.S)


_PATTERNS = {kind: _template_regex(t) for kind, t in
             (("loc", T_LOC), ("aggr", T_AGGR), ("dec", T_DEC), ("rwt", T_RWT))}

# Our own phrasing of each attribute group, for sub-sentences built from a partial attribute
# set (answer_sentence needs the full set). Each phrase is checked with parse_caption.
_BACKGROUND_PHRASES = {"street": "on a street", "park": "in a park", "wall": "in front of a wall",
                       "indoor": "indoors"}
_SLEEVE_ADJ = {"long": "long-sleeved", "short": "short-sleeved"}
_PATTERN_SENTENCES = {"plain": "There are no patterns on {pos} clothes.",
                      "striped": "{Pos} clothes have a striped pattern.",
                      "plaid": "{Pos} clothes have a plaid pattern.",
                      "logo": "There is a logo on {pos} clothes."}
_SUBJECT_SWAPS = {
    "the person": ("this person", "the pedestrian", "this pedestrian"),
    "the man": ("this man", "the gentleman", "this guy"),
    "the woman": ("this woman", "the lady", "this lady"),
    "a man": ("a gentleman", "a guy"),
    "a woman": ("a lady",),
    "a person": ("a pedestrian", "someone"),
    "he": ("this man",),
    "she": ("this woman",),
}
_VERB_SWAPS = {
    "is wearing": ("wears", "is dressed in", "has on"),
    "wears": ("is wearing", "is dressed in", "has on"),
    "carries": ("is carrying", "has"),
    "is carrying": ("carries",),
    "holds": ("is holding",),
    "is holding": ("holds",),
    "has": ("is seen with",),
}
_PREFIXES = ("In the image, ", "It can be seen that ", "Looking at the picture, ",
             "As shown in the photo, ", "From the image, ", "Clearly, ")


def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _lower_first(s: str) -> str:
    if len(s) > 1 and s[1].isupper():  # an acronym: leave it
        return s
    return s[:1].lower() + s[1:]


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _read_table(attributes) -> tuple[dict, Optional[str], bytes]:
    """(table, path of its file or None, its bytes) of ``attributes``: a path (see
    :class:`SimulatedClient`) or the table itself."""
    if isinstance(attributes, Mapping):
        return dict(attributes), None, json.dumps(attributes, sort_keys=True).encode()
    path = os.fspath(attributes)
    if os.path.isdir(path):
        path = os.path.join(path, ATTRIBUTES_FILE)
    if not os.path.isfile(path):
        raise MLLMError(f"SynthPEDES attribute sidecar not found: {path!r} (option attributes); "
                        f"generate the dataset with `python -m offline.synthpedes OUT_DIR`")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        table = json.loads(raw)
    except ValueError as exc:
        raise MLLMError(f"{path}: not a SynthPEDES attributes file ({exc})") from exc
    return table, os.path.abspath(path), raw


class SimulatedClient(BaseClient):
    """MLLM stand-in backed by SynthPEDES attributes.

    ``attributes``: the attribute table (a mapping like the sidecar's content: ``version``,
    ``images`` = {path under imgs/: {attribute: value}}, optional ``schema``), or the path of
    ``attributes.json`` or of the dataset folder holding it (with ``imgs/``). ``images_dir``:
    the folder the table's image keys are relative to (default: ``imgs/`` beside the file; for
    a table, images are then matched by their path after ``/imgs/``). ``error_rate``: probability of a wrong answer per localization / VQA /
    aggregation request. ``rewrites_style``: how line lists (decomposition, rewriting) are
    formatted: "lines" (one per line), "numbered" ("1. ..."), "chatty" (a preamble and bullets,
    like a talkative model; the parsers must cope).
    """

    backend = "simulated"

    def __init__(self, attributes, error_rate: float = 0.0, seed: int = 0, cache_dir=None,
                 rewrites_style: str = "lines", max_batch: "Optional[int] | str" = "auto",
                 retry_unusable: bool = True, images_dir=None, profile=None,
                 aggregation: str = "keep", text_length: int = 77, **image_options):
        super().__init__(cache_dir=cache_dir, max_batch=max_batch, retry_unusable=retry_unusable,
                         **image_options)
        if not 0.0 <= float(error_rate) <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if rewrites_style not in REWRITE_STYLES:
            raise ValueError(f"rewrites_style must be one of {REWRITE_STYLES}, got {rewrites_style!r}")
        self.error_rate = float(error_rate)
        self.seed = int(seed)
        self.rewrites_style = rewrites_style
        self.profile = resolve_profile(profile)
        if self.profile is not None and self.error_rate:
            raise ValueError("give the simulated MLLM an error rate or an error profile, not both")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation, self.text_length = aggregation, int(text_length)
        data, path, raw = _read_table(attributes)
        where = path or "the attribute table"
        try:
            images = data["images"]
        except (KeyError, TypeError) as exc:
            raise MLLMError(f"{where}: not a SynthPEDES attributes file ({exc})") from exc
        if data.get("version") != ATTRIBUTES_VERSION:
            raise MLLMError(f"{where}: attributes version {data.get('version')!r} is not the one "
                            f"this code reads; regenerate the dataset")
        self.attributes_path = path or "an attribute table"
        self.images: dict = images
        self.schema = {k: tuple(v) for k, v in (data.get("schema") or SCHEMA).items()}
        if images_dir is not None:
            self.imgs_dir = os.path.abspath(os.fspath(images_dir))
        else:
            self.imgs_dir = os.path.join(os.path.dirname(path), "imgs") if path else None
        self._sidecar_digest = hashlib.sha256(raw).hexdigest()[:16]
        self.stats.update({"flipped": 0, "hallucinated": 0, "unrecognised": 0,
                           "loc": 0, "vqa": 0, "aggr": 0, "dec": 0, "rwt": 0})

    def identity_info(self) -> dict:
        # the sidecar's content, not its path: a copy of the dataset elsewhere answers the same
        info = {"backend": self.backend, "attributes_digest": self._sidecar_digest,
                "error_rate": self.error_rate, "seed": self.seed, "style": self.rewrites_style}
        if self.profile is not None:
            info["profile"] = self.profile
        if self.aggregation != "keep":
            info["aggregation"], info["text_length"] = self.aggregation, self.text_length
        return info

    def describe(self) -> str:
        return f"simulated MLLM on {self.attributes_path}"

    # --- helpers -------------------------------------------------------------------------
    def _rng(self, kind: str, request: Request) -> random.Random:
        """A generator seeded by (seed, request content): independent of batching."""
        image = self._image_key(request) if request.image is not None else ""
        blob = json.dumps([self.seed, kind, request.system, request.text, image])
        return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))

    def _image_key(self, request: Request) -> str:
        image = request.image
        if not isinstance(image, (str, os.PathLike)):
            raise MLLMError("the simulated backend identifies images by their path under the "
                            f"dataset's imgs/ folder ({self.imgs_dir}); pass a path, not a "
                            f"{type(image).__name__}")
        path = os.path.abspath(os.fspath(image))
        if self.imgs_dir is None:
            rel = path.replace(os.sep, "/")
        else:
            rel = os.path.relpath(path, self.imgs_dir).replace(os.sep, "/")
        if self.imgs_dir is None or rel.startswith("../"):
            norm = path.replace(os.sep, "/")  # the same dataset copied elsewhere
            rel = norm.rsplit("/imgs/", 1)[1] if "/imgs/" in norm else rel
        return rel

    def _attrs(self, request: Request, kind: str) -> dict:
        if request.image is None:
            raise MLLMError(f"a {kind} request needs an image (simulated backend)")
        key = self._image_key(request)
        if key not in self.images:
            raise MLLMError(f"image {os.fspath(request.image)!r} (key {key!r}) is not in the "
                            f"SynthPEDES sidecar {self.attributes_path}")
        return self.images[key]

    def _format_list(self, lines: list[str], what: str) -> str:
        if self.rewrites_style == "numbered":
            return "\n".join(f"{i}. {s}" for i, s in enumerate(lines, 1))
        if self.rewrites_style == "chatty":
            return f"Sure! Here are the {what}:\n\n" + "\n".join(f"- {s}" for s in lines)
        return "\n".join(lines)

    # --- the five templates --------------------------------------------------------------
    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: Request) -> str:
        text = request.text
        if text == T_VQA:
            self.stats["vqa"] += 1
            return self._vqa(request)
        for kind, pattern in _PATTERNS.items():
            m = pattern.fullmatch(text)
            if m:
                self.stats[kind] += 1
                return getattr(self, f"_{kind}")(request, **m.groupdict())
        self.stats["unrecognised"] += 1
        return NEUTRAL_ANSWER

    def _loc(self, request: Request, caption: str) -> str:
        attrs = self._attrs(request, "localization")
        said = parse_caption(caption)
        match = bool(said) and all(attrs.get(k) == v for k, v in said.items())
        if self.profile is not None:
            p = self.profile["loc_yes_true" if match else "loc_yes_false"]
            yes = self._rng("loc", request).random() < p
            if yes != match:
                self.stats["flipped"] += 1
            return "Yes" if yes else "No"
        if self._rng("loc", request).random() < self.error_rate:
            match = not match
            self.stats["flipped"] += 1
        return "Yes" if match else "No"

    def _vqa(self, request: Request) -> str:
        attrs = dict(self._attrs(request, "VQA"))
        rng = self._rng("vqa", request)
        wrong = (1.0 - self.profile["vqa_accuracy"]) if self.profile is not None else self.error_rate
        if rng.random() < wrong:
            attrs = self._hallucinate(attrs, rng)
            self.stats["hallucinated"] += 1
        return "\n".join(f"{i + 1}. {answer_sentence(i, attrs)}"
                         for i in range(len(QUESTION_ATTRIBUTES)))

    def _hallucinate(self, attrs: dict, rng: random.Random) -> dict:
        """``attrs`` with one attribute a VQA question asks about set to another valid value."""
        groups = QUESTION_ATTRIBUTES
        candidates = [a for g in groups for a in g
                      if not (a == "bag_color" and attrs.get("bag") == "none")]
        attr = rng.choice(candidates)
        options = [v for v in self.schema[attr] if v != attrs[attr]
                   and not (attr == "bag_color" and v == "none")]
        attrs[attr] = rng.choice(options)
        if attr == "bag":  # keep the pair consistent so the answer stays a sentence
            attrs["bag_color"] = ("none" if attrs["bag"] == "none" else
                                  attrs["bag_color"] if attrs["bag_color"] != "none" else
                                  rng.choice([c for c in self.schema["bag_color"] if c != "none"]))
        return attrs

    def _aggr(self, request: Request, subtexts: str) -> str:
        try:
            items = ast.literal_eval(subtexts.strip())
        except (ValueError, SyntaxError):
            items = None
        if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
            self.stats["unrecognised"] += 1
            return NEUTRAL_ANSWER
        parse = parse_caption
        caption, rest = items[0].strip(), items[1:]
        known = dict(parse(caption))
        pron = {"male": "He", "female": "She"}.get(known.get("gender", ""), "The person")
        added = []
        for sentence in rest:
            said = parse(sentence)
            new = {k: v for k, v in said.items() if k not in known}
            conflict = any(known.get(k, v) != v for k, v in said.items())
            if not new or conflict:
                continue  # already in the caption, or contradicts it: the caption wins
            known.update(new)
            s = sentence.strip()
            if pron != "The person" and re.match(r"the person\b", s, re.I):
                s = pron + s[len("the person"):]  # "The person wears..." -> "She wears..."
            added.append(s if s.endswith(".") else s + ".")
        if caption and not caption.endswith("."):
            caption += "."
        if self.aggregation == "concise":
            added = self._within_length(caption, added)
        out = " ".join([caption] + added).strip()
        rng = self._rng("aggr", request)
        wrong = (1.0 - self.profile["aggr_faithful"]) if self.profile is not None else self.error_rate
        if rng.random() < wrong:
            changed = self._hallucinate_text(out, rng)
            if changed != out:
                out = changed
                self.stats["hallucinated"] += 1
        return out

    def _within_length(self, caption: str, added: list) -> list:
        """The new sentences, in order, while caption + them stays within the text length (CLIP
        tokens, start and end tokens included); a sentence that does not fit is left out whole."""
        tok = get_tokenizer()
        budget = self.text_length - 2 - len(tok.encode(caption))
        kept = []
        for s in added:
            n = len(tok.encode(" " + s))
            if n <= budget:
                kept.append(s)
                budget -= n
        return kept

    def _hallucinate_text(self, text: str, rng: random.Random) -> str:
        """``text`` with one stated attribute value replaced by another (checked by parsing)."""
        parse = parse_caption
        said = parse(text)
        options = [(k, v) for k, v in sorted(said.items()) if v not in ("none", "yes", "plain")]
        rng.shuffle(options)
        for attr, value in options:
            pattern = re.compile(rf"\b{re.escape(value)}\b", re.I)
            if not pattern.search(text):
                continue
            for other in rng.sample(self.schema[attr], len(self.schema[attr])):
                if other in (value, "none", "yes"):
                    continue
                candidate = pattern.sub(other, text, count=1)
                if parse(candidate).get(attr) == other:
                    return candidate
        return text

    def _dec(self, request: Request, text: str) -> str:
        said = parse_caption(text)
        lines = self.group_sentences(said)
        if not lines:
            lines = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
        return self._format_list(lines, "sub-sentences")

    def _rwt(self, request: Request, text: str, m: str) -> str:
        rewrites = self.paraphrases(text.strip(), int(m), self._rng("rwt", request))
        return self._format_list(rewrites, "rewrites")

    # --- text building blocks ------------------------------------------------------------
    @staticmethod
    def group_sentences(said: dict) -> list[str]:
        """One sentence per VQA attribute group present in ``said`` (a parse_caption result),
        each stating exactly that group's known attributes."""
        g = said.get("gender")
        subj = {"male": "The man", "female": "The woman"}.get(g, "The person")
        pos = {"male": "his", "female": "her"}.get(g, "the person's")
        out = []
        if g:
            out.append(f"The person is {g}.")
        hair = " ".join(x for x in (said.get("hair_length"), said.get("hair_color")) if x)
        if hair:
            out.append(f"{subj} has {hair} hair.")
        if "upper_type" in said:
            words = [said.get("upper_color"), _SLEEVE_ADJ.get(said.get("sleeve", "")),
                     said["upper_type"]]
            out.append(f"{subj} is wearing {_a(' '.join(w for w in words if w))}.")
        elif "sleeve" in said:
            out.append(f"{_upper_first(pos)} top has {said['sleeve']} sleeves.")
        if "pattern" in said:
            out.append(_PATTERN_SENTENCES[said["pattern"]].format(pos=pos, Pos=_upper_first(pos)))
        if "lower_type" in said:
            words = " ".join(w for w in (said.get("lower_length"), said.get("lower_color"),
                                         said["lower_type"]) if w)
            out.append(f"{subj} is wearing {_a(words) if said['lower_type'] == 'skirt' else words}.")
        shoes = " ".join(w for w in (said.get("shoes_color"), said.get("shoes_style")) if w)
        if shoes:
            out.append(f"{subj} is wearing {shoes if 'shoes_style' in said else shoes + ' shoes'}.")
        for item in ("glasses", "scarf", "hat", "belt"):
            if item in said:
                value = said[item]
                noun = "glasses" if item == "glasses" else _a(item)
                out.append(f"{subj} does not wear {noun}." if value == "none" else
                           f"{subj} wears {value} glasses." if item == "glasses" else
                           f"{subj} wears {_a(value + ' ' + item)}.")
        if "held" in said:
            out.append(f"{subj} holds nothing in the hand." if said["held"] == "none" else
                       f"{subj} holds {_a(said['held'])} in the hand.")
        if "bag" in said or "bag_color" in said:
            bag, color = said.get("bag"), said.get("bag_color")
            if bag == "none":
                out.append(f"{subj} does not carry a bag.")
            else:
                out.append(f"{subj} carries {_a(' '.join(w for w in (color, bag or 'bag') if w))}.")
        if "action" in said:
            out.append(f"{subj} is {said['action']}.")
        if "background" in said:
            out.append(f"{subj} is {_BACKGROUND_PHRASES[said['background']]}.")
        if "others" in said:
            out.append("There are other people in the background." if said["others"] == "yes"
                       else "There are no other people in the background.")
        return out

    def paraphrases(self, sentence: str, m: int, rng: random.Random) -> list[str]:
        """``m`` distinct rewrites of ``sentence`` that parse to the same attributes."""
        parse = parse_caption
        target = parse(sentence)
        base = sentence if sentence.endswith((".", "!", "?")) else sentence + "."
        swapped = {base}
        for table in (_SUBJECT_SWAPS, _VERB_SWAPS):
            for variant in list(swapped):
                for old, news in table.items():
                    pat = re.compile(rf"\b{re.escape(old)}\b", re.I)
                    if pat.search(variant):
                        for new in news:
                            def repl(mt, new=new):
                                return _upper_first(new) if mt.group(0)[:1].isupper() else new
                            swapped.add(pat.sub(repl, variant, count=1))
        candidates = sorted(swapped - {base})
        rng.shuffle(candidates)
        prefixed = [p + _lower_first(c) for c in [base] + candidates for p in _PREFIXES]
        rng.shuffle(prefixed)
        out, seen = [], {base.lower()}
        for c in candidates + prefixed:
            if len(out) >= m:
                break
            if c.lower() not in seen and parse(c) == target:
                seen.add(c.lower())
                out.append(c)
        k = 0
        while len(out) < m:  # a very large m: stack two prefixes
            c = _PREFIXES[k % len(_PREFIXES)] + _lower_first(prefixed[k // len(_PREFIXES) % len(prefixed)])
            k += 1
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
            if k > 10 * (m + len(prefixed)):
                break
        return out
