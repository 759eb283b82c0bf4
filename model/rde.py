"""RDE: a CLIP backbone with two embeddings (BGE and TSE) trained with per-sample losses.

BGE (basic global embedding) is the CLS image token and the EOT text token; TSE (token
selection embedding) pools the most-attended tokens. Retrieval scores with the mean of the two
cosine similarities. Attribute names follow the RDE release (``base_model``,
``visul_emb_layer``, ``texual_emb_layer``) so that its checkpoints load.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from model import objectives
from model.tse import TexualEmbeddingLayer, VisualEmbeddingLayer

# The RDA terms (the augmented caption's view), weighted by ``aug_gamma`` (the schedule:
# processor/rda_schedule.py); every other term keeps weight 1.
RDA_TERMS = ("bge_aug_loss", "tse_aug_loss")


class RDE(nn.Module):
    def __init__(self, base_model: nn.Module, *, select_ratio: float = 0.3, tse_embed_dim: int = 1024,
                 loss_name: str = "TAL", tau: float = 0.015, margin: float = 0.1,
                 temperature: float = 0.02):
        super().__init__()
        if loss_name not in objectives.LOSSES:
            raise ValueError(f"loss_names={loss_name!r}: choose one of {sorted(objectives.LOSSES)}")
        self.base_model = base_model
        dim = base_model.embed_dim
        self.visul_emb_layer = VisualEmbeddingLayer(dim, tse_embed_dim, select_ratio)
        self.texual_emb_layer = TexualEmbeddingLayer(dim, tse_embed_dim, select_ratio)
        self.loss_name = loss_name
        self.tau = tau
        self.margin = margin
        self.logit_scale = 1.0 / temperature
        self.use_tse = True  # False when loaded from a checkpoint without TSE layers (IRRA)

    # -- embeddings -------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.base_model.encode_image(images)
        return tokens[:, 0, :].float()

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.base_model.encode_text(ids.long())
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), ids.argmax(dim=-1)].float()

    def encode_image_tse(self, images: torch.Tensor) -> torch.Tensor:
        tokens, attn = self.base_model.encode_image(images)
        return self.visul_emb_layer(tokens, attn)

    def encode_text_tse(self, ids: torch.Tensor) -> torch.Tensor:
        tokens, attn = self.base_model.encode_text(ids.long())
        return self.texual_emb_layer(tokens, ids, attn)

    def image_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BGE, TSE) from one backbone pass."""
        tokens, attn = self.base_model.encode_image(images)
        return tokens[:, 0, :].float(), self.visul_emb_layer(tokens, attn)

    def text_embeddings(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BGE, TSE) from one backbone pass."""
        ids = ids.long()
        tokens, attn = self.base_model.encode_text(ids)
        bge = tokens[torch.arange(tokens.shape[0], device=tokens.device), ids.argmax(dim=-1)].float()
        return bge, self.texual_emb_layer(tokens, ids, attn)

    # -- losses -----------------------------------------------------------------------------
    def _scores(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).t()

    def per_sample_losses(self, images: torch.Tensor, caption_ids: torch.Tensor,
                          pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses of the BGE and TSE views, shape [B] each."""
        i_bge, i_tse = self.image_embeddings(images)
        t_bge, t_tse = self.text_embeddings(caption_ids)
        kw = self._loss_kwargs()
        loss_bge = objectives.compute_loss(self.loss_name, self._scores(i_bge, t_bge), pids, **kw)
        loss_tse = objectives.compute_loss(self.loss_name, self._scores(i_tse, t_tse), pids, **kw)
        return loss_bge, loss_tse

    def _loss_kwargs(self) -> dict:
        if self.loss_name in ("TAL", "TRL"):
            return {"tau": self.tau, "margin": self.margin}
        return {"logit_scale": self.logit_scale}

    def forward(self, batch: dict, weights: torch.Tensor | None = None,
                aug_gamma: float | None = None) -> dict:
        """Training losses: ``bge_loss``, ``tse_loss`` and, with RDA captions, the ``*_aug_loss`` terms
        already multiplied by ``aug_gamma``.

        Under DDP the embeddings of all ranks are gathered (with gradients), so every pair is scored
        against the whole global batch exactly as on one GPU; each rank reduces its own pairs and the
        result is scaled so that DDP's gradient averaging gives the single-process gradient.
        """
        images, ids, pids = batch["images"], batch["caption_ids"], batch["pids"]
        if weights is None:
            weights = torch.ones(ids.shape[0], device=ids.device)
        weights = weights.to(ids.device, torch.float32)
        i_bge, i_tse = self.image_embeddings(images)
        t_bge, t_tse = self.text_embeddings(ids)
        views = {"bge_loss": (i_bge, t_bge), "tse_loss": (i_tse, t_tse)}
        if aug_gamma is not None and "aug_caption_ids" in batch:
            a_bge, a_tse = self.text_embeddings(batch["aug_caption_ids"])
            views.update({"bge_aug_loss": (i_bge, a_bge), "tse_aug_loss": (i_tse, a_tse)})
        gather = _CrossRank(ids.shape[0], ids.device)
        pids_all, weights_all = gather.plain(pids), gather.plain(weights)
        kw = self._loss_kwargs()
        out = {}
        for name, (img, txt) in views.items():
            per = objectives.compute_loss(self.loss_name, self._scores(gather(img), gather(txt)), pids_all, **kw)
            loss = self.reduce_local(per[gather.local], weights, weights_all) * gather.world
            out[name] = loss * aug_gamma if name in RDA_TERMS else loss
        return out

    def reduce_local(self, per_local: torch.Tensor, w_local: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
        """This rank's share of :meth:`reduce` over the global batch (the shares sum to it)."""
        total = (w_local * per_local).sum()
        if self.loss_name in ("TAL", "TRL"):
            return total
        return total / w_all.sum().clamp(min=1.0)


class _CrossRank:
    """Gathers per-rank batches (of possibly different sizes) into the global batch; the identity
    in a single process."""

    def __init__(self, n: int, device: torch.device):
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.world == 1:
            self.local = slice(0, n)
            return
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n], device=device))
        self.sizes = [int(x) for x in sizes]
        start = sum(self.sizes[:dist.get_rank()])
        self.local = slice(start, start + n)
        self.max = max(self.sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of ``x``, concatenated in rank order, gradients flowing back."""
        if self.world == 1:
            return x

        return self._unpad(all_gather(self._pad(x)))

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """Like calling, for tensors that need no gradient (ids, weights)."""
        if self.world == 1:
            return x

        x = self._pad(x).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return self._unpad(parts)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # all_gather needs equal shapes; the last batch of an epoch may be shorter on some ranks
        pad = self.max - x.shape[0]
        return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x

    def _unpad(self, parts) -> torch.Tensor:
        return torch.cat([part[:n] for part, n in zip(parts, self.sizes)])
