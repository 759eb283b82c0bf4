"""SynthPEDES text: captions from attribute sets, VQA answer sentences, and the parser that
reads attributes back from any text composed of them.

Every phrase built here knows the attributes it expresses, so ``compose_caption`` returns the
exact attribute dict a reader can recover, and ``parse_caption`` recovers exactly that. The
parser works on word tokens: an attribute noun (jacket, hair, glasses...) takes the colour /
length / sleeve adjectives directly in front of it; a negation (no, not, without, nothing)
applies to the next attribute noun of the same clause.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable

from .synth_schema import QUESTION_ATTRIBUTES, SCHEMA

# ---------------------------------------------------------------------------- vocabulary
_GENDER_WORDS = {
    "male": {"man", "male", "men", "gentleman", "boy", "guy", "he", "him", "his"},
    "female": {"woman", "female", "women", "lady", "girl", "she", "her", "hers"},
}
_COLOR_WORDS = {c: c for c in SCHEMA["upper_color"]} | {"grey": "gray"}
_HAIR_COLOR_WORDS = {c: c for c in SCHEMA["hair_color"]} | {"blond": "blonde", "grey": "gray"}
_UPPER_NOUNS = {"t-shirt": "t-shirt", "tshirt": "t-shirt", "tee": "t-shirt", "shirt": "shirt",
                "jacket": "jacket", "coat": "coat", "sweater": "sweater"}
_LOWER_NOUNS = {"trousers": "trousers", "pants": "trousers", "jeans": "jeans", "shorts": "shorts",
                "skirt": "skirt"}
_SHOE_NOUNS = {"sneakers": "sneakers", "boots": "boots", "sandals": "sandals", "shoes": None}
_BAG_NOUNS = {"backpack": "backpack", "handbag": "handbag", "shoulder_bag": "shoulder bag", "bag": None}
_HELD_NOUNS = {"phone": "phone", "umbrella": "umbrella", "cup": "cup", "book": "book"}
_ACCESSORY_NOUNS = {"glasses": "glasses", "sunglasses": "glasses", "scarf": "scarf", "hat": "hat",
                    "cap": "hat", "belt": "belt", "waistband": "belt"}
_ACTION_WORDS = {"walking": "walking", "walks": "walking", "walk": "walking",
                 "standing": "standing", "stands": "standing", "stand": "standing",
                 "running": "running", "runs": "running", "run": "running"}
_BACKGROUND_WORDS = {"street": "street", "road": "street", "park": "park", "wall": "wall",
                     "indoor": "indoor", "indoors": "indoor", "inside": "indoor"}
_PATTERN_WORDS = {"striped": "striped", "stripes": "striped", "plaid": "plaid", "checked": "plaid",
                  "logo": "logo", "plain": "plain"}
_SLEEVE_WORDS = {"long-sleeved": "long", "short-sleeved": "short"}
_LENGTH_WORDS = {"long", "short"}
_ADJECTIVES = (set(_COLOR_WORDS) | set(_HAIR_COLOR_WORDS) | set(_SLEEVE_WORDS) | _LENGTH_WORDS
               | {"striped", "plaid", "checked", "plain", "dark", "light"})
_NEGATIONS = {"no", "not", "without", "nothing", "never", "neither", "nor", "none", "nobody"}
_CLAUSE_WORDS = {"and", "but", "while", "with", "who", "which", "whereas"}
_OTHER_PEOPLE = {"people", "pedestrians", "persons"}

_TOKEN_RE = re.compile(r"[a-z]+(?:[-_][a-z]+)*|[.,;:!?()\n]")


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"shoulder[\s-]+bag", "shoulder_bag", text)
    text = re.sub(r"t\s*-\s*shirt", "t-shirt", text)
    text = text.replace("empty-handed", "empty_handed")
    return _TOKEN_RE.findall(text)


def _clauses(tokens: list[str]) -> list[list[str]]:
    clauses, current = [], []
    for tok in tokens:
        if not tok[0].isalpha() or tok in _CLAUSE_WORDS:
            if current:
                clauses.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        clauses.append(current)
    return clauses


def _adjectives(clause: list[str], i: int) -> list[str]:
    """The adjective run directly in front of token ``i``."""
    out = []
    j = i - 1
    while j >= 0 and clause[j] in _ADJECTIVES:
        out.append(clause[j])
        j -= 1
    return out


def _parse_token(clause: list[str], i: int, negated: bool, put: Callable[[str, str | None], None]) -> bool:
    """Record what token ``i`` of ``clause`` states -> whether it used up a preceding negation
    (a noun it applies to); words that only colour a later noun leave the negation standing."""
    adjs = _adjectives(clause, i)
    colors = [_COLOR_WORDS[a] for a in adjs if a in _COLOR_WORDS]
    color = colors[0] if colors else None
    lengths = [a for a in adjs if a in _LENGTH_WORDS]
    tok = clause[i]
    consumed = True
    if tok in _UPPER_NOUNS:
        put("upper_type", _UPPER_NOUNS[tok])
        put("upper_color", color)
        for a in adjs:
            if a in _SLEEVE_WORDS:
                put("sleeve", _SLEEVE_WORDS[a])
    elif tok in ("sleeves", "sleeve") and lengths:
        put("sleeve", lengths[0])
    elif tok in _LOWER_NOUNS:
        put("lower_type", _LOWER_NOUNS[tok])
        put("lower_color", color)
        put("lower_length", lengths[0] if lengths else None)
    elif tok == "hair":
        hair_colors = [_HAIR_COLOR_WORDS[a] for a in adjs if a in _HAIR_COLOR_WORDS]
        put("hair_color", hair_colors[0] if hair_colors else None)
        put("hair_length", lengths[0] if lengths else None)
    elif tok in _SHOE_NOUNS:
        put("shoes_style", _SHOE_NOUNS[tok])
        put("shoes_color", color)
    elif tok in _ACCESSORY_NOUNS:
        put(_ACCESSORY_NOUNS[tok], "none" if negated else color)
    elif tok in _BAG_NOUNS:
        if negated:
            put("bag", "none")
            put("bag_color", "none")
        else:
            put("bag", _BAG_NOUNS[tok])
            put("bag_color", color)
    elif tok in _HELD_NOUNS:
        if not negated:
            put("held", _HELD_NOUNS[tok])
    elif tok in ("hand", "hands"):
        if negated:
            put("held", "none")
        else:
            consumed = False
    elif tok == "empty_handed":
        put("held", "none")
    elif tok in ("pattern", "patterns"):
        if negated:
            put("pattern", "plain")
        else:
            consumed = False
    elif tok == "other" and i + 1 < len(clause) and clause[i + 1] in _OTHER_PEOPLE:
        put("others", "none" if negated else "yes")
    elif tok == "alone":
        put("others", "none")
    else:
        consumed = False
        if tok in _PATTERN_WORDS and not negated:
            put("pattern", _PATTERN_WORDS[tok])
        elif tok in _ACTION_WORDS and not negated:
            put("action", _ACTION_WORDS[tok])
        elif tok in _BACKGROUND_WORDS and not negated:
            put("background", _BACKGROUND_WORDS[tok])
        else:
            for gender, words in _GENDER_WORDS.items():
                if tok in words:
                    put("gender", gender)
    return consumed


def parse_caption(text: str) -> dict[str, str]:
    """The SynthPEDES attributes ``text`` states (only those it can identify; the first
    mention of an attribute wins). Insensitive to case, punctuation and sentence order."""
    found: dict[str, str] = {}

    def put(attr: str, value: str | None) -> None:
        if value is not None:
            found.setdefault(attr, value)

    for clause in _clauses(_tokens(text)):
        negated = False
        for i, tok in enumerate(clause):
            if tok in _NEGATIONS:
                negated = True
                if tok == "nobody":
                    put("others", "none")
                continue
            if _parse_token(clause, i, negated, put):
                negated = False
    return found


# ---------------------------------------------------------------------------- phrases
def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_art(phrase: str) -> str:
    return f"{_art(phrase)} {phrase}"


_SLEEVE_ADJ = {"long": "long-sleeved", "short": "short-sleeved"}
_BG_PHRASES = {
    "street": ("on a street", "on the street", "by the road"),
    "park": ("in a park", "in the park"),
    "wall": ("in front of a brick wall", "next to a wall"),
    "indoor": ("indoors", "inside a building"),
}
_BG_NOUNS = {"street": "a street", "park": "a park", "wall": "a brick wall", "indoor": "an indoor room"}
_ACTION_VERBS = {"walking": "walks", "standing": "stands", "running": "runs"}
Phrase = tuple[str, dict[str, str]]


def _upper_phrase(a: dict[str, str], rng: random.Random) -> Phrase:
    kind, color, sleeve = a["upper_type"], a["upper_color"], a["sleeve"]
    ex = {"upper_type": kind, "upper_color": color}
    words = [color]
    suffix = ""
    if rng.random() < 0.5:
        ex["pattern"] = a["pattern"]
        if a["pattern"] == "logo":
            suffix = " with a logo"
        else:
            words.insert(0, a["pattern"])
    sleeve_mode = rng.random()
    if sleeve_mode < 0.45:
        words.append(_SLEEVE_ADJ[sleeve])
        ex["sleeve"] = sleeve
    elif sleeve_mode < 0.65 and not suffix:
        suffix = f" with {sleeve} sleeves"
        ex["sleeve"] = sleeve
    return _with_art(" ".join(words + [kind])) + suffix, ex


def _lower_phrase(a: dict[str, str], rng: random.Random) -> Phrase:
    kind, color, length = a["lower_type"], a["lower_color"], a["lower_length"]
    ex = {"lower_type": kind, "lower_color": color}
    words = [color, kind]
    if rng.random() < 0.5:
        words.insert(0, length)
        ex["lower_length"] = length
    body = " ".join(words)
    if kind == "skirt":
        return _with_art(body), ex
    return (f"a pair of {body}" if rng.random() < 0.3 else body), ex


def _hair_phrase(a: dict[str, str], rng: random.Random) -> Phrase:
    mode = rng.random()
    if mode < 0.6:
        return f"{a['hair_length']} {a['hair_color']} hair", {"hair_length": a["hair_length"],
                                                              "hair_color": a["hair_color"]}
    if mode < 0.8:
        return f"{a['hair_color']} hair", {"hair_color": a["hair_color"]}
    return f"{a['hair_length']} hair", {"hair_length": a["hair_length"]}


def _shoes_phrase(a: dict[str, str], rng: random.Random) -> Phrase:
    mode = rng.random()
    if mode < 0.55:
        body, ex = f"{a['shoes_color']} {a['shoes_style']}", {"shoes_color": a["shoes_color"],
                                                               "shoes_style": a["shoes_style"]}
    elif mode < 0.8:
        body, ex = f"{a['shoes_color']} shoes", {"shoes_color": a["shoes_color"]}
    else:
        body, ex = a["shoes_style"], {"shoes_style": a["shoes_style"]}
    return (f"a pair of {body}" if rng.random() < 0.3 else body), ex


def _bag_phrase(a: dict[str, str], rng: random.Random) -> Phrase:
    if rng.random() < 0.75:
        return _with_art(f"{a['bag_color']} {a['bag']}"), {"bag": a["bag"], "bag_color": a["bag_color"]}
    return _with_art(a["bag"]), {"bag": a["bag"]}


def _accessory_np(attr: str, color: str) -> str:
    return f"{color} glasses" if attr == "glasses" else _with_art(f"{color} {attr}")


def _subject(a: dict[str, str], rng: random.Random, gendered: bool) -> tuple[str, str, dict[str, str]]:
    """(subject noun phrase, pronoun for later sentences, expressed)."""
    if gendered:
        noun = "man" if a["gender"] == "male" else "woman"
        subject = rng.choice((f"A {noun}", f"A young {noun}", f"The {noun}", f"This {noun}",
                              f"A {a['gender']} pedestrian"))
        return subject, ("He" if a["gender"] == "male" else "She"), {"gender": a["gender"]}
    return rng.choice(("A person", "A pedestrian", "Someone", "The pedestrian")), "The person", {}


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _vague_options(a: dict[str, str]) -> dict[str, list[tuple[str, str, dict[str, str]]]]:
    """Per facet, the short phrases a vague caption may use: (verb, object, expressed)."""
    plural = a["lower_type"] != "skirt"
    lower_np = (lambda body: body if plural else _with_art(body))
    opts = {
        "upper": [("wearing", _with_art(a["upper_type"]), {"upper_type": a["upper_type"]}),
                  ("wearing", _with_art(f"{a['upper_color']} {a['upper_type']}"),
                   {"upper_type": a["upper_type"], "upper_color": a["upper_color"]})],
        "lower": [("wearing", lower_np(a["lower_type"]), {"lower_type": a["lower_type"]}),
                  ("wearing", lower_np(f"{a['lower_color']} {a['lower_type']}"),
                   {"lower_type": a["lower_type"], "lower_color": a["lower_color"]})],
        "hair": [("with", f"{a['hair_color']} hair", {"hair_color": a["hair_color"]}),
                 ("with", f"{a['hair_length']} hair", {"hair_length": a["hair_length"]}),
                 ("with", f"{a['hair_length']} {a['hair_color']} hair",
                  {"hair_length": a["hair_length"], "hair_color": a["hair_color"]})],
        "shoes": [("wearing", a["shoes_style"], {"shoes_style": a["shoes_style"]}),
                  ("wearing", f"{a['shoes_color']} shoes", {"shoes_color": a["shoes_color"]})],
    }
    if a["bag"] != "none":
        opts["bag"] = [("carrying", _with_art(a["bag"]), {"bag": a["bag"]}),
                       ("carrying", _with_art(f"{a['bag_color']} {a['bag']}"),
                        {"bag": a["bag"], "bag_color": a["bag_color"]})]
    if a["hat"] != "none":
        opts["hat"] = [("wearing", _accessory_np("hat", a["hat"]), {"hat": a["hat"]})]
    if a["held"] != "none":
        opts["held"] = [("holding", _with_art(a["held"]), {"held": a["held"]})]
    return opts


def _vague_caption(a: dict[str, str], rng: random.Random, subject: str,
                   ex: dict[str, str]) -> tuple[str, dict[str, str]]:
    """"A woman in a red jacket.": two or three attributes in all (the subject's gender counts)."""
    remaining = rng.choice((2, 3)) - len(ex)
    options = _vague_options(a)
    facets = list(options)
    rng.shuffle(facets)
    parts: list[tuple[str, str]] = []
    for facet in facets:
        fitting = [o for o in options[facet] if len(o[2]) <= remaining]
        if not fitting:
            continue
        verb, obj, e = rng.choice(fitting)
        parts.append((verb, obj))
        ex.update(e)
        remaining -= len(e)
        if remaining <= 0:
            break
    # Group by verb: "A woman with long hair, wearing a red jacket and jeans."
    pieces = []
    for verb in ("with", "wearing", "carrying", "holding"):
        objs = [t for v, t in parts if v == verb]
        if objs:
            pieces.append(f"{verb} {_join(objs)}")
    if pieces[0].startswith("wearing") and rng.random() < 0.5:
        pieces[0] = "in " + pieces[0][len("wearing "):]
    return f"{subject} {', '.join(pieces)}.", ex


def _clothing_sentences(a: dict[str, str], rng: random.Random, detail: str, subject: str, pron: str,
                        ex: dict[str, str]) -> list[str]:
    """The upper and lower garments, shoes and hair in one or two sentences."""
    sentences: list[str] = []
    upper, e_up = _upper_phrase(a, rng)
    lower, e_low = _lower_phrase(a, rng)
    ex.update(e_up)
    ex.update(e_low)
    clothes = [upper, lower]
    include_hair = detail == "full" or rng.random() < 0.5
    include_shoes = detail == "full" or rng.random() < 0.4
    if include_shoes:
        shoes, e = _shoes_phrase(a, rng)
        clothes.append(shoes)
        ex.update(e)
    if include_hair:
        hair, e = _hair_phrase(a, rng)
        ex.update(e)
        if rng.random() < 0.5:
            sentences.append(f"{subject} with {hair} is wearing {_join(clothes)}.")
        else:
            sentences.append(f"{subject} has {hair}.")
            sentences.append(f"{pron} is wearing {_join(clothes)}.")
    else:
        sentences.append(f"{subject} is wearing {_join(clothes)}.")
    return sentences


def _accessory_sentences(a: dict[str, str], rng: random.Random, detail: str, pron: str,
                         ex: dict[str, str]) -> list[str]:
    """Present accessories listed together, absent ones (full captions only) one by one."""
    sentences: list[str] = []
    present = [k for k in ("glasses", "scarf", "hat", "belt") if a[k] != "none"]
    absent = [k for k in ("glasses", "scarf", "hat", "belt") if a[k] == "none"]
    if detail == "medium":
        present = [k for k in present if rng.random() < 0.5]
        absent = []
    else:
        absent = [k for k in absent if rng.random() < 0.3]
    if present:
        sentences.append(f"{pron} also wears {_join([_accessory_np(k, a[k]) for k in present])}.")
        ex.update({k: a[k] for k in present})
    for k in absent:
        noun = "glasses" if k == "glasses" else _with_art(k)
        sentences.append(rng.choice((f"{pron} does not wear {noun}.", f"{pron} is not wearing {noun}.")))
        ex[k] = "none"
    return sentences


def _carry_sentences(a: dict[str, str], rng: random.Random, detail: str, pron: str,
                     ex: dict[str, str]) -> list[str]:
    """The bag and the held object (or, in full captions now and then, their absence)."""
    sentences: list[str] = []
    carry = []
    if a["bag"] != "none" and (detail == "full" or rng.random() < 0.6):
        text, e = _bag_phrase(a, rng)
        carry.append(f"carries {text}")
        ex.update(e)
    elif a["bag"] == "none" and detail == "full" and rng.random() < 0.3:
        sentences.append(f"{pron} does not carry a bag.")
        ex.update({"bag": "none", "bag_color": "none"})
    if a["held"] != "none" and (detail == "full" or rng.random() < 0.5):
        carry.append(f"holds {_with_art(a['held'])} in the hand")
        ex["held"] = a["held"]
    elif a["held"] == "none" and detail == "full" and rng.random() < 0.2:
        sentences.append(f"{pron} holds nothing in the hand.")
        ex["held"] = "none"
    if carry:
        sentences.append(f"{pron} {_join(carry)}.")
    return sentences


def _scene_sentences(a: dict[str, str], rng: random.Random, detail: str, pron: str,
                     ex: dict[str, str]) -> list[str]:
    """The action, the background and the other people."""
    sentences: list[str] = []
    if detail == "full" or rng.random() < 0.4:
        action = a["action"]
        verb = f"is {action}" if rng.random() < 0.6 else _ACTION_VERBS[action]
        ex["action"] = action
        if detail == "full" or rng.random() < 0.5:
            sentences.append(f"{pron} {verb} {rng.choice(_BG_PHRASES[a['background']])}.")
            ex["background"] = a["background"]
        else:
            sentences.append(f"{pron} {verb}.")
    if detail == "full" and rng.random() < 0.5:
        sentences.append("Other people can be seen in the background." if a["others"] == "yes"
                         else "There are no other people around.")
        ex["others"] = a["others"]
    return sentences


def compose_caption(a: dict[str, str], rng: random.Random, detail: str = "full") -> tuple[str, dict[str, str]]:
    """A caption of image attributes ``a`` -> (text, the attributes it expresses).

    ``detail``: "full" (most attributes, including absent accessories now and then),
    "medium" (clothing and a few extras) or "vague" (two or three attributes). The parts are
    composed in a fixed order, so ``rng`` gives one caption.
    """
    if detail not in ("full", "medium", "vague"):
        raise ValueError(f"detail must be full, medium or vague, got {detail!r}")
    ex: dict[str, str] = {}
    gendered = rng.random() < {"full": 0.85, "medium": 0.6, "vague": 0.4}[detail]
    subject, pron, sub_ex = _subject(a, rng, gendered)
    ex.update(sub_ex)
    if detail == "vague":
        return _vague_caption(a, rng, subject, ex)
    sentences = _clothing_sentences(a, rng, detail, subject, pron, ex)
    sentences += _accessory_sentences(a, rng, detail, pron, ex)
    sentences += _carry_sentences(a, rng, detail, pron, ex)
    sentences += _scene_sentences(a, rng, detail, pron, ex)
    return " ".join(sentences), ex


# ---------------------------------------------------------------------------- VQA answers
def answer_sentence(question_index: int, attrs: dict[str, str]) -> str:
    """A full-sentence answer to VQA question ``question_index`` (0-based; see
    ``QUESTION_ATTRIBUTES``) about an image with attributes ``attrs``."""
    if not 0 <= question_index < len(QUESTION_ATTRIBUTES):
        raise ValueError(f"question_index must be in 0..{len(QUESTION_ATTRIBUTES) - 1}, got {question_index}")
    a = attrs
    q = question_index
    if q == 0:
        return f"The person is {a['gender']}."
    if q == 1:
        return f"The person has {a['hair_length']} {a['hair_color']} hair."
    if q == 2:
        garment = f"{a['upper_color']} {_SLEEVE_ADJ[a['sleeve']]} {a['upper_type']}"
        return f"The person is wearing {_with_art(garment)}."
    if q == 3:
        body = f"{a['lower_length']} {a['lower_color']} {a['lower_type']}"
        return f"The person is wearing {_with_art(body) if a['lower_type'] == 'skirt' else body}."
    if q == 4:
        return {"plain": "No, there are no patterns on the person's clothes.",
                "striped": "Yes, the person's clothes have a striped pattern.",
                "plaid": "Yes, the person's clothes have a plaid pattern.",
                "logo": "Yes, there is a logo on the person's clothes."}[a["pattern"]]
    if q == 5:
        return f"The person is wearing {a['shoes_color']} {a['shoes_style']}."
    if q == 6:
        return ("No, the person does not wear glasses." if a["glasses"] == "none"
                else f"Yes, the person wears {a['glasses']} glasses.")
    if q == 7:
        return ("No, the person is not wearing a scarf." if a["scarf"] == "none"
                else f"Yes, the person is wearing {_with_art(a['scarf'] + ' scarf')}.")
    if q == 8:
        return ("No, the person is not holding anything in the hand." if a["held"] == "none"
                else f"Yes, the person is holding {_with_art(a['held'])} in the hand.")
    if q == 9:
        return ("No, the person does not carry a bag." if a["bag"] == "none"
                else f"Yes, the person carries {_with_art(a['bag_color'] + ' ' + a['bag'])}.")
    if q == 10:
        return ("No, the person does not wear a hat." if a["hat"] == "none"
                else f"Yes, the person wears {_with_art(a['hat'] + ' hat')}.")
    if q == 11:
        return ("No, the person does not wear a belt." if a["belt"] == "none"
                else f"Yes, the person wears {_with_art(a['belt'] + ' belt')}.")
    if q == 12:
        return f"The person is {a['action']}."
    if q == 13:
        return f"The background is {_BG_NOUNS[a['background']]}."
    return ("Yes, there are other people in the background." if a["others"] == "yes"
            else "No, there are no other people in the background.")
