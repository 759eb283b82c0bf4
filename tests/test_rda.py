"""RDA generation (rda.generate) with the simulated MLLM on a small SynthPEDES: the output's
structure, one VQA call per distinct image, kill-and-resume without repeated calls, the
training reader reading the file back, --limit, the filters and the CLI."""
from __future__ import annotations

import copy
import json
import os

import pytest

from rda import generate_rda, run_rda
from rda.filters import FilterCounts, clean_pieces, is_uninformative, normalize
from rda.generate import default_paths
from utils.mllm import build_client

M = 3  # rewrites per sub-sentence


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small SynthPEDES (10 identities x 3 images x 2 captions) and its annotation records."""
    from offline.synthpedes import generate

    root = tmp_path_factory.mktemp("rda-data")
    generate(root / "SynthPEDES", num_ids=10, images_per_id=3, seed=1)
    ds_dir = root / "SynthPEDES"
    with open(ds_dir / "reid_raw.json") as f:
        records = json.load(f)
    return {"root": str(root), "dir": str(ds_dir), "imgs": str(ds_dir / "imgs"),
            "records": records}


class Recorder:
    """Wraps a client: counts the requests it forwards, and raises on generate call number
    ``fail_on`` (1-based) before forwarding anything, like a process killed mid-stage."""

    def __init__(self, inner, fail_on: "int | None" = None):
        self.inner, self.fail_on = inner, fail_on
        self.calls, self.image_requests, self.text_requests = 0, 0, 0

    def identity(self) -> str:
        return self.inner.identity()

    def generate(self, requests, temperature=0.01, max_tokens=512):
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise KeyboardInterrupt(f"killed at generate call {self.calls}")
        self.image_requests += sum(r.image is not None for r in requests)
        self.text_requests += sum(r.image is None for r in requests)
        return self.inner.generate(requests, temperature=temperature, max_tokens=max_tokens)

    @property
    def requests(self) -> int:
        return self.image_requests + self.text_requests


def simulated(synth, cache_dir=None):
    return build_client("simulated", attributes=synth["dir"], error_rate=0.0, seed=0,
                        cache_dir=cache_dir)


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    """One uninterrupted run, written to a file, with its request counts."""
    out = tmp_path_factory.mktemp("rda-ref") / "reid_raw.rda.json"
    client = Recorder(simulated(synth))
    records, summary = run_rda(synth["records"], client, image_root=synth["imgs"], rewrites=M,
                               out_path=out, chunk_size=16, progress=False)
    return {"out": str(out), "records": records, "summary": summary, "client": client}


def test_output_structure(synth, reference):
    records = reference["records"]
    with open(reference["out"]) as f:
        assert json.load(f) == records  # the file holds exactly what was returned
    assert len(records) == len(synth["records"])
    n_sub, n_rw = 0, 0
    for orig, rec in zip(synth["records"], records):
        if orig["split"] != "train":
            assert rec == orig  # other splits pass through unchanged
            continue
        assert {k: v for k, v in rec.items() if k != "diversity_captions"} == orig
        dc = rec["diversity_captions"]
        assert isinstance(dc, list) and len(dc) == len(rec["captions"])
        for subs in dc:
            assert isinstance(subs, list) and len(subs) >= 1
            keys = [normalize(g[0]) for g in subs]
            assert len(keys) == len(set(keys))  # no duplicated sub-sentences
            for group in subs:
                assert isinstance(group, list) and all(isinstance(s, str) and s.strip() for s in group)
                assert 1 <= len(group) <= 1 + M  # the sub-sentence, then at most m rewrites
                norms = [normalize(s) for s in group]
                assert len(norms) == len(set(norms))  # rewrites distinct from it and each other
                assert not any(is_uninformative(s) for s in group)
                n_sub += 1
                n_rw += len(group) - 1
    s = reference["summary"]
    assert s["pairs"] == sum(len(r["captions"]) for r in synth["records"] if r["split"] == "train")
    assert s["sub_sentences_per_caption"]["mean"] > 2  # the simulated MLLM decomposes for real
    assert s["rewrites_kept"]["total"] > 0
    assert s["rewrites_kept"]["per_sub_sentence"]["max"] <= M
    assert s["parse_failures"] == {"vqa": 0, "aggr": 0, "dec": 0, "rwt": 0}
    assert set(s["filtered"]) == {"vqa", "dec", "rwt"}
    with open(default_paths(reference["out"])[1]) as f:
        assert json.load(f) == s  # the summary file next to the output
    assert n_sub > 0 and n_rw > 0


def test_vqa_once_per_distinct_image(synth, reference):
    train = [r for r in synth["records"] if r["split"] == "train"]
    images = {r["file_path"] for r in train}
    pairs = sum(len(r["captions"]) for r in train)
    client = reference["client"]
    assert client.image_requests == len(images) == reference["summary"]["requests"]["vqa"]
    assert client.image_requests * 2 == pairs  # SynthPEDES: two captions per image
    assert client.inner.stats["vqa"] == len(images)
    # aggregation is per pair
    assert reference["summary"]["requests"]["aggr"] == pairs


@pytest.mark.parametrize("fail_on", [2, 5, 9])  # killed during VQA, aggregation, rewriting
def test_kill_and_resume_repeats_no_call(synth, reference, tmp_path, fail_on):
    out = tmp_path / "reid_raw.rda.json"
    killed = Recorder(simulated(synth), fail_on=fail_on)
    with pytest.raises(KeyboardInterrupt):
        generate_rda(synth["records"], killed, image_root=synth["imgs"], rewrites=M,
                     out_path=out, chunk_size=16, progress=False)
    assert not out.exists()  # no partial output file
    assert killed.requests > 0  # some chunks finished before the kill
    resumed = Recorder(simulated(synth))  # a fresh client, no response cache: the state resumes
    records = generate_rda(synth["records"], resumed, image_root=synth["imgs"], rewrites=M,
                           out_path=out, chunk_size=16, progress=False)
    assert records == reference["records"]
    with open(out) as f:
        assert json.load(f) == reference["records"]
    assert killed.requests + resumed.requests == reference["client"].requests
    # a third run has nothing left to ask
    again = Recorder(simulated(synth))
    assert generate_rda(synth["records"], again, image_root=synth["imgs"], rewrites=M,
                        out_path=out, chunk_size=16, progress=False) == records
    assert again.calls == 0


def test_torn_state_line_is_dropped(synth, reference, tmp_path):
    out = tmp_path / "reid_raw.rda.json"
    with pytest.raises(KeyboardInterrupt):
        generate_rda(synth["records"], Recorder(simulated(synth), fail_on=3),
                     image_root=synth["imgs"], rewrites=M, out_path=out, chunk_size=16,
                     progress=False)
    log = os.path.join(default_paths(str(out))[0], "vqa.jsonl")
    with open(log) as f:
        complete = f.read().count("\n")
    with open(log, "a") as f:
        f.write('{"k": "p0001/0001_00.png", "v": "1. Half a li')  # killed mid-write
    client = Recorder(simulated(synth))
    assert generate_rda(synth["records"], client, image_root=synth["imgs"], rewrites=M,
                        out_path=out, chunk_size=16, progress=False) == reference["records"]
    with open(log) as f:
        lines = f.read().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone, the file is clean
    assert client.image_requests == reference["client"].image_requests - complete


def test_response_cache_also_prevents_repeated_calls(synth, reference, tmp_path):
    cache = str(tmp_path / "cache")
    first = simulated(synth, cache_dir=cache)
    generate_rda(synth["records"], first, image_root=synth["imgs"], rewrites=M,
                 out_path=tmp_path / "a.json", progress=False)
    second = simulated(synth, cache_dir=cache)  # another output (no state), the same cache
    records = generate_rda(synth["records"], second, image_root=synth["imgs"], rewrites=M,
                           out_path=tmp_path / "b.json", progress=False)
    assert records == reference["records"]
    assert second.stats["cache_misses"] == 0 and second.stats["calls"] == 0
    assert second.stats["cache_hits"] == reference["client"].requests


def test_state_from_other_settings_is_refused(synth, tmp_path):
    out = tmp_path / "x.json"
    generate_rda(synth["records"], simulated(synth), image_root=synth["imgs"], out_path=out,
                 limit=2, progress=False)
    with pytest.raises(ValueError, match=r"x\.state.*temperature"):
        generate_rda(synth["records"], simulated(synth), image_root=synth["imgs"], out_path=out,
                     limit=2, temperature=0.7, progress=False)


def test_training_reader_reads_the_rda_file(synth, reference):
    from datasets import build_dataset
    from datasets.bases import draw_rda_caption

    plain = build_dataset("SynthPEDES", synth["root"])
    ds = build_dataset("SynthPEDES", synth["root"], anno_file=reference["out"])
    assert plain.train_rda is None
    assert ds.train == plain.train
    assert ds.train_rda is not None and len(ds.train_rda) == len(ds.train)
    expected = [dc for r in reference["records"] if r["split"] == "train"
                for dc in r["diversity_captions"]]
    assert ds.train_rda == expected  # aligned caption by caption
    assert ds.test == plain.test
    import random
    text = draw_rda_caption(ds.train_rda[0], random.Random(0))
    assert isinstance(text, str) and text
    pieces = {s for group in ds.train_rda[0] for s in group}
    assert any(s in text for s in pieces)


def test_limit_augments_the_first_pairs_only(synth, tmp_path):
    client = Recorder(simulated(synth))
    records, summary = run_rda(synth["records"], client, image_root=synth["imgs"], rewrites=M,
                               out_path=tmp_path / "lim.json", limit=5, progress=False)
    train_idx = [i for i, r in enumerate(synth["records"]) if r["split"] == "train"]
    done = [i for i in train_idx if "diversity_captions" in records[i]]
    assert done == train_idx[:3]  # 5 pairs -> 3 whole images of 2 captions
    assert summary["pairs"] == 6 and summary["records_augmented"] == 3
    assert client.image_requests == 3
    assert all(records[i] == synth["records"][i] for i in range(len(records)) if i not in done)


def test_filters():
    counts = FilterCounts()
    kept = clean_pieces(["  the man wears a red coat  ", "", "The man wears a red coat.",
                         "His shoes are not clearly visible.", "Hat colour cannot be determined",
                         "Yes", "She carries a black bag"], counts, min_words=3)
    assert kept == ["The man wears a red coat.", "She carries a black bag."]
    assert counts.as_dict() == {"kept": 2, "empty": 1, "duplicate": 1, "not_visible": 2,
                                "too_short": 1, "gibberish": 0}
    assert clean_pieces(["A red coat.", "a red  coat"], FilterCounts(), exclude=("A red coat",)) == []


def test_parse_failures_fall_back_and_are_counted(synth, tmp_path):
    """A model that answers nothing usable: every caption still gets one sub-sentence (its
    aggregated text falls back to the caption) and the summary counts the failures."""
    class Mute:
        def identity(self):
            return "mute"

        def generate(self, requests, temperature=0.01, max_tokens=512):
            return ["" for _ in requests]

    records, summary = run_rda(copy.deepcopy(synth["records"]), Mute(), image_root=synth["imgs"],
                               limit=4, progress=False)
    aug = [r for r in records if "diversity_captions" in r]
    assert len(aug) == 2
    for r in aug:
        for caption, dc in zip(r["captions"], r["diversity_captions"]):
            # the caption's own sentences (the fallback decomposition), in order
            assert normalize(" ".join(g[0] for g in dc)) == normalize(caption)
            assert all(len(g) == 1 for g in dc)  # no rewrites survived
    assert summary["parse_failures"]["vqa"] == 2 and summary["parse_failures"]["aggr"] == 4
    assert summary["rewrites_kept"]["total"] == 0


def test_cli_generate(synth, tmp_path):
    import shutil

    from rda.cli import main

    root = tmp_path / "data"
    shutil.copytree(synth["dir"], root / "SynthPEDES")
    assert main(["generate", "--dataset", "SynthPEDES", "--root", str(root), "--backend",
                 "simulated", "--limit", "4", "--no-progress"]) == 0
    out = root / "SynthPEDES" / "reid_raw.rda.json"  # default: beside the annotation file
    with open(out) as f:
        records = json.load(f)
    assert sum("diversity_captions" in r for r in records) == 2
    assert (root / "SynthPEDES" / "reid_raw.rda.summary.json").exists()
    assert (root / "SynthPEDES" / "reid_raw.rda.state" / "mllm_cache").exists()


def test_cli_refuses_changed_settings_as_one_message(synth, tmp_path, capsys):
    """Issue 28 #12: resuming with another temperature is one message and exit 2, no traceback."""
    import shutil

    from rda.cli import main

    root = tmp_path / "data"
    shutil.copytree(synth["dir"], root / "SynthPEDES")
    argv = ["generate", "--dataset", "SynthPEDES", "--root", str(root), "--backend", "simulated",
            "--limit", "2", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m rda: error: ") and "Traceback" not in err
    assert "temperature" in err and "reid_raw.rda.state" in err


GIBBERISH = ["xq zvbn wkrt plmq\nfjdk slq trw", "ĠĠ<|image_pad|>Ċ!!?? ## ĊĊ",
             "Lorem ipsum dolor sit amet consectetur adipiscing",
             "1. qwx brrk\n2. zzkt vbn\n3. prrt sklm vvx"]


def _gibberish_client(cache_dir=None):
    from utils.mllm import BaseClient

    class Gibberish(BaseClient):
        backend = "gibberish"

        def identity_info(self):
            return {"backend": self.backend}

        def _generate(self, requests, temperature, max_tokens):
            return [GIBBERISH[(len(r.text) + i) % len(GIBBERISH)] for i, r in enumerate(requests)]

    return Gibberish(cache_dir=cache_dir)


def test_gibberish_never_becomes_diversity_captions(synth, tmp_path):
    """Before: against a server answering gibberish, every diversity_captions entry was the
    gibberish and parse_failures were all 0."""
    records, summary = run_rda(copy.deepcopy(synth["records"]), _gibberish_client(tmp_path / "c"),
                               image_root=synth["imgs"], limit=4, progress=False,
                               out_path=str(tmp_path / "rda.json"))
    aug = [r for r in records if "diversity_captions" in r]
    assert len(aug) == 2
    for r in aug:
        for caption, dc in zip(r["captions"], r["diversity_captions"]):
            assert normalize(" ".join(g[0] for g in dc)) == normalize(caption)
            assert all(len(g) == 1 for g in dc)
    n_sentences = sum(len(dc) for r in aug for dc in r["diversity_captions"])
    assert summary["parse_failures"] == {"vqa": 2, "aggr": 4, "dec": 4, "rwt": n_sentences}
    assert len(summary["warnings"]) == 4
    assert all(w.startswith("MOSTLY UNUSABLE") for w in summary["warnings"])
    saved = json.load(open(tmp_path / "rda.summary.json"))
    assert saved["warnings"] == summary["warnings"]
    # Gibberish pieces inside otherwise fine answers are dropped and counted.
    counts = FilterCounts()
    assert clean_pieces(["The man wears a red coat.", "Lorem ipsum dolor sit amet.",
                         "xq zvbn wkrt", "Female."], counts, min_words=1) == [
        "The man wears a red coat.", "Female."]
    assert counts.gibberish == 2
    # The simulated MLLM's real answers: nothing is gibberish, nothing fails.
    _, clean = run_rda(copy.deepcopy(synth["records"]), simulated(synth), image_root=synth["imgs"],
                       limit=4, progress=False)
    assert all(v["gibberish"] == 0 for v in clean["filtered"].values())
    assert sum(clean["parse_failures"].values()) == 0 and clean["warnings"] == []


def test_unusable_answers_are_not_kept_and_asked_again(synth, tmp_path):
    """Before: empty answers were logged as answers; after the server was fixed, the rerun sent
    0 requests and kept the fallback captions."""
    from offline.simulated import SimulatedClient

    class Flaky(SimulatedClient):
        broken = True

        def _generate(self, requests, temperature, max_tokens):
            out = super()._generate(requests, temperature, max_tokens)
            return ["" for _ in out] if Flaky.broken else out

    out = str(tmp_path / "rda.json")
    cache = str(tmp_path / "cache")
    _, first = run_rda(copy.deepcopy(synth["records"]), Flaky(synth["dir"], cache_dir=cache),
                       image_root=synth["imgs"], limit=4, progress=False, out_path=out)
    assert first["parse_failures"]["vqa"] == 2 and first["warnings"]
    Flaky.broken = False
    records, second = run_rda(copy.deepcopy(synth["records"]), Flaky(synth["dir"], cache_dir=cache),
                              image_root=synth["imgs"], limit=4, progress=False, out_path=out)
    assert second["requests_this_run"]["vqa"] == 2 and second["requests_this_run"]["aggr"] == 4
    assert sum(second["parse_failures"].values()) == 0 and not second["warnings"]
    reference = generate_rda(copy.deepcopy(synth["records"]), simulated(synth),
                             image_root=synth["imgs"], limit=4, progress=False)
    assert records == reference


def test_cli_client_options(tmp_path, capsys):
    import logging

    from rda.cli import build_parser, client_options, main

    def opts(*argv):
        args = build_parser().parse_args(["generate", "--dataset", "SynthPEDES", "--root", "R",
                                          *argv])
        return client_options(args, "D", "C")

    o = opts("--backend", "openai", "--base-url", "http://h/v1", "--served-model", "icl",
             "--concurrency", "3", "--micro-batch", "5", "--no-retry-unusable")
    assert o == {"base_url": "http://h/v1", "model": "icl", "concurrency": 3, "cache_dir": "C",
                 "max_batch": 5, "retry_unusable": False}
    assert opts("--backend", "vllm", "--model", "M")["dtype"] == "float32"  # no CUDA GPU here
    assert opts("--backend", "vllm", "--model", "M", "--dtype", "bfloat16")["dtype"] == "bfloat16"
    with pytest.raises(SystemExit, match="--concurrency"):
        opts("--backend", "openai", "--base-url", "u", "--served-model", "m", "--concurrency", "0")
    # every HTTP request of the openai SDK is not an INFO line
    # logging is set up first; the missing annotation file is one message, exit status 2
    assert main(["generate", "--dataset", "SynthPEDES", "--root", str(tmp_path), "--backend", "openai"]) == 2
    assert "python -m rda: error: SynthPEDES: annotation file" in capsys.readouterr().err
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


def test_changed_images_are_asked_again(synth, tmp_path):
    """Issue 28 #4. Before: VQA answers were keyed by the image's path, so after every training
    image changed a rerun sent 0 VQA requests and reused answers about the old pixels. Now they
    are keyed by the image's content digest (the MLLM cache's identity)."""
    import shutil

    from PIL import Image

    imgs = tmp_path / "imgs"
    shutil.copytree(synth["imgs"], imgs)
    out, cache = tmp_path / "rda.json", str(tmp_path / "cache")
    _, first = run_rda(synth["records"], simulated(synth, cache), image_root=str(imgs), limit=6,
                       out_path=out, progress=False)
    n_images = first["images"]
    assert first["requests_this_run"]["vqa"] == n_images == 3
    _, same = run_rda(synth["records"], simulated(synth, cache), image_root=str(imgs), limit=6,
                      out_path=out, progress=False)
    assert same["requests_this_run"] == {"vqa": 0, "aggr": 0, "dec": 0, "rwt": 0}
    used = {r["file_path"] for r in synth["records"] if r["split"] == "train"}
    for rel in used:  # every training image's pixels change, its path stays
        path = imgs / rel
        with Image.open(path) as im:
            flipped = im.convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        flipped.save(path)
    client = simulated(synth, cache)
    _, again = run_rda(synth["records"], client, image_root=str(imgs), limit=6, out_path=out,
                       progress=False)
    assert again["requests_this_run"]["vqa"] == n_images
    # the MLLM cache keys images by content too: the new pixels are really asked
    assert client.stats["cache_misses"] >= n_images
    assert again["requests_this_run"]["aggr"] == first["requests_this_run"]["aggr"]
