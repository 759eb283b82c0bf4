"""The search engine behind the page: query kinds, sessions, one THI step per answer.

No web code here. A session holds one query's base similarity over the gallery and its
interaction so far. One answer is one THI step (``thi.pipeline``'s step functions over the MLLM
stage runner, ``utils.mllm.stages``: the same requests and answer rules as THI and RDA; Eq. 6
from ``thi.rerank``):

* "this is the one" (the person, or the MLLM's anchor localization on request) makes the image
  an anchor; VQA on it and aggregation with the current query text give the refined text;
  the new scores are Eq. 6, S_hat = lambda S + (1 - lambda) S_bar, with S the session's base
  similarity and S_bar the refined text's similarity, 1 at every confirmed image. A later
  confirmation refines the latest refined text again (multi-round, beyond ICL's single anchor).
* "not this one" sets the image aside (ranked last) and changes no score; an MLLM "No" (or an
  unparseable answer, as in THI) does the same. "undo" brings a set-aside image back.

A session takes at most ``max_rounds`` answers (``--rounds``): its state, its export and the
work of each answer stay bounded.

Query kinds: ``text``; ``attributes`` (the 15 VQA questions as fields, see ``attributes``);
``text_image`` (w * image similarity + (1 - w) * text similarity); ``image`` (image -> image).
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from utils.mllm.parsing import parse_yes_no
from utils.mllm.stages import loc_request

from ..defaults import LAMBDA
from ..pipeline import ask_one, refine_query
from ..rerank import check_lambda, rerank_rows
from .attributes import attributes_to_text

KINDS = ("text", "attributes", "text_image", "image")
ANSWERS = ("yes", "no", "mllm", "undo")
MAX_TEXT_CHARS = 2000
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BadRequest(ValueError):
    """Bad input from the user: the web layer answers 400 with this message."""


class NotFound(KeyError):
    """An unknown session or gallery index: the web layer answers 404 with this message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class Session:
    """One search: its query, base similarity ``base`` [G], current scores and history."""

    id: str
    kind: str
    text: str                     # the query text the MLLM sees ("" for an image-only query)
    base: np.ndarray              # S of Eq. 6 for this query
    scores: np.ndarray            # current S_hat
    image_weight: Optional[float]
    target_pid: Optional[int]
    attributes: dict = field(default_factory=dict)
    refined: str = ""             # the latest refined text ("" until a confirmation refines)
    anchors: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    prev_key: Optional[np.ndarray] = None   # ranking key before the latest step (movement)
    start_target_rank: Optional[int] = None # the target's rank before any answer
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def current_text(self) -> str:
        return self.refined or self.text


class SessionStore:
    """At most ``capacity`` sessions; the least recently used one goes first. Thread-safe."""

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError(f"capacity (--max-sessions) must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: "OrderedDict[str, Session]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, session: Session) -> None:
        with self._lock:
            self._items[session.id] = session
            self._items.move_to_end(session.id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, session_id: str) -> Session:
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            size = len(session_id) if isinstance(session_id, str) else type(session_id).__name__
            raise BadRequest(f"malformed session id ({size}): pass the 'session' that "
                             f"/api/search returned (1-64 letters, digits, '-' or '_')")
        with self._lock:
            session = self._items.get(session_id)
            if session is None:
                raise NotFound(f"unknown session {session_id!r} (expired or never created: the "
                               f"server keeps the {self.capacity} most recent sessions); start "
                               f"a new search")
            self._items.move_to_end(session.id)
            return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def ranking_key(scores: np.ndarray, rejected: Sequence[int]) -> np.ndarray:
    """Scores with set-aside images at -inf (ranked last, in gallery order)."""
    key = np.array(scores, dtype=np.float64, copy=True)
    if len(rejected):
        key[np.asarray(rejected, dtype=np.int64)] = -np.inf
    return key


