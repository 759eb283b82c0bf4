"""CLIP in OpenAI's layout: loading (TorchScript / state dict), position-embedding resizing,
encoder outputs against an independent plain-tensor implementation, and checkpoint errors."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from model.clip import (
    CLIP,
    _is_torchscript_archive,
    build_clip,
    eot_index,
    load_clip,
    read_clip_state_dict,
    resize_visual_pos_embed,
)
from offline.tiny_clip import random_clip_state_dict, write_random_clip
from utils.tokenizer import EOT_ID, tokenize_batch

META = {"input_resolution", "context_length", "vocab_size", "logit_scale"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The default tiny CLIP (64 wide, 2+2 layers, 224px, patch 16) as both file kinds."""
    folder = tmp_path_factory.mktemp("clip")
    sd = write_random_clip(folder / "ViT-tiny.pt", torchscript=True)
    write_random_clip(folder / "ViT-tiny-sd.pt", torchscript=False)
    return {"sd": sd, "ts": folder / "ViT-tiny.pt", "plain": folder / "ViT-tiny-sd.pt"}


@pytest.fixture(scope="module")
def perturbed_sd():
    """Non-trivial biases and LayerNorm affines (CLIP init has them at 0/1), so the reference
    comparison also covers those parameters; two heads in both towers."""
    sd = random_clip_state_dict(embed_dim=32, vision_width=128, text_width=128, vocab_size=500, seed=3)
    gen = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if k.endswith("bias") or ".ln_" in k or k.startswith("ln_"):
            sd[k] = v + 0.1 * torch.randn(v.shape, generator=gen)
    return sd


def _images(n=2, size=(384, 128), seed=0):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _ids(n=2, length=77, vocab=49408, eot_at=(9, 20), seed=0):
    ids = torch.randint(1, vocab - 2, (n, length), generator=torch.Generator().manual_seed(seed))
    for row, pos in enumerate(eot_at[:n]):
        ids[row, pos] = vocab - 1
        ids[row, pos + 1 :] = 0
    return ids


# ----------------------------------------------------------------- independent reference


def _linear_resample(x: torch.Tensor, out_len: int, dim: int) -> torch.Tensor:
    """Hand-written 1-D linear resampling with half-pixel centres (align_corners=False)."""
    in_len = x.shape[dim]
    rows = []
    for i in range(out_len):
        src = max((i + 0.5) * in_len / out_len - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_len - 1)
        i1 = min(i0 + 1, in_len - 1)
        w = src - i0
        rows.append((1 - w) * x.select(dim, i0) + w * x.select(dim, i1))
    return torch.stack(rows, dim=dim)


def _hand_visual_pos(pos: torch.Tensor, grid: tuple) -> torch.Tensor:
    g = math.isqrt(pos.shape[0] - 1)
    patch = pos[1:].reshape(g, g, -1)
    patch = _linear_resample(_linear_resample(patch, grid[0], 0), grid[1], 1)
    return torch.cat([pos[:1], patch.reshape(grid[0] * grid[1], -1)])


def _ref_block(x, sd, p, mask):
    width = x.shape[-1]
    heads = width // 64
    h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    attn = scores.softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(x.shape)
    x = x + out @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"], attn.mean(1)


def _ref_layers(sd, prefix):
    return len({k.split(".")[len(prefix.split(".")) - 1] for k in sd if k.startswith(prefix)})


