"""Behaviour pinned against independent computations (fast): what reaches backward() in the
training loop (CCD weights, the RDA term times gamma), which tokens TSE keeps, and the retrieval
rule (mean of BGE and TSE) in evaluation and in THI's re-encoding.

Each test was checked against the bug it guards (see scripts/mutation_check.py)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------ an independent TAL
def reference_tal(text: torch.Tensor, image: torch.Tensor, pids: torch.Tensor, tau: float,
                  margin: float) -> torch.Tensor:
    """TAL per pair written out from the paper in float64 (no code shared with model/):
    per direction, max(0, m - sum_p alpha_p s_p + tau log sum_n exp(s_n / tau)), alpha the
    softmax of s_p / tau over the positives; rows without a negative give 0."""
    t = text.detach().double()
    v = image.detach().double()
    s = (t / t.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).t()
    same = pids[:, None] == pids[None, :]
    out = torch.zeros(s.shape[0], dtype=torch.float64)
    for sim in (s, s.t()):
        e = torch.exp(sim / tau)
        alpha = torch.where(same, e, torch.zeros_like(e))
        alpha = alpha / alpha.sum(1, keepdim=True)
        positive = (alpha * sim).sum(1)
        neg_sum = torch.where(same, torch.zeros_like(e), e).sum(1)
        has_neg = (~same).any(1)
        term = margin - positive + tau * torch.log(neg_sum.clamp(min=1e-300))
        out += torch.where(has_neg, term.clamp(min=0), torch.zeros_like(term))
    return out


# ------------------------------------------------------------------ the training loop
def _tiny_cfg(tiny_clip_path, root, out, **kw):
    from utils.config import load_config

    items = {
        "dataset_name": "SynthPEDES", "root_dir": root, "output_dir": str(out),
        "pretrain_choice": tiny_clip_path, "img_size": [64, 32], "tse_embed_dim": 64,
        "batch_size": 32, "test_batch_size": 64, "num_workers": 0, "img_aug": False, "txt_aug": False,
        "lr": 5e-4, "warmup_epochs": 1, "num_epoch": 1, "eval_period": 100,
        "log_period": 1000, "device": "cpu", "save_eval": False, "seed": 0,
    }
    items.update(kw)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


@pytest.fixture(scope="module")
def rda_anno(synth_root, tmp_path_factory) -> str:
    """The fixture's annotation with RDA sub-sentences: each sentence and its upper-case rewrite."""
    records = json.load(open(os.path.join(synth_root, "SynthPEDES", "reid_raw.json")))
    for r in records:
        r["diversity_captions"] = [[[s, s.upper()] for s in re.split(r"(?<=\.) ", c)] for c in r["captions"]]
    path = tmp_path_factory.mktemp("rda") / "reid_raw.rda.json"
    path.write_text(json.dumps(records))
    return str(path)


def _noisy(index: torch.Tensor) -> torch.Tensor:
    return index % 3 == 0  # the pairs our stand-in CCD labels noisy