def top_indices(key: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best gallery indices, best first; ties in gallery order (like ``topk``)."""
    k = min(int(k), key.shape[0])
    if k >= key.shape[0]:
        return np.argsort(-key, kind="stable")
    part = np.argpartition(-key, k - 1)[:k]
    threshold = key[part].min()
    # every index scoring at least the k-th score, then a stable sort: exact tie order
    cand = np.flatnonzero(key >= threshold)
    return cand[np.argsort(-key[cand], kind="stable")][:k]


def rank_of(key: np.ndarray, index: int) -> int:
    """1-based rank of gallery ``index`` under ``key`` (ties in gallery order), in O(G)."""
    v = key[index]
    return int((key > v).sum() + (key[:index] == v).sum() + 1)


class SearchEngine:
    """Query kinds, sessions and THI steps over one gallery.

    ``image_paths`` [G]; ``score_texts(texts) -> [n, G]`` and ``score_images(pil images) ->
    [n, G]`` (the run's model, ``thi.scoring``); ``client``: an MLLM client (``utils.mllm``) or
    None (then only the person answers and confirmations cannot refine); ``g_pids`` [G]:
    identities, when known (the target's rank is shown); ``examples``: (caption, identity)
    pairs of the dataset's test queries, offered on the page. ``lam``: Eq. 6's lambda.
    """

    def __init__(self, image_paths: Sequence[str], score_texts: Callable, *,
                 score_images: Optional[Callable] = None, client=None, g_pids=None,
                 examples: Optional[Sequence] = None, lam: float = LAMBDA,
                 default_image_weight: float = 0.5, top_k: int = 20, max_sessions: int = 64,
                 max_rounds: int = 100, temperature: float = 0.01, max_tokens: int = 512,
                 info: Optional[dict] = None, image_root: Optional[str] = None):
        self.image_paths = [str(p) for p in image_paths]
        self.num_gallery = len(self.image_paths)
        if self.num_gallery == 0:
            raise ValueError("the gallery is empty")
        self.score_texts, self.score_images, self.client = score_texts, score_images, client
        self.g_pids = None if g_pids is None else np.asarray(g_pids, dtype=np.int64)
        if self.g_pids is not None and self.g_pids.shape != (self.num_gallery,):
            raise ValueError(f"g_pids has {self.g_pids.shape} entries for {self.num_gallery} "
                             f"gallery images")
        self.examples = [(str(c), None if p is None else int(p)) for c, p in (examples or [])]
        self.lam = check_lambda(lam)
        self.default_image_weight = _weight(default_image_weight)
        self.top_k = int(top_k)
        if int(max_rounds) < 1:
            raise ValueError(f"max_rounds (--rounds) must be >= 1, got {max_rounds}")
        self.max_rounds = int(max_rounds)
        self.image_root = image_root  # paths are shown relative to it
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.sessions = SessionStore(max_sessions)
        self.info = dict(info or {})
        self._mllm_lock = threading.Lock()  # clients (and their caches) are not shared-safe

    # ---------------------------------------------------------------- queries
    def _text_row(self, text: str) -> np.ndarray:
        return _one_row(self.score_texts([text]), self.num_gallery, "score_texts")

    def _image_row(self, image) -> np.ndarray:
        if self.score_images is None:
            raise BadRequest("this server has no image encoder; image queries are off")
        return _one_row(self.score_images([image]), self.num_gallery, "score_images")

    def search(self, kind: str, *, text: str = "", attributes: Optional[Mapping] = None,
               image=None, image_weight: Optional[float] = None,
               target_pid: Optional[int] = None) -> Session:
        """A new session for a query; ``image`` is a PIL image (the web layer decodes it)."""
        if kind not in KINDS:
            raise BadRequest(f"unknown query kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        text = " ".join(str(text or "").split())
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"the text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
        attrs = {k: str(v) for k, v in (attributes or {}).items() if str(v or "").strip()}
        weight = None
        if kind == "attributes":
            try:
                text = attributes_to_text(attrs)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
            if not text:
                raise BadRequest("fill at least one attribute field")
        if kind in ("text", "text_image") and not text:
            raise BadRequest("the text is empty: describe the person")
        if kind in ("text_image", "image") and image is None:
            raise BadRequest(f"a {kind!r} query needs an image (field 'image')")
        if kind == "image":
            text = ""
        if target_pid is not None:
            target_pid = int(target_pid)
            if self.g_pids is None:
                raise BadRequest("this gallery has no identities; leave the target empty")
            if not (self.g_pids == target_pid).any():
                raise BadRequest(f"identity {target_pid} has no image in the gallery")
        if kind == "text" or kind == "attributes":
            base = self._text_row(text)
        elif kind == "image":
            base = self._image_row(image)
        else:
            weight = self.default_image_weight if image_weight is None else _weight(image_weight)
            base = weight * self._image_row(image) + (1.0 - weight) * self._text_row(text)
        session = Session(id=secrets.token_urlsafe(12), kind=kind, text=text,
                          base=base.astype(np.float32), scores=base.astype(np.float32).copy(),
                          image_weight=weight, target_pid=target_pid, attributes=attrs)
        session.start_target_rank = self.target_rank(session)
        self.sessions.add(session)
        return session

    # ---------------------------------------------------------------- answers
    def check_index(self, gallery_index) -> int:
        try:
            g = int(gallery_index)
        except (TypeError, ValueError):
            raise BadRequest(f"gallery_index must be an integer, got {gallery_index!r}") from None
        if not 0 <= g < self.num_gallery:
            raise NotFound(f"gallery index {g} is out of range [0, {self.num_gallery})")
        return g

    def feedback(self, session_id: str, answer: str, gallery_index=None) -> dict:
        """One step: ``answer`` "yes"/"no" from the person on ``gallery_index``, or "mllm":
        the MLLM judges ``gallery_index`` (default: the best-ranked image not judged yet)."""
        if answer not in ANSWERS:
            raise BadRequest(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        session = self.sessions.get(session_id)
        with session.lock:
            if len(session.rounds) >= self.max_rounds:
                raise BadRequest(f"this search has had its {self.max_rounds} answers (--rounds); "
                                 f"start a new search (GET /api/session/ID keeps this one)")
            if gallery_index is None:
                if answer != "mllm":
                    raise BadRequest("gallery_index is missing: which image is (not) the one?")
                g = self._next_unjudged(session)
            else:
                g = self.check_index(gallery_index)
            step = {"round": len(session.rounds) + 1, "gallery_index": g, "by": "person",
                    "mllm_seconds": 0.0}
            if answer == "mllm":
                answer = self._ask_localization(session, g, step)
            if answer == "undo":
                self._undo_reject(session, g, step)
            elif answer == "yes":
                self._confirm(session, g, step)
            else:
                self._reject(session, g, step)
            step["target_rank"] = self.target_rank(session)
            session.rounds.append(step)
            return step

    def _next_unjudged(self, session: Session) -> int:
        judged = set(session.anchors) | set(session.rejected)
        key = ranking_key(session.scores, session.rejected)
        for g in top_indices(key, min(self.num_gallery, len(judged) + 1)):
            if int(g) not in judged:
                return int(g)
        raise BadRequest("every gallery image has been judged")

    def _ask_localization(self, session: Session, g: int, step: dict) -> str:
        if self.client is None:
            raise BadRequest("this server has no MLLM (start it with --backend); answer yourself")
        if not session.current_text:
            raise BadRequest("the MLLM judges an image against a text and this image-only query "
                             "has none yet: answer yourself")
        t0 = time.perf_counter()
        with self._mllm_lock:
            raw = ask_one(self.client, "loc", loc_request(session.current_text,
                                                          self.image_paths[g]),
                          temperature=self.temperature, max_tokens=self.max_tokens)
        step["mllm_seconds"] += time.perf_counter() - t0
        parsed = parse_yes_no(raw)
        step.update(by="mllm", mllm_answer=raw)
        return "yes" if parsed is True else "no"  # unparseable counts as "No", as in THI

    def _reject(self, session: Session, g: int, step: dict) -> None:
        if g in session.anchors:
            raise BadRequest(f"gallery image {g} was confirmed as the one; it cannot be set "
                             f"aside now")
        step["action"] = "reject"
        session.prev_key = ranking_key(session.scores, session.rejected)
        if g not in session.rejected:
            session.rejected.append(g)
        step["refined_text"] = session.current_text
        step["encode_rerank_seconds"] = 0.0

    def _undo_reject(self, session: Session, g: int, step: dict) -> None:
        if g not in session.rejected:
            raise BadRequest(f"gallery image {g} is not set aside: nothing to undo")
        step["action"] = "undo"
        session.prev_key = ranking_key(session.scores, session.rejected)
        session.rejected.remove(g)
        step["refined_text"] = session.current_text
        step["encode_rerank_seconds"] = 0.0

    def _identity_warning(self, session: Session, g: int) -> Optional[str]:
        """A warning when ``g`` shows another identity than the images confirmed before."""
        if self.g_pids is None or not session.anchors:
            return None
        others = sorted({int(self.g_pids[a]) for a in session.anchors} - {int(self.g_pids[g])})
        if not others:
            return None
        return (f"image {g} shows identity {int(self.g_pids[g])}, but the image(s) confirmed "
                f"before show identity {', '.join(map(str, others))}: the query now mixes "
                f"two people")

    def _confirm(self, session: Session, g: int, step: dict) -> None:
        if g in session.anchors:
            raise BadRequest(f"gallery image {g} is already confirmed")
        step["action"] = "confirm"
        if self.client is None:
            raise BadRequest("this server has no MLLM (start it with --backend): a confirmed "
                             "image cannot be described")
        t0 = time.perf_counter()
        with self._mllm_lock:
            subtexts, refined = refine_query(self.client, session.current_text,
                                             self.image_paths[g], temperature=self.temperature,
                                             max_tokens=self.max_tokens)
        step["mllm_seconds"] += time.perf_counter() - t0
        warning = self._identity_warning(session, g)
        if warning:
            step["warning"] = warning
        session.prev_key = ranking_key(session.scores, session.rejected)
        if g in session.rejected:
            session.rejected.remove(g)
        session.anchors.append(g)
        step["subtexts"] = subtexts
        t0 = time.perf_counter()
        if refined:
            session.refined = refined
            session.scores = self.refine_scores(session.base, refined, session.anchors)
        else:
            step["note"] = ("the MLLM's answer could not be used (no VQA sub-sentence or an "
                            "empty aggregation): the ranking keeps its scores, as THI does")
        step["encode_rerank_seconds"] = time.perf_counter() - t0
        step["refined_text"] = session.current_text

    def refine_scores(self, base: np.ndarray, refined: str, anchors: Sequence[int]) -> np.ndarray:
        """Eq. 6 for one query: re-encode ``refined``, S_bar = 1 at every confirmed image."""
        s_bar = self._text_row(refined)
        s_bar[np.asarray(anchors[:-1], dtype=np.int64)] = 1.0
        return rerank_rows(base[None], s_bar[None], np.asarray(anchors[-1:]), self.lam)[0]

    # ---------------------------------------------------------------- views
    @property
    def run_name(self) -> Optional[str]:
        """The run directory's name (never its absolute path)."""
        run = self.info.get("run")
        return os.path.basename(os.path.normpath(run)) if run else None

    def shown_path(self, g: int) -> str:
        """Gallery image ``g``'s path as the page may show it (relative to the data root)."""
        from .paths import shown_path

        return shown_path(self.image_paths[g], self.image_root)

    def anchors_view(self, session: Session) -> list:
        """The confirmed images with their identities (None when unknown)."""
        return [{"gallery_index": int(a),
                 "pid": None if self.g_pids is None else int(self.g_pids[a])}
                for a in session.anchors]

    def target_rank(self, session: Session) -> Optional[int]:
        """Best 1-based rank of any image of the session's target identity (None without one)."""
        if session.target_pid is None or self.g_pids is None:
            return None
        key = ranking_key(session.scores, session.rejected)
        idx = np.flatnonzero(self.g_pids == session.target_pid)
        best = idx[np.argmax(key[idx])]
        return rank_of(key, int(best))

    def target_view(self, session: Session) -> Optional[dict]:
        """The target identity, its rank now and before the latest answer (None without one)."""
        if session.target_pid is None:
            return None
        before = (session.rounds[-2]["target_rank"] if len(session.rounds) > 1 else
                  session.start_target_rank if session.rounds else None)
        return {"pid": session.target_pid, "rank": self.target_rank(session),
                "previous_rank": before, "start_rank": session.start_target_rank}

    def results(self, session: Session, k: Optional[int] = None) -> list:
        """The top-``k`` rows: rank, gallery index, score, identity, judgement, rank movement."""
        key = ranking_key(session.scores, session.rejected)
        rows = []
        for rank, g in enumerate(top_indices(key, k or self.top_k), start=1):
            g = int(g)
            row = {"rank": rank, "gallery_index": g, "score": round(float(session.scores[g]), 6),
                   "pid": None if self.g_pids is None else int(self.g_pids[g]),
                   "confirmed": g in session.anchors, "rejected": g in session.rejected,
                   "previous_rank": None}
            if session.prev_key is not None:
                row["previous_rank"] = rank_of(session.prev_key, g)
            rows.append(row)
        return rows

    def export(self, session: Session) -> dict:
        """The session as JSON: ``python -m thi --queries FILE`` replays its query."""
        return {
            "format": "icl-thi-session", "version": 1, "session": session.id,
            "run": self.run_name, "dataset": self.info.get("dataset"),
            "kind": session.kind, "lam": self.lam, "image_weight": session.image_weight,
            "attributes": dict(session.attributes),
            "queries": [{"text": session.text, "pid": session.target_pid}],
            "anchors": list(session.anchors),
            "anchor_images": [self.shown_path(g) for g in session.anchors],
            "rejected": list(session.rejected), "refined": session.refined or None,
            "rounds": [dict(r) for r in session.rounds],
        }


def _weight(w) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise BadRequest(f"image_weight must be a number in [0, 1], got {w!r}") from None
    if not 0.0 <= w <= 1.0:
        raise BadRequest(f"image_weight must be in [0, 1], got {w}")
    return w


def _one_row(rows, num_g: int, name: str) -> np.ndarray:
    if hasattr(rows, "detach"):
        rows = rows.detach().float().cpu().numpy()
    rows = np.asarray(rows, dtype=np.float32)
    if rows.shape != (1, num_g):
        raise ValueError(f"{name} returned shape {rows.shape}, expected (1, {num_g})")
    return rows[0].copy()
