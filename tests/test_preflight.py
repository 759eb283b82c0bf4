"""``python -m repro preflight``: every input of the asked tables checked on fixtures: a complete
set passes; each input missing, and each input wrong, fails with a row naming the fix; the
shapes users often have instead (CUHK-PEDES with only caption_all.json, images in another
subfolder) are named."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fullsize_data import write_benchmark, write_rda_file
from repro import preflight as pf

GiB = 2 ** 30
RTX3090 = ("NVIDIA GeForce RTX 3090", 24 * GiB)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_path):
    """A complete real-world input set for `table1 rde_noise` on CUHK-PEDES (small stand-ins whose
    identities the test declares: sizes, sha256s and CLIP shapes are patched per test)."""
    from offline.synthpedes import generate

    base = tmp_path_factory.mktemp("preflight")
    synth = generate(base / "synth" / "SynthPEDES", num_ids=8, images_per_id=1, captions_per_image=2,
                     splits=(0.5, 0.25, 0.25), seed=1)
    bench = write_benchmark(base / "data", "CUHK-PEDES", synth)
    rda = write_rda_file(bench, base / "cuhk.rda.json")
    clip = base / "pretrained" / "ViT-B-16.pt"
    clip.parent.mkdir()
    clip.write_bytes(b"openai clip stand-in")
    noise = base / "noiseindex"
    noise.mkdir()
    for rate in (0.2, 0.5, 0.8):
        (noise / f"CUHK-PEDES_{rate}.npy").write_bytes(f"noise {rate}".encode())
    pre = base / "pre"
    pre.mkdir()
    sd = torch.load(tiny_clip_path, weights_only=True)
    torch.save({"model": {f"module.base_model.{k}": v for k, v in sd.items()}}, pre / "best0.pth")
    mllm = base / "Qwen2-VL-7B-Instruct"
    mllm.mkdir()
    (mllm / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (mllm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for s in shards:
        (mllm / s).write_bytes(b"")
    lora = base / "icl_lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({
        "r": 8, "lora_alpha": 16, "base_model_name_or_path": "/models/Qwen2-VL-7B-Instruct",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return {"base": base, "bench": bench, "rda": rda, "clip": str(clip), "noise": str(noise), "pre": str(pre),
            "mllm": str(mllm), "lora": str(lora), "tiny_sd": sd}


@pytest.fixture
def patched(world, monkeypatch):
    """Declare the stand-ins the right files: their sizes, hashes and CLIP shapes."""
    from datasets import noise

    recs = world["bench"]["records"]
    sizes = {}
    for split in ("train", "val", "test"):
        part = [r for r in recs if r["split"] == split]
        sizes[split] = (len({r["id"] for r in part}), len(part), sum(len(r["captions"]) for r in part))
    monkeypatch.setitem(pf.PUBLISHED, "CUHK-PEDES", sizes)
    monkeypatch.setattr(pf, "CLIP_SHA256", pf.sha256(world["clip"]))
    for rate in (0.2, 0.5, 0.8):
        name = f"CUHK-PEDES_{rate}.npy"
        monkeypatch.setitem(noise.RELEASE_NOISE_SHA256, name, pf.sha256(os.path.join(world["noise"], name)))
    sd = world["tiny_sd"]
    monkeypatch.setattr(pf, "VIT_B16_SHAPES", {f"base_model.{k}": tuple(sd[k].shape) for k in
                                               ("visual.conv1.weight", "token_embedding.weight", "text_projection")})
    monkeypatch.setattr(pf, "vllm_importable", lambda: True)
    return world


def _argv(w, *extra, rda=True):
    """The issue's form: ``--world real`` and the path options, then the tables."""
    return ["--world", "real", "--datasets", "CUHK-PEDES", "--root", str(w["base"] / "data"),
            "--clip", w["clip"], "--noise-dir", w["noise"], "--pre-checkpoint", w["pre"], "--mllm", w["mllm"],
            "--lora", w["lora"], "--gpus", "2", *(["--rda-file", f"CUHK-PEDES={w['rda']}"] if rda else []), *extra,
            "table1", "rde_noise"]


def _run(w, monkeypatch, capsys, *extra, gpus=(RTX3090, RTX3090), rda=True):
    monkeypatch.setattr(pf, "cuda_gpus", lambda: list(gpus))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = pf.main(_argv(w, *extra, rda=rda))
    return code, capsys.readouterr().out


def _rows(w, monkeypatch, gpus=(RTX3090, RTX3090), **kw):
    from repro.cli import build_parser

    argv = _argv(w)[:-2]
    args = build_parser().parse_args(["all", *[a for a in argv if a not in ("--clip", w["clip"])]])
    args.clip = w["clip"]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {r.input: r for r in pf.run_preflight(args, ["table1", "rde_noise"], probe_gpus=lambda: list(gpus), **kw)}


