"""SynthPEDES: determinism, format, visible attributes, and the text round trips the
simulated MLLM relies on."""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import build_dataset
from offline.synth_schema import COLORS, IDENTITY_ATTRIBUTES, PER_IMAGE, sample_identity, sample_image_attributes
from offline.synthpedes import (QUESTION_ATTRIBUTES, SCHEMA, answer_sentence, compose_caption, generate,
                                 load_attributes, main, parse_caption)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "SynthPEDES", num_ids=30, images_per_id=4, seed=0)


# ---------------------------------------------------------------------------- generation
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", num_ids=8, images_per_id=2, seed=7)
    b = generate(tmp_path / "b", num_ids=8, images_per_id=2, seed=7)
    c = generate(tmp_path / "c", num_ids=8, images_per_id=2, seed=8)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == 8 * 2 + 2 and da == db
    assert da["reid_raw.json"] != dc["reid_raw.json"]
    shared = [k for k in da if k.endswith(".png") and k in dc]
    assert shared and all(da[k] != dc[k] for k in shared)


def test_cuhk_format_splits_and_sidecar(synth):
    records = json.loads((synth / "reid_raw.json").read_text())
    assert len(records) == 30 * 4
    for r in records:
        assert set(r) == {"split", "captions", "file_path", "id", "processed_tokens"}
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c for c in r["captions"])
        assert r["processed_tokens"] == [re.findall(r"[a-z]+(?:-[a-z]+)*", c.lower()) for c in r["captions"]]
        with Image.open(synth / "imgs" / r["file_path"]) as im:
            assert im.size == (64, 128) and im.mode == "RGB"
    ids_by_split = {s: sorted({r["id"] for r in records if r["split"] == s}) for s in ("train", "val", "test")}
    assert ids_by_split == {"train": list(range(1, 19)), "val": [19, 20, 21], "test": list(range(22, 31))}

    side = load_attributes(synth)
    assert side["version"] == 1 and side["schema"] == {k: list(v) for k, v in SCHEMA.items()}
    assert set(side["images"]) == {r["file_path"] for r in records}
    for attrs in side["images"].values():
        assert set(attrs) == set(SCHEMA) and all(attrs[k] in SCHEMA[k] for k in SCHEMA)
        assert (attrs["bag"] == "none") == (attrs["bag_color"] == "none")
        if attrs["upper_type"] == "t-shirt":
            assert attrs["sleeve"] == "short"
        if attrs["lower_type"] in ("trousers", "jeans"):
            assert attrs["lower_length"] == "long"


