"""The mutation list of scripts/mutation_check.py stays plantable: every snippet occurs exactly
once in its file and every test target exists (an edit of the code must update the list, it
cannot silently retire a mutation). `make mutation` runs the list itself."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("mutation_check", os.path.join(ROOT, "scripts", "mutation_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_snippet_matches_exactly_once():
    mod = _module()
    assert len(mod.MUTATIONS) >= 40
    assert mod.check_patterns(mod.MUTATIONS) == []


def test_a_stale_snippet_is_reported(tmp_path):
    mod = _module()
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    (tmp_path / "t.py").write_text("")
    bad = [mod.Mutation("twice", "a.py", "x = 1", "x = 2", ("t.py",), ""),
           mod.Mutation("gone", "a.py", "y = 1", "y = 2", ("t.py::test_x",), ""),
           mod.Mutation("no-test", "a.py", "x = 1\nx", "x", ("missing.py",), "")]
    problems = mod.check_patterns(bad, root=str(tmp_path))
    assert any(p.startswith("twice: the snippet occurs 2 times") for p in problems)
    assert any(p.startswith("gone: the snippet occurs 0 times") for p in problems)
    assert any(p.startswith("no-test: test target missing.py") for p in problems)
