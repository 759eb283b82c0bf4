"""The client interface every MLLM backend implements, with the shared response cache.

A backend subclasses :class:`BaseClient` and implements two methods: ``identity_info()`` (what
makes its answers what they are: model path and content digest, adapter, server-reported
model, ...) and ``_generate()`` (one uncached batch call). ``generate()`` does the rest: cache
look-up, the misses in micro-batches, storing usable answers as soon as they return (unusable
ones marked so, to be asked again), and the ``stats`` counters.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

from .cache import ResponseCache, make_key
from .errors import MLLMError
from .identity import canonical
from .images import image_digest
from .prompts import PROMPT_VERSION

if TYPE_CHECKING:  # PIL is only needed for the annotation here
    from PIL import Image

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_PIXELS = 50176  # the paper: min_pixels = max_pixels = 224 * 224


@dataclass(frozen=True)
class Request:
    """One MLLM request: a user text, zero or one image (path or PIL image), a system prompt."""

    text: str
    image: "Union[str, os.PathLike[str], Image.Image, None]" = None
    system: str = DEFAULT_SYSTEM


def usable_text(answer: str) -> bool:
    """The default test of an answer worth caching: not empty."""
    return bool(answer.strip())


class BaseClient:
    """Batch-in, batch-out MLLM client with a persistent response cache.

    Subclasses implement :meth:`identity_info` (or :meth:`identity`) and :meth:`_generate`;
    callers use :meth:`generate`. ``max_batch`` splits a batch into micro-batches that are
    answered and stored one after the other, so a killed run loses at most one micro-batch
    (None: one call for all misses; the default is the backend's ``DEFAULT_MAX_BATCH``). A
    backend that receives answers one by one (the openai backend) hands each to
    :meth:`_answered` and it is stored at once. ``retry_unusable=False`` reuses answers the
    caller's ``accept`` rejected in an earlier run instead of asking them again.
    """

    backend: str = "base"
    DEFAULT_MAX_BATCH: "int | None" = 64

    def __init__(self, *, cache_dir: "str | os.PathLike[str] | None" = None,
                 min_pixels: int = DEFAULT_PIXELS, max_pixels: int = DEFAULT_PIXELS,
                 max_batch: "int | None | str" = "auto", retry_unusable: bool = True):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        if max_batch == "auto":
            max_batch = self.DEFAULT_MAX_BATCH
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.max_batch = max_batch
        self.retry_unusable = bool(retry_unusable)
        self.cache = None
        if cache_dir is not None:
            self.cache = ResponseCache(cache_dir)
        self.stats: dict = {"calls": 0, "requests": 0, "cache_hits": 0, "cache_misses": 0,
                            "unusable": 0}
        if self.cache is not None:  # torn or unreadable cache lines skipped so far
            self.stats["cache_skipped_lines"] = self.cache.corrupt_lines
        # Hashing the same gallery image for every caption is wasteful: remember digests per
        # (path, size, mtime) for this client only.
        self._digests: dict = {}
        self._stream: "dict | None" = None  # the micro-batch being answered (see _answered)
        self._lock = threading.Lock()

    # --- to implement -------------------------------------------------------------------
    def identity_info(self) -> dict:
        """What changes the answers besides the request, as a flat dict: backend, model,
        adapter, content digests, server-reported model... (results folders compare it)."""
        return {"backend": self.backend, "identity": self.identity()}

    def identity(self) -> str:
        """:meth:`identity_info` as one string (part of every cache key)."""
        if type(self).identity_info is BaseClient.identity_info:
            raise NotImplementedError(f"{type(self).__name__} must implement identity_info()")
        return canonical(self.identity_info())

    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        """The backend's uncached batch call; one answer per request, same order."""
        raise NotImplementedError(f"{type(self).__name__} must implement _generate()")

    def describe(self) -> str:
        """Which server/model this client talks to, for error messages."""
        return f"{self.backend} backend"

    # --- shared behaviour ---------------------------------------------------------------
    def cache_key(self, request: Request, temperature: float, max_tokens: int,
                  identity: "str | None" = None) -> str:
        """The cache key of ``request`` under this client and these sampling parameters
        (``identity``: a precomputed ``self.identity()``)."""
        digest = None if request.image is None else self._image_digest(request.image)
        # The pixel budget changes what the model sees, so it belongs to image requests' keys.
        pixels = None if request.image is None else [self.min_pixels, self.max_pixels]
        return make_key([self.identity() if identity is None else identity, PROMPT_VERSION,
                         request.system, request.text, digest, pixels, float(temperature),
                         int(max_tokens)])

    def _image_digest(self, image) -> str:
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise MLLMError(f"image file not found: {path!r} (check the dataset root / "
                                f"image paths)") from exc
            memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
            if memo not in self._digests:
                self._digests[memo] = image_digest(path)
            return self._digests[memo]
        return image_digest(image)

    def _store(self, items: dict, accept: Callable[[str], bool]) -> None:
        """Persist ``{key: answer}``: usable answers for reuse, the others marked unusable."""
        if self.cache is None or not items:
            return
        good = {k: a for k, a in items.items() if accept(a)}
        bad = {k: a for k, a in items.items() if k not in good}
        with self._lock:
            if good:
                self.cache.put_many(good, meta={"backend": self.backend})
            if bad:
                self.cache.put_many(bad, meta={"backend": self.backend}, usable=False)

    def _answered(self, position: int, answer: str) -> None:
        """Called by a backend (from any thread) as soon as the answer to ``position`` of the
        micro-batch it is working on arrives: stored at once, so a kill cannot lose it."""
        stream = self._stream
        if stream is None or not isinstance(answer, str):
            return
        keys = stream["keys"]
        if 0 <= position < len(keys):
            self._store({keys[position]: answer}, stream["accept"])

    def generate(self, requests: Sequence[Request], temperature: float = 0.01,
                 max_tokens: int = 512, accept: "Callable[[str], bool] | None" = None
                 ) -> list[str]:
        """Answer ``requests`` (same order): cached answers first, then the misses in
        micro-batches of ``max_batch``, each stored as soon as it returns.

        ``accept(answer) -> bool`` says whether an answer is usable (default: not empty);
        unusable answers are returned but not reused by later calls (unless the client was
        built with ``retry_unusable=False``) and counted in ``stats["unusable"]``."""
        if isinstance(requests, Request):
            raise TypeError("generate() takes a list of Request; wrap a single one: [request]")
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, Request) or not isinstance(r.text, str):
                raise TypeError(f"requests[{i}] must be a Request with a str text, got {r!r:.80}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        check = accept or usable_text

        def ok(answer: str) -> bool:
            return usable_text(answer) and bool(check(answer))

        self.stats["requests"] += len(requests)
        identity = self.identity()
        keys = [self.cache_key(r, temperature, max_tokens, identity) for r in requests]
        answers: list = (self.cache.get_many(keys, include_unusable=not self.retry_unusable)
                         if self.cache is not None else [None] * len(keys))
        if self.cache is not None:
            self.stats["cache_skipped_lines"] = self.cache.corrupt_lines

        # Identical requests in one batch are asked once.
        positions: dict[str, list[int]] = {}
        for i, (k, a) in enumerate(zip(keys, answers)):
            if a is None:
                positions.setdefault(k, []).append(i)
        n_missing = sum(a is None for a in answers)
        self.stats["cache_hits"] += len(requests) - n_missing
        self.stats["cache_misses"] += n_missing

        todo = [idx[0] for idx in positions.values()]
        step = self.max_batch or max(1, len(todo))
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            chunk_keys = [keys[i] for i in chunk]
            self.stats["calls"] += 1
            self._stream = {"keys": chunk_keys, "accept": ok}
            try:
                outs = self._generate([requests[i] for i in chunk], temperature, max_tokens)
            except MLLMError as exc:
                # Keep what did arrive, so a re-run asks only for the rest.
                self._store({chunk_keys[j]: a for j, a in exc.partial.items()
                             if 0 <= j < len(chunk) and isinstance(a, str)}, ok)
                if self.describe() in str(exc):
                    raise
                raise MLLMError(f"{self.describe()}: {exc}", partial=exc.partial) from exc
            except NotImplementedError:
                raise
            except Exception as exc:  # say which engine/server failed; the cause stays chained
                raise MLLMError(f"{self.describe()} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self._stream = None
            if len(outs) != len(chunk) or not all(isinstance(o, str) for o in outs):
                raise MLLMError(f"{self.describe()} returned {len(outs)} answers for "
                                f"{len(chunk)} requests (or non-text answers)")
            fresh = dict(zip(chunk_keys, outs))
            self._store(fresh, ok)
            for k, o in fresh.items():
                for i in positions[k]:
                    answers[i] = o
        self.stats["unusable"] += sum(not ok(a) for a in answers)
        return answers

    def close(self) -> None:
        """Release engines, servers or connections (no-op here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
