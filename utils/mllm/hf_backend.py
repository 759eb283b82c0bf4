"""The ``transformers`` backend: a local Qwen2-VL / Qwen2.5-VL directory run in this process.

Batched with left padding (so every prompt ends where generation starts), an optional PEFT
adapter applied without merging (as vLLM applies a LoRA), on CPU or a GPU.

Sampling rule shared with the vLLM backend (:func:`is_greedy`): a temperature below
``GREEDY_BELOW`` (0.05) is decoded greedily. The paper asks for 0.01, which is sampling only in
name (near-ties aside, it is the argmax); treating it as greedy makes runs reproducible and lets
both backends agree token for token. The release samples at 0.01 (vLLM ``SamplingParams``);
``sample_low_temperature=True`` (``--release-sampling``) does the same, and says so in the
client's identity (results folders, cache keys).

The image rule, also shared: the client resizes each image itself to the pixel budget
(``images.prepare_image``: Qwen's ``smart_resize``, as ``qwen_vl_utils`` did in the original
pipeline) and tells the processor a budget that leaves such an image as it is
(:func:`processor_size`), whatever budget the model folder's processor config carries.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .base import DEFAULT_PIXELS, BaseClient, MLLMError, Request
from .images import PATCH_FACTOR, MAX_ASPECT_RATIO, prepare_image

GREEDY_BELOW = 0.05


def is_greedy(temperature: float, sample_low_temperature: bool = False) -> bool:
    """True when ``temperature`` is decoded greedily by our backends: 0, or below ``GREEDY_BELOW``
    unless ``sample_low_temperature`` (the release: sampling at 0.01)."""
    if sample_low_temperature:
        return temperature <= 0.0
    return temperature < GREEDY_BELOW


def processor_size(max_pixels: int) -> dict:
    """A Qwen2-VL image-processor ``size`` that keeps any ``prepare_image`` output unchanged.

    ``prepare_image`` gives sides that are multiples of 28 and within 28 px of an ideal size of
    area <= ``max_pixels`` and aspect ratio <= 200, so the area is at most
    ``max_pixels + 28 * (H + W) + 28**2`` with ``H + W <= sqrt(max_pixels) * (sqrt(200) + 1/sqrt(200))``.
    A second resize inside the processor (e.g. the 50,176 budget rounding 120x80 up to 70 tokens,
    then down to 54) would otherwise change what the model sees.
    """
    f = PATCH_FACTOR
    spread = math.sqrt(MAX_ASPECT_RATIO) + 1 / math.sqrt(MAX_ASPECT_RATIO)
    hi = max_pixels + f * math.sqrt(max_pixels) * spread + f * f
    return {"shortest_edge": f * f, "longest_edge": int(math.ceil(hi))}


def chat_messages(request: Request, image_part: "dict | None") -> list[dict]:
    """The chat of one request: a system turn, then a user turn (the image part first, as
    Qwen's examples and the original pipeline do, then the text). Text-only: no image part."""
    content = ([image_part] if image_part is not None else []) + [
        {"type": "text", "text": request.text}]
    return [{"role": "system", "content": request.system},
            {"role": "user", "content": content}]


def check_model_dir(model: "str | os.PathLike", what: str = "model") -> Path:
    """Resolve a local model (or adapter) directory, or raise MLLMError saying how to get one."""
    path = Path(model).expanduser()
    marker = "adapter_config.json" if what == "adapter" else "config.json"
    if not (path / marker).is_file():
        hint = ("a PEFT/LLaMA-Factory LoRA output folder" if what == "adapter" else
                "a local Qwen2-VL / Qwen2.5-VL folder, e.g. `hf download Qwen/Qwen2-VL-7B-Instruct "
                "--local-dir pretrained/Qwen2-VL-7B-Instruct` on a machine with internet")
        raise MLLMError(f"{what} directory {os.fspath(model)!r} has no {marker}; pass {hint}")
    return path.resolve()


class TransformersClient(BaseClient):
    """Qwen2-VL through transformers, in this process, with an optional PEFT adapter.

    ``dtype``: ``"auto"`` (the folder's dtype), ``"float32"`` or ``"bfloat16"``. ``device``:
    default ``cuda`` when available, else ``cpu``. ``batch_size``: requests per ``generate``
    call of the model (a client ``generate`` may hold more). The model loads on first use.
    """

    backend = "transformers"

    def __init__(self, model: "str | os.PathLike", *, adapter: "str | os.PathLike | None" = None,
                 device: "str | None" = None, dtype: str = "auto", batch_size: int = 8,
                 seed: int = 0, cache_dir: "str | os.PathLike | None" = None,
                 min_pixels: int = DEFAULT_PIXELS, max_pixels: int = DEFAULT_PIXELS,
                 max_batch: "int | None | str" = "auto", retry_unusable: bool = True,
                 sample_low_temperature: bool = False):
        if max_batch == "auto":  # one model.generate batch: a kill loses at most that one
            max_batch = batch_size if isinstance(batch_size, int) and batch_size >= 1 else None
        super().__init__(cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels,
                         max_batch=max_batch, retry_unusable=retry_unusable)
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = check_model_dir(model)
        self.adapter_dir = None if adapter is None else check_model_dir(adapter, "adapter")
        self.dtype, self.batch_size, self.seed = dtype, int(batch_size), int(seed)
        self._device = device
        self._model = None
        self._processor = None
        self._sampling_calls = 0
        self.sample_low_temperature = bool(sample_low_temperature)
        self._identity: "dict | None" = None

    def identity_info(self) -> dict:
        if self._identity is None:
            from .identity import local_identity
            self._identity = local_identity(self.backend, self.model_dir, self.adapter_dir, self.dtype)
            if self.sample_low_temperature:
                self._identity["sampling"] = "release"
        return dict(self._identity)

    def identity(self) -> str:
        from .identity import piped
        return piped(self.identity_info())

    def describe(self) -> str:
        adapter = f" + adapter {self.adapter_dir}" if self.adapter_dir is not None else ""
        return f"transformers backend on {self.model_dir}{adapter}"

    # --- loading ------------------------------------------------------------------------
    @property
    def device(self) -> str:
        if self._device is None:
            import torch
            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _load(self):
        """Load processor, model and adapter once; return (processor, model)."""
        if self._model is not None:
            return self._processor, self._model
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        try:
            processor = AutoProcessor.from_pretrained(self.model_dir)
            model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise MLLMError(f"transformers cannot load the model folder {self.model_dir}: "
                            f"{exc}") from exc
        if self.adapter_dir is not None:
            try:
                from peft import PeftModel
            except ImportError as exc:
                raise MLLMError("an adapter was given but peft is not installed: "
                                "pip install peft (it is in requirements.txt)") from exc
            model = PeftModel.from_pretrained(model, self.adapter_dir)
        self._model = model.to(self.device).eval()
        self._processor = processor
        return processor, self._model

    # --- generation ---------------------------------------------------------------------
    def _encode(self, requests: Sequence[Request]):
        """Left-padded model inputs for a micro-batch (prompt text via the chat template)."""
        processor, _ = self._load()
        texts, images = [], []
        for r in requests:
            part = None
            if r.image is not None:
                images.append(prepare_image(r.image, self.min_pixels, self.max_pixels))
                part = {"type": "image"}
            texts.append(processor.apply_chat_template(chat_messages(r, part), tokenize=False,
                                                       add_generation_prompt=True))
        kwargs = {"images": images, "size": processor_size(self.max_pixels)} if images else {}
        return processor(text=texts, padding=True, padding_side="left", return_tensors="pt",
                         **kwargs)

    def _generation_config(self, temperature: float, max_tokens: int, ignore_eos: bool):
        """Sampling settings spelled out, so that the folder's generation_config (Qwen's sets
        top_k=1, top_p=0.001, repetition_penalty=1.05) does not differ from vLLM's offline
        defaults, which ignore it."""
        import copy
        _, model = self._load()
        gc = copy.deepcopy(model.generation_config)
        greedy = is_greedy(temperature, self.sample_low_temperature)
        gc.update(max_new_tokens=int(max_tokens), do_sample=not greedy, num_beams=1,
                  repetition_penalty=1.0)
        if greedy:  # unset, not neutral: transformers warns about sampling flags when greedy
            gc.update(temperature=None, top_p=None, top_k=None)
        else:
            gc.update(temperature=float(temperature), top_p=1.0, top_k=0)
        if gc.pad_token_id is None:
            gc.pad_token_id = self._processor.tokenizer.pad_token_id
        if ignore_eos:  # an id past the vocabulary is never generated: exactly max_tokens tokens
            gc.eos_token_id = [model.config.get_text_config().vocab_size]
        return gc

    def _run(self, requests: Sequence[Request], temperature: float, max_tokens: int,
             ignore_eos: bool = False) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, output ids) per request; output ids end at (and keep) the first EOS."""
        import torch
        _, model = self._load()
        gc = self._generation_config(temperature, max_tokens, ignore_eos)
        eos = set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
        results = []
        for start in range(0, len(requests), self.batch_size):
            enc = self._encode(requests[start:start + self.batch_size]).to(self.device)
            # devices=None forks every visible GPU's RNG too; [] only the CPU's
            rng_devices = None if self.device.startswith("cuda") else []
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                if gc.do_sample:  # reproducible sampling without touching the caller's RNG
                    torch.manual_seed(self.seed + self._sampling_calls)
                    self._sampling_calls += 1
                out = model.generate(**enc, generation_config=gc)
            n_prompt = enc["input_ids"].shape[1]
            for row in range(out.shape[0]):
                mask = enc["attention_mask"][row].bool()
                prompt = enc["input_ids"][row][mask].tolist()
                new = out[row, n_prompt:].tolist()
                cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
                results.append((prompt, new[:cut]))
        return results

    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        processor, _ = self._load()
        outs = self._run(requests, temperature, max_tokens)
        return [self.decode(o) for _, o in outs]

    def generate_ids(self, requests: Sequence[Request], temperature: float = 0.0,
                     max_tokens: int = 16, ignore_eos: bool = False
                     ) -> list[tuple[list[int], list[int]]]:
        """Uncached ``(prompt token ids, output token ids)`` per request, for comparing backends.

        ``ignore_eos`` generates exactly ``max_tokens`` tokens."""
        return self._run(list(requests), temperature, max_tokens, ignore_eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text as ``generate`` returns it: special tokens skipped, and a trailing
        incomplete UTF-8 sequence (cut by max_tokens or EOS) dropped rather than shown as U+FFFD,
        as vLLM's incremental detokenizer does, so both backends return the same text."""
        processor, _ = self._load()
        return processor.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")

    def close(self) -> None:
        """Drop the model (and free GPU memory when it was on a GPU)."""
        on_cuda = self._model is not None and self.device.startswith("cuda")
        self._model = self._processor = None
        if on_cuda:
            import torch
            torch.cuda.empty_cache()
