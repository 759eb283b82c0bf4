"""SynthPEDES renderer: draws a pedestrian with given attributes (PIL, frontal view).

Every attribute is visible: garment colours and shapes (sleeve and leg lengths, coat length,
shirt collar, jacket zip, sweater hem, jeans seams, skirt), patterns, hair length and colour,
hat, glasses, scarf, belt, bag, held object, pose (action), background and other people. The
picture is drawn at twice the target size and box-downsampled, then per-image brightness,
noise and blur are applied.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .synth_schema import COLORS, HAIR_COLORS

RGB = tuple[int, int, int]
SKIN_TONES: tuple[RGB, ...] = ((238, 200, 170), (214, 170, 130), (176, 126, 90), (120, 84, 60))
_SUPERSAMPLE = 2


def _shade(c: RGB, f: float) -> RGB:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def _contrast(c: RGB) -> RGB:
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return (40, 40, 40) if luma > 140 else (228, 228, 228)


@dataclass
class _Frame:
    """Maps person coordinates (u across, v down, in person heights; v=0 top of head, v=1
    soles; u=0 body axis) to canvas pixels."""

    cx: float
    top: float
    height: float

    def x(self, u: float) -> float:
        return self.cx + u * self.height

    def y(self, v: float) -> float:
        return self.top + v * self.height

    def box(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        return [self.x(u0), self.y(v0), self.x(u1), self.y(v1)]

    def pts(self, *uv: tuple[float, float]) -> list[tuple[float, float]]:
        return [(self.x(u), self.y(v)) for u, v in uv]


def _draw_background(d: ImageDraw.ImageDraw, kind: str, w: int, h: int, rng: random.Random) -> None:
    j = lambda c: tuple(int(max(0, min(255, v + rng.randint(-12, 12)))) for v in c)  # noqa: E731
    if kind == "street":
        horizon = int(h * rng.uniform(0.55, 0.7))
        d.rectangle([0, 0, w, horizon], fill=j((170, 160, 150)))
        for _ in range(rng.randint(2, 4)):           # windows of the buildings behind
            x0 = rng.randint(0, w - 12)
            y0 = rng.randint(4, max(5, horizon - 30))
            d.rectangle([x0, y0, x0 + 10, y0 + 14], fill=j((90, 100, 120)))
        d.rectangle([0, horizon, w, h], fill=j((95, 95, 98)))
        for x in range(rng.randint(0, 20), w, 40):   # lane marks
            d.rectangle([x, h - 14, x + 18, h - 10], fill=(225, 225, 215))
    elif kind == "park":
        horizon = int(h * rng.uniform(0.45, 0.6))
        d.rectangle([0, 0, w, horizon], fill=j((150, 195, 235)))
        d.rectangle([0, horizon, w, h], fill=j((80, 160, 70)))
        for _ in range(rng.randint(1, 2)):
            tx = rng.randint(0, w)
            d.rectangle([tx - 3, horizon - 40, tx + 3, horizon + 5], fill=(100, 70, 40))
            d.ellipse([tx - 20, horizon - 75, tx + 20, horizon - 30], fill=j((40, 120, 45)))
    elif kind == "wall":
        d.rectangle([0, 0, w, h], fill=j((160, 78, 56)))
        mortar = j((205, 200, 190))
        for row, y in enumerate(range(0, h, 12)):
            d.line([0, y, w, y], fill=mortar, width=2)
            for x in range((row % 2) * 12, w, 24):
                d.line([x, y, x, y + 12], fill=mortar, width=2)
    else:  # indoor
        floor = int(h * rng.uniform(0.72, 0.82))
        d.rectangle([0, 0, w, floor], fill=j((222, 206, 178)))
        d.rectangle([0, floor, w, h], fill=j((140, 108, 78)))
        dx = rng.randint(0, w - 30)
        d.rectangle([dx, floor - 90, dx + 28, floor], fill=j((150, 120, 90)))   # a door


def _draw_bystander(d: ImageDraw.ImageDraw, f: _Frame, rng: random.Random) -> None:
    tone = rng.randint(70, 150)
    body = (tone, tone, tone + rng.randint(-10, 10))
    legs = _shade(body, 0.7)
    d.ellipse(f.box(-0.06, 0.0, 0.06, 0.13), fill=_shade(body, 1.3))
    d.rectangle(f.box(-0.12, 0.15, 0.12, 0.52), fill=body)
    d.rectangle(f.box(-0.10, 0.52, -0.01, 0.97), fill=legs)
    d.rectangle(f.box(0.01, 0.52, 0.10, 0.97), fill=legs)


def _limb(d: ImageDraw.ImageDraw, f: _Frame, a: tuple[float, float], b: tuple[float, float],
          width: float, fill: RGB) -> None:
    """A straight limb of ``width`` (person units) from point a to point b (u, v)."""
    (u0, v0), (u1, v1) = a, b
    dx, dy = u1 - u0, v1 - v0
    n = max((dx * dx + dy * dy) ** 0.5, 1e-6)
    px, py = -dy / n * width / 2, dx / n * width / 2
    d.polygon(f.pts((u0 + px, v0 + py), (u1 + px, v1 + py), (u1 - px, v1 - py), (u0 - px, v0 - py)), fill=fill)


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


@dataclass
class _Body:
    """The person's proportions, colours and pose, fixed before drawing (person units)."""

    skin: RGB
    shoulder: float
    hip: float
    upper: RGB
    lower: RGB
    arms: list[tuple[tuple[float, float], tuple[float, float], tuple[float, float]]]
    left_foot: tuple[float, float]
    right_foot: tuple[float, float]
    left_hip: tuple[float, float] = (-0.05, 0.5)
    right_hip: tuple[float, float] = (0.05, 0.5)

    @property
    def hands(self) -> list[tuple[float, float]]:
        return [self.arms[0][2], self.arms[1][2]]

    @property
    def legs(self) -> tuple[tuple[tuple[float, float], tuple[float, float]], ...]:
        return ((self.left_hip, self.left_foot), (self.right_hip, self.right_foot))


