"""Persistent, append-only response cache shared by every backend and by concurrent processes.

One JSONL file (``responses.jsonl``) under the cache directory; one record per line,
``{"key": ..., "answer": ...}``, or ``{"key": ..., "answer": ..., "usable": false}`` for an answer
the caller could not use (empty, unparseable): such answers are kept apart and returned only when
asked for (``include_unusable``), so by default they are asked again, and a usable answer
for the same key replaces them. An empty answer is never usable.

Each record is appended with a single ``write`` under an exclusive ``flock``, so a killed
process loses at most the answers it had not written yet and concurrent writers never
interleave. A torn last line (a process killed mid-write, or a
filesystem that ignores locks) is skipped on load, counted (``corrupt_lines``, what
``refresh()`` returns, the client's ``stats["cache_skipped_lines"]``) and logged with the file's
path; the next writer starts on a fresh line so the
torn fragment cannot swallow a good record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable, Mapping, Sequence

from utils.io import disk_full_named

try:  # POSIX only; without it the cache still works for a single process
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_FILE = "responses.jsonl"
log = logging.getLogger(__name__)


def make_key(parts: Sequence[object]) -> str:
    """sha256 over a JSON encoding of ``parts`` (strings, numbers, None)."""
    blob = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _Locked:
    """Context manager holding an flock on an open file (no-op where flock is unavailable)."""

    def __init__(self, f, exclusive: bool):
        self.f, self.mode = f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) if fcntl else None

    def __enter__(self):
        if fcntl:
            fcntl.flock(self.f.fileno(), self.mode)
        return self.f

    def __exit__(self, *exc):
        if fcntl:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)


class ResponseCache:
    """Key -> answer store backed by an append-only JSONL file.

    ``refresh()`` reads only the bytes appended since the last read, so other processes'
    answers become visible without reloading the whole file.
    """

    def __init__(self, cache_dir: "str | os.PathLike[str]"):
        self.dir = os.fspath(cache_dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the MLLM cache directory {self.dir!r} "
                          f"(option cache_dir): {exc}") from exc
        self.path = os.path.join(self.dir, CACHE_FILE)
        self._data: dict[str, str] = {}
        self._unusable: dict[str, str] = {}
        self._offset = 0
        self.corrupt_lines = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def refresh(self) -> int:
        """Load complete lines appended since the last refresh (by any process); returns how
        many of them were torn or unreadable and skipped (their answers are asked again)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f, _Locked(f, exclusive=False):
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:  # nothing complete yet (or only a torn fragment)
            return 0
        self._offset += end + 1
        before = self.corrupt_lines
        for line in chunk[:end].split(b"\n"):
            self._ingest(line)
        skipped = self.corrupt_lines - before
        if skipped:
            log.warning("MLLM cache %s: skipped %d torn or unreadable line(s) (a write cut by a "
                        "kill, or not a cache record); their answers are asked again",
                        self.path, skipped)
        return skipped

    def _ingest(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            rec = json.loads(line)
            key, answer = rec["key"], rec["answer"]
            if not isinstance(key, str) or not isinstance(answer, str):
                raise TypeError("key and answer must be strings")
        except (ValueError, KeyError, TypeError):
            self.corrupt_lines += 1  # torn or foreign line: skip, never fail a run for it
            return
        if rec.get("usable") is False or not answer.strip():
            # caches written before the flag existed may hold empty answers: never reuse them
            self._unusable[key] = answer
            return
        self._data.setdefault(key, answer)  # first writer wins; later duplicates are identical work

    def get(self, key: str) -> "str | None":
        return self._data.get(key)

    def get_many(self, keys: Iterable[str], include_unusable: bool = False) -> list["str | None"]:
        """Answers for ``keys`` (None for misses), after picking up other processes' appends;
        answers stored as unusable count as misses unless ``include_unusable``."""
        self.refresh()
        if include_unusable:
            return [self._data.get(k, self._unusable.get(k)) for k in keys]
        return [self._data.get(k) for k in keys]

    def unusable_count(self) -> int:
        """Keys whose only stored answers are unusable."""
        return sum(k not in self._data for k in self._unusable)

    def put_many(self, items: Mapping[str, str], meta: "Mapping[str, object] | None" = None,
                 usable: bool = True) -> None:
        """Append records for ``items`` in one locked write; ``meta`` fields are stored alongside
        (for humans inspecting the file; they are not part of the key). ``usable=False`` stores
        answers the caller could not use (see the module docstring); empty answers are always
        stored as unusable."""
        if usable:
            bad = {k: v for k, v in items.items() if not v.strip()}
            if bad:
                self.put_many(bad, meta, usable=False)
            items = {k: v for k, v in items.items() if k not in bad}
            new = {k: v for k, v in items.items() if k not in self._data}
        else:
            new = {k: v for k, v in items.items()
                   if k not in self._data and self._unusable.get(k) != v}
        if not new:
            return
        extra = dict(meta or {})
        if not usable:
            extra["usable"] = False
        payload = "".join(json.dumps({"key": k, "answer": v, **extra}, ensure_ascii=False) + "\n"
                          for k, v in new.items()).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # Outermost, so that the close's second failed flush is named too.
        with disk_full_named(self.path, len(payload),
                             kept="the answers cached before are kept; a rerun asks only the rest"), \
                os.fdopen(fd, "ab") as f, _Locked(f, exclusive=True):
            # A process killed mid-write may have left a fragment without a newline: start a
            # fresh line so our first record stays parseable.
            size = os.fstat(f.fileno()).st_size
            if size:
                with open(self.path, "rb") as r:
                    r.seek(size - 1)
                    if r.read(1) != b"\n":
                        payload = b"\n" + payload
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        (self._data if usable else self._unusable).update(new)
