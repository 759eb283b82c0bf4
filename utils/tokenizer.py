"""OpenAI CLIP's byte-level BPE tokenizer (49,408-token vocabulary).

Token ids are identical to OpenAI's ``clip.tokenize`` (checked in tests/test_tokenizer.py):
text is repaired with ftfy, HTML-unescaped, whitespace-collapsed and lower-cased, split with
CLIP's pre-tokenisation pattern, mapped byte-wise to printable unicode and merged with the
ranked BPE merges of ``bpe_simple_vocab_16e6.txt.gz`` (shipped next to this module).
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Iterable, Sequence

import ftfy
import regex
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# IRRA/RDE/ICL's vocabulary drops CLIP's last merge ("jekyll</w>") for a mask token of the same id,
# the token RDE's txt_aug writes; a caption that spells it out gets that id, as in the releases.
MASK_TOKEN = "<|mask|>"
SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49405
SPECIAL_TOKENS = {SOT_TOKEN: SOT_ID, EOT_TOKEN: EOT_ID, MASK_TOKEN: MASK_ID}
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")

# CLIP uses the first 48,894 merges of the file: 256 byte tokens + 256 end-of-word byte tokens
# + merges + 2 special tokens = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2 style), so BPE never sees
    whitespace or control characters. Printable Latin-1 bytes map to themselves, the rest
    are shifted above 255 in byte order. The dict's insertion order (printable bytes first)
    is the order of the first 256 vocabulary ids, so it matters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _clean(text: str) -> str:
    """ftfy repair, double HTML unescape (captions are sometimes escaped twice), whitespace
    collapse, lower case: the order OpenAI CLIP applies them in."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


class SimpleTokenizer:
    """CLIP BPE tokenizer. ``encode`` gives the BPE ids without SOT/EOT; see ``tokenize``."""

    def __init__(self, vocab_path: str = VOCAB_FILE, bpe_cache_size: int = 1 << 16) -> None:
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found at {vocab_path}; it ships with the repository as "
                "utils/bpe_simple_vocab_16e6.txt.gz (restore it with git checkout)."
            )
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header.
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path} is not CLIP's bpe_simple_vocab_16e6.txt.gz (bad merge list)")

        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.encoder[MASK_TOKEN] = MASK_ID  # shares its id with the last merge (see MASK_TOKEN)
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.merge_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        assert self.encoder[SOT_TOKEN] == SOT_ID and self.encoder[EOT_TOKEN] == EOT_ID
        # Per-instance cache: captions repeat words constantly, BPE is the slow part.
        self._bpe_cached = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)  # 49,408 ids (the mask token shares one)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the characters of one pre-token (already byte-mapped) into vocabulary symbols."""
        if word in SPECIAL_TOKENS:
            return (word,)
        parts = list(word[:-1]) + [word[-1] + _END_OF_WORD]
        while len(parts) > 1:
            # Apply the lowest-ranked (earliest learned) merge present, everywhere it occurs.
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.merge_ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no SOT/EOT)."""
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe_cached(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (lower-cased, words separated by single spaces). Strip padding
        first: id 0 is the token '!'. Special tokens come back literally."""
        # Every vocabulary character (including those of '</w>' and the special tokens) is a
        # byte-mapped character, so a single byte-decode handles all of them.
        symbols = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in symbols)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str = VOCAB_FILE) -> SimpleTokenizer:
    """Shared tokenizer (building it parses 49k merges, ~0.3 s)."""
    return SimpleTokenizer(vocab_path)


def tokenize(caption: str, text_length: int = 77, truncate: bool = True) -> torch.LongTensor:
    """CLIP ids of ``caption``: [SOT] + BPE + [EOT], zero-padded to ``text_length``.

    Too long: with ``truncate`` keep the first ``text_length - 1`` tokens and put EOT last
    (EOT must survive: features are read at the EOT position); otherwise raise ValueError.
    """
    if text_length < 2:
        raise ValueError(f"text_length must be >= 2 (room for SOT and EOT), got {text_length}")
    tokens = [SOT_ID] + get_tokenizer().encode(caption) + [EOT_ID]
    if len(tokens) > text_length:
        if not truncate:
            raise ValueError(
                f"caption has {len(tokens)} tokens (with SOT/EOT), more than text_length={text_length}; "
                f"raise text_length or pass truncate=True: {caption[:80]!r}"
            )
        tokens = tokens[: text_length - 1] + [EOT_ID]
    out = torch.zeros(text_length, dtype=torch.long)
    out[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def tokenize_batch(captions: Sequence[str], text_length: int = 77, truncate: bool = True) -> torch.LongTensor:
    """Stack ``tokenize`` over ``captions`` -> LongTensor [B, text_length]."""
    if len(captions) == 0:
        return torch.zeros(0, text_length, dtype=torch.long)
    return torch.stack([tokenize(c, text_length, truncate) for c in captions])