def _body(attrs: dict[str, str], rng: random.Random) -> _Body:
    """Skin tone (one draw of ``rng``), proportions by gender, and the pose: feet apart and arm
    swing grow from standing to walking to running."""
    skin = rng.choice(SKIN_TONES)
    female = attrs["gender"] == "female"
    shoulder = 0.115 if female else 0.13
    action = attrs["action"]
    spread = {"standing": 0.045, "walking": 0.1, "running": 0.17}[action]
    if action == "running":
        arms = [((-shoulder - 0.02, 0.19), (-shoulder - 0.09, 0.32), (-shoulder - 0.02, 0.42)),
                ((shoulder + 0.02, 0.19), (shoulder + 0.1, 0.3), (shoulder + 0.05, 0.2))]
    else:
        swing = 0.03 if action == "walking" else 0.0
        arms = [((-shoulder - 0.02, 0.19), (-shoulder - 0.035 - swing, 0.35), (-shoulder - 0.04 - swing, 0.5)),
                ((shoulder + 0.02, 0.19), (shoulder + 0.035 + swing, 0.35), (shoulder + 0.04 + swing, 0.5))]
    return _Body(skin=skin, shoulder=shoulder, hip=0.11 if female else 0.1,
                 upper=COLORS[attrs["upper_color"]], lower=COLORS[attrs["lower_color"]], arms=arms,
                 left_foot=(-spread, 0.94), right_foot=(spread * 0.9, 0.94))