def test_complete_inputs_pass(patched, monkeypatch, capsys):
    code, out = _run(patched, monkeypatch, capsys)
    assert code == 0, out
    assert "every needed input is present" in out
    rows = _rows(patched, monkeypatch)
    for name in ("CUHK-PEDES annotation", "CUHK-PEDES train split", "CUHK-PEDES test split", "CUHK-PEDES images",
                 "CLIP ViT-B/16", "noise CUHK-PEDES_0.5.npy", "+pre checkpoint CUHK-PEDES", "RDA file CUHK-PEDES",
                 "MLLM Qwen2-VL-7B-Instruct", "vLLM", "ICL LoRA adapter", "GPUs",
                 "memory plan rde_cuhk_pedes.yaml", "memory plan icl_cuhk_pedes.yaml"):
        assert rows[name].status == "ok", (name, rows[name])


def _break(w, what: str, how: str):
    """Make input ``what`` missing or wrong in a copy of the fixture; returns the copy."""
    src = w["base"]
    dst = src.parent / f"{src.name}_{what}_{how}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    c = {k: (v.replace(str(src), str(dst)) if isinstance(v, str) else v) for k, v in w.items()}
    c["base"] = dst
    cuhk = dst / "data" / "CUHK-PEDES"
    if what == "annotation":
        if how == "missing":
            os.remove(cuhk / "reid_raw.json")
        else:                                   # a record dropped: the split sizes differ
            recs = json.loads((cuhk / "reid_raw.json").read_text())
            (cuhk / "reid_raw.json").write_text(json.dumps([r for r in recs if r["split"] != "test"][1:]
                                                           + [r for r in recs if r["split"] == "test"]))
    elif what == "images":
        victim = next(p for p in (cuhk / "imgs").rglob("*") if p.is_file())
        os.remove(victim) if how == "missing" else victim.write_bytes(b"")
    elif what == "clip":
        os.remove(c["clip"]) if how == "missing" else open(c["clip"], "ab").write(b"x")
    elif what == "noise":
        p = os.path.join(c["noise"], "CUHK-PEDES_0.5.npy")
        os.remove(p) if how == "missing" else open(p, "ab").write(b"x")
    elif what == "pre":
        p = os.path.join(c["pre"], "best0.pth")
        if how == "missing":
            os.remove(p)
        else:
            torch.save({"model": {"base_model.visual.conv1.weight": torch.zeros(3, 3)}}, p)
    elif what == "rda":
        if how == "missing":
            os.remove(c["rda"])
        else:
            recs = json.loads(open(c["rda"]).read())
            first = next(r for r in recs if r["split"] == "train")
            del first["diversity_captions"]
            open(c["rda"], "w").write(json.dumps(recs))
    elif what == "mllm":
        if how == "missing":
            os.remove(os.path.join(c["mllm"], "model-00002-of-00002.safetensors"))
        else:
            open(os.path.join(c["mllm"], "config.json"), "w").write(
                json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    elif what == "lora":
        p = os.path.join(c["lora"], "adapter_config.json")
        if how == "missing":
            os.remove(p)
        else:
            cfg = json.loads(open(p).read())
            cfg["r"] = 16
            open(p, "w").write(json.dumps(cfg))
    return c


ROW = {"annotation": "CUHK-PEDES annotation", "images": "CUHK-PEDES images", "clip": "CLIP ViT-B/16",
       "noise": "noise CUHK-PEDES_0.5.npy", "pre": "+pre checkpoint CUHK-PEDES", "rda": "RDA file CUHK-PEDES",
       "mllm": "MLLM Qwen2-VL-7B-Instruct", "lora": "ICL LoRA adapter"}
FIX = {"annotation": "reid_raw.json", "images": "imgs", "clip": "openaipublic.azureedge.net", "noise": "RDE",
       "pre": "best0/1/2.pth", "rda": "RDA_data.zip", "mllm": "Qwen2-VL-7B-Instruct", "lora": "Yangsss/ICL"}


# A corrupt image (rather than a missing one) is the dataset loader's header check (helper "inputs").
CASES = [(w, h) for w in sorted(ROW) for h in ("missing", "wrong") if (w, h) != ("images", "wrong")]


@pytest.mark.parametrize("what,how", CASES)
def test_each_input_missing_or_wrong_fails_naming_the_fix(patched, monkeypatch, capsys, what, how):
    c = _break(patched, what, how)
    try:
        code, out = _run(c, monkeypatch, capsys)
        assert code == 1, out
        rows = _rows(c, monkeypatch)
        if what == "annotation" and how == "wrong":
            row = rows["CUHK-PEDES train split"]
            assert row.status == "wrong" and "official" in row.fix
        else:
            row = rows[ROW[what]]
            assert row.status == how, row
            assert FIX[what] in row.fix + row.expected, row
        assert sum(r.failed for r in rows.values()) >= 1
    finally:
        shutil.rmtree(c["base"], ignore_errors=True)


def test_gpus_missing_and_too_small(patched, monkeypatch, capsys):
    code, out = _run(patched, monkeypatch, capsys, gpus=())
    assert code == 1 and "run on the GPU box" in out
    rows = _rows(patched, monkeypatch, gpus=[("small", 4 * GiB)] * 2)
    plan_row = rows["memory plan icl_cuhk_pedes.yaml"]
    assert plan_row.status == "wrong" and "memory_plan.py" in plan_row.fix
    monkeypatch.setattr(pf, "vllm_importable", lambda: False)
    assert _rows(patched, monkeypatch)["vLLM"].status == "missing"


def test_optional_inputs_not_given_do_not_fail(patched, monkeypatch, capsys):
    """Without --pre-checkpoint and --lora, those rows are listed as not run (as the real runs do)."""
    from repro.cli import build_parser

    args = build_parser().parse_args(["all", "--world", "real", "--datasets", "CUHK-PEDES", "--root",
                                      str(patched["base"] / "data"), "--noise-dir", patched["noise"],
                                      "--mllm", patched["mllm"], "--gpus", "1"])
    args.clip = patched["clip"]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = {r.input: r for r in pf.run_preflight(args, ["table1"], probe_gpus=lambda: [RTX3090])}
    assert rows["+pre checkpoint CUHK-PEDES"].status == "missing" and not rows["+pre checkpoint CUHK-PEDES"].failed
    assert not rows["ICL LoRA adapter"].failed and not rows["RDA file CUHK-PEDES"].failed
    assert not any(r.failed for r in rows.values()), [r for r in rows.values() if r.failed]


def test_cuhk_with_only_caption_all_json_is_named(patched, tmp_path):
    folder = tmp_path / "CUHK-PEDES"
    (folder / "imgs").mkdir(parents=True)
    (folder / "caption_all.json").write_text("[]")
    (row,) = pf.check_dataset(str(tmp_path), "CUHK-PEDES")
    assert row.status == "missing"
    assert "original" in row.found and "reid_raw.json" in row.fix and "split" in row.fix
    assert "RDE issue #4" in row.fix and "ShuangLI59" in row.fix


def test_images_in_another_subfolder_are_named(patched, tmp_path):
    shutil.copytree(patched["base"] / "data" / "CUHK-PEDES", tmp_path / "CUHK-PEDES")
    os.rename(tmp_path / "CUHK-PEDES" / "imgs", tmp_path / "CUHK-PEDES" / "CUHK-PEDES_images")
    rows = {r.input: r for r in pf.check_dataset(str(tmp_path), "CUHK-PEDES")}
    row = rows["CUHK-PEDES images"]
    assert row.status == "missing" and "CUHK-PEDES_images" in row.fix and "move them" in row.fix


def test_preflight_is_reached_from_python_m_repro_and_never_runs_a_job(patched, monkeypatch, capsys):
    from repro import cli, jobs

    monkeypatch.setattr(pf, "cuda_gpus", lambda: [RTX3090, RTX3090])
    monkeypatch.setattr(jobs.Runner, "run", lambda *a, **k: pytest.fail("preflight started a job"))
    assert cli.main(["preflight", *_argv(patched)]) == 0
    assert "every needed input" in capsys.readouterr().out
    # Tables first works too; an unknown flag is an error, not a silently ignored input.
    argv = _argv(patched)
    assert cli.main(["preflight", *argv[-2:], *argv[:-2]]) == 0
    with pytest.raises(SystemExit):
        cli.main(["preflight", *argv, "--no-such-flag"])


def test_real_constants_are_the_published_ones():
    """Figures from the dataset papers and OpenAI's hash, as the issue and the readers state them."""
    assert pf.PUBLISHED["CUHK-PEDES"]["test"] == (1000, 3074, 6156)
    assert pf.PUBLISHED["ICFG-PEDES"]["test"] == (1000, 19848, 19848)
    assert pf.PUBLISHED["RSTPReid"]["test"] == (200, 1000, 2000)
    assert pf.CLIP_SHA256 == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    assert pf.CLIP_SHA256 in pf.CLIP_URL
    from datasets.noise import RELEASE_NOISE_FILES
    # The training-pair counts of the noise files are the published train caption counts.
    for ds in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid"):
        assert RELEASE_NOISE_FILES[f"{ds}_0.2.npy"][0] == pf.PUBLISHED[ds]["train"][2]
