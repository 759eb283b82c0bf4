"""RDE on a tiny random CLIP: embeddings, the TSE pooling fix, losses, and checkpoint layouts."""

import pytest
import torch

from model import build_model, load_checkpoint, load_run
from model.features import similarity_from_features
from utils.config import load_config
from utils.run_dir import save_config
from utils.tokenizer import tokenize_batch


@pytest.fixture(scope="module")
def cfg(tiny_clip_path):
    return load_config(None, [f"pretrain_choice={tiny_clip_path}", "img_size=[96, 48]", "tse_embed_dim=32"])


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


CAPS = ["a woman in a red coat and black trousers carrying a bag",
        "a man wearing a blue shirt", "", "backpack"]


def test_embeddings_shapes_and_finite(model):
    ids = tokenize_batch(CAPS, 77)
    images = torch.randn(len(CAPS), 3, 96, 48)
    with torch.no_grad():
        t_bge, t_tse = model.text_embeddings(ids)
        i_bge, i_tse = model.image_embeddings(images)
    assert t_bge.shape == (4, 64) and t_tse.shape == (4, 32)
    assert i_bge.shape == (4, 64) and i_tse.shape == (4, 32)
    assert torch.isfinite(t_tse).all() and torch.isfinite(i_tse).all()
    with torch.no_grad():
        assert torch.allclose(model.encode_text_tse(ids), t_tse, atol=1e-6)
        assert torch.allclose(model.encode_image(images), i_bge, atol=1e-6)


def test_empty_caption_does_not_leak_into_other_rows(model):
    """The release pools with k = min(k, length) in a loop, so an empty caption set k = 0 for all
    later rows (NaN). Ours pools per row: each row equals its value computed alone."""
    ids = tokenize_batch(CAPS, 77)
    with torch.no_grad():
        together = model.encode_text_tse(ids)
        alone = torch.cat([model.encode_text_tse(ids[i:i + 1]) for i in range(len(CAPS))])
    assert torch.isfinite(together).all()
    assert torch.allclose(together, alone, atol=1e-5)


def test_tse_pools_only_words(model):
    """With select_ratio large enough to pick padding, the TSE of a 1-word caption is the
    embedding of that word's token alone (max over a single selected token)."""
    ids = tokenize_batch(["backpack"], 77)
    tokens, attn = model.base_model.encode_text(ids)
    layer = model.texual_emb_layer
    with torch.no_grad():
        out = layer(tokens, ids, attn)
        word = torch.nn.functional.normalize(tokens[:, 1:2], dim=-1)
        expect = (layer.mlp(word) + layer.linear(word))[:, 0]
    assert torch.allclose(out, expect, atol=1e-5)


def test_per_sample_losses_and_weighted_forward(model):
    ids = tokenize_batch(CAPS, 77)
    images = torch.randn(4, 3, 96, 48)
    pids = torch.tensor([0, 1, 2, 2])
    la, lb = model.per_sample_losses(images, ids, pids)
    assert la.shape == (4,) and lb.shape == (4,)
    model.train()
    try:
        out = model({"images": images, "caption_ids": ids, "pids": pids}, weights=torch.tensor([1., 0, 1, 0]))
        zero = model({"images": images, "caption_ids": ids, "pids": pids}, weights=torch.zeros(4))
    finally:
        model.eval()
    assert set(out) == {"bge_loss", "tse_loss"}
    assert zero["bge_loss"].item() == 0.0 and zero["tse_loss"].item() == 0.0
    out["bge_loss"].backward()


def _outputs(m, images, ids):
    with torch.no_grad():
        return similarity_from_features(
            dict(zip(("bge", "tse"), [torch.nn.functional.normalize(x, dim=-1) for x in m.text_embeddings(ids)])),
            dict(zip(("bge", "tse"), [torch.nn.functional.normalize(x, dim=-1) for x in m.image_embeddings(images)])))


def test_release_checkpoint_layouts_load(model, cfg, tmp_path):
    images = torch.randn(3, 3, 96, 48)
    ids = tokenize_batch(CAPS[:3], 77)
    ref = _outputs(model, images, ids)
    # RDE release: {"model": state_dict} in fp16 (convert_weights), saved from a DDP wrapper.
    sd = {f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"model": sd, "epoch": 60}, tmp_path / "rde_release.pth")
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "best.pth").write_bytes((tmp_path / "rde_release.pth").read_bytes())
    rebuilt, rcfg = load_run(tmp_path)
    assert rebuilt.use_tse
    assert torch.allclose(_outputs(rebuilt, images, ids), ref, atol=2e-2)  # fp16 round trip
    # IRRA: base_model.* plus modules the retrieval model does not have, no TSE layers.
    irra = {k: v for k, v in model.state_dict().items() if k.startswith("base_model.")}
    irra["classifier.weight"] = torch.zeros(10, 64)
    irra["cross_attn.in_proj_weight"] = torch.zeros(192, 64)
    torch.save({"model": irra}, tmp_path / "irra.pth")
    fresh = build_model(cfg).eval()
    info = load_checkpoint(fresh, tmp_path / "irra.pth")
    assert not info["tse"] and "classifier.weight" in info["unexpected"] and not fresh.use_tse
    with torch.no_grad():
        b = torch.nn.functional.normalize(fresh.encode_text(ids), dim=-1) @ \
            torch.nn.functional.normalize(fresh.encode_image(images), dim=-1).t()
        a = torch.nn.functional.normalize(model.encode_text(ids), dim=-1) @ \
            torch.nn.functional.normalize(model.encode_image(images), dim=-1).t()
    assert torch.allclose(a, b, atol=1e-5)
    # a truncated backbone is refused
    bad = {k: v for k, v in irra.items() if "ln_final" not in k}
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="ln_final"):
        load_checkpoint(build_model(cfg), tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path, checkpoint="nope.pth")
