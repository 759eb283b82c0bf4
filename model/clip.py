"""CLIP (ViT image tower + causal text transformer) in OpenAI's module and parameter layout.

Differences from OpenAI's CLIP, all needed for person ReID (as in IRRA/RDE):
- images are (H, W) = ``image_size`` (384x128 by default) and ``conv1`` may use a stride smaller
  than the patch size (overlapping patches); the visual position embeddings of a checkpoint are
  interpolated from its square grid to the new grid;
- the text context is ``text_length`` tokens (UFine6926 uses 168); the text position embeddings
  are linearly interpolated along the sequence when it differs from the checkpoint's 77;
- both encoders return *all* tokens after the final LayerNorm and projection, plus the last
  residual block's attention weights (averaged over heads), which RDE's TSE branch selects from.

Parameters stay float32; run under ``torch.autocast`` for mixed precision.
"""
from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.clip_download import OPENAI_MODELS, fetch_openai_clip

# Entries of OpenAI's checkpoints that our CLIP does not own: the TorchScript archive's
# non-parameter scalars (OpenAI's build_model deletes exactly these) and CLIP's contrastive
# temperature, which IRRA/RDE drop (RDE has its own); keeping it out keeps our backbone keys
# identical to the RDE/IRRA releases' ``base_model.*``.
CHECKPOINT_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size", "logit_scale")

_MISSING_CHECKPOINT_HELP = (
    "put OpenAI's ViT-B-16.pt (the TorchScript archive OpenAI distributes for ViT-B/16) at that "
    "path, e.g. pretrained/ViT-B-16.pt, or set `pretrain_choice` in the config to a checkpoint "
    "that exists"
)


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a ViT CLIP. Heads follow OpenAI's rule: width // 64."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_patch: int
    text_width: int
    text_layers: int
    vocab_size: int = 49408
    image_size: tuple[int, int] = (384, 128)
    stride: int = 16
    text_length: int = 77

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if len(self.image_size) != 2:
            raise ValueError(f"CLIPConfig.image_size must be (height, width), got {self.image_size}")
        for name in ("vision_width", "text_width"):
            width = getattr(self, name)
            if width < 64 or width % 64:
                raise ValueError(
                    f"CLIPConfig.{name}={width}: must be a positive multiple of 64 "
                    "(OpenAI CLIP uses width // 64 attention heads of size 64)"
                )
        if self.stride < 1:
            raise ValueError(f"CLIPConfig.stride={self.stride}: must be >= 1")
        if min(self.image_size) < self.vision_patch:
            raise ValueError(
                f"CLIPConfig.image_size={self.image_size} is smaller than the patch size {self.vision_patch}"
            )
        if self.text_length < 2:
            raise ValueError(f"CLIPConfig.text_length={self.text_length}: must be >= 2 (SOT and EOT)")

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def text_heads(self) -> int:
        return self.text_width // 64

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) produced by conv1 with this stride."""
        h, w = self.image_size
        return ((h - self.vision_patch) // self.stride + 1, (w - self.vision_patch) // self.stride + 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (YAML friendly) accepted by ``CLIP.from_config(**d)``."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 activations stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid GELU approximation CLIP was trained with (not nn.GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B, L, D] -> (x [B, L, D], head-averaged attention [B, L, L] or None)."""
        h = self.ln_1(x)
        out, weights = self.attn(
            h, h, h, attn_mask=attn_mask, need_weights=need_weights, average_attn_weights=True
        )
        x = x + out
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class Transformer(nn.Module):
    """Stack of residual blocks; only the last one computes attention weights (the others keep
    the fused fast path)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights: Optional[torch.Tensor] = None
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            x, weights = block(x, attn_mask, need_weights=i == last)
        assert weights is not None
        return x, weights


class VisionTransformer(nn.Module):
    """ViT image tower: conv patchify (optionally overlapping) + CLS token + transformer."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.grid_size = config.grid_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.vision_patch, stride=config.stride, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_tokens = self.grid_size[0] * self.grid_size[1] + 1
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, width, gh, gw]
        if tuple(x.shape[-2:]) != self.grid_size:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give a {tuple(x.shape[-2:])} patch grid, "
                f"but this CLIP was built for grid {self.grid_size}: resize images to the configured image_size"
            )
        x = x.flatten(2).transpose(1, 2)  # [B, N, width], row-major over the grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x, attn = self.transformer(x)
        x = self.ln_post(x)
        return x @ self.proj.to(x.dtype), attn


