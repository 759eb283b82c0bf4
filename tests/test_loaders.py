"""Torch datasets and loaders: per-sample seeding (epochs, workers, resume), RDA captions,
noisy pairs, train_eval order, evaluation loaders."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import build_dataset, build_dataloader, build_eval_loaders
from datasets.bases import ImageTextDataset, draw_rda_caption, sample_seeds
from datasets.sampler import ShuffleSampler
from datasets.transforms import build_transforms
from utils.tokenizer import tokenize


def _cfg(root: str, **overrides) -> dict:
    cfg = dict(dataset_name="SynthPEDES", root_dir=root, anno_file=None, img_size=[64, 32], img_aug=True,
               txt_aug=True, text_length=77, batch_size=16, test_batch_size=32, num_workers=0,
               sampler="random", num_instance=4, distributed=False, noisy_rate=0.0, noisy_file=None,
               seed=0, rda=True, val_dataset="test")
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def rda_anno(synth_root, tmp_path_factory) -> Path:
    """reid_raw.json with ICL-style diversity_captions: per caption its sentences, each with
    a rewrite (the sentence in capitals)."""
    records = json.loads((Path(synth_root) / "SynthPEDES" / "reid_raw.json").read_text())
    for r in records:
        r["diversity_captions"] = [[[s, s.upper()] for s in re.split(r"(?<=\.) ", c)] for c in r["captions"]]
    path = tmp_path_factory.mktemp("rda") / "synth_rda.json"
    path.write_text(json.dumps(records))
    return path


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_draw_rda_caption_orders_and_picks_alternatives():
    subs = [["a1", "a2"], ["b1"], ["c1", "c2", "c3"]]
    draws = {draw_rda_caption(subs, random.Random(s)) for s in range(200)}
    for d in draws:
        words = d.split(" ")
        assert len(words) == 3 and sorted(w[0] for w in words) == ["a", "b", "c"]
    orders = {tuple(w[0] for w in d.split(" ")) for d in draws}
    assert len(orders) == 6                                   # every order of the sub-sentences
    assert {w for d in draws for w in d.split(" ")} == {"a1", "a2", "b1", "c1", "c2", "c3"}


def test_samples_are_seeded_by_seed_epoch_index(synth_root, rda_anno):
    ds = build_dataset("SynthPEDES", synth_root, anno_file=rda_anno)
    make = lambda seed: ImageTextDataset(ds.train, build_transforms((64, 32), aug=True), txt_aug=True,  # noqa: E731
                                         rda=ds.train_rda, seed=seed)
    a, b = make(0), make(0)
    idx = [0, 5, 17, 40]
    a.set_epoch(2)
    b.set_epoch(2)
    first = [a[i] for i in idx]
    torch.manual_seed(123)                                    # global RNG state must not matter
    assert all(_same(first[k], b[i]) for k, i in enumerate(idx))
    assert all(_same(first[k], a[i]) for k, i in enumerate(idx))   # repeated access, same sample
    a.set_epoch(3)
    later = [a[i] for i in idx]
    assert sum(not torch.equal(x["aug_caption_ids"], y["aug_caption_ids"]) for x, y in zip(first, later)) >= 3
    assert sum(not torch.equal(x["images"], y["images"]) for x, y in zip(first, later)) >= 3
    assert sum(not torch.equal(x["caption_ids"], y["caption_ids"]) for x, y in zip(first, later)) >= 2
    c = make(1)
    c.set_epoch(2)
    assert sum(not torch.equal(first[k]["aug_caption_ids"], c[i]["aug_caption_ids"]) for k, i in enumerate(idx)) >= 3
    assert [x["index"] for x in first] == idx and [x["pids"] for x in first] == [ds.train[i][0] for i in idx]


def test_rda_caption_is_built_from_the_caption_sub_sentences(synth_root, rda_anno):
    ds = build_dataset("SynthPEDES", synth_root, anno_file=rda_anno)
    plain = ImageTextDataset(ds.train, None, txt_aug=False, rda=ds.train_rda, seed=4)
    plain.set_epoch(1)
    for i in (0, 3, 9):
        item = plain[i]
        _, _, rda_seed = sample_seeds(4, 1, i)
        expected = draw_rda_caption(ds.train_rda[i], random.Random(rda_seed))
        assert torch.equal(item["aug_caption_ids"], tokenize(expected))
        assert torch.equal(item["caption_ids"], tokenize(ds.train[i][3]))
        sentences = re.split(r"(?<=\.) ", ds.train[i][3])
        assert sorted(s.lower() for s in re.split(r"(?<=\.) ", expected)) == sorted(s.lower() for s in sentences)


def test_batches_do_not_depend_on_num_workers(synth_root, rda_anno):
    ds = build_dataset("SynthPEDES", synth_root, anno_file=rda_anno)
    batches = []
    for workers in (0, 2):
        data = ImageTextDataset(ds.train[:48], build_transforms((64, 32), aug=True), txt_aug=True,
                                rda=ds.train_rda[:48], seed=9)
        sampler = ShuffleSampler(len(data), seed=9)
        data.set_epoch(5)
        sampler.set_epoch(5)
        batches.append(list(DataLoader(data, batch_size=16, sampler=sampler, num_workers=workers)))
    assert len(batches[0]) == 3
    assert all(_same(x, y) for x, y in zip(*batches))


def test_build_dataloader_train_side(synth_root, rda_anno, tmp_path):
    noisy_file = tmp_path / "noise" / "synth_0.3.npy"
    cfg = _cfg(synth_root, anno_file=str(rda_anno), noisy_rate=0.3, noisy_file=str(noisy_file), noise_draw=True,
               seed=2)
    loaders = build_dataloader(cfg)
    ds = loaders.dataset
    n = len(ds.train)
    assert loaders.num_classes == 24 == len(ds.train_id_container)
    # Noisy pairs: the index file was written and the mask matches it.
    index = np.load(noisy_file)
    assert np.array_equal(loaders.noisy_mask, index != np.arange(n))
    assert 0.27 * n <= loaders.noisy_mask.sum() <= 0.3 * n
    train_items = loaders.train.dataset.train
    assert all(train_items[i][3] == ds.train[j][3] and train_items[i][:3] == ds.train[i][:3]
               for i, j in enumerate(index))
    assert loaders.train.dataset.rda == [ds.train_rda[j] for j in index]     # RDA travels along

    loaders.set_epoch(0)
    batch = next(iter(loaders.train))
    assert set(batch) == {"pids", "image_ids", "images", "caption_ids", "index", "aug_caption_ids"}
    assert batch["images"].shape == (16, 3, 64, 32) and batch["caption_ids"].shape == (16, 77)
    assert batch["aug_caption_ids"].shape == (16, 77)
    assert sorted(loaders.train.sampler) == list(range(n))

    # train_eval: the same (noisy) pairs in order, no augmentation, with index.
    ev = list(loaders.train_eval)
    assert torch.equal(torch.cat([b["index"] for b in ev]), torch.arange(n))
    first = ev[0]
    assert "aug_caption_ids" not in first
    assert torch.equal(first["caption_ids"][3], tokenize(train_items[3][3]))
    again = next(iter(loaders.train_eval))
    assert torch.equal(first["images"], again["images"])

    # A resumed run (fresh loaders, same epoch) sees bit-identical batches.
    loaders.set_epoch(3)
    resumed = build_dataloader(cfg)
    resumed.set_epoch(3)
    for x, y, _ in zip(loaders.train, resumed.train, range(2)):
        assert _same(x, y)


def test_identity_sampler_loader(synth_root):
    loaders = build_dataloader(_cfg(synth_root, sampler="identity", num_instance=4, rda=False, img_aug=False))
    loaders.set_epoch(1)
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train) > 0
    for b in batches:
        assert b["images"].shape[0] == 16
        counts = Counter(b["pids"].tolist())
        assert len(counts) == 4 and set(counts.values()) == {4}
        assert "aug_caption_ids" not in b


def test_eval_loaders(synth_root):
    loaders = build_dataloader(_cfg(synth_root))
    test = loaders.dataset.test
    pids = torch.cat([p for p, _ in loaders.test_img])
    assert pids.tolist() == test["image_pids"]
    txt_pids, ids = zip(*loaders.test_txt)
    ids = torch.cat(ids)
    assert torch.cat(txt_pids).tolist() == test["caption_pids"] and ids.shape == (len(test["captions"]), 77)
    assert torch.equal(ids[7], tokenize(test["captions"][7]))

    img, txt, split = build_eval_loaders(_cfg(synth_root), split="val")
    assert split == loaders.dataset.val
    images = next(iter(img))[1]
    assert images.shape[1:] == (3, 64, 32)
    assert len(txt.dataset) == len(split["captions"]) == 4 * 4 * 2          # 40 ids: 24 train, 4 val, 12 test


def test_config_errors(synth_root):
    cfg = _cfg(synth_root)
    del cfg["dataset_name"]
    with pytest.raises(KeyError, match="dataset_name"):
        build_dataloader(cfg)
    with pytest.raises(ValueError, match="sampler"):
        build_dataloader(_cfg(synth_root, sampler="softmax"))
    with pytest.raises(ValueError, match="valid names"):
        build_dataloader(_cfg(synth_root, dataset_name="Synth"))
    # rda=True on a file without diversity captions trains without them.
    loaders = build_dataloader(_cfg(synth_root, rda=True))
    assert loaders.train.dataset.rda is None and not loaders.noisy_mask.any()
