"""Reading a dataset image as 8-bit RGB, and the cheap start-up check of an image file.

One home for both, used by the datasets' loaders and the MLLM clients alike: a 16-bit PNG is
scaled to 8 bits (PIL's ``convert("RGB")`` clips it, so a 16-bit grey image reads as all
white), a float image is refused by name, and a file that is empty, not an image or cut short
fails naming its path.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import InputFileError

# Integer modes that hold up to 16 bits per pixel (PNG 16-bit grey opens as I;16; older Pillow
# versions as I).
_HIGH_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_REFUSED = {"F": "32-bit float pixels"}
_FIX = "re-copy the file from the dataset, or convert it to an 8-bit RGB JPEG/PNG"


class ImageFileNotFound(InputFileError, FileNotFoundError):
    """A dataset image that does not exist."""


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit values are scaled (v / 257, rounded), not clipped."""
    if image.mode in _REFUSED:
        raise InputFileError(f"image {name}: mode {image.mode} ({_REFUSED[image.mode]}) cannot be read "
                             f"as a photo; {_FIX}")
    if image.mode in _HIGH_BIT:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputFileError(f"image {name}: mode {image.mode} with values outside 0..65535 "
                                 f"({values.min()}..{values.max()}); {_FIX}")
        eight = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    return image.convert("RGB")  # loads the pixels (also of an RGB file, before it is closed)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode the image file ``path`` as 8-bit RGB; every failure names the file."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            return to_rgb(img, path)
    except FileNotFoundError as err:
        raise ImageFileNotFound(f"image {path} not found (check root_dir and the dataset's imgs/ folder)") from err
    except InputFileError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        # PIL raises OSError for a truncated file, UnidentifiedImageError for a non-image.
        problem = image_problem(path) or f"cannot be decoded ({type(err).__name__}: {err})"
        raise InputFileError(f"image {path}: {problem}; {_FIX}") from err


def image_problem(path: str | os.PathLike) -> str | None:
    """None when ``path``'s header says it is an image the loaders can read, else the problem.
    Reads the header only (PIL's lazy open): a file cut short after it still passes."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except FileNotFoundError:
        return "missing"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return f"not an image PIL can read ({type(err).__name__})"
    if width <= 0 or height <= 0:
        return f"image of size {width}x{height}"
    if mode in _REFUSED:
        return f"mode {mode} ({_REFUSED[mode]}) is not a photo"
    return None
