"""The one place that talks to a multimodal LLM (THI and RDA use only this package).

``build_client(backend, **options)`` returns a client whose ``generate(requests, temperature,
max_tokens)`` answers a batch of :class:`Request` in order, through a persistent cache.
Backends are imported lazily so that, e.g., the simulated backend needs neither vLLM nor torch.
"""
from __future__ import annotations

import importlib

from .base import BaseClient, MLLMError, Request

# backend name -> (module, class); modules are imported only when that backend is built. The
# simulated MLLM lives in the offline world (offline/simulated.py): named here, never imported
# by utils/ (tests/test_layers.py).
BACKENDS = {
    "vllm": ("utils.mllm.vllm_backend", "VLLMClient"),
    "openai": ("utils.mllm.openai_backend", "OpenAIClient"),
    "transformers": ("utils.mllm.hf_backend", "TransformersClient"),
    "simulated": ("offline.simulated", "SimulatedClient"),
}

__all__ = ["BACKENDS", "BaseClient", "MLLMError", "Request", "build_client", "default_dtype"]


def build_client(backend: str, **options) -> BaseClient:
    """Build the client of ``backend`` (one of ``BACKENDS``) with its ``options``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MLLM backend {backend!r}; valid backends: "
                         f"{', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise  # our own module is missing: a packaging bug, not a user error
        raise MLLMError(f"the {backend!r} MLLM backend needs the package {exc.name!r}, which is "
                        f"not installed in this environment ({exc}); install it or pick another "
                        f"backend ({', '.join(sorted(BACKENDS))})") from exc
    return getattr(module, class_name)(**options)


def default_dtype(backend: str, dtype: "str | None") -> "str | None":
    """``dtype`` as given, else float32 for vllm/transformers without a CUDA GPU (bfloat16 on a
    CPU is slow and makes transformers warn about every float32 -> bfloat16 cast), else None
    (the backend's own default)."""
    if dtype or backend not in ("vllm", "transformers"):
        return dtype
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    return None if has_gpu else "float32"