def _ref_image(sd, images, stride):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(images, w, stride=stride)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + _hand_visual_pos(sd["visual.positional_embedding"], grid)
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(_ref_layers(sd, "visual.transformer.resblocks.")):
        x, attn = _ref_block(x, sd, f"visual.transformer.resblocks.{i}.", None)
    x = F.layer_norm(x, (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"], attn


def _ref_text(sd, ids):
    length = ids.shape[1]
    pos = sd["positional_embedding"]
    if pos.shape[0] != length:
        pos = _linear_resample(pos, length, 0)
    x = sd["token_embedding.weight"][ids] + pos
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    for i in range(_ref_layers(sd, "transformer.resblocks.")):
        x, attn = _ref_block(x, sd, f"transformer.resblocks.{i}.", mask)
    x = F.layer_norm(x, (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    return x @ sd["text_projection"], attn


# ----------------------------------------------------------------------------- tests


def test_tiny_state_dict_has_openai_layout():
    sd = random_clip_state_dict(vision_layers=1, text_layers=1)
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
    expected = {
        "positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
        "visual.positional_embedding", "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight",
        "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "token_embedding.weight",
        "ln_final.weight", "ln_final.bias", "input_resolution", "context_length", "vocab_size",
        *(f"visual.transformer.resblocks.0.{b}" for b in block), *(f"transformer.resblocks.0.{b}" for b in block),
    }
    assert set(sd) == expected
    assert sd["visual.positional_embedding"].shape == (14 * 14 + 1, 64)
    assert sd["visual.conv1.weight"].shape == (64, 3, 16, 16)
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert [sd[k].item() for k in ("input_resolution", "context_length", "vocab_size")] == [224, 77, 49408]
    assert sd["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert sd["token_embedding.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    n_params = sum(v.numel() for k, v in random_clip_state_dict().items() if k not in META)
    assert 3.3e6 < n_params < 3.6e6
    # seeded: same seed same weights, other seed other weights
    assert torch.equal(sd["visual.proj"], random_clip_state_dict(vision_layers=1, text_layers=1)["visual.proj"])
    assert not torch.equal(sd["visual.proj"], random_clip_state_dict(vision_layers=1, text_layers=1, seed=1)["visual.proj"])


def test_torchscript_and_state_dict_files_load_identically(ckpt):
    assert _is_torchscript_archive(str(ckpt["ts"])) and not _is_torchscript_archive(str(ckpt["plain"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        jit_sd = torch.jit.load(str(ckpt["ts"]), map_location="cpu").state_dict()
    assert set(jit_sd) == set(ckpt["sd"])
    a, b = load_clip(ckpt["ts"]).eval(), load_clip(str(ckpt["plain"])).eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with torch.no_grad():
        ia, ta = a.encode_image(_images()), a.encode_text(_ids())
        ib, tb = b.encode_image(_images()), b.encode_text(_ids())
    for x, y in zip(ia + ta, ib + tb):
        assert torch.equal(x, y)


def test_fp16_archive_loads_as_float32(tmp_path):
    sd16 = write_random_clip(tmp_path / "half.pt", torchscript=True, half=True)
    model = load_clip(tmp_path / "half.pt", image_size=(224, 224))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.visual.proj, sd16["visual.proj"].float())


def test_identity_load_is_bit_exact(ckpt):
    model = load_clip(ckpt["sd"], image_size=(224, 224), stride=16, text_length=77)
    own = model.state_dict()
    assert set(own) == set(ckpt["sd"]) - META
    for k, v in own.items():
        assert v.dtype == torch.float32 and torch.equal(v, ckpt["sd"][k]), k


def test_shapes_384x128_stride16(ckpt):
    model = load_clip(ckpt["ts"]).eval()
    assert model.num_patches == (24, 8) and model.image_size == (384, 128)
    assert model.embed_dim == 64 and model.text_length == 77
    assert model.visual.positional_embedding.shape == (193, 64)
    with torch.no_grad():
        tokens, attn = model.encode_image(_images())
        text, tattn = model.encode_text(_ids())
    assert tokens.shape == (2, 193, 64) and attn.shape == (2, 193, 193)
    assert text.shape == (2, 77, 64) and tattn.shape == (2, 77, 77)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 193), atol=1e-5)
    assert torch.allclose(tattn.sum(-1), torch.ones(2, 77), atol=1e-5)
    assert (attn >= 0).all() and tattn.triu(1).abs().max().item() == 0.0  # causal


def test_overlapping_patches_stride12(ckpt):
    model = load_clip(ckpt["sd"], stride=12).eval()
    assert model.num_patches == (31, 10)  # (384-16)//12+1, (128-16)//12+1
    with torch.no_grad():
        tokens, attn = model.encode_image(_images())
    assert tokens.shape == (2, 311, 64) and attn.shape == (2, 311, 311)
    expected = _hand_visual_pos(ckpt["sd"]["visual.positional_embedding"], (31, 10))
    assert torch.allclose(model.visual.positional_embedding, expected, atol=1e-6)


def test_visual_pos_embed_interpolation_against_hand_computation(ckpt):
    src = ckpt["sd"]["visual.positional_embedding"]
    model = load_clip(ckpt["sd"], image_size=(384, 128), stride=16)
    got = model.visual.positional_embedding.detach()
    assert torch.equal(got[0], src[0])  # CLS row untouched
    assert torch.allclose(got, _hand_visual_pos(src, (24, 8)), atol=1e-6)
    assert resize_visual_pos_embed(src, (14, 14)) is src


def test_text_pos_embed_interpolated_to_168(ckpt):
    src = ckpt["sd"]["positional_embedding"]
    model = load_clip(ckpt["sd"], text_length=168).eval()
    got = model.positional_embedding.detach()
    assert got.shape == (168, 64)
    assert torch.equal(got[0], src[0])
    assert torch.allclose(got, _linear_resample(src, 168, 0), atol=1e-6)
    # matching relative positions: output row i sits at source coordinate (i+0.5)*77/168-0.5;
    # i=84 -> 38 + 77/336, between source rows 38 and 39; the ends map onto the source ends
    w = 77 / 336
    assert torch.allclose(got[84], (1 - w) * src[38] + w * src[39], atol=1e-6)
    assert torch.allclose(got[-1], src[-1], atol=1e-7)
    assert model.attn_mask.shape == (168, 168)
    assert torch.equal(model.attn_mask, torch.ones(168, 168, dtype=torch.bool).triu(1))
    with torch.no_grad():
        text, attn = model.encode_text(_ids(length=168, eot_at=(100, 150)))
    assert text.shape == (2, 168, 64) and attn.shape == (2, 168, 168)


@pytest.mark.parametrize("stride,text_length", [(16, 77), (12, 168)])
def test_encoders_match_independent_implementation(perturbed_sd, stride, text_length):
    model = load_clip(perturbed_sd, image_size=(384, 128), stride=stride, text_length=text_length).eval()
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2  # 128 // 64
    assert model.transformer.resblocks[0].attn.num_heads == 2
    images, ids = _images(), _ids(length=text_length, vocab=500)
    with torch.no_grad():
        tokens, attn = model.encode_image(images)
        text, tattn = model.encode_text(ids)
    ref_tokens, ref_attn = _ref_image(perturbed_sd, images, stride)
    ref_text, ref_tattn = _ref_text(perturbed_sd, ids)
    assert torch.allclose(tokens, ref_tokens, atol=1e-4, rtol=1e-4)
    assert torch.allclose(attn, ref_attn, atol=1e-5)
    assert torch.allclose(text, ref_text, atol=1e-4, rtol=1e-4)
    assert torch.allclose(tattn, ref_tattn, atol=1e-5)


def test_training_mode_gives_the_same_outputs(ckpt):
    # train mode leaves MultiheadAttention's fused inference path: results must not change
    model = load_clip(ckpt["sd"])
    images = _images()
    with torch.no_grad():
        train_out = model.train().encode_image(images)
        eval_out = model.eval().encode_image(images)
    assert torch.allclose(train_out[0], eval_out[0], atol=1e-5)
    assert torch.allclose(train_out[1], eval_out[1], atol=1e-6)


def test_text_is_causal(ckpt):
    model = load_clip(ckpt["sd"]).eval()
    ids = _ids()
    changed = ids.clone()
    changed[:, 5:] = 123
    with torch.no_grad():
        a, _ = model.encode_text(ids)
        b, _ = model.encode_text(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_eot_index_selects_eot():
    ids = tokenize_batch(["a man in a red coat", "", "word " * 100], 77)
    idx = eot_index(ids)
    assert idx.tolist() == [7, 1, 76]
    assert (ids[torch.arange(3), idx] == EOT_ID).all()


def test_rebuild_from_config_and_own_weights(ckpt):
    model = load_clip(ckpt["sd"]).eval()
    cfg = model.config.to_dict()
    assert cfg == {"embed_dim": 64, "vision_width": 64, "vision_layers": 2, "vision_patch": 16, "text_width": 64,
                   "text_layers": 2, "vocab_size": 49408, "image_size": [384, 128], "stride": 16, "text_length": 77}
    fresh = CLIP.from_config(**cfg).eval()
    images, ids = _images(), _ids()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_image(images)[0], model.encode_image(images)[0])
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(fresh.encode_image(images)[0], model.encode_image(images)[0])
        assert torch.equal(fresh.encode_text(ids)[0], model.encode_text(ids)[0])
    # a saved 24x8 (non-square) backbone is taken as is by build_clip
    again = build_clip(model.state_dict(), image_size=(384, 128), stride=16)
    assert torch.equal(again.visual.positional_embedding, model.visual.positional_embedding)


def test_square_count_reid_grid_needs_source_grid(ckpt):
    model = load_clip(ckpt["sd"], image_size=(512, 128))  # 32x8 = 256 = 16^2 patches
    saved = model.state_dict()
    as_saved = build_clip(saved, image_size=(512, 128), source_grid=(32, 8))
    assert torch.equal(as_saved.visual.positional_embedding, model.visual.positional_embedding)
    misread = build_clip(saved, image_size=(512, 128))  # read as a square 16x16 OpenAI grid
    assert not torch.equal(misread.visual.positional_embedding, model.visual.positional_embedding)


def test_missing_key_raises_listing_it(ckpt):
    sd = dict(ckpt["sd"])
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    del sd["visual.ln_post.weight"]
    with pytest.raises(RuntimeError, match=r"missing keys: \['transformer.resblocks.1.mlp.c_fc.bias', 'visual.ln_post.weight'\]"):
        load_clip(sd)
    del sd["text_projection"]
    with pytest.raises(RuntimeError, match="text_projection"):
        load_clip(sd)


def test_wrong_shape_raises_listing_it(ckpt):
    sd = dict(ckpt["sd"])
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(256, 32)
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*resblocks\.0\.mlp\.c_fc\.weight: checkpoint \(256, 32\) vs model \(256, 64\)"):
        load_clip(sd)


def test_unknown_key_raises(ckpt):
    sd = dict(ckpt["sd"])
    sd["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"unexpected keys: \['visual.extra_head.weight'\]"):
        load_clip(sd)


def test_missing_file_points_to_vit_b_16(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)pretrained/nope\.pt.*ViT-B-16\.pt.*pretrain_choice"):
        load_clip(tmp_path / "pretrained" / "nope.pt")


def test_non_state_dict_file_raises(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "x.pth")
    with pytest.raises(RuntimeError, match="not a state dict"):
        read_clip_state_dict(tmp_path / "x.pth")


def test_bad_sizes_raise_clear_errors(ckpt):
    model = load_clip(ckpt["sd"])
    with pytest.raises(ValueError, match="image_size"):
        model.encode_image(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="text_length=77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="vision_width=96"):
        CLIP.from_config(64, 96, 1, 16, 64, 1)


def test_dtype_agnostic_under_autocast_and_half_weights(ckpt):
    model = load_clip(ckpt["sd"]).eval()
    images, ids = _images(), _ids()
    with torch.no_grad():
        ref = model.encode_image(images)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, attn = model.encode_image(images)
            text, _ = model.encode_text(ids)
        assert tokens.dtype == text.dtype == torch.bfloat16
        assert (tokens.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves weights alone
        half = load_clip(ckpt["sd"]).to(torch.bfloat16).eval()
        assert half.encode_image(images)[0].dtype == torch.bfloat16
