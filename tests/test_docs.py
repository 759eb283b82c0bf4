"""Docs that run as written: every shell block of README.md and docs/*.md (tests/doc_blocks.py)
runs from a scratch copy of the repository in the state `make demo` leaves (a smaller, shorter
demo: 60 identities, 2 epochs), unless it is marked `<!-- not-run: REASON -->`.

The copy holds the working tree's tracked and untracked (not ignored) files and links to the
venvs, so the repository itself is never written to. A block runs with `bash -e -o pipefail`
and the project venv (or, marked `<!-- run: vllm -->`, the vLLM venv) first on PATH."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_blocks import ROOT, VENVS, all_blocks  # noqa: E402

BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.not_run is None]
# A safety net for a hung block, far above what a block needs (seconds of CPU on the demo data):
# a block that needs minutes on CPU gets tiny overrides in the docs, or not-run.
BLOCK_TIMEOUT_S = 900


def test_every_block_is_run_or_marked_with_a_reason():
    assert BLOCKS, "no shell blocks found in README.md and docs/*.md"
    unexplained = [b.id for b in BLOCKS if b.not_run is not None and len(b.not_run.split()) < 2]
    assert not unexplained, f"<!-- not-run: REASON --> needs a reason (a few words): {unexplained}"
    assert RUN, "every block is marked not-run: at least the CPU ones must run"


def test_extraction_rules(tmp_path):
    from doc_blocks import extract

    (tmp_path / "a.md").write_text(
        "text\n```bash\necho 1\n```\n<!-- not-run: needs a GPU -->\n```bash\nnvidia-smi\n```\n"
        "```python\n```bash\n```\n<!-- run: vllm -->\n```sh\nvllm --version\n```\n")
    blocks = extract("a.md", str(tmp_path))
    assert [(b.line, b.code, b.not_run, b.venv) for b in blocks] == [
        (2, "echo 1\n", None, None), (6, "nvidia-smi\n", "needs a GPU", None),
        (13, "vllm --version\n", None, "vllm")]
    (tmp_path / "b.md").write_text("```bash\necho\n")
    with pytest.raises(ValueError, match="b.md:1"):
        extract("b.md", str(tmp_path))


def _copy_tree(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in files:
        src = os.path.join(ROOT, rel)
        if rel and os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    for venv in (".venv", *VENVS.values()):
        if os.path.exists(os.path.join(ROOT, venv)):
            os.symlink(os.path.realpath(os.path.join(ROOT, venv)), os.path.join(dest, venv))


def _env(repo: str, venv: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               VIRTUAL_ENV=os.path.join(repo, venv), PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = os.path.join(repo, venv, "bin") + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd: list[str], cwd: str, env: dict, timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, output tail, CPU seconds of the command and its children).
    The command runs in its own session so that a timeout ends everything it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rc, out[-6000:], cpu


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory) -> str:
    """A scratch copy of the repository after `make demo` made small (40 identities, one epoch;
    THI with the simulated MLLM as the demo runs it, so the blocks meet what a user meets)."""
    repo = str(tmp_path_factory.mktemp("docs") / "repo")
    _copy_tree(repo)
    cmd = [os.path.join(repo, ".venv", "bin", "python"), "scripts/demo.py", "--num-ids", "40",
           "--no-progress", "num_epoch=1", "device=cpu"]
    rc, out, cpu = _run(cmd, repo, _env(repo, ".venv"), 1800)
    assert rc == 0, out
    print(f"[docs] demo state built with {cpu:.0f} s of CPU")
    for path in ("work/data/SynthPEDES/reid_raw.json", "work/pretrained/tiny_clip_synthpretrain.pt",
                 "work/runs/demo_synthpedes/best.pth", "work/runs/demo_synthpedes/eval/SynthPEDES/best/similarity.npy"):
        assert os.path.exists(os.path.join(repo, path)), path
    return repo


def _params():
    for b in RUN:
        marks = [pytest.mark.slow] + ([pytest.mark.vllm] if b.venv == "vllm" else [])
        yield pytest.param(b, id=b.id, marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_doc_block_runs(block, demo_repo):
    venv = VENVS[block.venv] if block.venv else ".venv"
    rc, out, cpu = _run(["bash", "-e", "-o", "pipefail", "-c", block.code], demo_repo, _env(demo_repo, venv),
                        BLOCK_TIMEOUT_S)
    print(f"[docs] {block.id}: {cpu:.0f} s of CPU")
    assert rc is not None, (f"{block.id} ran longer than {BLOCK_TIMEOUT_S} s: give it tiny CPU overrides in "
                            f"the docs or mark it <!-- not-run: REASON -->")
    assert rc == 0, (f"{block.id} failed (exit {rc}); fix the docs or the code, or mark it "
                     f"<!-- not-run: REASON -->:\n{block.code}\n--- output\n{out}")
