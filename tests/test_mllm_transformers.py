"""The transformers backend on a tiny random Qwen2-VL built in the session (main venv, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from utils.mllm import MLLMError, Request, build_client
from utils.mllm.hf_backend import GREEDY_BELOW, is_greedy, processor_size
from utils.mllm.images import prepare_image, smart_resize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16)  # 4..16 image tokens: short prompts
IMAGE_TOKEN = 12  # <|image_pad|> in the tiny tokenizer


def picture(w: int, h: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (w, h), ((70 * seed) % 256, (40 * seed + 90) % 256, 200))
    img.paste((255, 255, 0), (w // 4, h // 4, w // 2, h // 2))
    return img


def requests() -> list[Request]:
    """Image+text and text-only requests of clearly different prompt lengths."""
    return [
        Request("What is in this image?", picture(64, 64, 0)),
        Request("Can this text accurately describe the image? Text: a man wearing a red shirt "
                "and blue pants with a black bag. Answer Yes or No.", picture(120, 80, 1)),
        Request("Aggregate the subtexts into one sentence."),
        Request("Describe the person.", picture(33, 91, 2), system="You are a pedestrian expert."),
        Request("hello"),
    ]


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(model dir, LoRA dir), written by the module's command line (also tests the CLI)."""
    base = tmp_path_factory.mktemp("tiny_qwen2vl")
    model, lora = base / "model", base / "lora"
    proc = subprocess.run([sys.executable, "-m", "offline.tiny_qwen2vl", str(model),
                           "--lora", str(lora)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (model / "model.safetensors").is_file() and (lora / "adapter_config.json").is_file()
    return str(model), str(lora)


@pytest.fixture(scope="module")
def client(tiny_qwen, tmp_path_factory):
    c = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32",
                     batch_size=8, cache_dir=str(tmp_path_factory.mktemp("cache")), **BUDGET)
    yield c
    c.close()


def test_prompts_hold_the_image_tokens_of_the_budget(client):
    reqs = requests()
    ids = client.generate_ids(reqs, max_tokens=4, ignore_eos=True)
    for r, (prompt, out) in zip(reqs, ids):
        n_image = prompt.count(IMAGE_TOKEN)
        if r.image is None:
            assert n_image == 0
        else:  # the client resizes to the budget and the processor must leave it so
            h, w = smart_resize(r.image.height, r.image.width, **BUDGET)
            assert n_image == h * w // (28 * 28)
        assert len(out) == 4  # ignore_eos: exactly max_tokens


def test_paper_budget_overrides_the_folder_processor(tiny_qwen):
    """The paper's 50,176 budget, although the folder's processor says at most 12,544 pixels:
    120x80 rounds up to 196x280 = 70 tokens and must stay so (a second resize would give 54
    tokens, the folder's own budget 16)."""
    c = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32")
    assert (c.min_pixels, c.max_pixels) == (50176, 50176)
    [(prompt, _)] = c.generate_ids([Request("What is in this image?", picture(120, 80, 1))],
                                   max_tokens=1)
    assert prompt.count(IMAGE_TOKEN) == 70


def test_left_padding_batch_equals_single_requests(client):
    reqs = requests()
    batched = client.generate_ids(reqs, max_tokens=8, ignore_eos=True)
    assert len({len(p) for p, _ in batched}) == len(reqs)  # all prompt lengths differ
    alone = [client.generate_ids([r], max_tokens=8, ignore_eos=True)[0] for r in reqs]
    assert batched == alone


def test_generate_text_is_the_decoded_greedy_ids(client):
    reqs = requests()
    texts = client.generate(reqs, temperature=0.0, max_tokens=12)
    ids = client.generate_ids(reqs, max_tokens=12)
    assert texts == [client.decode(out) for _, out in ids]
    assert len(set(texts)) > 1 and any(texts)
    # small micro-batches give the same answers (order kept across micro-batches)
    small = build_client("transformers", model=str(client.model_dir), device="cpu",
                         dtype="float32", batch_size=2, **BUDGET)
    assert small.generate(reqs, temperature=0.0, max_tokens=12) == texts


def test_temperature_rule(client, tiny_qwen):
    assert is_greedy(0.0) and is_greedy(0.01) and is_greedy(GREEDY_BELOW - 1e-9)
    assert not is_greedy(GREEDY_BELOW) and not is_greedy(1.0)
    reqs = requests()
    greedy = client.generate(reqs, temperature=0.0, max_tokens=10)
    assert client.generate(reqs, temperature=0.01, max_tokens=10) == greedy  # paper's 0.01
    # real sampling: reproducible per client seed, and not the argmax path
    a = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32", **BUDGET)
    b = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32", **BUDGET)
    sa = a.generate(reqs, temperature=1.0, max_tokens=10)
    assert sa == b.generate(reqs, temperature=1.0, max_tokens=10)
    assert sa != greedy


def test_release_sampling_samples_at_low_temperature(client, tiny_qwen):
    """--release-sampling: the release's vLLM SamplingParams(temperature=0.01) samples; by default
    we decode greedily below 0.05. The choice is part of the client's identity (cache, results)."""
    assert not is_greedy(0.01, sample_low_temperature=True) and is_greedy(0.0, sample_low_temperature=True)
    sampled = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32",
                           sample_low_temperature=True, **BUDGET)
    assert sampled._generation_config(0.01, 10, False).do_sample
    assert sampled._generation_config(0.01, 10, False).temperature == pytest.approx(0.01)
    assert not client._generation_config(0.01, 10, False).do_sample
    assert sampled.identity_info()["sampling"] == "release" and "sampling" not in client.identity_info()
    from argparse import Namespace

    from utils.mllm.cli_options import client_options
    args = Namespace(backend="transformers", model=tiny_qwen[0], lora=None, release_sampling=True)
    assert client_options(args, None, "c")["sample_low_temperature"] is True


