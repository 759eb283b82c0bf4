"""THI's resume state: what a killed run needs to continue exactly where it stopped.

After every stage of every round the state is written atomically (``state.json``, plus the
current similarity matrix after each re-ranking stage as its own ``.npy`` file, written first
and then named by the JSON). A run killed at any point therefore restarts at the stage it was
in. What is kept of the stage it was killed in: every usable MLLM answer the client had stored
in its cache. The client stores answers as they arrive: the openai backend each answer on
arrival (a kill loses only the requests in flight, at most ``--concurrency``), the other
backends after each micro-batch (``max_batch``: 64 simulated, 256 vLLM, the batch size for
transformers), so a kill loses at most one micro-batch. Empty or unparseable answers are not
kept as answers: the next run asks them again.

The state's fingerprint holds digests of the inputs, the settings and the MLLM's identity
(backend, model, adapter, content digests, what a server reports on ``/v1/models``): a folder
written with anything else is refused, naming each difference.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from utils.errors import ProjectError
from utils.io import atomic_save_npy, atomic_write_json
from utils import run_dir as rd

STATE_FILE = rd.THI_STATE


class SettingsChanged(ProjectError, ValueError):
    """A THI results folder written with other inputs, settings or MLLM than this run's: a
    refusal whose message lists each difference and what to do (entry points print it alone)."""

STAGES = ("loc", "vqa", "aggr", "rerank")
PER_QUERY = ("anchors", "anchor_round", "said_yes", "refined", "asked_ever")  # lists by query
STATE_VERSION = 1


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(similarity: np.ndarray, captions: Sequence[str], image_paths: Sequence[str],
                **settings) -> dict:
    """What a state belongs to: digests of the inputs plus the settings that shape the result."""
    sim = np.ascontiguousarray(similarity, dtype=np.float32)
    return {
        "version": STATE_VERSION,
        "shape": list(sim.shape),
        "similarity": _digest(sim.tobytes()),
        "captions": _digest(json.dumps(list(captions), ensure_ascii=False).encode("utf-8")),
        "image_paths": _digest(json.dumps([os.fspath(p) for p in image_paths]).encode("utf-8")),
        **{k: v for k, v in sorted(settings.items())},
    }


@dataclass
class THIState:
    """Progress of one THI run. Lists are indexed by query; ``round``/``stage`` name the next
    stage to run (``round == rounds`` once finished)."""

    fingerprint: dict
    anchors: list
    anchor_round: list          # 1-based round of each anchor, 0 for none
    said_yes: list
    refined: list               # refined text per query, None until (and unless) refined
    asked_ever: list            # asked the localization question at least once
    subtexts: dict = field(default_factory=dict)   # str(query) -> parsed VQA sub-sentences
    round: int = 0
    stage: str = "loc"
    pending: list = field(default_factory=list)     # queries the next stage of this round works on
    current: dict = field(default_factory=dict)     # this round's record under construction
    records: list = field(default_factory=list)     # finished rounds' records
    similarity_file: Optional[str] = None           # current re-ranked similarity (.npy name)
    base_metrics: Optional[dict] = None

    @classmethod
    def fresh(cls, fp: dict, num_queries: int) -> "THIState":
        """The state before round 1: no anchors, no answers."""
        return cls(fingerprint=fp, anchors=[-1] * num_queries, anchor_round=[0] * num_queries,
                   said_yes=[False] * num_queries, refined=[None] * num_queries,
                   asked_ever=[False] * num_queries)

    def finished(self, rounds: int) -> bool:
        return self.round >= rounds


def save_state(out_dir: str, state: THIState, similarity: Optional[np.ndarray] = None) -> None:
    """Write ``state`` atomically; with ``similarity``, first write it to a new file that the
    state then names (so the pair on disk is always consistent), and drop the older file."""
    old = state.similarity_file
    if similarity is not None:
        name = f"state_similarity_r{state.round}_{state.stage}.npy"
        atomic_save_npy(os.path.join(out_dir, name), np.asarray(similarity, dtype=np.float32))
        state.similarity_file = name
    atomic_write_json(os.path.join(out_dir, STATE_FILE), asdict(state), indent=None)
    if old and old != state.similarity_file:
        try:
            os.remove(os.path.join(out_dir, old))
        except FileNotFoundError:
            pass


def load_state(out_dir: str, fp: dict) -> Optional[THIState]:
    """The saved state of ``out_dir`` (None if there is none); an error when it was written for
    other inputs or settings, naming what differs and how to start over."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = THIState(**json.load(f))
    except (ValueError, TypeError) as exc:
        raise rd.RunFileError(f"{path}: unreadable THI resume state ({exc}); delete it to start "
                              f"the run over") from exc
    if state.fingerprint != fp:
        lines = "\n".join(f"  {k}: saved {_short(old)}, now {_short(new)}"
                          for k, old, new in differences(state.fingerprint, fp))
        raise SettingsChanged(f"{path} belongs to a THI run with other inputs, settings or MLLM; "
                         f"it differs in:\n{lines}\nIts results are not yours: pass another "
                         f"output folder (--out DIR), or start this folder over by deleting it "
                         f"(rm -r {out_dir})")
    if state.stage not in STAGES:
        raise rd.RunFileError(f"{path}: unknown stage {state.stage!r}; delete it to start over")
    queries = int(fp["shape"][0])
    for name in PER_QUERY:
        if len(getattr(state, name)) != queries:
            raise rd.RunFileError(f"{path}: {name} holds {len(getattr(state, name))} entries for "
                                  f"{queries} queries (cut or edited by hand); delete it to start "
                                  f"the run over")
    return state


def differences(old: dict, new: dict, prefix: str = "") -> list:
    """``(dotted key, old value, new value)`` for every leaf where two fingerprints differ."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", a, b))
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 90 else text[:87] + "..."


def load_similarity(out_dir: str, state: THIState, base: np.ndarray) -> np.ndarray:
    """The current re-ranked similarity of ``state`` (``base`` before the first re-ranking)."""
    if state.similarity_file is None:
        return np.array(base, dtype=np.float32, copy=True)
    path = os.path.join(out_dir, state.similarity_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (named by {STATE_FILE}) is missing; delete "
                                f"{os.path.join(out_dir, STATE_FILE)} to start over")
    sim = rd.read_npy(path, f"delete {os.path.join(out_dir, STATE_FILE)} to start over")
    if sim.shape != np.shape(base):
        raise rd.RunFileError(f"{path} (named by {STATE_FILE}) has shape {sim.shape}, not the "
                              f"evaluation's {np.shape(base)}; delete "
                              f"{os.path.join(out_dir, STATE_FILE)} to start over")
    return sim