def test_loss_reaching_backward_is_ccd_weighted_and_rda_times_gamma(tiny_clip_path, synth_root, rda_anno,
                                                                    tmp_path, monkeypatch):
    """One epoch of the real training loop with CCD replaced by known weights (0 for every third
    pair): the total that backward() receives equals, batch by batch, an independent sum
    sum_b w_b (TAL_bge + TAL_tse + gamma (TAL_bge_aug + TAL_tse_aug)), gamma from the config's
    schedule; pairs with weight 0 move no gradient, and the weights are those of the batch's pairs."""
    import processor.trainer as trainer
    from model.rde import RDE

    cfg = _tiny_cfg(tiny_clip_path, synth_root, tmp_path, anno_file=rda_anno, ccd=True, rda=True,
                    rda_gamma_start=0.7, rda_gamma_decay=0.2, rda_gamma_min=0.1)
    gamma = 0.5  # max(0.1, 0.7 - 0.2 * 1) at epoch 1, written out

    def fake_ccd(cfg_, model, loaders, *args, **kwargs):
        n = len(loaders.train_eval.dataset)
        return (~_noisy(torch.arange(n))).float(), {}

    seen = []
    original = RDE.forward

    class Enough(Exception):
        pass

    def spy_forward(self, batch, weights=None, aug_gamma=None):
        if len(seen) == 3:
            raise Enough  # three batches tell; the rest of the epoch would only cost time
        assert aug_gamma == pytest.approx(gamma)
        out = original(self, batch, weights=weights, aug_gamma=aug_gamma)
        with torch.no_grad():
            i_bge, i_tse = self.image_embeddings(batch["images"])
            t_bge, t_tse = self.text_embeddings(batch["caption_ids"])
            a_bge, a_tse = self.text_embeddings(batch["aug_caption_ids"])
        pids, w = batch["pids"], (~_noisy(batch["index"])).double()
        ref = sum((w * reference_tal(t, i, pids, self.tau, self.margin)).sum() for t, i in
                  ((t_bge, i_bge), (t_tse, i_tse)))
        ref_aug = sum((w * reference_tal(t, i, pids, self.tau, self.margin)).sum() for t, i in
                      ((a_bge, i_bge), (a_tse, i_tse)))
        seen.append({"ref": float(ref + gamma * ref_aug), "total": None})
        return out

    class SpyScaler(torch.amp.GradScaler):
        def scale(self, outputs):
            seen[-1]["total"] = float(outputs.detach())
            return super().scale(outputs)

    monkeypatch.setattr(trainer, "ccd_weights", fake_ccd)
    monkeypatch.setattr(RDE, "forward", spy_forward)
    monkeypatch.setattr(trainer.torch.amp, "GradScaler", SpyScaler)
    with pytest.raises(Enough):
        trainer.train(cfg, str(tmp_path / "run"), progress=False)
    assert len(seen) == 3 and all(s["total"] is not None for s in seen)
    for s in seen:
        assert s["total"] == pytest.approx(s["ref"], rel=1e-4, abs=1e-5), seen


def test_noisy_pair_moves_no_gradient(tiny_clip_path):
    """In RDE.forward, d(total)/d(per-pair loss) is the pair's CCD weight; RDA terms carry gamma.

    Checked on the gradient: the total's gradient w.r.t. the model equals the gradient of the
    independent weighted sum, and a weight-0 pair's own text does not matter except as a
    negative of the others (replacing its loss term changes nothing)."""
    from model import build_model
    from utils.config import load_config
    from utils.tokenizer import tokenize

    torch.manual_seed(0)
    cfg = load_config(None, [f"pretrain_choice={tiny_clip_path}", "img_size=[64, 32]", "tse_embed_dim=32",
                             "device=cpu"])
    model = build_model(cfg).eval()  # eval: BatchNorm uses running stats, so rows are independent
    b = 6
    images = torch.randn(b, 3, 64, 32)
    ids = torch.stack([tokenize(f"a person {w} bag", 77) for w in
                       ("red", "blue", "green", "black", "white", "grey")])
    aug = torch.stack([tokenize(f"someone with a {w} bag", 77) for w in
                       ("red", "blue", "green", "black", "white", "grey")])
    pids = torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    batch = {"images": images, "caption_ids": ids, "pids": pids, "aug_caption_ids": aug}
    gamma = 0.37
    out = model(batch, weights=w, aug_gamma=gamma)
    i_bge, i_tse = model.image_embeddings(images)
    t_bge, t_tse = model.text_embeddings(ids)
    a_bge, a_tse = model.text_embeddings(aug)
    per = {k: reference_tal(t, i, pids, model.tau, model.margin) for k, (t, i) in
           {"bge_loss": (t_bge, i_bge), "tse_loss": (t_tse, i_tse),
            "bge_aug_loss": (a_bge, i_bge), "tse_aug_loss": (a_tse, i_tse)}.items()}
    for name, values in per.items():
        expected = (w.double() * values).sum() * (gamma if "aug" in name else 1.0)
        assert float(out[name]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6), name
    # Gradient: the same as the independent weighted sum (autograd through objectives.tal_loss
    # with the pair's loss multiplied by its weight), hence zero through a weight-0 pair's own term.
    from model.objectives import tal_loss

    def cos(t, i):
        return F.normalize(t, dim=-1) @ F.normalize(i, dim=-1).t()

    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(out.values())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    ref_total = 0
    for (t, i), g in (((t_bge, i_bge), 1.0), ((t_tse, i_tse), 1.0), ((a_bge, i_bge), gamma), ((a_tse, i_tse), gamma)):
        ref_total = ref_total + g * (w * tal_loss(cos(t, i), pids, model.tau, model.margin)).sum()
    ref_grads = torch.autograd.grad(ref_total, params, allow_unused=True)
    for _, g, r in zip(params, grads, ref_grads):
        if g is None or r is None:
            assert g is None and r is None
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ TSE token selection
class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.weight.shape[0]))
        linear.bias.zero_()


