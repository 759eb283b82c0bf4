"""The memory plan (processor/memory.py, scripts/memory_plan.py): byte counts on models small
enough to count by hand, the plan's arithmetic, and the plan of every paper config against the
known fact that the releases train batch 64 at 384x128 on one 24 GB RTX 3090."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from processor.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT, GiB, fit_line, inference_peak_bytes,
                              largest_batch, model_state_bytes, parse_bytes, plan, release_fp16_names,
                              saved_bytes)
from utils.config import load_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import memory_plan  # noqa: E402

PAPER_CONFIGS = [f"configs/{m}_{d}.yaml" for d in ("cuhk_pedes", "icfg_pedes", "rstpreid", "ufine6926")
                 for m in ("rde", "icl")]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_saved_bytes_counted_by_hand(batch):
    """Linear(3->5) saves its input (B x 3 floats) for its weight's gradient, ReLU its output
    (B x 5), which the second Linear saves again (same storage: counted once) with its weight
    (needed for the gradient of its input; a parameter: not counted)."""
    model = _mlp()
    x = torch.randn(batch, 3)
    assert saved_bytes(lambda: model(x).sum(), model.parameters()) == 4 * (3 + 5) * batch
    # Parameters counted when not excluded: + the second Linear's 10 weights (the first one's
    # weight is not saved: its input needs no gradient).
    assert saved_bytes(lambda: model(x).sum()) == 4 * (3 + 5) * batch + 4 * 10


def test_autocast_saves_half_size_activations_and_weight_copies():
    """Under bf16 autocast the second Linear saves a bf16 copy of its weight (10 elements: the
    fixed part, not a parameter's storage) and both save bf16 activations (2 bytes: half the
    fp32 slope)."""
    model = _mlp()
    values = []
    for b in (1, 2, 3):
        x = torch.randn(b, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values.append(saved_bytes(lambda x=x: model(x).float().sum(), model.parameters()))
    fixed, per = fit_line((1, 2, 3), values)
    assert (fixed, per) == pytest.approx((2 * 10, 2 * (3 + 5)))


def test_inference_peak_counted_by_hand():
    x = torch.randn(6, 8)

    def step():
        a = x + 1            # 6*8 floats alive
        b = a * 2            # and these: peak 2 * 192 bytes
        del a
        return b.sum()       # 4 bytes on top of b alone

    assert inference_peak_bytes(step) == 2 * 6 * 8 * 4


def test_fit_line_and_parse_bytes():
    assert fit_line([1, 2, 4], [13, 23, 43]) == pytest.approx((3, 10))
    with pytest.raises(ValueError):
        fit_line([2, 2], [1, 1])
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("24 GB") == 24 * 10 ** 9
    assert parse_bytes("1500MiB") == 1500 * 2 ** 20
    assert parse_bytes("1024") == 1024


def test_release_fp16_names_follow_convert_weights(tiny_clip_path):
    """The releases cast Linear/Conv/attention projections and the CLIP projections to fp16, never
    embeddings, LayerNorm or BatchNorm."""
    from model import build_model

    cfg = load_config("configs/rde_cuhk_pedes.yaml", [f"pretrain_choice={tiny_clip_path}", "img_size=[64, 32]",
                                                      "tse_embed_dim=32"])
    names = release_fp16_names(build_model(cfg))
    for name in ("base_model.visual.conv1.weight", "base_model.visual.proj", "base_model.text_projection",
                 "base_model.transformer.resblocks.0.attn.in_proj_weight",
                 "base_model.transformer.resblocks.0.attn.in_proj_bias",
                 "base_model.transformer.resblocks.0.attn.out_proj.weight",
                 "base_model.visual.transformer.resblocks.1.mlp.c_fc.bias",
                 "texual_emb_layer.linear.weight", "visul_emb_layer.fc.bias"):
        assert name in names, name
    for name in ("base_model.token_embedding.weight", "base_model.positional_embedding",
                 "base_model.visual.class_embedding", "base_model.visual.positional_embedding",
                 "base_model.ln_final.weight", "base_model.visual.transformer.resblocks.0.ln_1.bias"):
        assert name not in names, name
    assert not any(".bns." in n for n in names)


def test_model_state_bytes():
    ours = model_state_bytes(150, 100, "bf16")
    assert (ours.weights, ours.gradients, ours.adam, ours.ddp_buckets) == (600, 600, 1200, 0)
    release = model_state_bytes(150, 100, "release_fp16", gpus=2)
    assert (release.weights, release.gradients, release.adam, release.ddp_buckets) == (400, 400, 800, 400)
    assert release.total == 2000


MEAS = {"param_counts": {"total": 1000, "release_fp16": 600},
        "saved_fp32": {"fixed": 0, "per_sample": 4e6}, "saved_autocast": {"fixed": 1200, "per_sample": 200},
        "saved_release_fp16": {"fixed": 0, "per_sample": 200}, "inference": {"fixed": 10, "per_sample": 30},
        "inference_text": {"fixed": 5, "per_sample": 3}}


def test_plan_arithmetic():
    cfg = load_config("configs/rde_cuhk_pedes.yaml")
    slack = 1 + ALLOCATOR_SLACK
    p = plan(MEAS, cfg, batch=8, gpus=2, precision="bf16", eval_gallery=10, eval_queries=20, thi_batch=4)
    assert p["per_gpu_batch"] == 4
    state = 4000 + 4000 + 8000 + 4000                      # fp32 weights, grads, Adam, DDP buckets
    assert p["state"].total == state
    assert p["activations"] == 1200 + 200 * 4
    assert p["train"] == pytest.approx((state + 2000 + 10 + 30 * 4) * slack + CUDA_CONTEXT)
    assert p["ccd"] == pytest.approx((state + 130) * slack + CUDA_CONTEXT)
    store = 4 * (512 + 1024) * 30 + 4 * 200
    assert p["eval"] == pytest.approx((state + 10 + 30 * 512 + store) * slack + CUDA_CONTEXT)
    assert p["thi"] == pytest.approx((4000 + 5 + 12 + store + 800) * slack + CUDA_CONTEXT)
    r = plan(MEAS, cfg, batch=8, gpus=1, precision="release_fp16")
    assert r["state"].weights == 4 * 400 + 2 * 600 and r["activations"] == 200 * 8
    with pytest.raises(ValueError, match="divisible"):
        plan(MEAS, cfg, batch=7, gpus=2, precision="bf16")


def test_largest_batch_is_the_boundary():
    cfg = load_config("configs/rde_cuhk_pedes.yaml")
    for gpus in (1, 2):
        memory = int(plan(MEAS, cfg, 40 * gpus, gpus, "fp32")["peak"]) + 1   # training dominates
        assert plan(MEAS, cfg, 40 * gpus, gpus, "fp32")["peak"] == plan(MEAS, cfg, 40 * gpus, gpus, "fp32")["train"]
        best = largest_batch(MEAS, cfg, gpus, "fp32", memory)
        assert best % gpus == 0
        assert plan(MEAS, cfg, best, gpus, "fp32")["peak"] <= memory < plan(MEAS, cfg, best + gpus, gpus,
                                                                               "fp32")["peak"]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_release_recipe_fits_one_3090(config):
    """The releases train batch 64 at 384x128 on one 24 GB RTX 3090 with fp16 weights: the plan
    (from the committed measurement) must say it fits, and ours (fp32 + autocast) costs more."""
    cfg = load_config(config)
    entries = memory_plan.load_cache(memory_plan.CACHE)
    meas = next((e for e in entries if e["geometry"] == memory_plan.geometry(cfg)), None)
    assert meas is not None, f"{memory_plan.CACHE} has no measurement for {config}: run scripts/memory_plan.py"
    assert meas["param_counts"]["total"] > 149e6   # ViT-B/16 CLIP + TSE
    release = plan(meas, cfg, 64, 1, "release_fp16")
    assert release["peak"] < 24 * GiB
    ours = plan(meas, cfg, 64, 1, "bf16")
    assert release["train"] < ours["train"]
    assert ours["state"].total == 16 * meas["param_counts"]["total"]
    assert largest_batch(meas, cfg, 1, "release_fp16", 24 * GiB) >= 64


def test_cli_prints_every_figure(capsys):
    assert memory_plan.main(["--config", "configs/icl_ufine6926.yaml", "--gpus", "2", "--memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    for what in ("weights", "gradients", "Adam moments", "DDP gradient buckets", "activations saved for backward",
                 "training peak", "CCD pass peak", "evaluation peak", "THI scorer peak", "fits in 24GiB",
                 "largest batch that fits", "vs the releases' fp16 weights", "168 tokens", "32 per GPU"):
        assert what in out, what
    assert memory_plan.main(["--config", "configs/rde_cuhk_pedes.yaml", "--memory", "2GiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
