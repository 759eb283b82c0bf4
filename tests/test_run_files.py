"""Only utils/run_dir.py names a run's files (issue 26): every other module asks it for a path.

An AST walk over the project's own Python (tests excluded) flags (1) a string constant that is
exactly a run file's name (``"best.pth"``, ``"similarity.npy"``, ...) and (2) an
``os.path.join(...)`` with a run folder's name (``"eval"``, ``"ccd"``, ``"thi"``, ...)."""
from __future__ import annotations

import ast
import os

import pytest

from utils import run_dir as rd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_NAMES = {rd.CONFIG, rd.BEST, rd.LAST, rd.METRICS, rd.TRAIN_LOG, rd.TEST_LOG, rd.EVAL_SIMILARITY,
              rd.EVAL_Q_PIDS, rd.EVAL_G_PIDS, rd.EVAL_GALLERY, rd.EVAL_CAPTIONS,
              rd.EVAL_IMAGE_PATHS, rd.EVAL_CHECKPOINT, rd.THI_FINAL_SIMILARITY, rd.THI_COST,
              rd.THI_STATE, rd.THI_ROUNDS, rd.THI_SWEEP, rd.MLLM_CACHE_DIR, rd.LOCK_FILE}
FOLDER_NAMES = {rd.EVAL_DIR, rd.CCD_DIR, rd.TB_DIR, rd.THI_DIR, rd.MLLM_CACHE_DIR}
SKIP_DIRS = {"tests", ".venv", ".venv-vllm", ".venv-llamafactory", "work", "runs", ".git", "node_modules"}


def _sources():
    for here, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in files:
            path = os.path.join(here, name)
            if name.endswith(".py") and os.path.relpath(path, ROOT) != os.path.join("utils", "run_dir.py"):
                yield path


def _is_join(node: ast.Call) -> bool:
    f = node.func
    return isinstance(f, ast.Attribute) and f.attr == "join" and isinstance(f.value, ast.Attribute) \
        and f.value.attr == "path"


def run_file_names(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every run file or folder named in ``source``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FILE_NAMES:
            hits.append((node.lineno, node.value))
        elif isinstance(node, ast.Call) and _is_join(node):
            hits += [(a.lineno, a.value) for a in node.args
                     if isinstance(a, ast.Constant) and a.value in FOLDER_NAMES]
    return hits


def test_the_checker_sees_a_planted_run_path():
    planted = 'import os\npath = os.path.join(run, "eval", target)\nbest = os.path.join(run, "best.pth")\n'
    assert run_file_names(planted) == [(2, "eval"), (3, "best.pth")] or \
        sorted(run_file_names(planted)) == [(2, "eval"), (3, "best.pth")]
    # Prose (docstrings, help texts) may mention the files; only whole names count.
    assert run_file_names('"""writes RUN/eval/X/ and best.pth"""\nhelp = "default best.pth"\n') == []


def test_only_the_run_dir_module_names_run_files():
    found = []
    for path in _sources():
        with open(path, encoding="utf-8") as f:
            for line, name in run_file_names(f.read()):
                found.append(f"{os.path.relpath(path, ROOT)}:{line}: {name!r}")
    assert not found, ("run files named outside utils/run_dir.py (ask it for the path: "
                       "checkpoint_path, eval_dir, ccd_file, thi_dir, ...):\n" + "\n".join(found))


@pytest.mark.parametrize("name", sorted(FILE_NAMES))
def test_each_name_is_defined_once(name):
    with open(os.path.join(ROOT, "utils", "run_dir.py"), encoding="utf-8") as f:
        assert f.read().count(repr(name).replace("'", '"')) == 1, name
