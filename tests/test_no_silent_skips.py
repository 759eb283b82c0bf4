"""Under ICL_REQUIRE_ALL=1 (make test) a skip is a failure unless the test is marked gpu, and the
test ledger (ICL_TEST_LEDGER + scripts/check_test_ledger.py) notices a test that no pytest run
selected or passed. Checked on a throw-away test folder run with this folder's conftest.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TESTS = '''
import pytest

def test_ok():
    pass

def test_needs_an_engine():
    pytest.skip("engine not installed")

@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("needs CUDA")

@pytest.mark.slow
def test_slow():
    pass
'''


def _pytest(folder, env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("ICL_REQUIRE_ALL", "ICL_TEST_LEDGER")}
    env.update({k: v for k, v in env_extra.items() if v})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", *args, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _folder(tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    shutil.copy(os.path.join(HERE, "conftest.py"), folder / "conftest.py")
    (folder / "test_x.py").write_text(TESTS)
    return folder


def test_skip_fails_under_require_all_but_not_otherwise(tmp_path):
    folder = _folder(tmp_path)
    plain = _pytest(folder, {"ICL_TEST_LEDGER": ""}, "-m", "not slow")
    assert plain.returncode == 0, plain.stdout
    strict = _pytest(folder, {"ICL_REQUIRE_ALL": "1", "ICL_TEST_LEDGER": ""}, "-m", "not slow")
    assert strict.returncode == 1, strict.stdout
    # the engine test fails, the gpu one may still skip
    assert "1 failed, 1 passed, 1 skipped, 1 deselected" in strict.stdout, strict.stdout
    assert "FAILED test_x.py::test_needs_an_engine" in strict.stdout


def test_ledger_reports_deselected_and_skipped_tests(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from check_test_ledger import check
    finally:
        sys.path.pop(0)
    folder = _folder(tmp_path)
    ledger = tmp_path / "ledger"
    _pytest(folder, {"ICL_TEST_LEDGER": str(ledger)}, "-m", "not slow")
    problems, counts = check(str(ledger))
    assert counts == {"runs": 1, "collected": 4, "passed": 1, "exempt": 1}
    assert sorted(p.split("::")[1].split(":")[0] for p in problems) == ["test_needs_an_engine", "test_slow"]
    assert any("never selected" in p for p in problems if "test_slow" in p)
    # A second run selecting the slow test completes the picture except for the skip.
    _pytest(folder, {"ICL_TEST_LEDGER": str(ledger)}, "-m", "slow")
    problems, counts = check(str(ledger))
    assert counts["runs"] == 2 and [p.split("::")[1].split(":")[0] for p in problems] == ["test_needs_an_engine"]
    assert check(str(tmp_path / "nothing"))[0][0].startswith("no run-*.json")
