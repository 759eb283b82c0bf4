"""A tiny, randomly initialised Qwen2-VL model directory built offline, for tests and demos.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the spot with ``tokenizers``
and given Qwen2-VL's 14 special tokens (ids 0..13, ``<|image_pad|>`` = 12) and chat template;
the weights are random (about 440k parameters). The folder loads in transformers
(``AutoProcessor`` + ``Qwen2VLForConditionalGeneration``), in ``vllm.LLM`` and in both
``transformers serve`` and ``vllm serve``.

    python -m offline.tiny_qwen2vl OUT [--lora LORA_DIR] [--dtype float32|bfloat16] [--seed 0]

The saved tokenizer config names ``TokenizersBackend``, so it needs transformers 5.x (both the
main venv and ``.venv-vllm`` have it).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Iterator

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 1024
# The processor's own budget (patch 14, 2x2 merge: 4..16 image tokens). Our clients resize images
# themselves and tell the processor not to resize again, so this only matters to callers that
# send raw images (e.g. a server queried without a pixel budget).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16
LORA_RANK = 8

# Qwen2-VL-Instruct's chat template (a system turn is added when the chat has none).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> Iterator[str]:
    """A small deterministic English-ish corpus so that common prompt words get merged tokens."""
    words = ("the a an person man woman wearing red green blue black white cat dog image picture "
             "shows describe what is in this photo text can accurately yes no answer shirt pants "
             "shoes hair long short bag hat left right top bottom you are helpful assistant user "
             "system hello world question one two three colour color").split()
    for i in range(3000):
        yield " ".join(words[(i * k + k * k) % len(words)] for k in range(1, 12)) + f" {i}."


def build_tokenizer(corpus: "Iterable[str] | None" = None, vocab_size: int = VOCAB_SIZE,
                    split_pattern: "str | None" = None):
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    ``corpus``: the training texts (default: a small English-ish corpus). ``split_pattern``: a
    regex whose matches are isolated before BPE, which then merges freely across spaces inside
    the pieces between them (default: split into words, as GPT-2/Qwen do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096)


def make_model(tokenizer, *, seed: int = 0, dtype: str = "float32", hidden: int = 64,
               layers: int = 2, intermediate: int = 128, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS):
    """A random Qwen2-VL around ``tokenizer`` (vocabulary = the tokenizer's) and its processor:
    ``(model, processor)``, not saved. Attention heads have head_dim 32 (``hidden`` a multiple
    of 32): vLLM's CPU attention rejects head_dim < 32, and mrope_section [4, 6, 6] must sum to
    head_dim / 2."""
    import torch
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if hidden % 32:
        raise ValueError(f"hidden must be a multiple of 32 (head_dim 32), got {hidden}")
    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    heads = hidden // 32
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                          "rope_theta": 1000000.0},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, dtype=dtype)
    model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    return model, processor


def build_tiny_qwen2vl(out_dir: str | os.PathLike, *, seed: int = 0, dtype: str = "float32",
                       lora_dir: str | os.PathLike | None = None) -> Path:
    """Write a tiny random Qwen2-VL (weights, tokenizer, processor) to ``out_dir``.

    ``dtype`` is the dtype of the saved weights (``float32`` or ``bfloat16``). With ``lora_dir``
    also write a random PEFT LoRA (rank 8 on the language model's q/k/v/o_proj) whose B matrices
    are large enough to change greedy outputs. Returns ``out_dir`` as a Path.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = make_model(build_tokenizer(), seed=seed, dtype=dtype)
    processor.save_pretrained(out)
    model.save_pretrained(out)

    if lora_dir is not None:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        peft_model = get_peft_model(model, lcfg)
        with torch.no_grad():  # peft's random B is too small to move a greedy argmax reliably
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(Path(lora_dir))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="model directory to write")
    ap.add_argument("--lora", help="also write a random PEFT LoRA adapter to this directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = build_tiny_qwen2vl(args.out, seed=args.seed, dtype=args.dtype, lora_dir=args.lora)
    print(f"wrote tiny Qwen2-VL to {out}" + (f" and LoRA to {args.lora}" if args.lora else ""))


if __name__ == "__main__":
    main()
