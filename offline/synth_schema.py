"""SynthPEDES attribute schema, colours, and the sampling of identities and image variations.

Every attribute value here is drawn in the picture (``synth_render``) and can be expressed in
text (``synth_text``). "none" means the thing is absent.
"""
from __future__ import annotations

import random

# Format version of the attribute sidecar (attributes.json) that SynthPEDES writes and the
# simulated MLLM reads.
ATTRIBUTES_VERSION = 1

# Garment palette (RGB); far enough apart that a pixel's nearest palette colour is its name
# even after the renderer's brightness jitter, noise and blur.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 24),
    "white": (236, 236, 232),
    "gray": (128, 128, 128),
    "red": (200, 32, 36),
    "blue": (34, 64, 196),
    "green": (36, 146, 60),
    "yellow": (232, 208, 44),
    "orange": (240, 128, 24),
    "purple": (118, 44, 158),
    "pink": (238, 150, 188),
    "brown": (118, 74, 36),
}
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (18, 16, 16),
    "brown": (96, 60, 30),
    "blonde": (222, 190, 112),
    "gray": (152, 152, 150),
}
PALETTE = tuple(COLORS)

SCHEMA: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female"),
    "hair_length": ("short", "long"),
    "hair_color": tuple(HAIR_COLORS),
    "upper_type": ("t-shirt", "shirt", "jacket", "coat", "sweater"),
    "upper_color": PALETTE,
    "sleeve": ("short", "long"),
    "pattern": ("plain", "striped", "plaid", "logo"),
    "lower_type": ("trousers", "jeans", "shorts", "skirt"),
    "lower_color": PALETTE,
    "lower_length": ("long", "short"),
    "shoes_color": ("black", "white", "brown", "gray", "red", "blue"),
    "shoes_style": ("sneakers", "boots", "sandals"),
    "glasses": ("none", "black", "brown", "red", "blue"),
    "scarf": ("none",) + PALETTE,
    "held": ("none", "phone", "umbrella", "cup", "book"),
    "bag": ("none", "backpack", "handbag", "shoulder bag"),
    "bag_color": ("none",) + PALETTE,
    "hat": ("none",) + PALETTE,
    "belt": ("none", "black", "brown", "white"),
    "action": ("walking", "standing", "running"),
    "background": ("street", "park", "wall", "indoor"),
    "others": ("none", "yes"),
}

# The attributes each of the paper's 15 VQA questions asks about (question i+1 of T_VQA).
QUESTION_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("gender",),
    ("hair_length", "hair_color"),
    ("upper_type", "upper_color", "sleeve"),
    ("lower_type", "lower_color", "lower_length"),
    ("pattern",),
    ("shoes_color", "shoes_style"),
    ("glasses",),
    ("scarf",),
    ("held",),
    ("bag", "bag_color"),
    ("hat",),
    ("belt",),
    ("action",),
    ("background",),
    ("others",),
)

# Attributes that change from image to image of one identity; the rest are the identity's.
PER_IMAGE = ("held", "action", "background", "others")
IDENTITY_ATTRIBUTES = tuple(a for a in SCHEMA if a not in PER_IMAGE)
# Attributes a "look-alike" identity may differ in from the identity it is derived from.
_MUTABLE = ("upper_color", "lower_color", "shoes_color", "hat", "glasses", "bag", "bag_color",
            "hair_color", "upper_type", "lower_type", "pattern", "scarf", "belt")


def _weighted(rng: random.Random, options: dict[str, float]) -> str:
    return rng.choices(list(options), weights=list(options.values()))[0]