def test_visual_tse_keeps_the_top_ratio_patches_by_cls_attention():
    """Tokens are one-hot by position and the embedding heads are reduced to the identity, so the
    max-pooled output is the indicator of the selected positions: it must be the top
    int(N * ratio) patches by the CLS row of the attention, never CLS itself."""
    from model.tse import VisualEmbeddingLayer

    n1, ratio = 11, 0.3  # 10 patches -> 3 selected
    layer = VisualEmbeddingLayer(input_dim=n1, embed_dim=n1, ratio=ratio).eval()
    _identity(layer.fc)
    layer.mlp = _Zero()
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, n1, n1, generator=gen)
    attn[:, 0, 0] = 5.0          # CLS attends most to itself: must still not be picked
    attn[:, 1:, 0] = 0.0         # a column-wise (to-CLS) read would pick other tokens
    tokens = torch.eye(n1).expand(2, n1, n1).clone()
    out = layer(tokens, attn)
    for b in range(2):
        expected = set((torch.argsort(attn[b, 0, 1:], descending=True)[:3] + 1).tolist())
        assert set(torch.nonzero(out[b] > 0.5).flatten().tolist()) == expected
        assert out[b].sum().item() == pytest.approx(3.0)


def test_text_tse_keeps_the_top_ratio_words_by_eot_attention():
    """Same construction for texts: the top int((L - 2) * ratio) word tokens by the EOT row of the
    attention; SOT, EOT and padding never; a caption with fewer words keeps only its words."""
    from model.tse import TexualEmbeddingLayer

    length, ratio = 12, 0.3  # 10 slots -> 3 selected
    layer = TexualEmbeddingLayer(input_dim=length, embed_dim=length, ratio=ratio).eval()
    _identity(layer.linear)
    layer.mlp = _Zero()
    ids = torch.zeros(2, length, dtype=torch.long)
    ids[0, :8] = torch.tensor([49406, 320, 1125, 593, 2866, 1579, 2225, 49407])   # 6 words, EOT at 7
    ids[1, :4] = torch.tensor([49406, 320, 1125, 49407])                          # 2 words, EOT at 3
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(2, length, length, generator=gen) * 0.5
    attn[:, :, 0] = 1.0    # SOT most attended
    attn[0, 7, 7] = attn[1, 3, 3] = 1.0    # EOT itself
    attn[:, :, 9:] = 1.0   # padding
    attn[0, 0, 1:7] = torch.tensor([2.0, 2.0, 2.0, 0, 0, 0])  # the SOT row says other words
    tokens = torch.eye(length).expand(2, length, length).clone()
    out = layer(tokens, ids, attn)
    expected0 = set((torch.argsort(attn[0, 7, 1:7], descending=True)[:3] + 1).tolist())
    assert set(torch.nonzero(out[0] > 0.5).flatten().tolist()) == expected0
    assert out[0].sum().item() == pytest.approx(3.0)
    assert set(torch.nonzero(out[1] > 0.5).flatten().tolist()) == {1, 2}


# ------------------------------------------------------------------ retrieval = mean of BGE and TSE
# Two queries, two gallery images (one per pid). BGE ranks query 0 wrong, TSE ranks query 1
# wrong; their mean ranks both right.
BGE_SIM = np.array([[0.5, 0.6], [0.1, 0.9]])
TSE_SIM = np.array([[0.9, 0.1], [0.6, 0.5]])


def _unit_queries(sim: np.ndarray) -> torch.Tensor:
    """Unit vectors in 3-D whose dot products with e0, e1 are the rows of ``sim``."""
    rest = np.sqrt(1.0 - (sim ** 2).sum(1, keepdims=True))
    return torch.tensor(np.hstack([sim, rest]), dtype=torch.float32)


