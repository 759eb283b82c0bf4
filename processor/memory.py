"""Device memory of training and inference, measured on CPU and planned for a GPU.

Method (docs/MEMORY.md): the bytes a training step keeps are (1) the model state, counted from
the parameters (weights, gradients, Adam's two moments, DDP's gradient buckets) and (2) the
tensors autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``
during a real forward pass of the full-size model on CPU. The saved tensors do not depend on
the device; their bytes are counted once per storage, parameters excluded. Two or more batch
sizes give a straight line ``bytes = fixed + per_sample * batch`` (the fixed part: autocast's
low-precision weight copies). Inference (CCD pass, evaluation, THI's scorer) keeps no graph;
its peak is counted with a dispatch mode that follows every tensor an operator allocates until
it is freed.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import _rde
from model.clip import CLIP, CLIPConfig

GiB = 1024 ** 3
PRECISIONS = ("fp32", "fp16", "bf16", "release_fp16")


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs, not
    counting the storages of ``exclude`` (the parameters: they are counted as weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr and ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


class _LiveBytes(TorchDispatchMode):
    """Follows the storages operators allocate; ``peak`` is the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}      # storage ptr -> live tensors (Python objects) on it
        self.size: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.size.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr, nbytes = _storage_key(t)
                if not ptr:
                    continue
                if ptr not in self.refs:
                    self.refs[ptr] = 0
                    self.size[ptr] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def inference_peak_bytes(step: Callable[[], object]) -> int:
    """Most bytes of operator outputs alive at once during ``step()`` under ``torch.no_grad`` (the
    inputs and parameters not counted)."""
    mode = _LiveBytes()
    with torch.no_grad(), mode:
        out = step()
    del out
    return mode.peak


