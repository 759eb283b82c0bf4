"""CLIP-style pre-training of a tiny CLIP on an image-caption corpus (SynthPEDES-pretrain).

What OpenAI did for CLIP, at toy scale: a symmetric InfoNCE over in-batch pairs with a learned
temperature (logit scale initialised at 1/0.07, clamped at 100), large batches, AdamW with
warm-up and a cosine schedule. The result is written in OpenAI's checkpoint layout (square
visual position grid, ``input_resolution``/``context_length``/``vocab_size`` entries,
``logit_scale``), so ``model.clip.load_clip`` and ``pretrain_choice`` read it like ViT-B-16.pt.

The visual position embedding is kept as the square grid the checkpoint stores and resized
to the training images' grid inside every forward pass, with the very function the loader uses
(``resize_visual_pos_embed``): a fine-tune at the same image size therefore starts from exactly
the embedding that was trained.

Deterministic for a given seed and thread count; resumable: a state file next to the output
(``<out>.state``) is written atomically every ``save_every`` steps and removed at the end.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from datasets.transforms import CLIP_MEAN, CLIP_STD
from model.clip import build_clip, eot_index, resize_visual_pos_embed
from offline.tiny_clip import random_clip_state_dict
from utils.io import atomic_torch_save
from utils.tokenizer import tokenize_batch


@dataclass
class PretrainSettings:
    """Architecture (OpenAI key sizes) and optimisation of the pre-training."""

    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    patch_size: int = 16
    image_resolution: int = 64      # square grid stored in the checkpoint (4x4 for patch 16)
    image_size: tuple[int, int] = (64, 32)   # (H, W) of the training images
    text_length: int = 77
    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    save_every: int = 250


class _Pretrainer(nn.Module):
    """A CLIP plus the two tensors pre-training owns: the square position grid and the
    learned logit scale."""

    def __init__(self, settings: PretrainSettings) -> None:
        super().__init__()
        s = settings
        sd = random_clip_state_dict(embed_dim=s.embed_dim, vision_width=s.vision_width,
                                    vision_layers=s.vision_layers, patch_size=s.patch_size,
                                    image_resolution=s.image_resolution, text_width=s.text_width,
                                    text_layers=s.text_layers, context_length=s.text_length, seed=s.seed)
        self.clip = build_clip(sd, image_size=s.image_size, stride=s.patch_size, text_length=s.text_length)
        self.pos_square = nn.Parameter(sd["visual.positional_embedding"].clone())
        self.logit_scale = nn.Parameter(sd["logit_scale"].clone())
        g = s.image_resolution // s.patch_size
        self.square_grid = (g, g)
        self.settings = settings

    def _pos(self) -> torch.Tensor:
        return resize_visual_pos_embed(self.pos_square, self.clip.num_patches, self.square_grid)

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image CLS, text EOT) embeddings."""
        tokens, _ = functional_call(self.clip.visual, {"positional_embedding": self._pos()}, (images,))
        text, _ = self.clip.encode_text(ids)
        txt = text[torch.arange(ids.shape[0]), eot_index(ids)]
        return F.normalize(tokens[:, 0], dim=-1), F.normalize(txt, dim=-1)

    def openai_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.clip.state_dict().items()}
        sd["visual.positional_embedding"] = self.pos_square.detach().clone()
        sd["logit_scale"] = self.logit_scale.detach().clone()
        s = self.settings
        sd["input_resolution"] = torch.tensor(s.image_resolution)
        sd["context_length"] = torch.tensor(s.text_length)
        sd["vocab_size"] = torch.tensor(sd["token_embedding.weight"].shape[0])
        return sd


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the in-batch pairs (row i matches column i)."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (what ToTensor + Normalize give)."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop padding columns after the longest caption's EOT (causal attention: the kept
    positions compute the same values, and short batches run faster)."""
    return ids[:, : int(eot_index(ids).max()) + 1]


def _param_groups(model: _Pretrainer, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # CLIP's recipe: no decay on gains, biases, embeddings and the temperature.
        if p.ndim < 2 or "embedding" in name or name in ("pos_square", "logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, s: PretrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return 0.5 * s.lr * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def retrieval_r1(model: _Pretrainer, images: torch.Tensor, ids: torch.Tensor, chunk: int = 512) -> float:
    """Text-to-image Rank-1 (percent) among ``images`` (uint8 [N, H, W, 3]) for their captions."""
    model.eval()
    imgs, txts = [], []
    for i in range(0, len(images), chunk):
        a, b = model.embed(_normalise(images[i:i + chunk]), _trim(ids[i:i + chunk]))
        imgs.append(a)
        txts.append(b)
    sim = torch.cat(txts) @ torch.cat(imgs).t()
    return float((sim.argmax(dim=1) == torch.arange(len(sim))).float().mean() * 100)


def pretrain_clip(images: np.ndarray, captions: list[list[str]], out_path: str, settings: PretrainSettings,
                  *, heldout: int = 300, progress: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Pre-train on ``images`` (uint8 [N, H, W, 3]) and ``captions`` (per image a list, one drawn
    per step); the last ``heldout`` pairs are kept out to report Rank-1. Writes ``out_path``
    (OpenAI layout) atomically and returns a summary dict. ``stop_after=k`` saves the resume
    state after step k and returns None, as a killed run would leave it (tests)."""
    s = settings
    if tuple(images.shape[1:3]) != tuple(s.image_size):
        raise ValueError(f"corpus images are {images.shape[1:3]}, settings.image_size is {s.image_size}")
    n_train = len(images) - heldout
    if n_train < s.batch_size:
        raise ValueError(f"{len(images)} images leave {n_train} for training, fewer than batch_size={s.batch_size}")
    torch.manual_seed(s.seed)
    per = len(captions[0])
    flat = [c for caps in captions for c in caps]
    ids = tokenize_batch(flat, s.text_length).view(len(captions), per, s.text_length)
    imgs = torch.from_numpy(images)
    model = _Pretrainer(s)
    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(s.seed)
    state_path = out_path + ".state"
    step = 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        keep = lambda d: {k: v for k, v in d.items() if k != "save_every"}  # noqa: E731
        if keep(state["settings"]) != keep(asdict(s)):
            raise RuntimeError(f"{state_path} was written with other settings; delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = state["step"]
        log(f"[pretrain] resuming {state_path} at step {step}/{s.steps}")
    bar = tqdm(total=s.steps, initial=step, desc="pretrain tiny CLIP", disable=not progress, unit="step")
    model.train()
    loss = torch.tensor(float("nan"))
    while step < s.steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        idx = torch.randint(0, n_train, (s.batch_size,), generator=gen)
        which = torch.randint(0, per, (s.batch_size,), generator=gen)
        flip = torch.rand(s.batch_size, generator=gen) < 0.5
        batch = _normalise(imgs[idx])
        batch[flip] = batch[flip].flip(-1)
        img, txt = model.embed(batch, _trim(ids[idx, which]))
        loss = clip_loss(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}")
        if (step % s.save_every == 0 or step == stop_after) and step < s.steps:
            atomic_torch_save(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                           "generator": gen.get_state(), "step": step, "settings": asdict(s)})
        if step == stop_after:
            bar.close()
            return None
    bar.close()
    r1 = retrieval_r1(model, imgs[n_train:], ids[n_train:, 0]) if heldout else float("nan")
    atomic_torch_save(out_path, model.openai_state_dict())
    if os.path.isfile(state_path):
        os.remove(state_path)
    summary = {"steps": s.steps, "final_loss": float(loss.item()),
               "temperature": float(1 / model.logit_scale.exp().item()), "heldout_r1": r1,
               "heldout": heldout}
    log(f"[pretrain] wrote {out_path}: loss {summary['final_loss']:.3f}, temperature "
        f"{summary['temperature']:.4f}, held-out text->image R1 {r1:.1f}% among {heldout}")
    return summary
