"""The packages' imports run one way (docs/ARCHITECTURE.md, "Layers"): each package imports only
the packages below it, and the offline world (``offline/``) is a guest that no real package
imports; the system reaches it by name through its registries (``datasets.get_reader``,
``utils.mllm.BACKENDS``). Read from the source (ast), every import, at the top or in a function."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# package -> the packages its modules may import (besides itself and third-party packages)
ALLOWED: dict[str, frozenset[str]] = {
    "utils": frozenset(),
    "datasets": frozenset({"utils"}),
    "model": frozenset({"utils"}),
    "solver": frozenset({"utils"}),
    "processor": frozenset({"utils", "datasets", "model", "solver"}),
    "thi": frozenset({"utils", "datasets", "model"}),
    "rda": frozenset({"utils", "datasets", "model"}),
    "repro": frozenset({"utils", "datasets", "model", "solver", "processor", "thi", "rda", "offline"}),
    "offline": frozenset({"utils", "datasets", "model", "solver", "processor", "thi", "rda"}),
}
PROJECT = frozenset(ALLOWED)


def imported_modules(path: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at ``path``, a module of the
    dotted ``package`` (relative imports resolved against it)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = []
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
            if node.module:
                found.append((node.lineno, ".".join(base + [node.module])))
            else:  # ``from .. import x``: x is a module of the package named by the dots
                found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
    return found


def arrows_back_up(root: str = REPO) -> list[str]:
    """Every import that breaks ALLOWED, as 'file:line: package -> package (module)'."""
    bad = []
    for top in sorted(ALLOWED):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                module = rel[:-3].replace(os.sep, ".")
                package = module.rsplit(".", 1)[0] if name != "__init__.py" else module[:-len(".__init__")]
                for line, target in imported_modules(path, package):
                    other = target.split(".")[0]
                    if other in PROJECT and other != top and other not in ALLOWED[top]:
                        bad.append(f"{rel}:{line}: {top} -> {other} ({target})")
    return bad


def test_no_import_runs_back_up_the_layers():
    bad = arrows_back_up()
    assert not bad, ("imports against the layers of docs/ARCHITECTURE.md (a real package may not "
                     "import offline/ -- reach it by name through a registry -- nor a package "
                     "above it):\n" + "\n".join(bad))


@pytest.mark.parametrize("source,arrow", [
    ("utils/mllm/extra.py", "from datasets.synthpedes import parse_caption\n"),
    ("utils/extra.py", "def f():\n    from datasets import build_dataset\n"),
    ("datasets/extra.py", "from offline import synthpedes\n"),
    ("thi/extra.py", "from offline.simulated import SimulatedClient\n"),
    ("model/extra.py", "import offline.tiny_clip\n"),
    ("thi/extra.py", "from processor.evaluate import evaluate_run\n"),
    ("rda/extra.py", "from solver import build_optimizer\n"),
    ("datasets/extra.py", "from .. import model\n"),
])
def test_the_walk_sees_a_planted_arrow(tmp_path, source, arrow):
    """Each arrow planted in a copy of the packages' layout is reported, with its file."""
    for top in ALLOWED:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "utils" / "mllm").mkdir()
    (tmp_path / "utils" / "mllm" / "__init__.py").write_text("")
    (tmp_path / "offline" / "ok.py").write_text("from datasets import build_dataset\nimport utils.io\n")
    (tmp_path / "thi" / "ok.py").write_text("from model import build_model\nfrom .cli import main\n")
    assert arrows_back_up(str(tmp_path)) == []
    (tmp_path / source).write_text(arrow)
    bad = arrows_back_up(str(tmp_path))
    assert len(bad) == 1 and bad[0].startswith(source + ":"), bad