def test_adapter_changes_outputs(client, tiny_qwen):
    reqs = requests()
    base = client.generate_ids(reqs, max_tokens=8, ignore_eos=True)
    tuned_client = build_client("transformers", model=tiny_qwen[0], adapter=tiny_qwen[1],
                                device="cpu", dtype="float32", **BUDGET)
    tuned = tuned_client.generate_ids(reqs, max_tokens=8, ignore_eos=True)
    assert [p for p, _ in tuned] == [p for p, _ in base]  # same prompts
    assert sum(t != b for (_, t), (_, b) in zip(tuned, base)) >= len(reqs) - 1
    assert tuned_client.identity() != client.identity()


def test_cache_hit_on_rerun(client, tiny_qwen):
    reqs = requests()
    first = client.generate(reqs, temperature=0.01, max_tokens=6)
    calls = client.stats["calls"]
    again = client.generate(reqs, temperature=0.01, max_tokens=6)
    assert again == first and client.stats["calls"] == calls
    # a new client on the same cache folder answers without loading the model at all
    fresh = build_client("transformers", model=tiny_qwen[0], device="cpu", dtype="float32",
                         cache_dir=client.cache.dir, **BUDGET)
    assert fresh.generate(reqs, temperature=0.01, max_tokens=6) == first
    assert fresh.stats["calls"] == 0 and fresh.stats["cache_hits"] == len(reqs)
    assert fresh._model is None


def test_processor_size_leaves_prepared_images_alone():
    """Every prepare_image output fits processor_size, so the processor never resizes twice."""
    for lo, hi in [(3136, 12544), (50176, 50176), (3136, 3136), (784, 1003520)]:
        size = processor_size(hi)
        for h in (1, 5, 14, 33, 80, 91, 128, 384, 999):
            # up to 1:50; near 1:200 the rounding itself can pass 200 (28x6608), which
            # Qwen's processors reject whatever the budget (a limit of prepare_image's rule)
            for ratio in (1 / 50, 1 / 7, 0.5, 1, 3, 50):
                w = max(1, round(h * ratio))
                rh, rw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                assert size["shortest_edge"] <= rh * rw <= size["longest_edge"], (h, w, lo, hi)
                assert smart_resize(rh, rw, min_pixels=size["shortest_edge"],
                                    max_pixels=size["longest_edge"]) == (rh, rw)
    img = prepare_image(picture(120, 80, 0), 50176, 50176)
    assert img.size == (280, 196)  # rounded up past the budget: 70 tokens, kept as they are


def test_errors_name_the_folder(tmp_path, tiny_qwen):
    with pytest.raises(MLLMError, match="no config.json"):
        build_client("transformers", model=str(tmp_path / "missing"))
    with pytest.raises(MLLMError, match="adapter_config.json"):
        build_client("transformers", model=tiny_qwen[0], adapter=str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        build_client("transformers", model=tiny_qwen[0], dtype="fp8")
