"""Crash-safe persistence for RDA: append-only per-stage answer logs (atomic JSON writes come
from ``utils.io``).

Why append-only logs rather than one JSON state file: on CUHK-PEDES the raw answers of all stages
are hundreds of MB, and rewriting them after every chunk would cost more than the chunk. A chunk's
answers are appended and fsync'ed in one go; a line cut short by a kill is dropped on load.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable

from utils.io import atomic_write_json, disk_full_named  # noqa: F401  (atomic_write_json: re-exported)

logger = logging.getLogger("ICL.rda")


class AnswerLog:
    """A persistent ``{key: answer}`` map for one pipeline stage, stored as JSON lines.

    ``path=None`` keeps it in memory only (no resume). Loading tolerates a torn last line (the
    process was killed while appending) and rewrites the file without it, so later appends start
    on a clean line.
    """

    def __init__(self, path: "str | os.PathLike[str] | None"):
        self.path = None if path is None else os.fspath(path)
        self.data: dict[str, str] = {}
        self.torn = 0  # lines skipped on load (cut by a kill, or not UTF-8 / JSON)
        if self.path is not None and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        # Bytes, not text: a kill can cut the last line inside a UTF-8 character, which a text
        # read would turn into a UnicodeDecodeError that blocks every resume.
        good_lines: list[bytes] = []
        self.torn = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line.decode("utf-8"))
                    key, value = entry["k"], entry["v"]
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    self.torn += 1
                    continue
                self.data[key] = value
                good_lines.append(line if line.endswith(b"\n") else line + b"\n")
        if self.torn:
            logger.warning("%s: skipped %d torn or unreadable line(s) (a write cut by a kill); their "
                           "answers are asked again. %d answers kept", self.path, self.torn, len(self.data))
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f, disk_full_named(tmp, sum(map(len, good_lines)),
                                                       kept=f"{self.path} is unchanged"):
                f.writelines(good_lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> str:
        return self.data[key]

    def __len__(self) -> int:
        return len(self.data)

    def add_many(self, items: Iterable[tuple[str, str]]) -> None:
        """Record ``(key, answer)`` pairs; on disk they are appended and fsync'ed together."""
        items = list(items)
        self.data.update(items)
        if self.path is None or not items:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        payload = "".join(json.dumps({"k": k, "v": v}, ensure_ascii=False) + "\n"
                          for k, v in items).encode("utf-8")
        with disk_full_named(self.path, len(payload)), open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