def fit_line(sizes: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_sample)`` with ``value = fixed + per_sample * size``."""
    if len(sizes) < 2 or len(set(sizes)) < 2:
        raise ValueError("fit_line needs two or more different batch sizes")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, values)) / sxx
    return my - slope * mx, slope


# ------------------------------------------------------------------------------------ state
def release_fp16_names(model: nn.Module) -> set[str]:
    """Parameters the releases store in fp16 (CLIP's ``convert_weights`` applied to the whole RDE
    model): weights and biases of Conv1d/Conv2d/Linear, MultiheadAttention's projections, and the
    ``proj`` / ``text_projection`` matrices. Embeddings, LayerNorm, BatchNorm, class and position
    embeddings stay fp32."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names.add(prefix + "weight")
            if mod.bias is not None:
                names.add(prefix + "bias")
        if isinstance(mod, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                if getattr(mod, attr, None) is not None:
                    names.add(prefix + attr)
        for attr in ("text_projection", "proj"):
            if isinstance(getattr(mod, attr, None), nn.Parameter):
                names.add(prefix + attr)
    own = {n for n, _ in model.named_parameters()}
    return names & own


@dataclass
class ModelState:
    """Bytes of the model state per device during training."""

    weights: int
    gradients: int
    adam: int
    ddp_buckets: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adam + self.ddp_buckets


def model_state_bytes(total: int, release_fp16: int, precision: str, gpus: int = 1) -> ModelState:
    """Weights, gradients and Adam's moments (``exp_avg``, ``exp_avg_sq``, same dtype as the
    parameter) of a model with ``total`` trainable elements, ``release_fp16`` of them among
    :func:`release_fp16_names`.

    ``release_fp16``: those are fp16 (2 bytes each for weight, gradient and both moments), the
    rest fp32. Every other precision: fp32 parameters (autocast only changes activations).
    ``gpus > 1``: DDP keeps a bucket copy of the gradients."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    fp16 = release_fp16 if precision == "release_fp16" else 0
    weights = 4 * (total - fp16) + 2 * fp16
    return ModelState(weights=weights, gradients=weights, adam=2 * weights,
                      ddp_buckets=weights if gpus > 1 else 0)


@contextlib.contextmanager
def release_fp16(model: nn.Module):
    """The model as the releases train it (``convert_weights``): the ``release_fp16_names``
    parameters cast to fp16 and the two transformers fed fp16 (the releases cast token and
    patch sequences to the weights' dtype). Restored to fp32 on exit."""
    names = release_fp16_names(model)
    params = dict(model.named_parameters())
    saved = {n: params[n].data for n in names}
    for n in names:
        params[n].data = params[n].data.half()
    hooks = []

    def to_half(_mod, args, kwargs):
        x = args[0]
        return (x.half() if x.is_floating_point() else x, *args[1:]), kwargs

    for mod in model.modules():
        if mod.__class__.__name__ == "Transformer":
            hooks.append(mod.register_forward_pre_hook(to_half, with_kwargs=True))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        for n, data in saved.items():
            params[n].data = data


# ------------------------------------------------------------------------------ measurement
MEASURE_SIZES = (1, 2)


def geometry(cfg) -> dict:
    """What the measured activations depend on (the cache key)."""
    return {"img_size": [int(s) for s in cfg.img_size], "stride_size": int(cfg.stride_size),
            "text_length": int(cfg.text_length), "tse_embed_dim": int(cfg.tse_embed_dim),
            "select_ratio": float(cfg.select_ratio), "loss": cfg.loss_names.split("+")[0].strip(),
            "rda_view": cfg.get("rda") == "required"}


def _vit_b16(cfg) -> nn.Module:
    """RDE on a random ViT-B/16 (OpenAI's architecture) at the config's input sizes."""
    torch.manual_seed(0)
    base = CLIP(CLIPConfig(embed_dim=512, vision_width=768, vision_layers=12, vision_patch=16, text_width=512,
                           text_layers=12, image_size=tuple(cfg.img_size), stride=cfg.stride_size,
                           text_length=cfg.text_length))
    return _rde(cfg, base)


def _batch(cfg, b: int, rda: bool) -> dict:
    g = torch.Generator().manual_seed(b)
    ids = torch.randint(1, 49000, (b, cfg.text_length), generator=g)
    ids[:, cfg.text_length // 2] = 49407   # EOT mid-way; every token still passes the encoder
    out = {"images": torch.randn(b, 3, *cfg.img_size, generator=g), "caption_ids": ids, "pids": torch.arange(b)}
    if rda:
        out["aug_caption_ids"] = ids.flip(0).clone()
    return out


def measure(cfg, model: nn.Module | None = None, sizes: Sequence[int] = MEASURE_SIZES,
            log: Callable[[str], None] = print) -> dict:
    """Measure at full size on CPU: saved-for-backward bytes per training step (fp32, autocast
    low precision, the releases' fp16 weights) and inference peaks (image + text encoders, text
    encoder alone), each at ``sizes`` and fitted to ``fixed + per_sample * batch``."""
    model = model if model is not None else _vit_b16(cfg)
    geo = geometry(cfg)
    rda = geo["rda_view"]
    gamma = 0.97 if rda else None
    counts = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    out: dict = {"geometry": geo, "sizes": list(sizes), "torch": torch.__version__.split("+")[0],
                 "param_counts": {"total": sum(counts.values()),
                                  "release_fp16": sum(counts[n] for n in release_fp16_names(model) if n in counts)}}
    model.train(cfg.get("train_mode", "train") == "train")

    def train_bytes(mode: str, b: int) -> int:
        batch = _batch(cfg, b, rda)
        if mode == "release_fp16":
            with release_fp16(model):
                return saved_bytes(lambda: model(batch, aug_gamma=gamma), list(model.parameters()))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
        with ctx:
            return saved_bytes(lambda: model(batch, aug_gamma=gamma), list(model.parameters()))

    def infer_both(b: int) -> int:
        batch = _batch(cfg, b, False)
        return inference_peak_bytes(lambda: (model.image_embeddings(batch["images"]),
                                             model.text_embeddings(batch["caption_ids"])))

    def infer_text(b: int) -> int:
        ids = _batch(cfg, b, False)["caption_ids"]
        return inference_peak_bytes(lambda: model.text_embeddings(ids))

    for name, fn in (("saved_fp32", lambda b: train_bytes("fp32", b)),
                     ("saved_autocast", lambda b: train_bytes("autocast", b)),
                     ("saved_release_fp16", lambda b: train_bytes("release_fp16", b)),
                     ("inference", infer_both), ("inference_text", infer_text)):
        values = []
        for b in sizes:
            values.append(fn(b))
            log(f"  {name} batch {b}: {values[-1] / 2**20:.1f} MiB")
        fixed, per = fit_line(sizes, values)
        out[name] = {"bytes": values, "fixed": fixed, "per_sample": per}
    model.train(False)
    return out


# ------------------------------------------------------------------------------------ plan
# Not counted by torch on a GPU: the CUDA context (kernels, cuBLAS/cuDNN handles) and the caching
# allocator's fragmentation. Assumed, not measured here (docs/MEMORY.md).
CUDA_CONTEXT = int(0.5 * GiB)
ALLOCATOR_SLACK = 0.10


def _line(m: dict, b: float) -> float:
    return max(0.0, m["fixed"] + m["per_sample"] * b)


def plan(meas: dict, cfg, batch: int, gpus: int, precision: str, eval_gallery: int = 3074,
         eval_queries: int = 6156, thi_batch: int = 256) -> dict:
    """Per-device peaks (bytes) of training, the CCD pass, evaluation and THI's scorer.

    ``batch`` is the global batch (each of ``gpus`` processes takes batch / gpus). ``precision``:
    fp32 | fp16 | bf16 (ours: fp32 parameters, autocast) | release_fp16 (the releases'
    ``convert_weights`` fp16 parameters, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if batch % gpus:
        raise ValueError(f"batch ({batch}) must be divisible by gpus ({gpus})")
    per_gpu = batch // gpus
    counts = meas["param_counts"]
    state = model_state_bytes(counts["total"], counts["release_fp16"], precision, gpus)
    saved_key = {"fp32": "saved_fp32", "fp16": "saved_autocast", "bf16": "saved_autocast",
                 "release_fp16": "saved_release_fp16"}[precision]
    activations = _line(meas[saved_key], per_gpu)
    transient = _line(meas["inference"], per_gpu)
    slack = 1 + ALLOCATOR_SLACK
    train_peak = (state.total + activations + transient) * slack + CUDA_CONTEXT
    ccd_peak = (state.total + _line(meas["inference"], per_gpu)) * slack + CUDA_CONTEXT
    test_batch = int(cfg.get("test_batch_size", 512))
    embed = 512 + int(cfg.tse_embed_dim)           # BGE + TSE features per item, fp32
    eval_store = 4 * embed * (eval_gallery + eval_queries) + 4 * eval_gallery * eval_queries
    eval_peak = (state.total + _line(meas["inference"], test_batch) + eval_store) * slack + CUDA_CONTEXT
    thi_weights = 4 * counts["total"]              # load_run: fp32 weights, no optimizer
    thi_peak = (thi_weights + _line(meas["inference_text"], thi_batch) + eval_store
                + 4 * eval_gallery * eval_queries) * slack + CUDA_CONTEXT
    return {"per_gpu_batch": per_gpu, "state": state, "activations": activations, "transient": transient,
            "train": train_peak, "ccd": ccd_peak, "eval": eval_peak, "thi": thi_peak,
            "peak": max(train_peak, ccd_peak, eval_peak)}


def largest_batch(meas: dict, cfg, gpus: int, precision: str, memory: int) -> int:
    """The largest global batch (a multiple of ``gpus``) whose peak fits ``memory``; 0 if none.
    The peak grows with the batch, so a doubling search then a bisection find it."""
    def fits(b: int) -> bool:
        return plan(meas, cfg, b, gpus, precision)["peak"] <= memory

    if not fits(gpus):
        return 0
    lo, hi = 1, 2                       # in units of gpus: lo fits, hi is to be tested
    while fits(hi * gpus):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo * gpus
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * gpus) else (lo, mid)
    return lo * gpus


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80GiB', '1500MiB' or a plain number of bytes -> bytes."""
    units = {"kib": 1024, "mib": 1024 ** 2, "gib": GiB, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "b": 1}
    s = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(float(s))
