"""Token Selection Embedding (TSE): the fine-grained view of RDE.

Keeps the tokens the last attention block of the backbone looks at most (from CLS for images,
from EOT for texts), embeds each with a linear layer plus a 2-layer MLP, and max-pools.
Module and parameter names follow the RDE release so its checkpoints load.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear layers with BatchNorm + ReLU between them, applied token-wise to [B, N, D]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))
        # The last BatchNorm is unused (as in the release) but kept so that checkpoints load.
        self.bns = nn.ModuleList(nn.BatchNorm1d(o) for o in outs)
        self.bns[-1].requires_grad_(False)  # never used: frozen so that DDP sees no unused grads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x.reshape(b * n, d)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(bn(x))
        return x.view(b, n, -1)


def _masked_max(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max over dim 1 of [B, K, D] among the first ``valid[b]`` (>= 1) entries of each row."""
    k = x.shape[1]
    keep = torch.arange(k, device=x.device)[None, :] < valid[:, None]
    return x.masked_fill(~keep[:, :, None], float("-inf")).amax(dim=1)


class VisualEmbeddingLayer(nn.Module):
    """TSE for images: the top ``ratio`` patch tokens by CLS attention."""

    def __init__(self, input_dim: int = 512, embed_dim: int = 1024, ratio: float = 0.3):
        super().__init__()
        self.embed_dim = embed_dim
        self.ratio = ratio
        self.linear = nn.Linear(input_dim, embed_dim)  # unused; present in released checkpoints
        self.linear.requires_grad_(False)
        self.fc = nn.Linear(input_dim, embed_dim)
        self.mlp = MLP(input_dim, embed_dim // 2, embed_dim, 2)

    def forward(self, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, n1, d = tokens.shape
        k = max(1, int((n1 - 1) * self.ratio))
        scores = attn[:, 0, :].clone()
        scores[:, 0] = -1.0  # never select the CLS token itself
        idx = scores.topk(k, dim=-1).indices
        picked = torch.gather(tokens, 1, idx[:, :, None].expand(b, k, d))
        picked = F.normalize(picked.float(), dim=-1).to(tokens.dtype)
        feats = self.mlp(picked) + self.fc(picked)
        return feats.amax(dim=1).float()


class TexualEmbeddingLayer(nn.Module):
    """TSE for texts: the top ``ratio`` word tokens by EOT attention (SOT, EOT and padding excluded).

    Unlike the release, the max-pool length is per row (at least 1), so an empty caption gives a
    finite embedding and never changes the other rows of its batch.
    """

    def __init__(self, input_dim: int = 512, embed_dim: int = 1024, ratio: float = 0.3):
        super().__init__()
        self.embed_dim = embed_dim
        self.ratio = ratio
        self.linear = nn.Linear(input_dim, embed_dim)
        self.mlp = MLP(input_dim, embed_dim // 2, embed_dim, 2)

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, length, d = tokens.shape
        k = max(1, int((length - 2) * self.ratio))
        eot = ids.argmax(dim=-1)
        rows = torch.arange(b, device=ids.device)
        scores = attn[rows, eot, :].clone()  # attention of EOT over all positions
        word = ids != 0
        word[rows, eot] = False
        word[:, 0] = False
        scores = scores.masked_fill(~word, -1.0)
        idx = scores.topk(k, dim=-1).indices
        picked = torch.gather(tokens, 1, idx[:, :, None].expand(b, k, d))
        picked = F.normalize(picked.float(), dim=-1).to(tokens.dtype)
        feats = self.mlp(picked) + self.linear(picked)
        n_words = word.sum(dim=1)
        valid = n_words.clamp(min=1, max=k)
        return _masked_max(feats, valid).float()