def fix_constraints(a: dict[str, str], rng: random.Random) -> dict[str, str]:
    """Make an attribute set physically consistent (garment shapes imply lengths)."""
    if a["upper_type"] == "t-shirt":
        a["sleeve"] = "short"
    elif a["upper_type"] in ("jacket", "coat", "sweater"):
        a["sleeve"] = "long"
    if a["lower_type"] == "skirt" and a["gender"] == "male":
        a["lower_type"] = rng.choice(("trousers", "jeans", "shorts"))
    if a["lower_type"] in ("trousers", "jeans"):
        a["lower_length"] = "long"
    elif a["lower_type"] == "shorts":
        a["lower_length"] = "short"
    if a["bag"] == "none":
        a["bag_color"] = "none"
    elif a["bag_color"] == "none":
        a["bag_color"] = rng.choice(PALETTE)
    return a


def sample_identity(rng: random.Random) -> dict[str, str]:
    """The fixed attributes of a new identity."""
    gender = rng.choice(SCHEMA["gender"])
    female = gender == "female"
    a = {
        "gender": gender,
        "hair_length": _weighted(rng, {"long": 0.7, "short": 0.3} if female else {"short": 0.85, "long": 0.15}),
        "hair_color": _weighted(rng, {"black": 0.45, "brown": 0.3, "blonde": 0.15, "gray": 0.1}),
        "upper_type": rng.choice(SCHEMA["upper_type"]),
        "upper_color": rng.choice(PALETTE),
        "sleeve": rng.choice(SCHEMA["sleeve"]),
        "pattern": _weighted(rng, {"plain": 0.55, "striped": 0.15, "plaid": 0.15, "logo": 0.15}),
        "lower_type": _weighted(rng, {"trousers": 0.3, "jeans": 0.3, "shorts": 0.15, "skirt": 0.25 if female else 0.0}),
        "lower_color": rng.choice(PALETTE),
        "lower_length": rng.choice(SCHEMA["lower_length"]),
        "shoes_color": rng.choice(SCHEMA["shoes_color"]),
        "shoes_style": rng.choice(SCHEMA["shoes_style"]),
        "glasses": "none" if rng.random() < 0.7 else rng.choice(SCHEMA["glasses"][1:]),
        "scarf": "none" if rng.random() < 0.75 else rng.choice(PALETTE),
        "bag": _weighted(rng, {"none": 0.3, "backpack": 0.3, "handbag": 0.2, "shoulder bag": 0.2}),
        "bag_color": rng.choice(PALETTE),
        "hat": "none" if rng.random() < 0.7 else rng.choice(PALETTE),
        "belt": "none" if rng.random() < 0.65 else rng.choice(SCHEMA["belt"][1:]),
    }
    if a["lower_type"] == "jeans" and rng.random() < 0.6:
        a["lower_color"] = "blue"
    return fix_constraints(a, rng)


def mutate_identity(base: dict[str, str], rng: random.Random) -> dict[str, str]:
    """A look-alike of ``base``: one or two of its attributes changed."""
    a = dict(base)
    for attr in rng.sample(_MUTABLE, rng.choice((1, 2))):
        values = [v for v in SCHEMA[attr] if v != a[attr]]
        if attr == "lower_type" and a["gender"] == "male":
            values = [v for v in values if v != "skirt"]
        a[attr] = rng.choice(values)
    return fix_constraints(a, rng)


def sample_image_attributes(identity: dict[str, str], rng: random.Random) -> dict[str, str]:
    """One image's full attribute set: the identity's plus this image's variable ones."""
    a = dict(identity)
    a["held"] = _weighted(rng, {"none": 0.6, "phone": 0.1, "umbrella": 0.1, "cup": 0.1, "book": 0.1})
    a["action"] = _weighted(rng, {"walking": 0.5, "standing": 0.35, "running": 0.15})
    a["background"] = rng.choice(SCHEMA["background"])
    a["others"] = _weighted(rng, {"none": 0.6, "yes": 0.4})
    return {k: a[k] for k in SCHEMA}


def identity_key(a: dict[str, str]) -> tuple[str, ...]:
    return tuple(a[k] for k in IDENTITY_ATTRIBUTES)
