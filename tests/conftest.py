"""Shared fixtures: a tiny random CLIP in OpenAI's layout and a small SynthPEDES benchmark,
both built once per test session (nothing is downloaded)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Markers whose tests must not be skipped when the whole suite runs (make test / CI).
REQUIRED_MARKERS = ("vllm", "llamafactory")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("ICL_REQUIRE_ALL") == "1"
            and any(item.get_closest_marker(m) for m in REQUIRED_MARKERS)):
        report.outcome = "failed"
        report.longrepr = f"skipped although ICL_REQUIRE_ALL=1 (make test): {report.longrepr}"


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> str:
    """A random CLIP (ViT, patch 16, width 64) saved as a plain state dict in OpenAI's layout."""
    from model.tiny_clip import write_random_clip

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    write_random_clip(str(path))
    return str(path)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    """Data root holding SynthPEDES/ (CUHK-PEDES format + attributes.json), small and seeded."""
    from datasets.synthpedes import generate

    root = tmp_path_factory.mktemp("data")
    generate(root / "SynthPEDES", num_ids=40, images_per_id=4, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def pinned_threads():
    """Tests that assert learned numbers pin torch's thread count (the demo's default), since
    another count sums floats in another order and moves the numbers; restored afterwards.
    A module whose numbers were measured with another count overrides this fixture."""
    from utils.determinism import DEFAULT_THREADS, pinned_threads as pinned

    with pinned(DEFAULT_THREADS) as n:
        yield n