class CLIP(nn.Module):
    """OpenAI-layout ViT CLIP returning token sequences and last-block attention."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.text_length, config.text_width))
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        # True above the diagonal = may not attend to later tokens. Not persistent: it is
        # derived from text_length, and OpenAI checkpoints do not carry it.
        causal = torch.ones(config.text_length, config.text_length, dtype=torch.bool).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.initialize_parameters()

    @classmethod
    def from_config(
        cls,
        embed_dim: int,
        vision_width: int,
        vision_layers: int,
        vision_patch: int,
        text_width: int,
        text_layers: int,
        vocab_size: int = 49408,
        image_size: Union[tuple[int, int], list[int]] = (384, 128),
        stride: int = 16,
        text_length: int = 77,
    ) -> "CLIP":
        """Randomly initialised CLIP of this architecture (e.g. from ``config.to_dict()`` of a
        saved run, before loading the run's own weights)."""
        return cls(
            CLIPConfig(
                embed_dim=embed_dim,
                vision_width=vision_width,
                vision_layers=vision_layers,
                vision_patch=vision_patch,
                text_width=text_width,
                text_layers=text_layers,
                vocab_size=vocab_size,
                image_size=tuple(image_size),
                stride=stride,
                text_length=text_length,
            )
        )

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (text tower explicitly; visual tokens/projection scaled
        normal; other visual weights keep PyTorch defaults, as in OpenAI's code)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    @property
    def text_length(self) -> int:
        return self.config.text_length

    @property
    def num_patches(self) -> tuple[int, int]:
        """Patch grid (rows, cols); the image sequence has rows * cols + 1 tokens."""
        return self.config.grid_size

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (tokens [B, 1+N, embed_dim] (CLS first), attn [B, 1+N, 1+N])."""
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] (L <= text_length) -> (tokens [B, L, embed_dim], causal attn [B, L, L]).
        The sentence feature is the token at ``eot_index(ids)``."""
        length = ids.shape[-1]
        if length > self.text_length:
            raise ValueError(
                f"text ids have length {length} > text_length={self.text_length} of this CLIP; "
                "tokenize with the model's text_length"
            )
        x = self.token_embedding(ids)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x, attn = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        return x @ self.text_projection.to(x.dtype), attn

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image tokens, image attn, text tokens, text attn)."""
        image_tokens, image_attn = self.encode_image(images)
        text_tokens, text_attn = self.encode_text(ids)
        return image_tokens, image_attn, text_tokens, text_attn


def eot_index(ids: torch.Tensor) -> torch.Tensor:
    """Position of the EOT token in each row: EOT (49407) is the largest id in the vocabulary."""
    return ids.argmax(dim=-1)


# ----------------------------------------------------------------------------- loading


def resize_visual_pos_embed(
    pos: torch.Tensor,
    grid_size: tuple[int, int],
    source_grid: Optional[tuple[int, int]] = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """[1 + sh*sw, D] position embeddings of a ``source_grid`` -> [1 + gh*gw, D] for ``grid_size``.

    ``source_grid=None`` infers it: a square grid when the patch-row count is a perfect square
    (OpenAI checkpoints), else the target grid itself when the counts match (weights saved from
    a model of this geometry). The CLS row is kept; the grid is resampled with ``F.interpolate``
    (align_corners=False); ``bilinear`` is what IRRA/RDE use. Returned unchanged (the same
    tensor) when the grids match.
    """
    n = pos.shape[0] - 1
    gh, gw = grid_size
    if source_grid is None:
        g = math.isqrt(n)
        if g * g == n:
            source_grid = (g, g)
        elif n == gh * gw:
            source_grid = (gh, gw)
        else:
            raise RuntimeError(
                f"visual.positional_embedding has {n} patch rows: neither a square grid (OpenAI "
                f"checkpoint) nor the model's {gh}x{gw} grid; pass source_grid=(rows, cols) of the "
                "model it was saved from, or check img_size / stride_size"
            )
    sh, sw = source_grid
    if sh * sw != n:
        raise RuntimeError(f"visual.positional_embedding has {n} patch rows, not source_grid {sh}x{sw}")
    if (sh, sw) == (gh, gw):
        return pos
    cls_row, grid = pos[:1], pos[1:]
    grid = grid.reshape(1, sh, sw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)
    return torch.cat([cls_row, grid.to(pos.dtype)], dim=0)


def resize_text_pos_embed(pos: torch.Tensor, length: int) -> torch.Tensor:
    """[L0, D] text position embeddings -> [length, D] by linear interpolation along the
    sequence (align_corners=False, as open_clip). Unchanged (same tensor) when length == L0."""
    if pos.shape[0] == length:
        return pos
    resized = F.interpolate(pos.T.unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).T.contiguous().to(pos.dtype)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise RuntimeError(f"checkpoint blocks under '{prefix}' are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


_REQUIRED_FOR_INFERENCE = (
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    image_size: Union[tuple[int, int], list[int]] = (384, 128),
    stride: int = 16,
    text_length: int = 77,
) -> CLIPConfig:
    """Architecture of an OpenAI-layout ViT CLIP state dict, for the requested input sizes."""
    missing = [k for k in _REQUIRED_FOR_INFERENCE if k not in state_dict]
    if missing:
        hint = " (this looks like a ResNet CLIP: only ViT CLIPs are supported)" if any(
            k.startswith("visual.attnpool") for k in state_dict
        ) else ""
        raise RuntimeError(f"checkpoint is missing keys needed to infer the CLIP architecture{hint}: {missing}")
    embed_dim = state_dict["text_projection"].shape[1]
    if state_dict["visual.proj"].shape[1] != embed_dim:
        raise RuntimeError(
            f"visual.proj {tuple(state_dict['visual.proj'].shape)} and text_projection "
            f"{tuple(state_dict['text_projection'].shape)} disagree on the embedding size"
        )
    return CLIPConfig(
        embed_dim=embed_dim,
        vision_width=state_dict["visual.conv1.weight"].shape[0],
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_patch=state_dict["visual.conv1.weight"].shape[-1],
        text_width=state_dict["ln_final.weight"].shape[0],
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        image_size=tuple(image_size),
        stride=stride,
        text_length=text_length,
    )


# How CLIP's 77-row text position table reaches a model with another text length (UFine6926: 168).
# interpolate: linear interpolation (the paper's text; ours). release_random: what both releases
# effectively do: their resize returns a [1, L, L] tensor, the copy into [L, D] fails inside a bare
# except, and the table keeps its random initialisation N(0, 0.01) (docs/DEVIATIONS.md).
TEXT_POS_MODES = ("interpolate", "release_random")


def load_openai_weights(
    model: CLIP,
    state_dict: Mapping[str, torch.Tensor],
    pos_mode: str = "bilinear",
    source_grid: Optional[tuple[int, int]] = None,
    text_pos: str = "interpolate",
) -> None:
    """Copy an OpenAI-layout state dict into ``model``: position embeddings resized to the
    model's grid / text length (see ``resize_visual_pos_embed`` for ``source_grid``; ``text_pos``:
    see ``TEXT_POS_MODES``), tensors cast to the model's dtype. Besides ``CHECKPOINT_ONLY_KEYS``
    every key must match: missing, unexpected or mis-shaped keys raise RuntimeError listing all of them."""
    if text_pos not in TEXT_POS_MODES:
        raise ValueError(f"clip_text_pos={text_pos!r}: choose one of {', '.join(TEXT_POS_MODES)}")
    sd = {k: v for k, v in state_dict.items() if k not in CHECKPOINT_ONLY_KEYS}
    if "visual.positional_embedding" in sd:
        sd["visual.positional_embedding"] = resize_visual_pos_embed(
            sd["visual.positional_embedding"], model.num_patches, source_grid, pos_mode
        )
    keep_random = set()
    if "positional_embedding" in sd:
        if text_pos == "release_random" and sd["positional_embedding"].shape[0] != model.text_length:
            del sd["positional_embedding"]
            keep_random.add("positional_embedding")
        else:
            sd["positional_embedding"] = resize_text_pos_embed(sd["positional_embedding"], model.text_length)

    own = model.state_dict()
    missing = sorted(set(own) - set(sd) - keep_random)
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            "CLIP checkpoint does not match the model"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {mismatched}" if mismatched else "")
        )
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)  # copy_ casts fp16 archives to the model's float32


def build_clip(
    state_dict: Mapping[str, torch.Tensor],
    image_size: Union[tuple[int, int], list[int]] = (384, 128),
    stride: int = 16,
    text_length: int = 77,
    pos_mode: str = "bilinear",
    source_grid: Optional[tuple[int, int]] = None,
    text_pos: str = "interpolate",
) -> CLIP:
    """CLIP with the architecture inferred from ``state_dict`` and its weights loaded.

    For weights saved from a ReID model (already at this image_size/stride) pass
    ``source_grid=model grid`` when that grid's patch count happens to be a perfect square
    (e.g. 32x8), otherwise it would be read as a square OpenAI grid and resampled."""
    model = CLIP(infer_config(state_dict, image_size, stride, text_length))
    load_openai_weights(model, state_dict, pos_mode, source_grid, text_pos)
    return model


def _is_torchscript_archive(path: str) -> bool:
    # TorchScript zips carry compiled code and constants.pkl; torch.save zips do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") for name in zf.namelist())


def read_clip_state_dict(checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """State dict from an OpenAI TorchScript archive, a torch.save'd state dict, or a dict."""
    if isinstance(checkpoint, Mapping):
        sd = dict(checkpoint)
        source = "the given dict"
    else:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint not found: {path}; {_MISSING_CHECKPOINT_HELP}")
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():
                # OpenAI only distributes TorchScript archives; torch's deprecation notice is noise here.
                warnings.simplefilter("ignore", FutureWarning)
                sd = dict(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        source = path
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RuntimeError(
            f"CLIP checkpoint {source} is not a state dict of tensors with OpenAI's keys "
            "(expected an OpenAI TorchScript archive or torch.save(state_dict))"
        )
    return dict(sd)


def load_clip(
    checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    image_size: Union[tuple[int, int], list[int]] = (384, 128),
    stride: int = 16,
    text_length: int = 77,
    pos_mode: str = "bilinear",
    text_pos: str = "interpolate",
) -> CLIP:
    """Load a pretrained ViT CLIP (e.g. OpenAI's ViT-B-16.pt) for ReID-sized inputs.

    ``checkpoint``: path to an OpenAI TorchScript archive or a torch.save'd state dict, or the
    dict itself. Returns a float32 CLIP on CPU (move it with ``.to(device)``). ``text_pos``: how
    a text position table of another length is made (``TEXT_POS_MODES``).
    """
    if isinstance(checkpoint, str) and checkpoint in OPENAI_MODELS:  # a name, as in the releases
        checkpoint = fetch_openai_clip(checkpoint)
    return build_clip(read_clip_state_dict(checkpoint), image_size, stride, text_length, pos_mode,
                      text_pos=text_pos)