def _draw_behind(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    """What the body hides: long hair and the backpack."""
    if attrs["hair_length"] == "long":
        d.rectangle(f.box(-0.085, 0.05, 0.085, 0.27), fill=HAIR_COLORS[attrs["hair_color"]])
    if attrs["bag"] == "backpack":
        d.rectangle(f.box(-b.shoulder - 0.035, 0.2, b.shoulder + 0.035, 0.47), fill=_bag_color(attrs))


def _bag_color(attrs: dict[str, str]) -> RGB:
    return COLORS.get(attrs["bag_color"], (0, 0, 0))


_LEG_W = 0.075


def _draw_legs(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body
               ) -> tuple[float, float, float, float]:
    """Legs (skin), then the lower garment on them -> the one-colour box of the garment (u, v)."""
    for hip_pt, foot in b.legs:
        _limb(d, f, hip_pt, foot, _LEG_W, b.skin)
    kind, lower, hip = attrs["lower_type"], b.lower, b.hip
    if kind not in ("trousers", "jeans", "shorts"):  # skirt
        bottom = 0.86 if attrs["lower_length"] == "long" else 0.7
        flare = 0.17 if attrs["lower_length"] == "long" else 0.15
        d.polygon(f.pts((-hip, 0.47), (hip, 0.47), (flare, bottom), (-flare, bottom)), fill=lower)
        return (-0.05, 0.61, 0.05, 0.67)
    end = 0.91 if kind != "shorts" else 0.7
    for hip_pt, foot in b.legs:
        knee_end = _lerp(hip_pt, foot, (end - 0.5) / 0.44)
        _limb(d, f, (hip_pt[0], 0.48), knee_end, _LEG_W + 0.012, lower)
        if kind == "jeans":
            seam = _shade(lower, 1.35) if sum(lower) < 500 else _shade(lower, 0.7)
            outer = (hip_pt[0] - 0.028 if hip_pt[0] < 0 else hip_pt[0] + 0.028, 0.5)
            _limb(d, f, outer, (knee_end[0] + (outer[0] - hip_pt[0]), knee_end[1]), 0.008, seam)
    d.rectangle(f.box(-hip, 0.47, hip, 0.56), fill=lower)
    if kind == "jeans":
        pocket = _shade(lower, 0.7)
        d.arc(f.box(-hip + 0.01, 0.47, -0.02, 0.54), 0, 180, fill=pocket, width=2)
        d.arc(f.box(0.02, 0.47, hip - 0.01, 0.54), 0, 180, fill=pocket, width=2)
    if kind == "shorts":
        mid = _lerp(b.left_hip, b.left_foot, (0.64 - 0.5) / 0.44)
        return (mid[0] - 0.015, 0.61, mid[0] + 0.015, 0.66)
    mid = _lerp(b.left_hip, b.left_foot, (0.76 - 0.5) / 0.44)
    return (mid[0] - 0.015, 0.72, mid[0] + 0.015, 0.8)


def _draw_shoes(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    shoe = COLORS[attrs["shoes_color"]]
    style = attrs["shoes_style"]
    for fu, _ in (b.left_foot, b.right_foot):
        if style == "boots":
            d.rectangle(f.box(fu - 0.042, 0.84, fu + 0.042, 0.985), fill=shoe)
        elif style == "sneakers":
            d.rectangle(f.box(fu - 0.045, 0.925, fu + 0.05, 0.985), fill=shoe)
            sole = (200, 200, 200) if attrs["shoes_color"] != "white" else (120, 120, 120)
            d.rectangle(f.box(fu - 0.045, 0.97, fu + 0.05, 0.985), fill=sole)
        else:  # sandals: skin with two straps
            d.rectangle(f.box(fu - 0.04, 0.93, fu + 0.045, 0.985), fill=b.skin)
            d.rectangle(f.box(fu - 0.04, 0.935, fu + 0.045, 0.948), fill=shoe)
            d.rectangle(f.box(fu - 0.04, 0.962, fu + 0.045, 0.985), fill=shoe)


def _garment_detail(upper: RGB) -> RGB:
    return _shade(upper, 0.6) if sum(upper) > 150 else _shade((90, 90, 90), 1.0)


def _draw_torso(canvas: Image.Image, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    """The torso in the upper garment, its pattern, and the garment's own marks (collar, zip,
    buttons, ribbed hem)."""
    top_type, upper, hip = attrs["upper_type"], b.upper, b.hip
    bottom = 0.6 if top_type == "coat" else 0.5
    hem = (hip + 0.02) if top_type == "coat" else hip
    torso = f.pts((-b.shoulder, 0.165), (b.shoulder, 0.165), (hem, bottom), (-hem, bottom))
    ImageDraw.Draw(canvas).polygon(torso, fill=upper)
    _draw_pattern(canvas, torso, attrs["pattern"], upper, f)
    d = ImageDraw.Draw(canvas)
    detail = _garment_detail(upper)
    if top_type == "t-shirt":
        d.chord(f.box(-0.035, 0.14, 0.035, 0.2), 0, 180, fill=b.skin)
    elif top_type == "shirt":
        collar = _contrast(upper)
        d.polygon(f.pts((-0.04, 0.165), (0.0, 0.2), (-0.005, 0.165)), fill=collar)
        d.polygon(f.pts((0.04, 0.165), (0.0, 0.2), (0.005, 0.165)), fill=collar)
        for v in (0.25, 0.32, 0.39, 0.46):
            d.ellipse(f.box(-0.006, v, 0.006, v + 0.012), fill=collar)
    elif top_type == "jacket":
        d.rectangle(f.box(-0.006, 0.17, 0.006, 0.5), fill=detail)
        d.polygon(f.pts((-0.045, 0.165), (0.0, 0.22), (0.045, 0.165)), fill=detail)
    elif top_type == "coat":
        for u in (-0.03, 0.03):
            for v in (0.28, 0.38, 0.48):
                d.ellipse(f.box(u - 0.007, v, u + 0.007, v + 0.014), fill=detail)
        d.line(f.pts((0.0, 0.2), (0.0, 0.6)), fill=detail, width=2)
    else:  # sweater: ribbed hem
        d.rectangle(f.box(-hip, 0.46, hip, 0.5), fill=detail)


def _draw_arms(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    """Sleeves in the garment colour (to the elbow when short), then skin; a sweater's cuffs."""
    long_sleeve = attrs["sleeve"] == "long"
    for shoulder_pt, elbow, hand in b.arms:
        _limb(d, f, shoulder_pt, elbow, 0.05, b.upper)
        _limb(d, f, elbow, hand, 0.045, b.upper if long_sleeve else b.skin)
        if not long_sleeve:
            _limb(d, f, shoulder_pt, _lerp(shoulder_pt, elbow, 0.7), 0.052, b.upper)
        d.ellipse(f.box(hand[0] - 0.025, hand[1] - 0.01, hand[0] + 0.025, hand[1] + 0.035), fill=b.skin)
    if attrs["upper_type"] == "sweater" and long_sleeve:
        detail = _garment_detail(b.upper)
        for _, _, hand in b.arms:
            d.ellipse(f.box(hand[0] - 0.026, hand[1] - 0.03, hand[0] + 0.026, hand[1] - 0.01), fill=detail)


def _draw_front(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    """The belt over the waist, then straps and bags in front."""
    hip, bag, bag_color = b.hip, attrs["bag"], _bag_color(attrs)
    if attrs["belt"] != "none":
        d.rectangle(f.box(-hip - 0.005, 0.48, hip + 0.005, 0.505), fill=COLORS[attrs["belt"]])
        d.rectangle(f.box(-0.012, 0.478, 0.012, 0.507), fill=(200, 180, 60))
    if bag == "backpack":
        for u in (-0.085, 0.085):
            d.rectangle(f.box(u - 0.01, 0.165, u + 0.01, 0.4), fill=_shade(bag_color, 0.8))
    elif bag == "shoulder bag":
        _limb(d, f, (-b.shoulder + 0.02, 0.17), (hip + 0.04, 0.46), 0.014, _shade(bag_color, 0.8))
        d.rectangle(f.box(hip - 0.01, 0.43, hip + 0.09, 0.54), fill=bag_color)
    elif bag == "handbag":
        hu, hv = b.hands[1]
        d.arc(f.box(hu - 0.03, hv - 0.005, hu + 0.03, hv + 0.06), 180, 360, fill=_shade(bag_color, 0.7), width=3)
        d.rectangle(f.box(hu - 0.045, hv + 0.03, hu + 0.045, hv + 0.11), fill=bag_color)


def _draw_held(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body,
               rng: random.Random) -> None:
    """The held object, in the hand without a handbag (an umbrella's canopy colour is one draw
    of ``rng``)."""
    held = attrs["held"]
    hu, hv = b.hands[0] if attrs["bag"] == "handbag" else b.hands[1]
    if held == "phone":
        d.rectangle(f.box(hu - 0.012, hv - 0.01, hu + 0.012, hv + 0.035), fill=(25, 25, 30))
    elif held == "cup":
        d.rectangle(f.box(hu - 0.017, hv - 0.015, hu + 0.017, hv + 0.03), fill=(245, 245, 240))
        d.rectangle(f.box(hu - 0.019, hv - 0.02, hu + 0.019, hv - 0.012), fill=(110, 70, 40))
    elif held == "book":
        d.rectangle(f.box(hu - 0.035, hv - 0.03, hu + 0.035, hv + 0.05), fill=(60, 90, 140))
        d.rectangle(f.box(hu - 0.028, hv - 0.024, hu + 0.028, hv + 0.044), fill=(235, 230, 215))
        d.rectangle(f.box(hu - 0.035, hv - 0.03, hu - 0.025, hv + 0.05), fill=(60, 90, 140))
    elif held == "umbrella":
        canopy = COLORS[rng.choice(("black", "blue", "red", "purple", "green"))]
        _limb(d, f, (hu, hv + 0.02), (hu, -0.04), 0.01, (60, 60, 60))
        d.pieslice(f.box(hu - 0.16, -0.1, hu + 0.16, 0.02), 180, 360, fill=canopy)


def _draw_head(d: ImageDraw.ImageDraw, f: _Frame, attrs: dict[str, str], b: _Body) -> None:
    """Neck, head, hair, then glasses, hat and scarf."""
    hair = HAIR_COLORS[attrs["hair_color"]]
    d.rectangle(f.box(-0.025, 0.12, 0.025, 0.17), fill=b.skin)          # neck
    d.ellipse(f.box(-0.058, 0.01, 0.058, 0.14), fill=b.skin)
    d.chord(f.box(-0.062, 0.0, 0.062, 0.1), 180, 360, fill=hair)
    d.rectangle(f.box(-0.062, 0.045, -0.048, 0.08), fill=hair)
    d.rectangle(f.box(0.048, 0.045, 0.062, 0.08), fill=hair)
    if attrs["glasses"] != "none":
        frame = COLORS[attrs["glasses"]]
        d.rectangle(f.box(-0.048, 0.066, -0.008, 0.084), outline=frame, width=2)
        d.rectangle(f.box(0.008, 0.066, 0.048, 0.084), outline=frame, width=2)
        d.line(f.pts((-0.008, 0.072), (0.008, 0.072)), fill=frame, width=2)
    if attrs["hat"] != "none":
        hat = COLORS[attrs["hat"]]
        d.rectangle(f.box(-0.052, -0.035, 0.052, 0.03), fill=hat)
        d.rectangle(f.box(-0.085, 0.02, 0.085, 0.04), fill=hat)
    if attrs["scarf"] != "none":
        scarf = COLORS[attrs["scarf"]]
        d.rectangle(f.box(-0.055, 0.135, 0.055, 0.185), fill=scarf)
        d.rectangle(f.box(0.015, 0.18, 0.05, 0.28), fill=scarf)


def render_person(attrs: dict[str, str], rng: random.Random, size: tuple[int, int] = (128, 64)
                  ) -> tuple[Image.Image, dict[str, list[int]]]:
    """Draw one image -> (RGB image of ``size`` = (H, W), sample boxes).

    The boxes ``[x0, y0, x1, y1]`` (target pixels) lie inside regions that show only one
    colour in a plain garment: ``upper`` (the chest, left of the axis), ``lower`` (a leg or the
    skirt), ``head``. The layers are drawn back to front; ``rng`` is drawn in a fixed order
    (background, frame, bystanders, skin, umbrella, photometry), so a seed gives one image.
    """
    out_h, out_w = size
    w, h = out_w * _SUPERSAMPLE, out_h * _SUPERSAMPLE
    canvas = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(canvas)
    _draw_background(d, attrs["background"], w, h, rng)

    height = h * rng.uniform(0.82, 0.92)
    f = _Frame(cx=w / 2 + rng.uniform(-0.07, 0.07) * w, top=(h - height) * rng.uniform(0.3, 0.7), height=height)
    if attrs["others"] == "yes":
        for side in rng.sample((-1, 1), rng.choice((1, 2))):
            bh = height * rng.uniform(0.55, 0.7)
            bx = w / 2 + side * w * rng.uniform(0.38, 0.5)
            _draw_bystander(d, _Frame(cx=bx, top=f.y(1.0) - bh - height * 0.05, height=bh), rng)

    b = _body(attrs, rng)
    _draw_behind(d, f, attrs, b)
    lower_box_uv = _draw_legs(d, f, attrs, b)
    _draw_shoes(d, f, attrs, b)
    _draw_torso(canvas, f, attrs, b)
    d = ImageDraw.Draw(canvas)
    _draw_arms(d, f, attrs, b)
    _draw_front(d, f, attrs, b)
    _draw_held(d, f, attrs, b, rng)
    _draw_head(d, f, attrs, b)

    image = _photometric(canvas.resize((out_w, out_h), Image.BOX), rng)
    scale = 1.0 / _SUPERSAMPLE

    def to_px(u0: float, v0: float, u1: float, v1: float) -> list[int]:
        x0, y0, x1, y1 = f.box(u0, v0, u1, v1)
        return [int(round(x0 * scale)), int(round(y0 * scale)), int(round(x1 * scale)), int(round(y1 * scale))]

    boxes = {"upper": to_px(-0.065, 0.3, -0.02, 0.44), "lower": to_px(*lower_box_uv),
             "head": to_px(-0.058, 0.01, 0.058, 0.14)}
    return image, boxes


def _draw_pattern(canvas: Image.Image, polygon: list[tuple[float, float]], pattern: str, base: RGB,
                  f: _Frame) -> None:
    """Stripes, a plaid grid or a chest logo, clipped to the garment polygon."""
    if pattern == "plain":
        return
    mark = _contrast(base)
    if pattern == "logo":
        ImageDraw.Draw(canvas).rectangle(f.box(0.025, 0.24, 0.08, 0.3), fill=mark)
        return
    layer = Image.new("RGB", canvas.size, mark)
    mask = Image.new("L", canvas.size, 0)
    md = ImageDraw.Draw(mask)
    x0, y0 = min(p[0] for p in polygon), min(p[1] for p in polygon)
    x1, y1 = max(p[0] for p in polygon), max(p[1] for p in polygon)
    step = max(4, int(0.04 * f.height))
    for y in range(int(y0) + step // 2, int(y1), step):
        md.rectangle([x0, y, x1, y + max(1, step // 3)], fill=255)
    if pattern == "plaid":
        for x in range(int(x0) + step // 2, int(x1), step):
            md.rectangle([x, y0, x + max(1, step // 3), y1], fill=255)
    clip = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(clip).polygon(polygon, fill=255)
    mask = Image.fromarray((np.asarray(mask) & np.asarray(clip)).astype(np.uint8))
    canvas.paste(layer, (0, 0), mask)


def _photometric(image: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness jitter, Gaussian pixel noise and a light blur, all drawn from ``rng``."""
    blur = rng.uniform(0.0, 0.6)
    if blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float32) * rng.uniform(0.93, 1.07)
    noise = np.random.default_rng(rng.getrandbits(63)).normal(0.0, rng.uniform(2.0, 6.0), arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).round().astype(np.uint8))
