"""The ``openai`` backend against real OpenAI-compatible servers on 127.0.0.1 (tiny Qwen2-VL).

(a) ``transformers serve`` from this venv (main venv; no marker).
(b) ``vllm serve`` from the vLLM venv, with a LoRA module (marker ``vllm``):
    .venv-vllm/bin/python -m pytest -m vllm tests/test_mllm_servers.py
Each server gets a free port, is polled on /health for a bounded time (no sleeps: the wait is
the server process's own ``wait(timeout)``), and is stopped by its PID in a finalizer. Answers
are checked request by request against the in-process transformers backend (float32, greedy),
so they must come back in the order sent.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from utils.mllm import Request, build_client
from utils.mllm.hf_backend import processor_size
from utils.mllm.openai_backend import OpenAIClient
from offline.tiny_qwen2vl import SPECIAL_TOKENS

BUDGET = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
READY_TIMEOUT = 240.0  # seconds; vllm serve is ready in about 30 s here
BIN = Path(sys.executable).parent


def picture(w: int, h: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (w, h), ((70 * seed) % 256, (40 * seed + 90) % 256, 200))
    img.paste((255, 255, 0), (w // 4, h // 4, w // 2, h // 2))
    return img


def requests() -> list[Request]:
    # Resized by the client to 112x84, 56x56, 84x140, 28x112: inside the tiny processor's own
    # budget, so a server that resizes again with it (transformers serve) leaves them alone.
    sizes = [(100, 70), (60, 60), (90, 150), (40, 120)]
    reqs = [Request(f"What is in this image? Question {i}.", picture(w, h, i))
            for i, (w, h) in enumerate(sizes)]
    reqs.insert(1, Request("Aggregate the following subtexts into one sentence."))
    return reqs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log: Path, env: dict, request) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, stop it by PID at teardown, wait for /health."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        try:  # engine workers the server started are in its process group (pgid = its PID)
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:  # the group is already empty
            pass
    request.addfinalizer(stop)

    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        try:
            proc.wait(timeout=0.5)  # the bounded pause between polls
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"server exited with {proc.returncode} before answering /health: "
                    f"{' '.join(cmd)}\n{log.read_text(errors='replace')[-3000:]}")
    pytest.fail(f"server not ready after {READY_TIMEOUT:.0f} s: {' '.join(cmd)}\n"
                f"{log.read_text(errors='replace')[-3000:]}")


def reference(model: str, adapter: "str | None" = None) -> list[str]:
    client = build_client("transformers", model=model, adapter=adapter, device="cpu",
                          dtype="float32", **BUDGET)
    return client.generate(requests(), temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from offline.tiny_qwen2vl import build_tiny_qwen2vl
    base = tmp_path_factory.mktemp("tiny_qwen2vl_serve")
    model = build_tiny_qwen2vl(base / "model", lora_dir=base / "lora")
    return str(model), str(base / "lora")


def test_transformers_serve(tiny_qwen, tmp_path, request):
    exe = BIN / "transformers"
    if not exe.is_file():
        pytest.skip(f"no `transformers` command next to {sys.executable} (pip install 'transformers[serving]')")
    port = free_port()
    model = tiny_qwen[0]
    t0 = time.monotonic()
    # The positional model pins the server to this local folder; HF_HUB_OFFLINE keeps it off
    # the hub, HF_HUB_CACHE must exist or /v1/models fails scanning it.
    (tmp_path / "hub").mkdir()
    start_server([str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                  "--device", "cpu", "--dtype", "float32"], port, tmp_path / "server.log",
                 {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}, request)
    ready = time.monotonic() - t0
    client = OpenAIClient(base_url=f"http://127.0.0.1:{port}/v1", model=model, concurrency=4,
                          timeout=120, **BUDGET)
    answers = client.generate(requests(), temperature=0.0, max_tokens=16)

    def norm(text: str) -> str:
        # transformers serve (5.2x) strips the reply and keeps special tokens other than EOS
        # (random models emit <|image_pad|> and co.); the tokens themselves are the same.
        for tok in SPECIAL_TOKENS:
            text = text.replace(tok, "")
        return text.strip()
    assert [norm(a) for a in answers] == [norm(t) for t in reference(model)]
    assert len(set(answers)) == len(answers)  # different requests, different answers
    print(f"transformers serve ready in {ready:.1f} s")


@pytest.mark.vllm
@pytest.mark.slow  # about 30 s to /health on an idle 2-core machine, more under load
def test_vllm_serve_with_lora(tiny_qwen, tmp_path, request):
    pytest.importorskip("vllm", reason="vLLM is not installed in this venv; run "
                        "`bash scripts/install_vllm_cpu.sh` and use .venv-vllm/bin/python")
    exe = BIN / "vllm"
    assert exe.is_file(), f"vLLM is importable but there is no {exe}"
    port = free_port()
    model, lora = tiny_qwen
    t0 = time.monotonic()
    start_server([str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                  "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "1024",
                  "--max-num-seqs", "8", "--enforce-eager",
                  "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
                  # the client has resized the images: keep the processor from resizing again
                  "--mm-processor-kwargs", json.dumps({"size": processor_size(BUDGET["max_pixels"])}),
                  "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"tiny-lora={lora}"],
                 port, tmp_path / "server.log",
                 {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
                  "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
                 request)
    ready = time.monotonic() - t0
    answers = {}
    for name in ("tiny", "tiny-lora"):
        client = OpenAIClient(base_url=f"http://127.0.0.1:{port}/v1", model=name,
                              concurrency=4, timeout=120, **BUDGET)
        answers[name] = client.generate(requests(), temperature=0.0, max_tokens=16)
    # float32 and greedy: exactly the transformers texts, request by request
    assert answers["tiny"] == reference(model)
    assert answers["tiny-lora"] == reference(model, lora)
    assert sum(a != b for a, b in zip(answers["tiny"], answers["tiny-lora"])) >= 4
    print(f"vllm serve ready in {ready:.1f} s")
