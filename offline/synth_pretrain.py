"""SynthPEDES-pretrain: a large image-caption corpus for pre-training a tiny CLIP.

The paper's effects (TAL at tau 0.015, CCD under noise, RDA, THI) assume a backbone that already
knows images and language, as OpenAI's CLIP does from web data. This corpus plays the web
data's role for the tiny CLIP of the CPU world. It is drawn from a *different distribution* than
the SynthPEDES benchmark, as web data differs from CUHK-PEDES:

* other identities: a separate random stream (string seed ``"synth-pretrain:<seed>"``, never an
  integer seed of the benchmark), attributes drawn independently from a corpus-level *clothing
  mix* (per-attribute value weights from a seeded Dirichlet, not the benchmark's hand-set
  weights), no look-alike clusters, one image per identity;
* other wording: captions come from templates of their own (``describe``: narrative,
  photo-alt-text and tag-list styles, with synonyms such as "pants", "tee", "grey",
  "trainers", "rucksack"), richer than the benchmark's (almost every attribute is named)
  and never built from ``synth_text.compose_caption``.

Images come from the benchmark's renderer (``synth_render.render_person``) at the benchmark's
size and are then resized like the training transform does, so the pixels follow the same
rendering rules: what differs is who is drawn and how they are described.

``generate_corpus(num_images, seed)`` returns the corpus in memory (uint8 images and captions);
nothing is written, so a pretraining run regenerates it deterministically.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from .synth_render import render_person
from .synth_schema import IDENTITY_ATTRIBUTES, SCHEMA, fix_constraints, sample_image_attributes

__all__ = ["PretrainCorpus", "clothing_mix", "sample_pretrain_identity", "describe", "generate_corpus"]

# Attributes whose absence ("none") keeps the benchmark's rough frequency: a corpus where most
# people wore a hat, glasses and a scarf at once would be a different world, not a different mix.
_NONE_SHARE = {"glasses": 0.65, "scarf": 0.7, "hat": 0.65, "belt": 0.6, "bag": 0.3}


@dataclass
class PretrainCorpus:
    """``images`` uint8 [N, H, W, 3]; ``captions`` N lists of captions; ``attributes`` N dicts."""

    images: np.ndarray
    captions: list[list[str]]
    attributes: list[dict[str, str]]
    mix: dict[str, dict[str, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def clothing_mix(rng: random.Random, alpha: float = 2.0) -> dict[str, dict[str, float]]:
    """Per identity attribute, value weights drawn from a symmetric Dirichlet(``alpha``): every
    value keeps support (so every word is seen), but the mix differs from the benchmark's."""
    mix: dict[str, dict[str, float]] = {}
    for attr in IDENTITY_ATTRIBUTES:
        values = [v for v in SCHEMA[attr] if v != "none"]
        draws = [rng.gammavariate(alpha, 1.0) for _ in values]
        total = sum(draws)
        weights = {v: d / total for v, d in zip(values, draws)}
        if "none" in SCHEMA[attr]:
            share = _NONE_SHARE.get(attr, 0.5)
            weights = {"none": share} | {v: w * (1 - share) for v, w in weights.items()}
        mix[attr] = weights
    return mix


def sample_pretrain_identity(rng: random.Random, mix: dict[str, dict[str, float]]) -> dict[str, str]:
    """An identity with attributes drawn independently from ``mix`` (then made consistent)."""
    a = {attr: rng.choices(list(w), weights=list(w.values()))[0] for attr, w in mix.items()}
    return fix_constraints(a, rng)


