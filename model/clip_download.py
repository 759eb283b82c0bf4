"""OpenAI's CLIP checkpoints by name, fetched on first use like the releases do.

The RDE/ICL releases accept ``pretrain_choice: ViT-B/16`` and download OpenAI's archive into
``~/.cache/clip``. We do the same: a name from ``OPENAI_MODELS`` resolves to a file in the cache
folder (``ICL_CLIP_CACHE`` or ``~/.cache/clip``), downloaded once into a temporary file, checked
against the sha256 in its URL, then renamed into place. A cached file with the right hash is used
without any network; a wrong one is refused; without internet the error names the URL and the
folder to put the file in.
"""
from __future__ import annotations

import os
import urllib.request
from typing import Callable, Optional

from tqdm import tqdm

from utils.errors import ProjectError
from utils.io import file_sha256

_BASE = "https://openaipublic.azureedge.net/clip/models"
# name -> (sha256, file name); the sha256 is also the URL's folder (OpenAI's scheme).
OPENAI_MODELS = {
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
}
CACHE_ENV = "ICL_CLIP_CACHE"


class CLIPDownloadError(ProjectError, RuntimeError):
    """OpenAI's checkpoint could not be fetched or failed its hash; the message says what to do."""


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clip")


def model_url(name: str) -> str:
    sha, fname = OPENAI_MODELS[name]
    return f"{_BASE}/{sha}/{fname}"


def fetch_openai_clip(name: str, folder: Optional[str] = None,
                      opener: Callable = urllib.request.urlopen) -> str:
    """Path of OpenAI's checkpoint ``name`` in ``folder`` (default ``cache_dir()``), downloaded
    and hash-checked on first use."""
    if name not in OPENAI_MODELS:
        raise ValueError(f"unknown OpenAI CLIP {name!r}: choose one of {sorted(OPENAI_MODELS)} or give a path")
    sha, fname = OPENAI_MODELS[name]
    folder = folder or cache_dir()
    target = os.path.join(folder, fname)
    if os.path.isfile(target):
        if file_sha256(target) == sha:
            return target
        raise CLIPDownloadError(f"{target} does not have OpenAI's sha256 {sha} for {name}: delete it "
                                f"and run again to download {model_url(name)}")
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    url = model_url(name)
    try:
        with opener(url) as src, open(tmp, "wb") as out:
            total = int(src.headers.get("Content-Length", 0) or 0) if getattr(src, "headers", None) else 0
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"CLIP {name}") as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except OSError as exc:  # URLError is an OSError: no internet, DNS, refused ...
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CLIPDownloadError(f"could not download {url} ({exc}); on a machine without internet "
                                f"download it elsewhere and put it at {target}, or set "
                                f"pretrain_choice to its path") from exc
    got = file_sha256(tmp)
    if got != sha:
        os.remove(tmp)
        raise CLIPDownloadError(f"{url} gave a file with sha256 {got}, not OpenAI's {sha}: nothing kept")
    os.replace(tmp, target)
    return target
