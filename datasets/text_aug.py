"""RDE's token-level caption augmentation (``txt_aug``).

Each ordinary token (0 < id < MASK_ID) is picked with probability 0.2; a picked token is
replaced by the mask token (60 %), by a random vocabulary token (20 %) or deleted (20 %).
Deletions shift the remaining tokens left and pad with zeros at the end. SOT, EOT, the mask
token and padding are never touched, so EOT stays the largest id and the last non-pad token
(CLIP reads the text feature at ``argmax(ids)``).
"""
from __future__ import annotations

import random

import torch

MASK_ID = 49405          # IRRA/RDE's "<|mask|>": replaces the last BPE merge of CLIP's vocabulary
SOT_ID = 49406
EOT_ID = 49407
AUG_PROB = 0.2
MASK_SHARE = 0.6         # of the picked tokens
REPLACE_SHARE = 0.2      # the remaining 0.2 are deleted
RANDOM_TOKEN_RANGE = (1, MASK_ID - 1)   # inclusive, as RDE's range(1, 49405)


def txt_aug(tokens: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Augment one caption's token ids ``[L]`` (zero padded); returns a new ``[L]`` LongTensor.

    ``rng`` supplies all randomness, so a seeded ``random.Random`` makes the result reproducible.
    """
    if tokens.dim() != 1:
        raise ValueError(f"txt_aug expects one caption's ids [L], got shape {tuple(tokens.shape)}")
    kept: list[int] = []
    for token in tokens.tolist():
        if not 0 < token < MASK_ID:
            kept.append(token)
            continue
        if rng.random() >= AUG_PROB:
            kept.append(token)
            continue
        choice = rng.random()
        if choice < MASK_SHARE:
            kept.append(MASK_ID)
        elif choice < MASK_SHARE + REPLACE_SHARE:
            kept.append(rng.randint(*RANDOM_TOKEN_RANGE))
        # else: deleted
    out = torch.zeros_like(tokens, dtype=torch.long)
    out[: len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out