def test_identities_fixed_per_image_attributes_vary_and_lookalikes_exist(synth):
    side = load_attributes(synth)
    records = json.loads((synth / "reid_raw.json").read_text())
    by_id: dict[int, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(side["images"][r["file_path"]])
    identities = {}
    for pid, images in by_id.items():
        for attr in IDENTITY_ATTRIBUTES:
            assert len({a[attr] for a in images}) == 1, (pid, attr)
        identities[pid] = images[0]
    assert any(len({a[attr] for images in by_id.values() for a in images}) > 1 for attr in PER_IMAGE)
    assert any(len({a["background"] for a in images}) > 1 for images in by_id.values())
    keys = [tuple(identities[p][a] for a in IDENTITY_ATTRIBUTES) for p in sorted(identities)]
    assert len(set(keys)) == len(keys)                               # identities are distinct
    closest = min(sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(keys, 2))
    near_pairs = sum(sum(x != y for x, y in zip(a, b)) <= 2 for a, b in itertools.combinations(keys, 2))
    assert closest <= 2 and near_pairs >= 5                          # look-alikes make retrieval hard


def _nearest_color(pixel: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=float)
    return names[int(np.argmin(((palette - pixel) ** 2).sum(1)))]


def test_garment_colours_are_drawn(synth):
    side = load_attributes(synth)
    hits = Counter()
    for file_path, attrs in side["images"].items():
        image = np.asarray(Image.open(synth / "imgs" / file_path), dtype=float)
        for part, attr in (("upper", "upper_color"), ("lower", "lower_color")):
            if part == "upper" and attrs["pattern"] != "plain":
                continue                                             # stripes/plaid/logo mix colours
            x0, y0, x1, y1 = side["boxes"][file_path][part]
            assert x1 > x0 and y1 > y0
            median = np.median(image[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3), axis=0)
            hits[(part, _nearest_color(median) == attrs[attr])] += 1
    for part in ("upper", "lower"):
        total = hits[(part, True)] + hits[(part, False)]
        assert total >= 30 and hits[(part, True)] / total >= 0.95, hits


def test_attributes_change_the_picture(tmp_path):
    """Changing one attribute (same random stream) changes the pixels where it is drawn."""
    from offline.synth_render import render_person

    rng = random.Random(3)
    base = sample_image_attributes(sample_identity(rng), rng)
    base.update(hat="none", glasses="none", scarf="none", belt="none", bag="none", bag_color="none", held="none")
    ref, _ = render_person(base, random.Random(0))
    for attr, value in [("hat", "red"), ("glasses", "blue"), ("scarf", "green"), ("belt", "white"),
                        ("held", "book"), ("hair_length", "long" if base["hair_length"] == "short" else "short"),
                        ("upper_type", "coat" if base["upper_type"] != "coat" else "shirt"),
                        ("shoes_style", "boots" if base["shoes_style"] != "boots" else "sandals"),
                        ("others", "yes" if base["others"] == "none" else "none")]:
        changed, _ = render_person({**base, attr: value}, random.Random(0))
        diff = np.abs(np.asarray(changed, dtype=int) - np.asarray(ref, dtype=int)).sum(-1)
        assert (diff > 60).sum() >= 4, attr


def test_reader_and_cli(tmp_path, synth):
    ds = build_dataset("SynthPEDES", synth.parent)
    assert sorted(ds.train_id_container) == list(range(18))
    assert len(ds.train) == 18 * 4 * 2 and len(ds.test["img_paths"]) == 9 * 4
    assert main([str(tmp_path / "cli"), "--num-ids", "5", "--images-per-id", "1", "--seed", "2"]) == 0
    assert len(json.loads((tmp_path / "cli" / "reid_raw.json").read_text())) == 5
    with pytest.raises(ValueError, match="splits"):
        generate(tmp_path / "bad", num_ids=5, splits=(1, 0))


# ---------------------------------------------------------------------------- text
def test_question_attributes_follow_the_paper_order():
    assert len(QUESTION_ATTRIBUTES) == 15
    assert QUESTION_ATTRIBUTES[0] == ("gender",) and QUESTION_ATTRIBUTES[14] == ("others",)
    assert set(itertools.chain(*QUESTION_ATTRIBUTES)) == set(SCHEMA)
    assert QUESTION_ATTRIBUTES[9] == ("bag", "bag_color") and QUESTION_ATTRIBUTES[12] == ("action",)


def test_every_answer_sentence_round_trips():
    rng = random.Random(0)
    base = sample_image_attributes(sample_identity(rng), rng)
    checked = 0
    for q, attrs_asked in enumerate(QUESTION_ATTRIBUTES):
        for values in itertools.product(*(SCHEMA[a] for a in attrs_asked)):
            attrs = {**base, **dict(zip(attrs_asked, values))}
            if "bag" in attrs_asked and (attrs["bag"] == "none") != (attrs["bag_color"] == "none"):
                continue                                             # impossible combination
            sentence = answer_sentence(q, attrs)
            assert parse_caption(sentence) == dict(zip(attrs_asked, values)), sentence
            checked += 1
    assert checked > 300
    assert answer_sentence(6, {**base, "glasses": "none"}) == "No, the person does not wear glasses."
    assert answer_sentence(2, {**base, "upper_type": "jacket", "upper_color": "red", "sleeve": "long"}) == \
        "The person is wearing a red long-sleeved jacket."
    with pytest.raises(ValueError):
        answer_sentence(15, base)


def test_captions_round_trip_and_are_true():
    rng = random.Random(1)
    seen_details = Counter()
    for _ in range(1500):
        attrs = sample_image_attributes(sample_identity(rng), rng)
        for detail in ("full", "medium", "vague"):
            text, expressed = compose_caption(attrs, rng, detail)
            assert parse_caption(text) == expressed, text
            assert all(attrs[k] == v for k, v in expressed.items())
            seen_details[detail, min(len(expressed), 8)] += 1
    # Vague captions name two or three attributes, complete ones many.
    assert {n for d, n in seen_details if d == "vague"} == {2, 3}
    assert seen_details["full", 8] > 1400 and seen_details["medium", 8] > 300


def test_parser_ignores_order_case_and_punctuation():
    rng = random.Random(5)
    for _ in range(200):
        attrs = sample_image_attributes(sample_identity(rng), rng)
        sentences = [answer_sentence(q, attrs) for q in range(15)]
        expected = {k: attrs[k] for k in SCHEMA}
        rng.shuffle(sentences)
        assert parse_caption(" ".join(sentences)) == expected
        assert parse_caption(" ".join(sentences).upper()) == expected
        # No punctuation at all, no Yes/No prefixes (ICL strips them from MLLM answers).
        bare = " ".join(re.sub(r"^(Yes|No), ", "", s) for s in sentences)
        assert parse_caption(re.sub(r"[.,;:!?']", " ", bare)) == expected
        text, expressed = compose_caption(attrs, rng, "full")
        parts = re.split(r"(?<=\.) ", text)
        rng.shuffle(parts)
        assert parse_caption(" ".join(parts).lower()) == expressed


def test_parser_on_hand_written_text():
    assert parse_caption("A young woman with long blonde hair wears a pink striped sweater and a short "
                         "black skirt; she carries a brown handbag and holds no umbrella.") == {
        "gender": "female", "hair_length": "long", "hair_color": "blonde", "upper_type": "sweater",
        "upper_color": "pink", "pattern": "striped", "lower_type": "skirt", "lower_color": "black",
        "lower_length": "short", "bag": "handbag", "bag_color": "brown"}
    assert parse_caption("No glasses, no hat, nobody else around. Gray shoulder-bag.") == {
        "glasses": "none", "hat": "none", "others": "none", "bag": "shoulder bag", "bag_color": "gray"}
    assert parse_caption("") == {}
