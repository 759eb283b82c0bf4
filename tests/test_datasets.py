"""Readers (on small fixture files in the real formats), transforms, txt_aug, noise injection
and samplers."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DATASET_NAMES, build_dataset
from datasets.noise import (RELEASE_NOISE_FILES, RELEASE_NOISE_SHA256, NoiseFileError, build_noise_index,
                            check_noise_file, inject_noise, permute_captions)
from datasets.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler, ShuffleSampler
from datasets.text_aug import EOT_ID, MASK_ID, SOT_ID, txt_aug
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms


# ---------------------------------------------------------------------------- fixtures
def _write_image(path: Path, color=(120, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), color).save(path)


def _make(root: Path, name: str, records: list[dict], anno: str, image_dir: str = "imgs",
          path_field: str = "file_path", images: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / anno).write_text(json.dumps(records))
    if images:
        for r in records:
            _write_image(folder / image_dir / r[path_field] if image_dir else folder / r[path_field])
    return folder


def _cuhk_records() -> list[dict]:
    # ids from 1 as in reid_raw.json; split order mixed as in the real file.
    return [
        {"split": "train", "id": 1, "file_path": "CUHK01/0001001.png", "captions": ["a", "b"], "processed_tokens": [["a"], ["b"]]},
        {"split": "test", "id": 12, "file_path": "test/0012.jpg", "captions": ["t1", "t2"], "processed_tokens": []},
        {"split": "train", "id": 2, "file_path": "CUHK01/0002001.png", "captions": ["c"], "processed_tokens": [["c"]]},
        {"split": "val", "id": 11, "file_path": "val/0011.jpg", "captions": ["v1"], "processed_tokens": []},
        {"split": "train", "id": 1, "file_path": "CUHK01/0001002.png", "captions": ["d", "e"], "processed_tokens": []},
        {"split": "train", "id": 3, "file_path": "CUHK03/0003.png", "captions": ["f"], "processed_tokens": []},
        {"split": "test", "id": 13, "file_path": "test/0013.jpg", "captions": ["t3"], "processed_tokens": []},
    ]


def test_cuhkpedes_splits_and_numbering(tmp_path):
    folder = _make(tmp_path, "CUHK-PEDES", _cuhk_records(), "reid_raw.json")
    ds = build_dataset("CUHK-PEDES", tmp_path)
    img = folder.resolve() / "imgs"
    assert ds.train == [
        (0, 0, str(img / "CUHK01/0001001.png"), "a"),
        (0, 0, str(img / "CUHK01/0001001.png"), "b"),
        (1, 1, str(img / "CUHK01/0002001.png"), "c"),
        (0, 2, str(img / "CUHK01/0001002.png"), "d"),
        (0, 2, str(img / "CUHK01/0001002.png"), "e"),
        (2, 3, str(img / "CUHK03/0003.png"), "f"),
    ]
    assert ds.train_id_container == {0, 1, 2}
    assert ds.train_rda is None
    # Evaluation splits keep the raw ids (IRRA: pid = id for val/test).
    assert ds.test == {"image_pids": [12, 13], "img_paths": [str(img / "test/0012.jpg"), str(img / "test/0013.jpg")],
                       "caption_pids": [12, 12, 13], "captions": ["t1", "t2", "t3"]}
    assert ds.val["caption_pids"] == [11] and ds.val["captions"] == ["v1"]
    rows = [line.split("|") for line in ds.summary().splitlines() if line.startswith("|")]
    cells = {r[1].strip(): [c.strip() for c in r[2:5]] for r in rows[1:]}
    assert cells == {"train": ["3", "4", "6"], "val": ["1", "1", "1"], "test": ["2", "2", "3"]}


def test_icfgpedes_zero_based_ids_and_no_val(tmp_path):
    records = [{"split": "train", "id": 0, "file_path": "train/0000/a.jpg", "captions": ["x"], "processed_tokens": []},
               {"split": "train", "id": 1, "file_path": "train/0001/b.jpg", "captions": ["y", "z"], "processed_tokens": []},
               {"split": "test", "id": 3102, "file_path": "test/3102/c.jpg", "captions": ["q"], "processed_tokens": []}]
    _make(tmp_path, "ICFG-PEDES", records, "ICFG-PEDES.json")
    ds = build_dataset("ICFG-PEDES", tmp_path)
    assert [(p, i, c) for p, i, _, c in ds.train] == [(0, 0, "x"), (1, 1, "y"), (1, 1, "z")]
    assert ds.val == {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": []}
    assert ds.test["caption_pids"] == [3102]


def test_rstpreid_reads_img_path_field(tmp_path):
    records = [{"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["u", "w"], "split": "train"},
               {"id": 1, "img_path": "0001_c1_0007.jpg", "captions": ["k"], "split": "train"},
               {"id": 3701, "img_path": "3701_c2_0001.jpg", "captions": ["m"], "split": "val"},
               {"id": 3901, "img_path": "3901_c2_0001.jpg", "captions": ["n"], "split": "test"}]
    folder = _make(tmp_path, "RSTPReid", records, "data_captions.json", path_field="img_path")
    ds = build_dataset("RSTPReid", tmp_path)
    assert ds.train[2] == (1, 1, str(folder.resolve() / "imgs" / "0001_c1_0007.jpg"), "k")
    assert ds.val["image_pids"] == [3701] and ds.test["image_pids"] == [3901]


def test_ufine6926_paths_relative_to_dataset_folder_and_renumbering(tmp_path):
    # UFineBench's README: "file_path": "images/1.jpg" (the images/ folder is in the path).
    records = [{"split": "train", "id": 1, "file_path": "images/1.jpg", "captions": ["p", "q"]},
               {"split": "train", "id": 5, "file_path": "images/2.jpg", "captions": ["r"]},
               {"split": "train", "id": 7, "file_path": "images/3.jpg", "captions": ["s"]},
               {"split": "test", "id": 9, "file_path": "images/4.jpg", "captions": ["t"]}]
    folder = _make(tmp_path, "UFine6926", records, "ufine6926.json", image_dir="")
    ds = build_dataset("UFine6926", tmp_path)
    assert [p for p, *_ in ds.train] == [0, 0, 1, 2]          # contiguous even if the file is not
    assert ds.train[0][2] == str(folder.resolve() / "images" / "1.jpg")
    assert ds.test["img_paths"] == [str(folder.resolve() / "images" / "4.jpg")]


def test_diversity_captions_become_train_rda(tmp_path):
    records = _cuhk_records()[:3]
    records[0]["diversity_captions"] = [
        [["A man.", "A male."], ["He wears red.", "He is in red."]],     # caption "a"
        "A single rewritten caption.",                                    # caption "b": bare string
    ]
    records[2]["diversity_captions"] = [[["One.", "Uno."], "Two."]]      # caption "c": string sub-sentence
    _make(tmp_path, "CUHK-PEDES", records, "reid_raw.json")
    ds = build_dataset("CUHK-PEDES", tmp_path)
    assert [c for *_, c in ds.train] == ["a", "b", "c"]
    assert ds.train_rda == [
        [["A man.", "A male."], ["He wears red.", "He is in red."]],
        [["A single rewritten caption."]],
        [["One.", "Uno."], ["Two."]],
    ]


def test_missing_diversity_captions_fall_back_to_the_caption(tmp_path):
    records = _cuhk_records()[:3]
    records[0]["diversity_captions"] = [[["x"]], [["y"]]]
    _make(tmp_path, "CUHK-PEDES", records, "reid_raw.json")
    ds = build_dataset("CUHK-PEDES", tmp_path)
    assert ds.train_rda == [[["x"]], [["y"]], [["c"]]]


def test_anno_file_overrides_the_annotation(tmp_path):
    _make(tmp_path, "CUHK-PEDES", _cuhk_records(), "reid_raw.json")
    other = _cuhk_records()
    other[0]["captions"] = ["rewritten"]
    alt = tmp_path / "augmented.json"
    alt.write_text(json.dumps(other))
    ds = build_dataset("CUHK-PEDES", tmp_path, anno_file=alt)
    assert ds.train[0][3] == "rewritten" and ds.anno_path == alt.resolve()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_dataset("CUHK-PEDES", tmp_path, anno_file=tmp_path / "nope.json")


# ---------------------------------------------------------------------------- errors
def test_unknown_dataset_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        build_dataset("CUHK_PEDES", tmp_path)
    for name in DATASET_NAMES:
        assert name in str(err.value)
    assert set(DATASET_NAMES) == {"CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "UFine6926", "SynthPEDES"}


def test_missing_annotation_file_names_path_and_content(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("RSTPReid", tmp_path)
    msg = str(err.value)
    assert str(tmp_path.resolve() / "RSTPReid" / "data_captions.json") in msg
    assert "img_path" in msg and "captions" in msg


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("captions"), "captions"),
    (lambda r: r.update(id="abc"), "id"),
    (lambda r: r.update(captions="just a string"), "captions"),
    (lambda r: r.update(split="training"), "split"),
    (lambda r: r.update(file_path=7), "file_path"),
    (lambda r: r.update(diversity_captions=[[["x"]]]), "diversity_captions"),   # 1 entry for 2 captions
    (lambda r: r.update(diversity_captions=[[["x"]], [[3]]]), "diversity_captions[1][0]"),
])
def test_malformed_record_names_file_record_and_field(tmp_path, mutate, field):
    records = _cuhk_records()
    mutate(records[4])
    _make(tmp_path, "CUHK-PEDES", records, "reid_raw.json", images=False)
    with pytest.raises(ValueError) as err:
        build_dataset("CUHK-PEDES", tmp_path)
    msg = str(err.value)
    assert "reid_raw.json" in msg and "record 4" in msg and f"'{field}'" in msg


def test_not_a_list_and_bad_json(tmp_path):
    folder = tmp_path / "CUHK-PEDES"
    folder.mkdir()
    (folder / "reid_raw.json").write_text('{"split": "train"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        build_dataset("CUHK-PEDES", tmp_path)
    (folder / "reid_raw.json").write_text('[{"split": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        build_dataset("CUHK-PEDES", tmp_path)


def test_missing_images_are_reported_with_the_expected_folder(tmp_path):
    records = _cuhk_records()
    folder = _make(tmp_path, "CUHK-PEDES", records, "reid_raw.json")
    (folder / "imgs" / "CUHK03" / "0003.png").unlink()
    (folder / "imgs" / "test" / "0013.jpg").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("CUHK-PEDES", tmp_path)
    msg = str(err.value)
    assert "2 of 7 images" in msg and str(folder.resolve() / "imgs") in msg
    assert "CUHK03/0003.png" in msg and "test/0013.jpg" in msg
    assert build_dataset("CUHK-PEDES", tmp_path, check_images=False).train[-1][3] == "f"


# ---------------------------------------------------------------------------- transforms
def test_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (50, 100), tuple(int(round(m * 255)) for m in CLIP_MEAN))
    test_t = build_transforms((64, 32), is_train=False)
    out = test_t(img)
    assert out.shape == (3, 64, 32)
    assert out.abs().max() < 0.02                  # the CLIP mean colour normalises to ~0
    plain = Image.new("RGB", (50, 100), (255, 255, 255))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(test_t(plain)[:, 10, 10], expected, atol=1e-5)
    for aug in (False, True):
        torch.manual_seed(0)
        assert build_transforms((64, 32), aug=aug, is_train=True)(img).shape == (3, 64, 32)
    names = [type(t).__name__ for t in build_transforms((64, 32), aug=True).transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize",
                     "RandomErasing"]
    erasing = build_transforms((64, 32), aug=True).transforms[-1]
    assert list(erasing.value) == pytest.approx(list(CLIP_MEAN)) and erasing.scale == (0.02, 0.4)
    with pytest.raises(ValueError, match="img_size"):
        build_transforms((64,))


# ---------------------------------------------------------------------------- txt_aug
def _random_caption(rng: random.Random, length: int = 77) -> torch.Tensor:
    n = rng.randint(3, length - 2)
    ids = [SOT_ID] + [rng.randint(1, 49404) for _ in range(n)] + [EOT_ID]
    ids = ids[:length]
    ids[-1] = EOT_ID
    return torch.tensor(ids + [0] * (length - len(ids)))


def test_txt_aug_invariants_and_rates():
    rng = random.Random(0)
    masked = deleted = total = 0
    for trial in range(300):
        ids = _random_caption(rng)
        out = txt_aug(ids, random.Random(trial))
        assert out.shape == ids.shape and out.dtype == torch.long
        nonpad = int((out != 0).sum())
        assert out[0] == SOT_ID
        assert out[nonpad - 1] == EOT_ID and int(out.argmax()) == nonpad - 1
        assert (out[nonpad:] == 0).all() and (out[:nonpad] != 0).all()
        assert int((out == EOT_ID).sum()) == 1 and int((out == SOT_ID).sum()) == 1
        n_in = int((ids != 0).sum())
        total += n_in - 2
        deleted += n_in - nonpad
        masked += int((out == MASK_ID).sum())
        # Same seed, same result.
        assert torch.equal(out, txt_aug(ids, random.Random(trial)))
    # RDE: 20 % of the tokens picked; of those 60 % masked, 20 % replaced, 20 % deleted.
    assert masked / total == pytest.approx(0.12, abs=0.015)
    assert deleted / total == pytest.approx(0.04, abs=0.01)


def test_txt_aug_keeps_special_tokens_and_padding():
    ids = torch.tensor([SOT_ID, MASK_ID, MASK_ID, EOT_ID, 0, 0])
    assert torch.equal(txt_aug(ids, random.Random(1)), ids)
    with pytest.raises(ValueError):
        txt_aug(ids[None], random.Random(0))


# ---------------------------------------------------------------------------- noise
def _toy_train(n: int) -> list[tuple[int, int, str, str]]:
    return [(i // 4, i // 2, f"/img/{i // 2}.png", f"caption {i}") for i in range(n)]


def test_inject_noise_fraction_and_semantics():
    train = _toy_train(1000)
    noisy, mask = inject_noise(train, 0.2, seed=3, draw=True)
    assert mask.dtype == bool and mask.shape == (1000,)
    assert 190 <= mask.sum() <= 200               # 200 shuffled, a few may land on themselves
    index = build_noise_index(1000, 0.2, seed=3, draw=True)
    for i, (item, src) in enumerate(zip(noisy, index)):
        assert item[:3] == train[i][:3]            # image side unchanged
        assert item[3] == train[src][3]
        assert mask[i] == (src != i)
    assert sorted(c for *_, c in noisy) == sorted(c for *_, c in train)
    clean, clean_mask = inject_noise(train, 0.0)
    assert clean == train and not clean_mask.any()


def test_noise_index_file_is_drawn_only_on_request_then_reused(tmp_path):
    path = tmp_path / "noiseindex" / "toy_0.5.npy"
    # Missing file, no noise_draw: refused, naming the release's folder; nothing written.
    with pytest.raises(NoiseFileError, match="2024-CVPR-RDE/noiseindex"):
        build_noise_index(50, 0.5, path, seed=0)
    with pytest.raises(NoiseFileError, match="noise_draw=true"):
        build_noise_index(50, 0.5, None, seed=0)
    assert not (tmp_path / "noiseindex").exists()
    first = build_noise_index(50, 0.5, path, seed=0, draw=True)
    assert path.is_file() and np.array_equal(np.load(path), first)
    # A different seed must not matter once the file exists: it is loaded (draw or not).
    assert np.array_equal(build_noise_index(50, 0.5, path, seed=99), first)
    assert np.array_equal(build_noise_index(50, 0.5, path, seed=99, draw=True), first)
    assert not np.array_equal(build_noise_index(50, 0.5, None, seed=99, draw=True), first)
    with pytest.raises(ValueError, match="toy_0.5.npy"):
        build_noise_index(51, 0.5, path)
    np.save(path, np.zeros(50, dtype=np.int64))
    with pytest.raises(ValueError, match="not a permutation"):
        build_noise_index(50, 0.5, path)


def test_a_drawn_permutation_never_takes_a_release_name(tmp_path):
    path = tmp_path / "noiseindex" / "CUHK-PEDES_0.2.npy"
    with pytest.raises(NoiseFileError, match="a name of the release's"):
        build_noise_index(50, 0.2, path, seed=0, draw=True)
    assert not path.parent.exists()
    # A file under a release name must be the release's file (sha256 checked).
    path.parent.mkdir()
    index = np.arange(50)
    index[:10] = index[:10][::-1]
    np.save(path, index)
    with pytest.raises(NoiseFileError, match=RELEASE_NOISE_SHA256["CUHK-PEDES_0.2.npy"]):
        build_noise_index(50, 0.2, path)


def test_release_noise_files_are_read_exactly(tmp_path):
    """The release's format (int64 .npy, pair i gets caption index[i]), rebuilt here in the release's
    own way (np.save of an int64 array) at a small size: the file loads unchanged, and a file with
    this content and a release name would be checked against the recorded sha256."""
    rng = np.random.default_rng(0)
    index = np.arange(30)
    sel = rng.permutation(30)[:15]
    index[sel] = rng.permutation(sel)
    path = tmp_path / "toy_0.5.npy"
    np.save(path, index)
    assert check_noise_file(0.5, path) == hashlib.sha256(path.read_bytes()).hexdigest()
    train = _toy_train(30)
    noisy, mask = inject_noise(train, 0.5, path)
    assert [c for *_, c in noisy] == [train[j][3] for j in index]
    assert np.array_equal(mask, index != np.arange(30))
    assert check_noise_file(0.0, tmp_path / "missing.npy") is None     # clean runs read no file
    # Every release file is recorded with its length and a sha256.
    assert len(RELEASE_NOISE_FILES) == 9 and all(len(sha) == 64 for _, sha in RELEASE_NOISE_FILES.values())
    assert {n for n, _ in RELEASE_NOISE_FILES.values()} == {68126, 34674, 37010}


def test_rda_sub_sentences_travel_with_their_captions():
    train = _toy_train(40)
    rda = [[[f"sub of {c}"]] for *_, c in train]
    index = build_noise_index(40, 0.5, seed=1, draw=True)
    noisy, _ = inject_noise(train, 0.5, seed=1, draw=True)
    moved = permute_captions(rda, index)
    assert all(m == [[f"sub of {item[3]}"]] for m, item in zip(moved, noisy))


# ---------------------------------------------------------------------------- samplers
def test_identity_sampler_batches_hold_k_instances_of_p_ids():
    rng = random.Random(0)
    pids = [p for p in range(30) for _ in range(rng.randint(1, 9))]
    sampler = RandomIdentitySampler(pids, batch_size=12, num_instances=4, seed=5)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % 12 == 0 and len(order) > 0
    for b in range(0, len(order), 12):
        counts = Counter(pids[i] for i in order[b:b + 12])
        assert len(counts) == 3 and set(counts.values()) == {4}
    assert list(sampler) == order                     # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler(pids, batch_size=10, num_instances=4)


def test_distributed_identity_sampler_splits_batches_across_ranks():
    pids = [p for p in range(40) for _ in range(4)]
    shards = [list(DistributedRandomIdentitySampler(pids, 16, 4, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) > 0
    assert not set(shards[0]) & set(shards[1])
    for shard in shards:
        for b in range(0, len(shard), 8):
            counts = Counter(pids[i] for i in shard[b:b + 8])
            assert len(counts) == 2 and set(counts.values()) == {4}


def test_shuffle_sampler_is_seeded_and_shards():
    s = ShuffleSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    shards = [ShuffleSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    parts = [list(x) for x in shards]
    assert all(len(p) == 4 for p in parts) and set().union(*parts) == set(range(10))
    with pytest.raises(ValueError):
        ShuffleSampler(10, rank=3, world_size=3)
