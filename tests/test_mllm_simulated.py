"""The simulated MLLM on a SynthPEDES dataset: right at error rate 0, wrong at the configured
rate, deterministic per request, and its answers readable by our parsers."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from offline.synthpedes import QUESTION_ATTRIBUTES, parse_caption
from utils.mllm import MLLMError, Request, build_client
from utils.mllm.parsing import parse_lines, parse_vqa, parse_yes_no
from utils.mllm.prompts import aggr_prompt, dec_prompt, loc_prompt, rwt_prompt, vqa_prompt
from offline.simulated import NEUTRAL_ANSWER, SimulatedClient


@pytest.fixture(scope="module")
def synth(synth_root):
    """(dataset dir, records of reid_raw.json, {file_path: attrs})."""
    d = os.path.join(synth_root, "SynthPEDES")
    with open(os.path.join(d, "reid_raw.json")) as f:
        records = json.load(f)
    with open(os.path.join(d, "attributes.json")) as f:
        images = json.load(f)["images"]
    return d, records, images


def img(d, file_path):
    return os.path.join(d, "imgs", file_path)


def test_localization_correct_at_error_rate_zero(synth):
    d, records, images = synth
    client = build_client("simulated", attributes=d)
    by_pid: dict = {}
    for r in records:
        by_pid.setdefault(r["id"], []).append(r)
    reqs, expected = [], []
    for r in records[:60]:
        for cap in r["captions"]:
            said = parse_caption(cap)
            reqs.append(Request(loc_prompt(cap), image=img(d, r["file_path"])))
            expected.append(True)  # a caption always describes its own image
            # the next identity's first image: Yes only where every stated attribute agrees
            other = by_pid[r["id"] % len(by_pid) + 1][0]
            attrs = images[other["file_path"]]
            reqs.append(Request(loc_prompt(cap), image=img(d, other["file_path"])))
            expected.append(all(attrs[k] == v for k, v in said.items()))
    answers = [parse_yes_no(a) for a in client.generate(reqs)]
    assert answers == expected
    assert expected.count(False) > 30  # mismatching pairs are well represented
    assert client.stats["loc"] == len(reqs) and client.stats["flipped"] == 0
    # a caption whose attributes contradict the image
    fp, attrs = next(iter(images.items()))
    wrong = "female" if attrs["gender"] == "male" else "male"
    assert client.generate([Request(loc_prompt(f"The person is {wrong}."), image=img(d, fp))]) == ["No"]
    assert client.generate([Request(loc_prompt("Nothing to read here."), image=img(d, fp))]) == ["No"]


def test_vqa_answers_parse_back_to_the_image_attributes(synth):
    d, _, images = synth
    client = build_client("simulated", attributes=os.path.join(d, "attributes.json"))
    paths = sorted(images)
    answers = client.generate([Request(vqa_prompt(), image=img(d, fp)) for fp in paths])
    for fp, answer in zip(paths, answers):
        assert [ln.split(". ", 1)[0] for ln in answer.splitlines()] == [str(i) for i in range(1, 16)]
        subs = parse_vqa(answer)
        assert parse_caption(" ".join(subs)) == images[fp], fp
    assert client.stats["hallucinated"] == 0


def test_errors_at_the_configured_rate(synth):
    d, records, images = synth
    truth = build_client("simulated", attributes=d)
    noisy = build_client("simulated", attributes=d, error_rate=0.3, seed=7)
    reqs = [Request(loc_prompt(cap), image=img(d, other["file_path"]))
            for r, other in zip(records, records[5:] + records[:5]) for cap in r["captions"][:1]]
    reqs += [Request(loc_prompt(r["captions"][-1]), image=img(d, r["file_path"])) for r in records]
    assert len(reqs) == 320
    clean, flipped = truth.generate(reqs), noisy.generate(reqs)
    n_wrong = sum(a != b for a, b in zip(clean, flipped))
    assert n_wrong == noisy.stats["flipped"]
    # binomial(320, 0.3): sd 0.026; +-0.08 is about 3 sd (and the draw is fixed by the seed)
    assert abs(n_wrong / len(reqs) - 0.3) < 0.08

    paths = sorted(images)
    vqa = noisy.generate([Request(vqa_prompt(), image=img(d, fp)) for fp in paths])
    n_bad = 0
    for fp, answer in zip(paths, vqa):
        got = parse_caption(" ".join(parse_vqa(answer)))
        diff = {k for k in images[fp] if got.get(k) != images[fp][k]}
        assert len(diff) <= 2  # one hallucinated value (a bag also takes a colour)
        n_bad += bool(diff)
    assert n_bad == noisy.stats["hallucinated"]
    assert abs(n_bad / len(paths) - 0.3) < 0.12  # 160 images: sd 0.036
    assert noisy.identity() != truth.identity()
    assert noisy.identity_info()["error_rate"] == 0.3 and noisy.identity_info()["seed"] == 7


def test_answers_do_not_depend_on_batch_order_or_size(synth):
    d, records, _ = synth
    reqs = [Request(loc_prompt(r["captions"][0]), image=img(d, records[-1 - i]["file_path"]))
            for i, r in enumerate(records[:40])]
    a = build_client("simulated", attributes=d, error_rate=0.5, seed=3).generate(reqs)
    b = build_client("simulated", attributes=d, error_rate=0.5, seed=3).generate(reqs[::-1])[::-1]
    single = build_client("simulated", attributes=d, error_rate=0.5, seed=3)
    c = [single.generate([r])[0] for r in reqs]
    assert a == b == c
    other_seed = build_client("simulated", attributes=d, error_rate=0.5, seed=4).generate(reqs)
    assert other_seed != a


def test_aggregation_adds_new_facts_and_keeps_the_caption(synth):
    d, records, images = synth
    client = build_client("simulated", attributes=d)
    for r in records[:20]:
        attrs = images[r["file_path"]]
        caption = r["captions"][0]
        subs = parse_vqa(client.generate([Request(vqa_prompt(), image=img(d, r["file_path"]))])[0])
        out = client.generate([Request(aggr_prompt(caption, subs))])[0]
        assert out.startswith(caption.rstrip("."))
        assert parse_caption(out) == attrs  # caption + the image's answers = every attribute
        # sub-texts the caption already says are not repeated
        said = parse_caption(caption)
        redundant = [s for s in subs if set(parse_caption(s)) <= set(said)]
        assert all(s not in out[len(caption):] for s in redundant)
    # contradicting sub-texts lose against the caption
    out = client.generate([Request(aggr_prompt("A man in a red coat.",
                                               ["The person is wearing a blue coat.",
                                                "The person has short black hair."]))])[0]
    assert out == "A man in a red coat. He has short black hair."
    assert client.stats["aggr"] == 21


def test_aggregation_hallucinates_at_the_rate(synth):
    d, records, _ = synth
    noisy = build_client("simulated", attributes=d, error_rate=1.0)
    clean = build_client("simulated", attributes=d)
    reqs = [Request(aggr_prompt(r["captions"][0], ["The person is running."])) for r in records[:30]]
    for a, b in zip(clean.generate(reqs), noisy.generate(reqs)):
        assert parse_caption(a) != parse_caption(b)
    assert noisy.stats["hallucinated"] == 30


@pytest.mark.parametrize("style", ["lines", "numbered", "chatty"])
def test_decomposition_and_rewriting(synth, style):
    d, records, _ = synth
    client = build_client("simulated", attributes=d, rewrites_style=style)
    for r in records[:25]:
        caption = r["captions"][0]
        lines = parse_lines(client.generate([Request(dec_prompt(caption))])[0])
        merged: dict = {}
        for line in lines:
            said = parse_caption(line)
            assert said, line
            assert all(merged.get(k, v) == v for k, v in said.items())
            merged.update(said)
        assert merged == parse_caption(caption)
        # one attribute group per line (gendered subjects like "The man" aside)
        for line in lines:
            keys = set(parse_caption(line)) - {"gender"}
            assert keys == set() or any(keys <= set(g) for g in QUESTION_ATTRIBUTES), line
        for line in lines[:3]:
            rewrites = parse_lines(client.generate([Request(rwt_prompt(line, 4))])[0])
            assert len(rewrites) == 4 and len({x.lower() for x in rewrites}) == 4
            assert line not in rewrites
            assert all(parse_caption(x) == parse_caption(line) for x in rewrites), rewrites
    big = parse_lines(client.generate([Request(rwt_prompt("The person is walking.", 12))])[0])
    assert len(big) == 12 and all(parse_caption(x) == {"action": "walking"} for x in big)


def test_unrecognised_prompt_and_bad_inputs(synth, tmp_path):
    d, _, images = synth
    client = build_client("simulated", attributes=d)
    assert client.generate([Request("Tell me a joke.")]) == [NEUTRAL_ANSWER]
    assert client.stats["unrecognised"] == 1
    with pytest.raises(MLLMError, match="nope.png"):
        client.generate([Request(vqa_prompt(), image=os.path.join(d, "imgs", "nope.png"))])
    pil = Image.new("RGB", (8, 8))
    with pytest.raises(MLLMError, match="path"):
        client.generate([Request(loc_prompt("A man."), image=pil)])
    with pytest.raises(MLLMError, match="needs an image"):
        client.generate([Request(loc_prompt("A man."))])
    with pytest.raises(MLLMError, match="attributes"):
        SimulatedClient(tmp_path / "missing")
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedClient(d, error_rate=1.5)


def test_attribute_table_answers_like_its_file(synth):
    """The client takes the attribute table itself (what the system hands it, no dataset module):
    same answers as from the sidecar file, images matched by their path under imgs/."""
    d, records, images = synth
    with open(os.path.join(d, "attributes.json")) as f:
        table = json.load(f)
    from_file = build_client("simulated", attributes=d)
    from_table = build_client("simulated", attributes=table)
    with_dir = build_client("simulated", attributes=table, images_dir=os.path.join(d, "imgs"))
    reqs = []
    for r in records[:8]:
        reqs += [Request(loc_prompt(r["captions"][0]), image=img(d, records[-1]["file_path"])),
                 Request(loc_prompt(r["captions"][0]), image=img(d, r["file_path"])),
                 Request(vqa_prompt(), image=img(d, r["file_path"]))]
    expected = from_file.generate(reqs)
    assert from_table.generate(reqs) == expected == with_dir.generate(reqs)
    assert from_table.identity_info()["attributes_digest"] == with_dir.identity_info()["attributes_digest"]
    fp = records[0]["file_path"]
    other = dict(table, images={fp: dict(images[fp], gender="female" if images[fp]["gender"] == "male" else "male")})
    said = build_client("simulated", attributes=other).generate([Request(vqa_prompt(), image=img(d, fp))])
    assert said != from_file.generate([Request(vqa_prompt(), image=img(d, fp))])
    with pytest.raises(MLLMError, match="attributes version"):
        SimulatedClient(dict(table, version=99))


def test_same_dataset_copied_elsewhere_and_cache_rerun(synth, tmp_path):
    d, records, images = synth
    fp = records[0]["file_path"]
    # an image path from a copy of the dataset still resolves by its path under imgs/
    copy = tmp_path / "copy" / "imgs" / fp
    copy.parent.mkdir(parents=True)
    copy.write_bytes(open(img(d, fp), "rb").read())
    client = build_client("simulated", attributes=d, cache_dir=tmp_path / "cache")
    reqs = [Request(loc_prompt(records[0]["captions"][0]), image=str(copy)),
            Request(vqa_prompt(), image=img(d, fp))]
    first = client.generate(reqs)
    assert first[0] == "Yes"
    again = build_client("simulated", attributes=d, cache_dir=tmp_path / "cache")
    assert again.generate(reqs) == first and again.stats["calls"] == 0


def _loc_pairs(d, records, images, n=200):
    """(requests, teacher says Yes) over caption x other-image pairs, half of them matching."""
    reqs, truth = [], []
    for i, r in enumerate(records[:n]):
        cap = r["captions"][0]
        reqs.append(Request(loc_prompt(cap), image=img(d, r["file_path"])))
        truth.append(True)
        other = records[(i * 7 + 3) % len(records)]
        said = parse_caption(cap)
        reqs.append(Request(loc_prompt(cap), image=img(d, other["file_path"])))
        truth.append(all(images[other["file_path"]].get(k) == v for k, v in said.items()))
    return reqs, truth


def test_error_profile_answers_at_the_measured_rates_deterministically(synth):
    from offline.simulated import PROFILES

    d, records, images = synth
    reqs, truth = _loc_pairs(d, records, images, n=len(records))
    p = PROFILES["tiny-qwen2vl"]
    a = [parse_yes_no(x) for x in build_client("simulated", attributes=d, profile="tiny-qwen2vl").generate(reqs)]
    b = [parse_yes_no(x) for x in build_client("simulated", attributes=d, profile="tiny-qwen2vl").generate(reqs[::-1])][::-1]
    assert a == b  # deterministic given the seed, whatever the order
    yes_true = sum(x for x, t in zip(a, truth) if t) / truth.count(True)
    yes_false = sum(x for x, t in zip(a, truth) if not t) / truth.count(False)
    assert truth.count(False) > 50
    assert abs(yes_true - p["loc_yes_true"]) < 0.08 and abs(yes_false - p["loc_yes_false"]) < 0.08
    other_seed = [parse_yes_no(x) for x in build_client("simulated", attributes=d, profile="tiny-qwen2vl",
                                                       seed=1).generate(reqs)]
    assert other_seed != a
    oracle = [parse_yes_no(x) for x in build_client("simulated", attributes=d, profile="oracle").generate(reqs)]
    assert oracle == truth
    never = build_client("simulated", attributes=d, profile="untuned-tiny-qwen2vl").generate(reqs)
    assert set(never) == {"No"}
    # VQA and aggregation rates of a profile: all wrong at accuracy 0, all right at 1
    vqa = [Request(vqa_prompt(), image=img(d, r["file_path"])) for r in records[:20]]
    bad = build_client("simulated", attributes=d, profile="loc_yes_true=1,loc_yes_false=0,"
                       "vqa_accuracy=0,aggr_faithful=1")
    good = build_client("simulated", attributes=d, profile="oracle")
    assert all(x != y for x, y in zip(bad.generate(vqa), good.generate(vqa)))
    with pytest.raises(ValueError, match="unknown MLLM error profile"):
        build_client("simulated", attributes=d, profile="tiny")
    with pytest.raises(ValueError, match="not both"):
        build_client("simulated", attributes=d, profile="oracle", error_rate=0.1)


def test_concise_aggregation_stays_within_the_text_length(synth):
    from utils.tokenizer import get_tokenizer

    d, records, _ = synth
    tok = get_tokenizer()
    keep = build_client("simulated", attributes=d)
    concise = build_client("simulated", attributes=d, aggregation="concise", text_length=77)
    longer = 0
    for r in records[:20]:
        caption = r["captions"][0]
        subs = parse_vqa(keep.generate([Request(vqa_prompt(), image=img(d, r["file_path"]))])[0])
        k = keep.generate([Request(aggr_prompt(caption, subs))])[0]
        c = concise.generate([Request(aggr_prompt(caption, subs))])[0]
        assert len(tok.encode(c)) + 2 <= 77 and c.startswith(caption.rstrip("."))
        # what it keeps is a prefix of the whole sentences the keep mode adds
        assert k.startswith(c.rstrip(".")) or set(parse_caption(c).items()) <= set(parse_caption(k).items())
        longer += len(tok.encode(k)) + 2 > 77
    assert longer > 10  # the keep mode is cut at 77 tokens for most captions
