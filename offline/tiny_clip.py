"""Small random CLIPs in OpenAI's checkpoint layout, for tests and the demo (nothing downloaded).

The state dict is written from the key layout of OpenAI's ViT archives directly (not from
``model.clip``), so loading it also checks our model against that layout.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import Union

import torch
from torch import nn


def random_clip_state_dict(
    embed_dim: int = 64,
    vision_width: int = 64,
    vision_layers: int = 2,
    patch_size: int = 16,
    image_resolution: int = 224,
    text_width: int = 64,
    text_layers: int = 2,
    context_length: int = 77,
    vocab_size: int = 49408,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 ViT CLIP state dict with exactly the keys of OpenAI's archives, including
    the non-parameter entries ``input_resolution``, ``context_length``, ``vocab_size``.

    Initialised like OpenAI's CLIP: normal with OpenAI's stds for the text tower and
    embeddings, LayerNorms at (1, 0), zero biases; the visual blocks use the same scheme as the
    text blocks. Widths must be multiples of 64 (heads = width // 64). The default is ~3.5M
    parameters, mostly the 49,408-row token embedding.
    """
    if image_resolution % patch_size:
        raise ValueError(f"image_resolution={image_resolution} must be a multiple of patch_size={patch_size}")
    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width < 64 or width % 64:
            raise ValueError(f"{name}={width} must be a positive multiple of 64 (OpenAI heads = width // 64)")
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        out: dict[str, torch.Tensor] = {}
        for i in range(layers):
            p = f"{prefix}resblocks.{i}."
            out[p + "attn.in_proj_weight"] = normal(3 * width, width, std=width**-0.5)
            out[p + "attn.in_proj_bias"] = torch.zeros(3 * width)
            out[p + "attn.out_proj.weight"] = normal(width, width, std=proj_std)
            out[p + "attn.out_proj.bias"] = torch.zeros(width)
            out[p + "ln_1.weight"] = torch.ones(width)
            out[p + "ln_1.bias"] = torch.zeros(width)
            out[p + "mlp.c_fc.weight"] = normal(4 * width, width, std=(2 * width) ** -0.5)
            out[p + "mlp.c_fc.bias"] = torch.zeros(4 * width)
            out[p + "mlp.c_proj.weight"] = normal(width, 4 * width, std=proj_std)
            out[p + "mlp.c_proj.bias"] = torch.zeros(width)
            out[p + "ln_2.weight"] = torch.ones(width)
            out[p + "ln_2.bias"] = torch.zeros(width)
        return out

    grid = image_resolution // patch_size
    vscale = vision_width**-0.5
    sd: dict[str, torch.Tensor] = {
        "positional_embedding": normal(context_length, text_width, std=0.01),
        "text_projection": normal(text_width, embed_dim, std=text_width**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.class_embedding": normal(vision_width, std=vscale),
        "visual.positional_embedding": normal(grid * grid + 1, vision_width, std=vscale),
        "visual.proj": normal(vision_width, embed_dim, std=vscale),
        "visual.conv1.weight": normal(vision_width, 3, patch_size, patch_size, std=(3 * patch_size**2) ** -0.5),
        "visual.ln_pre.weight": torch.ones(vision_width),
        "visual.ln_pre.bias": torch.zeros(vision_width),
    }
    sd.update(blocks("visual.transformer.", vision_width, vision_layers))
    sd["visual.ln_post.weight"] = torch.ones(vision_width)
    sd["visual.ln_post.bias"] = torch.zeros(vision_width)
    sd["token_embedding.weight"] = normal(vocab_size, text_width, std=0.02)
    sd.update(blocks("transformer.", text_width, text_layers))
    sd["ln_final.weight"] = torch.ones(text_width)
    sd["ln_final.bias"] = torch.zeros(text_width)
    # OpenAI's archives carry these as int64 scalars (their build_model deletes them).
    sd["input_resolution"] = torch.tensor(image_resolution)
    sd["context_length"] = torch.tensor(context_length)
    sd["vocab_size"] = torch.tensor(vocab_size)
    return sd


class _Node(nn.Module):
    """Empty module used to rebuild a dotted key hierarchy."""


class _Archive(nn.Module):
    """Holds a state dict under its dotted names, so TorchScript can save it like OpenAI's."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state_dict.items():
            *path, leaf = key.split(".")
            node: nn.Module = self
            for name in path:
                if not hasattr(node, name):
                    node.add_module(name, _Node())
                node = getattr(node, name)
            if value.is_floating_point():
                node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
            else:
                node.register_buffer(leaf, value.clone())

    def forward(self) -> torch.Tensor:
        return self.logit_scale


def write_random_clip(
    path: Union[str, os.PathLike], torchscript: bool = False, half: bool = False, **sizes: int
) -> dict[str, torch.Tensor]:
    """Write ``random_clip_state_dict(**sizes)`` to ``path`` (atomically) and return it.

    ``torchscript=False``: ``torch.save`` of the state dict. ``torchscript=True``: a real
    TorchScript archive whose ``state_dict()`` has OpenAI's keys, like ``ViT-B-16.pt``.
    ``half=True`` stores float tensors in fp16, as OpenAI's archives do; the returned dict is
    what was written.
    """
    sd = random_clip_state_dict(**sizes)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        if torchscript:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                torch.jit.save(torch.jit.script(_Archive(sd)), tmp)
        else:
            torch.save(sd, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sd