class _TableModel(nn.Module):
    """Embeddings looked up by item number: images 0..1, texts 0..1 (text number = first id)."""

    use_tse = True

    def __init__(self):
        super().__init__()
        eye = torch.eye(3)[:2]
        self.img = {"bge": eye, "tse": eye}
        self.txt = {"bge": _unit_queries(BGE_SIM), "tse": _unit_queries(TSE_SIM)}

    def image_embeddings(self, x):
        idx = x.long().view(-1)
        return self.img["bge"][idx], self.img["tse"][idx]

    def text_embeddings(self, ids):
        idx = ids.long()[:, 0] % 2
        return self.txt["bge"][idx], self.txt["tse"][idx]

    def encode_image(self, x):
        return self.image_embeddings(x)[0]

    def encode_text(self, ids):
        return self.text_embeddings(ids)[0]


def test_retrieval_uses_the_mean_of_bge_and_tse(tmp_path):
    from model.features import similarity_from_features, text_similarity
    from processor.evaluate import evaluate

    model = _TableModel()
    img_loader = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    txt_loader = [(torch.tensor([0, 1]), torch.tensor([[0], [1]]))]
    res = evaluate(model, img_loader, txt_loader, torch.device("cpu"), out_dir=str(tmp_path / "eval"),
                   progress=False)
    assert res["bge"]["R1"] == 50.0 and res["tse"]["R1"] == 50.0   # each view alone: one of two
    assert res["t2i"]["R1"] == 100.0                                  # their mean: both
    mean = (BGE_SIM + TSE_SIM) / 2
    np.testing.assert_allclose(np.load(tmp_path / "eval" / "similarity.npy"), mean, atol=1e-6)
    q = {"bge": _unit_queries(BGE_SIM), "tse": _unit_queries(TSE_SIM)}
    g = {"bge": torch.eye(3)[:2], "tse": torch.eye(3)[:2]}
    np.testing.assert_allclose(similarity_from_features(q, g).numpy(), mean, atol=1e-6)
    # THI's re-encoding of refined queries uses the same rule against the saved gallery.
    sim = text_similarity(model, torch.tensor([[0], [1]]), g, torch.device("cpu"))
    np.testing.assert_allclose(sim.numpy(), mean, atol=1e-6)


def test_thi_scorer_uses_the_mean_of_bge_and_tse():
    from thi.scoring import make_score_texts
    from utils.tokenizer import tokenize

    class Model(_TableModel):
        def text_embeddings(self, ids):  # "zero" -> query 0, "one" -> query 1
            idx = (ids.long()[:, 1] == int(tokenize("one")[1])).long()
            return self.txt["bge"][idx], self.txt["tse"][idx]

    gallery = {"bge": np.eye(3, dtype=np.float32)[:2], "tse": np.eye(3, dtype=np.float32)[:2]}
    score = make_score_texts(Model(), gallery, 77, torch.device("cpu"))
    np.testing.assert_allclose(score(["zero", "one"]), (BGE_SIM + TSE_SIM) / 2, atol=1e-6)


def test_text_bge_is_read_at_the_eot_token(tiny_clip_path):
    """BGE of a caption is the backbone's token at EOT (the highest id), not at a fixed position:
    with CLIP's causal mask an early position would give every caption the same embedding."""
    from model import build_model
    from utils.config import load_config
    from utils.tokenizer import tokenize

    cfg = load_config(None, [f"pretrain_choice={tiny_clip_path}", "img_size=[64, 32]", "tse_embed_dim=32",
                             "device=cpu"])
    model = build_model(cfg).eval()
    ids = torch.stack([tokenize("a man", 77), tokenize("a woman in a long red coat with a black bag", 77)])
    eot = [3, 12]
    assert ids.argmax(dim=-1).tolist() == eot
    with torch.no_grad():
        tokens, _ = model.base_model.encode_text(ids)
        bge, _ = model.text_embeddings(ids)
        plain = model.encode_text(ids)
    for row, pos in enumerate(eot):
        torch.testing.assert_close(bge[row], tokens[row, pos].float())
        torch.testing.assert_close(plain[row], tokens[row, pos].float())
    assert not torch.allclose(bge[0], bge[1], atol=1e-3)