# ---------------------------------------------------------------------------- wording
# Synonyms the benchmark's captions never use, mixed with the shared words (half and half), so
# the corpus teaches the shared vocabulary without copying the benchmark's phrasing.
_SYN = {
    "t-shirt": ("t-shirt", "tee"), "shirt": ("shirt", "button-up shirt"), "jacket": ("jacket", "zip jacket"),
    "coat": ("coat", "overcoat"), "sweater": ("sweater", "jumper"),
    "trousers": ("trousers", "pants"), "jeans": ("jeans", "denim jeans"), "shorts": ("shorts", "short pants"),
    "skirt": ("skirt", "skirt"),
    "sneakers": ("sneakers", "trainers"), "boots": ("boots", "ankle boots"), "sandals": ("sandals", "open sandals"),
    "backpack": ("backpack", "rucksack"), "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag"),
    "phone": ("phone", "smartphone"), "umbrella": ("umbrella", "umbrella"), "cup": ("cup", "coffee cup"),
    "book": ("book", "notebook"),
    "gray": ("gray", "grey"),
}
_GENDER_NOUNS = {"male": ("man", "guy", "gentleman", "male"), "female": ("woman", "lady", "girl", "female")}
_POSSESSIVE = {"male": "his", "female": "her"}
_ACTION = {"walking": ("walking", "strolling", "on the move"), "standing": ("standing", "standing still", "waiting"),
           "running": ("running", "jogging", "in a hurry")}
_PLACE = {"street": ("on a city street", "on the sidewalk", "near a road"),
          "park": ("in a green park", "on the grass", "among trees"),
          "wall": ("against a brick wall", "by a red wall"),
          "indoor": ("inside a building", "in a hallway", "indoors")}
_PATTERN = {"plain": ("plain", "solid"), "striped": ("striped", "with stripes"),
            "plaid": ("plaid", "checkered"), "logo": ("with a printed logo", "with a logo")}


def _w(word: str, rng: random.Random) -> str:
    return rng.choice(_SYN.get(word, (word,)))


def _color(color: str, rng: random.Random) -> str:
    return _w(color, rng) if color in _SYN else color


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pieces(a: dict[str, str], rng: random.Random) -> dict[str, str]:
    """Noun phrases (no article) for each facet, worded with the corpus's own choices."""
    pattern = rng.choice(_PATTERN[a["pattern"]])
    upper = f"{_color(a['upper_color'], rng)} {a['sleeve']}-sleeve {_w(a['upper_type'], rng)}"
    upper = f"{pattern} {upper}" if not pattern.startswith("with") else f"{upper} {pattern}"
    lower = f"{a['lower_length']} {_color(a['lower_color'], rng)} {_w(a['lower_type'], rng)}"
    p = {
        "upper": upper,
        "lower": lower,
        "shoes": f"{_color(a['shoes_color'], rng)} {_w(a['shoes_style'], rng)}",
        "hair": f"{a['hair_length']} {_color(a['hair_color'], rng)} hair",
    }
    for acc in ("glasses", "scarf", "hat", "belt"):
        if a[acc] != "none":
            noun = "glasses" if acc == "glasses" else acc
            p[acc] = f"{_color(a[acc], rng)}-framed glasses" if acc == "glasses" else f"{_color(a[acc], rng)} {noun}"
    if a["bag"] != "none":
        p["bag"] = f"{_color(a['bag_color'], rng)} {_w(a['bag'], rng)}"
    if a["held"] != "none":
        p["held"] = _w(a["held"], rng)
    return p


def _narrative(a: dict[str, str], p: dict[str, str], rng: random.Random) -> str:
    noun = rng.choice(_GENDER_NOUNS[a["gender"]][:3])
    pos = _POSSESSIVE[a["gender"]]
    lower = _an(p["lower"]) if a["lower_type"] == "skirt" else p["lower"]
    out = [f"Dressed in {_an(p['upper'])} and {lower}, {_an(noun)} with {p['hair']} is "
           f"{rng.choice(_ACTION[a['action']])} {rng.choice(_PLACE[a['background']])}."]
    out.append(f"On {pos} feet: {p['shoes']}.")
    extras = [_an(p[k]) if k != "glasses" else p[k] for k in ("glasses", "scarf", "hat", "belt") if k in p]
    if extras:
        out.append(f"Accessories include {', '.join(extras)}.")
    else:
        out.append("No accessories are visible.")
    if "bag" in p:
        out.append(f"A {p['bag']} hangs from {pos} shoulder." if rng.random() < 0.5
                   else f"{pos.capitalize()} bag is {_an(p['bag'])}.")
    if "held" in p:
        out.append(f"There is {_an(p['held'])} in {pos} hand.")
    out.append("Other pedestrians are nearby." if a["others"] == "yes" else "Nobody else is in the frame.")
    return " ".join(out)


