"""Image helpers shared by every MLLM backend: loading, hashing, and Qwen2-VL's pixel budget."""
from __future__ import annotations

import hashlib
import math
import os
from typing import Union

from PIL import Image

from utils.images import to_rgb

from .errors import MLLMError

ImageLike = Union[str, "os.PathLike[str]", Image.Image]

# Qwen2-VL's vision encoder works on 14-pixel patches merged 2x2, so sides are multiples of 28.
PATCH_FACTOR = 28
# Qwen2-VL refuses extreme aspect ratios; keep the same guard so failures happen here, early.
MAX_ASPECT_RATIO = 200


def load_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as an RGB PIL image; ``image`` is a file path or a PIL image.

    A missing or unreadable file raises :class:`MLLMError` naming the path.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else to_rgb(image, "(an in-memory image)")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise MLLMError(f"image file not found: {path!r} (check the dataset root / image paths)")
    try:
        with Image.open(path) as im:
            return to_rgb(im, path)  # 16-bit scaled as the datasets' loader does
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise MLLMError(f"cannot read image {path!r}: {exc}") from exc


def image_digest(image: ImageLike) -> str:
    """sha256 hex digest of an image's content.

    A path hashes the file's bytes (cheap and exact); a PIL image hashes mode, size and pixels,
    so the same picture loaded twice gives the same digest.
    """
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
        h.update(image.tobytes())
        return h.hexdigest()
    path = os.fspath(image)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise MLLMError(f"cannot read image {path!r} to hash it: {exc}") from exc
    return h.hexdigest()


def smart_resize(height: int, width: int, factor: int = PATCH_FACTOR,
                 min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of ``factor``, area brought into
    ``[min_pixels, max_pixels]`` while keeping the aspect ratio (as ``qwen_vl_utils`` does)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def prepare_image(image: ImageLike, min_pixels: int = 50176, max_pixels: int = 50176) -> Image.Image:
    """Load ``image`` as RGB and resize it to the fixed pixel budget (paper: 50,176 = 224*224)."""
    im = load_image(image)
    h, w = smart_resize(im.height, im.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == im.size:
        return im
    return im.resize((w, h), Image.BICUBIC)
