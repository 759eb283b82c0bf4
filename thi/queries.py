"""Query files for ``python -m thi --queries FILE``: THI on queries of one's own over a run's
gallery, e.g. a session exported by the search page (``GET /api/session/ID``).

The file is JSON: ``{"queries": [{"text": "...", "pid": 17}, ...]}`` (``pid``, the target
identity, is optional; with every pid given THI reports metrics) or a plain list of strings.
"""
from __future__ import annotations

import json
import os

import numpy as np


def load_queries(path: str) -> tuple[list, "list | None"]:
    """(texts, pids or None) of a query file; errors name the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"--queries {path}: no such file") from None
    except ValueError as exc:
        raise SystemExit(f"--queries {path}: not JSON ({exc})") from None
    items = data.get("queries") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise SystemExit(f"--queries {path}: expected {{\"queries\": [{{\"text\": ..., \"pid\": "
                         f"...}}, ...]}} or a list of strings, with at least one query")
    texts, pids = [], []
    for i, item in enumerate(items):
        text, pid = (item, None) if isinstance(item, str) else (
            (item.get("text"), item.get("pid")) if isinstance(item, dict) else (None, None))
        if not isinstance(text, str) or not text.strip():
            raise SystemExit(f"--queries {path}: query {i} has no text (THI refines text "
                             f"queries; an image-only search session cannot be replayed)")
        if pid is not None and not isinstance(pid, int):
            raise SystemExit(f"--queries {path}: query {i} has pid {pid!r}; expected an integer")
        texts.append(" ".join(text.split()))
        pids.append(pid)
    return texts, (pids if all(p is not None for p in pids) else None)


def apply_queries(data: dict, path: str, score_texts) -> dict:
    """``data`` (``load_eval_dir``'s dict) with the file's queries in place of the test queries:
    captions, their base similarity from ``score_texts`` and, when every pid is known, ids."""
    texts, pids = load_queries(path)
    out = dict(data)
    out["captions"] = texts
    out["similarity"] = np.asarray(score_texts(texts), dtype=np.float32)
    if pids is None:
        out["q_pids"] = out["g_pids"] = None
    else:
        out["q_pids"] = np.asarray(pids, dtype=np.int64)
    return out


def queries_subfolder(path: str) -> str:
    """``queries/<file name>``, under the results folder: a query file's results never mix
    with the test queries' results."""
    stem = os.path.splitext(os.path.basename(path))[0] or "queries"
    return os.path.join("queries", stem)