def _alt_text(a: dict[str, str], p: dict[str, str], rng: random.Random) -> str:
    noun = rng.choice(_GENDER_NOUNS[a["gender"]])
    parts = [p["hair"], p["upper"], p["lower"], p["shoes"]]
    parts += [p[k] for k in ("glasses", "scarf", "hat", "belt", "bag") if k in p]
    if "held" in p:
        parts.append(f"{p['held']} in hand")
    scene = f"{rng.choice(_ACTION[a['action']])} {rng.choice(_PLACE[a['background']])}"
    crowd = "crowd behind" if a["others"] == "yes" else "alone"
    return f"photo of a {noun} pedestrian: {'; '.join(parts)}; {scene}, {crowd}"


def _tags(a: dict[str, str], p: dict[str, str], rng: random.Random) -> str:
    tags = [a["gender"], p["hair"], p["upper"], p["lower"], p["shoes"]]
    tags += [p[k] for k in ("glasses", "scarf", "hat", "belt", "bag", "held") if k in p]
    tags += [f"no {k}" for k in ("hat", "bag", "glasses") if k not in p and rng.random() < 0.5]
    tags += [rng.choice(_ACTION[a["action"]]), a["background"]]
    rng.shuffle(tags)
    return "tags: " + ", ".join(tags)


_STYLES = (_narrative, _alt_text, _tags)


def describe(attrs: dict[str, str], rng: random.Random, style: int | None = None) -> str:
    """One pretraining caption of an image with attributes ``attrs`` (richer than the benchmark's:
    gender, hair, both garments with colour/length/sleeve/pattern, shoes, accessories, bag, held
    object, action, place and bystanders). ``style``: 0 narrative, 1 alt text, 2 tag list."""
    p = _pieces(attrs, rng)
    fn = _STYLES[rng.randrange(len(_STYLES)) if style is None else style]
    return fn(attrs, p, rng)


def generate_corpus(num_images: int, seed: int = 0, *, captions_per_image: int = 3,
                    render_size: tuple[int, int] = (128, 64), image_size: tuple[int, int] = (64, 32),
                    progress: bool = False) -> PretrainCorpus:
    """Render ``num_images`` people (one per identity) with ``captions_per_image`` captions each
    (one per style, in a random order when 3). Rendered at the benchmark's ``render_size`` and
    resized to ``image_size`` (H, W) with bilinear filtering, as the training transform does.
    Deterministic per ``seed``; the stream is disjoint from the benchmark's integer seeds."""
    if num_images < 1 or captions_per_image < 1:
        raise ValueError("num_images and captions_per_image must be >= 1")
    rng = random.Random(f"synth-pretrain:{seed}")
    mix = clothing_mix(rng)
    h, w = image_size
    images = np.empty((num_images, h, w, 3), dtype=np.uint8)
    captions, attributes = [], []
    for i in tqdm(range(num_images), desc="pretraining corpus", disable=not progress, unit="img"):
        attrs = sample_image_attributes(sample_pretrain_identity(rng, mix), rng)
        image, _ = render_person(attrs, rng, render_size)
        if tuple(render_size) != (h, w):
            image = image.resize((w, h), Image.BILINEAR)
        images[i] = np.asarray(image.convert("RGB"))
        styles = [k % len(_STYLES) for k in range(captions_per_image)]
        rng.shuffle(styles)
        captions.append([describe(attrs, rng, s) for s in styles])
        attributes.append(attrs)
    return PretrainCorpus(images=images, captions=captions, attributes=attributes, mix=mix)
