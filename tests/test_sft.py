"""Anchor-localization SFT data (rda.sft): counts, positives, hard negatives from the top-k of
another identity, the CCD clean mask, seeding, the LLaMA-Factory files, and the run-side helpers
(CCD file choice and mask, noisy pairs as training saw them)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rda import make_anchor_sft, topk_indices, write_llamafactory_dataset
from rda.run_data import clean_mask, latest_ccd_file, training_pairs
from utils.mllm.prompts import loc_prompt

N_IDS, IMGS_PER_ID, CAPS_PER_IMG = 12, 3, 2


@pytest.fixture()
def toy():
    """36 images of 12 identities, 2 captions each, and a similarity in which a caption's own
    identity is usually, but not always, ranked first (so the top-10 mixes identities)."""
    rng = np.random.default_rng(3)
    image_pids = np.repeat(np.arange(N_IDS), IMGS_PER_ID)
    image_paths = [f"/mnt/reid/imgs/{i:03d}.jpg" for i in range(len(image_pids))]
    caption_images = np.repeat(np.arange(len(image_pids)), CAPS_PER_IMG)
    caption_pids = image_pids[caption_images]
    captions = [f"caption {c} of image {i}" for c, i in enumerate(caption_images)]
    sim = rng.normal(size=(len(captions), len(image_pids)))
    sim += 1.5 * (caption_pids[:, None] == image_pids[None, :])
    return dict(captions=captions, caption_pids=caption_pids, caption_images=caption_images,
                image_paths=image_paths, image_pids=image_pids, similarity=sim)


def _parse(record):
    """(caption text, image path, label) of a record, read back from its messages."""
    user, answer = record["messages"]
    assert user["role"] == "user" and answer["role"] == "assistant"
    assert user["content"].startswith("<image>") and user["content"].count("<image>") == 1
    prompt = user["content"][len("<image>"):]
    assert len(record["images"]) == 1
    return prompt, record["images"][0], answer["content"]


def test_topk_indices_matches_full_sort_and_breaks_ties_by_index():
    sim = np.array([[0.1, 0.5, 0.5, 0.3], [0.9, 0.2, 0.9, 0.9]])
    np.testing.assert_array_equal(topk_indices(sim, 3), [[1, 2, 3], [0, 2, 3]])
    rng = np.random.default_rng(0)
    big = rng.normal(size=(50, 40))
    np.testing.assert_array_equal(topk_indices(big, 10, chunk=7), np.argsort(-big, axis=1)[:, :10])


def test_counts_positives_and_hard_negatives(toy):
    top10 = topk_indices(toy["similarity"], 10)
    records = make_anchor_sft(**toy, positives=20, negatives=15, top_k=10, seed=0)
    labels = [r["label"] for r in records]
    assert labels.count("Yes") == 20 and labels.count("No") == 15 and len(records) == 35
    for r in records:
        prompt, image, answer = _parse(r)
        c, i = r["caption_index"], r["image_index"]
        assert answer == r["label"]
        assert prompt == loc_prompt(toy["captions"][c])
        assert image == toy["image_paths"][i]
        if answer == "Yes":
            assert i == toy["caption_images"][c]  # the caption's own image
        else:
            assert i in top10[c]  # among the model's top-10 for this caption
            assert toy["image_pids"][i] != toy["caption_pids"][c]  # of another identity
    # distinct captions within each class
    for label in ("Yes", "No"):
        idx = [r["caption_index"] for r in records if r["label"] == label]
        assert len(idx) == len(set(idx))
    # both classes are mixed by the shuffle, not one block after the other
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_negative_images_are_drawn_only_from_top_k(toy):
    """With top_k=2, a negative must be one of the two best images, and only captions whose
    top-2 holds another identity qualify."""
    top2 = topk_indices(toy["similarity"], 2)
    has_other = [c for c in range(len(toy["captions"]))
                 if (toy["image_pids"][top2[c]] != toy["caption_pids"][c]).any()]
    assert 0 < len(has_other) < len(toy["captions"])
    records = make_anchor_sft(**toy, positives=0, negatives=len(has_other), top_k=2, seed=1)
    assert sorted(r["caption_index"] for r in records) == sorted(has_other)
    assert all(r["image_index"] in top2[r["caption_index"]] for r in records)
    with pytest.raises(ValueError, match="top-2"):
        make_anchor_sft(**toy, positives=0, negatives=len(has_other) + 1, top_k=2, seed=1)


def test_clean_mask_is_respected(toy):
    n = len(toy["captions"])
    clean = np.zeros(n, dtype=int)
    clean[::3] = 1
    records = make_anchor_sft(**toy, clean=clean, positives=int(clean.sum()), negatives=10, seed=0)
    assert all(clean[r["caption_index"]] == 1 for r in records)
    with pytest.raises(ValueError, match="positives"):
        make_anchor_sft(**toy, clean=clean, positives=int(clean.sum()) + 1, negatives=0)
    with pytest.raises(ValueError, match="clean mask"):
        make_anchor_sft(**toy, clean=clean[:-1], positives=1, negatives=1)


def test_seeded_reproducibility_and_top_indices_equivalence(toy):
    a = make_anchor_sft(**toy, positives=10, negatives=10, seed=5)
    b = make_anchor_sft(**toy, positives=10, negatives=10, seed=5)
    c = make_anchor_sft(**toy, positives=10, negatives=10, seed=6)
    assert a == b
    assert a != c
    # precomputed top-k indices (the CLI's path for large datasets) give the same records
    top = topk_indices(toy["similarity"], 12)
    d = make_anchor_sft(**{**toy, "similarity": None}, top_indices=top, positives=10,
                        negatives=10, seed=5)
    assert d == a


def test_input_validation(toy):
    with pytest.raises(ValueError, match="shape"):
        make_anchor_sft(**{**toy, "similarity": toy["similarity"][:, :5]}, positives=1, negatives=1)
    with pytest.raises(ValueError, match="same length"):
        make_anchor_sft(**{**toy, "caption_pids": toy["caption_pids"][:-1]}, positives=1,
                        negatives=1)


def test_write_llamafactory_dataset(toy, tmp_path):
    records = make_anchor_sft(**toy, positives=4, negatives=4, seed=0)
    info_path = tmp_path / "dataset_info.json"
    info_path.write_text(json.dumps({"other": {"file_name": "other.json"}}))
    path = write_llamafactory_dataset(records, tmp_path, "anchor")
    assert path == os.path.join(str(tmp_path), "anchor.json")
    assert json.loads((tmp_path / "anchor.json").read_text()) == records
    info = json.loads(info_path.read_text())
    assert set(info) == {"other", "anchor"}  # existing entries are kept
    assert info["anchor"] == {
        "file_name": "anchor.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant"}}
    write_llamafactory_dataset(records, tmp_path / "rel", "anchor", relative_images=True)
    rel = json.loads((tmp_path / "rel" / "anchor.json").read_text())
    for r, orig in zip(rel, records):
        assert not os.path.isabs(r["images"][0])
        assert os.path.normpath(os.path.join(tmp_path / "rel", r["images"][0])) == orig["images"][0]


def test_latest_ccd_file_and_clean_mask(tmp_path):
    assert latest_ccd_file(str(tmp_path)) is None
    (tmp_path / "ccd").mkdir()
    for k, bge in ((2, [1, 1, 0, 1]), (10, [1, 0, 1, 1]), (9, [0, 0, 0, 0])):
        np.savez(tmp_path / "ccd" / f"epoch_{k}.npz", clean_bge=np.array(bge, np.int8),
                 clean_tse=np.array([1, 1, 1, 0], np.int8), weights=np.ones(4, np.float32))
    latest = latest_ccd_file(str(tmp_path))
    assert latest.endswith("epoch_10.npz")  # numeric, not lexicographic, order
    np.testing.assert_array_equal(clean_mask(latest, 4), [True, False, True, False])
    with pytest.raises(ValueError, match="4 pairs"):
        clean_mask(latest, 5)


class _FakeDataset:
    def __init__(self):
        # 3 images (ids 0..2), pids 0, 0, 1; two captions per image
        self.train = [(p, i, f"/img/{i}.jpg", f"cap{i}{k}")
                      for i, p in enumerate([0, 0, 1]) for k in range(2)]


def test_training_pairs_layout_and_noise(tmp_path):
    ds = _FakeDataset()
    plain = training_pairs(ds)
    assert plain.captions == ["cap00", "cap01", "cap10", "cap11", "cap20", "cap21"]
    np.testing.assert_array_equal(plain.caption_images, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(plain.caption_pids, [0, 0, 0, 0, 1, 1])
    assert plain.image_paths == ["/img/0.jpg", "/img/1.jpg", "/img/2.jpg"]
    np.testing.assert_array_equal(plain.image_pids, [0, 0, 1])
    # with injected noise the captions are those training used: pair i gets caption index[i]
    index = np.array([0, 4, 2, 3, 1, 5])
    np.save(tmp_path / "noise.npy", index)
    noisy = training_pairs(ds, noisy_rate=0.3, noisy_file=str(tmp_path / "noise.npy"))
    assert noisy.captions == [plain.captions[j] for j in index]
    np.testing.assert_array_equal(noisy.caption_images, plain.caption_images)


@pytest.fixture(scope="module")
def tiny_run(tiny_clip_path, synth_root, tmp_path_factory):
    """A 1-epoch RDE run of the tiny CLIP on SynthPEDES (config.yaml, best.pth, ccd/epoch_1.npz)."""
    from processor.trainer import train
    from utils.config import load_config

    out = tmp_path_factory.mktemp("sft-run")
    items = {"dataset_name": "SynthPEDES", "root_dir": synth_root, "output_dir": str(out),
             "pretrain_choice": tiny_clip_path, "img_size": [64, 32], "tse_embed_dim": 64,
             "batch_size": 32, "test_batch_size": 64, "num_workers": 0, "img_aug": False,
             "txt_aug": False, "lr": 5e-4, "num_epoch": 1, "warmup_epochs": 1, "log_period": 1000,
             "device": "cpu", "save_eval": False, "seed": 0}
    cfg = load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                             for k, v in items.items()])
    run_dir = str(out / "run")
    train(cfg, run_dir, progress=False)
    return run_dir


@pytest.mark.slow
def test_cli_sft_from_a_trained_run(tiny_run, synth_root, tmp_path):
    """``python -m rda sft``: the model's top-10 (checked against a dense similarity computed
    here with the model's own encoders), CCD's clean pairs only, the counts asked for."""
    import torch
    import torch.nn.functional as F

    from datasets import build_dataset, build_transforms
    from datasets.bases import read_image
    from model import load_run
    from rda.cli import main
    from utils.tokenizer import tokenize

    out = tmp_path / "sft"
    assert main(["sft", "--run", tiny_run, "--out", str(out), "--positives", "30",
                 "--negatives", "20", "--device", "cpu", "--no-progress"]) == 0
    records = json.loads((out / "icl_anchor.json").read_text())
    meta = json.loads((out / "icl_anchor.meta.json").read_text())
    assert json.loads((out / "dataset_info.json").read_text())["icl_anchor"]["file_name"] == "icl_anchor.json"
    assert [r["label"] for r in records].count("Yes") == 30
    assert [r["label"] for r in records].count("No") == 20
    assert meta["ccd_file"].endswith(os.path.join("ccd", "epoch_1.npz"))

    pairs = training_pairs(build_dataset("SynthPEDES", synth_root))
    clean = clean_mask(meta["ccd_file"], len(pairs.captions))
    assert meta["clean_pairs"] == int(clean.sum()) < len(pairs.captions)
    # dense similarity, independently of the CLI's chunked feature path
    model, cfg = load_run(tiny_run, "cpu")
    tf = build_transforms(cfg.img_size, aug=False, is_train=False)
    with torch.no_grad():
        imgs = torch.stack([tf(read_image(p)) for p in pairs.image_paths])
        ids = torch.stack([tokenize(c, cfg.text_length) for c in pairs.captions])
        sim = sum(F.normalize(t(ids), dim=-1) @ F.normalize(i(imgs), dim=-1).T
                  for t, i in ((model.encode_text, model.encode_image),
                               (model.encode_text_tse, model.encode_image_tse))) / 2
    sim = sim.numpy()
    tenth = np.sort(sim, axis=1)[:, -10]  # the 10th best score per caption
    for r in records:
        c, i = r["caption_index"], r["image_index"]
        assert clean[c]
        assert r["images"] == [pairs.image_paths[i]]
        assert r["messages"][0]["content"] == "<image>" + loc_prompt(pairs.captions[c])
        if r["label"] == "Yes":
            assert i == pairs.caption_images[c]
        else:
            # in the top-10 (up to float noise between batched and dense encoding)
            assert sim[c, i] >= tenth[c] - 1e-5 and pairs.image_pids[i] != pairs.caption_pids[c]
