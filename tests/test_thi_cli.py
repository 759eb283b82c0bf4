"""``python -m thi`` on a tiny run directory (random tiny CLIP, SynthPEDES, simulated MLLM):
the run and sweep commands, the scorer against the run's own similarity, and the errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from thi.cli import TARGET_XI, main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_path, synth_root):
    """An untrained RDE run on SynthPEDES, evaluated on its test split (eval/SynthPEDES/)."""
    from conftest import write_untrained_run

    return write_untrained_run(tmp_path_factory.mktemp("run"), tiny_clip_path, synth_root)


def _args(run_dir, synth_root, *extra):
    return ["--run", run_dir, "--target", "SynthPEDES", "--root", synth_root,
            "--backend", "simulated", "--device", "cpu", "--no-progress", *extra]


def test_scorer_reproduces_the_runs_similarity(run_dir):
    from model import load_run
    from thi.cli import load_eval_dir
    from thi.scoring import make_score_texts

    data = load_eval_dir(run_dir, "SynthPEDES", None)
    model, cfg = load_run(run_dir, "cpu")
    score = make_score_texts(model, data["gallery_feats"], cfg.text_length, "cpu", batch_size=7)
    assert set(data["gallery_feats"]) == {"bge", "tse"}
    rows = score(data["captions"][:20])
    np.testing.assert_allclose(rows, data["similarity"][:20], atol=1e-4)
    assert score([]).shape == (0, data["similarity"].shape[1])
    # Over-long refined queries are truncated to the run's text length, never an error.
    assert score(["a man " * 200]).shape == (1, data["similarity"].shape[1])


def test_cli_runs_thi_and_writes_outputs(run_dir, synth_root, capsys):
    assert main(_args(run_dir, synth_root, "--rounds", "3")) == 0
    out = os.path.join(run_dir, "thi", "SynthPEDES", "simulated")  # per backend and model
    for name in ("rounds.json", "rounds.csv", "final_similarity.npy", "rankings.npy",
                 "queries.jsonl", "cost.json", "thi.log", "state.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    printed = capsys.readouterr().out
    assert "THI per round" in printed and "round 3" in printed and "rSum" in printed
    assert "unparseable loc/vqa/aggr" in printed
    rounds = json.load(open(os.path.join(out, "rounds.json")))
    assert len(rounds["rounds"]) == 3
    sim = np.load(os.path.join(run_dir, "eval", "SynthPEDES", "similarity.npy"))
    final = np.load(os.path.join(out, "final_similarity.npy"))
    assert final.shape == sim.shape
    cost = json.load(open(os.path.join(out, "cost.json")))
    assert cost["client_stats"]["cache_misses"] > 0
    # The cache lives in the run directory: a second run elsewhere asks the MLLM nothing.
    assert main(_args(run_dir, synth_root, "--rounds", "3", "--out",
                      os.path.join(run_dir, "thi_again"))) == 0
    again = json.load(open(os.path.join(run_dir, "thi_again", "cost.json")))
    assert again["client_stats"]["cache_misses"] == 0
    np.testing.assert_array_equal(np.load(os.path.join(run_dir, "thi_again",
                                                       "final_similarity.npy")), final)


def test_cli_names_an_untuned_mllm_above_its_table(run_dir, synth_root, capsys):
    """--no-lora (Table 6 #2) is said above THI's table, so its numbers are never read as ICL⋆."""
    out = os.path.join(run_dir, "thi_nolora_check")
    assert main(_args(run_dir, synth_root, "--rounds", "1", "--no-lora", "--out", out)) == 0
    printed = capsys.readouterr().out
    assert "MLLM without the ICL LoRA (--no-lora: Table 6 #2" in printed
    assert printed.index("MLLM without the ICL LoRA") < printed.index("THI per round")


def test_cli_sweep(run_dir, synth_root, capsys):
    out = os.path.join(run_dir, "sweep_out")
    assert main(["sweep", *_args(run_dir, synth_root, "--rounds", "2", "--lams", "0.7,0.9",
                                 "--xis", "0.3,0.5", "--out", out)]) == 0
    printed = capsys.readouterr().out
    assert "R1: xi \\ lambda" in printed and "mAP: xi \\ lambda" in printed
    saved = json.load(open(os.path.join(out, "sweep.json")))
    assert {(p["xi"], p["lam"]) for p in saved["points"]} == {(0.3, 0.7), (0.3, 0.9),
                                                              (0.5, 0.7), (0.5, 0.9)}


def test_cli_errors_say_what_to_do(run_dir, synth_root):
    with pytest.raises(FileNotFoundError, match=r"python test\.py .* --dataset RSTPReid --root"):
        main(["--run", run_dir, "--target", "RSTPReid", "--root", synth_root, "--backend",
              "simulated", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--model"):
        main(["--run", run_dir, "--target", "SynthPEDES", "--root", synth_root, "--backend",
              "vllm", "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a directory"):
        main(_args(os.path.join(run_dir, "nope"), synth_root))
    assert TARGET_XI["ICFG-PEDES"] == 0.55


@pytest.mark.parametrize("backend,extra,cls", [
    ("vllm", ["--model", "M", "--lora", "L", "--tensor-parallel-size", "2"],
     "utils.mllm.vllm_backend.VLLMClient"),
    ("transformers", ["--model", "M", "--lora", "L", "--device", "cpu"],
     "utils.mllm.hf_backend.TransformersClient"),
    ("openai", ["--base-url", "http://127.0.0.1:9/v1", "--served-model", "icl"],
     "utils.mllm.openai_backend.OpenAIClient"),
    ("simulated", ["--attributes", "A", "--error-rate", "0.3"],
     "offline.simulated.SimulatedClient"),
])
def test_backend_flags_map_to_client_options(backend, extra, cls):
    import importlib
    import inspect

    from thi.cli import backend_options, build_parsers

    args = build_parsers()[0].parse_args(["--run", "R", "--backend", backend, *extra])
    opts = backend_options(args, "ROOT", "SynthPEDES", "CACHE")
    assert opts["cache_dir"] == "CACHE"
    module, name = cls.rsplit(".", 1)
    inspect.signature(getattr(importlib.import_module(module), name)).bind(**opts)
    expected = {"vllm": {"model": "M", "lora": "L", "tensor_parallel_size": 2,
                         "dtype": "float32"},   # no CUDA GPU here: float32, not bf16
                "transformers": {"model": "M", "adapter": "L", "device": "cpu",
                                 "dtype": "float32"},
                "openai": {"base_url": "http://127.0.0.1:9/v1", "model": "icl"},
                "simulated": {"attributes": "A", "error_rate": 0.3}}[backend]
    assert expected.items() <= opts.items()


def test_docs_simulated_command_runs_after_the_demo(run_dir, synth_root, capsys):
    """Before: the demo wrote RUN/thi/SynthPEDES with its own xi, and the docs' command (the
    paper's xi) then failed with "state.json belongs to a THI run with other inputs"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    attributes = os.path.join(synth_root, "SynthPEDES")
    cmd = demo.thi_command(run_dir, "SynthPEDES", synth_root, attributes, 0.2, progress=False)
    assert cmd[:3][1:] == ["-m", "thi"]
    assert main(cmd[3:] + ["--device", "cpu", "--rounds", "2"]) == 0
    docs = ["--run", run_dir, "--target", "SynthPEDES", "--root", synth_root, "--backend",
            "simulated", "--device", "cpu", "--no-progress", "--rounds", "3"]
    assert main(docs) == 0
    assert main(docs + ["--error-rate", "0.1"]) == 0  # another simulated MLLM: its own folder
    thi = os.path.join(run_dir, "thi", "SynthPEDES")
    assert {"demo", "simulated", "simulated-err0.1-seed0"} <= set(os.listdir(thi))
    # Into the demo's folder with other settings: refused, saying what differs and what to do
    # (one message and exit 2 since issue 28 #12, no longer a ValueError's traceback).
    capsys.readouterr()
    assert main(docs + ["--out", os.path.join(thi, "demo")]) == 2
    msg = capsys.readouterr().err
    assert "xi: saved 0.2, now 0.5" in msg and "--out" in msg and "rm -r" in msg


def test_default_folders_differ_per_backend_and_model():
    from thi.cli import build_parsers, mllm_label

    def label(*argv):
        return mllm_label(build_parsers()[0].parse_args(["--run", "R", *argv]))

    labels = [label("--backend", "vllm", "--model", "pretrained/Qwen2-VL-7B-Instruct"),
              label("--backend", "vllm", "--model", "pretrained/Qwen2-VL-7B-Instruct",
                    "--lora", "saves/icl_lora/"),
              label("--backend", "transformers", "--model", "pretrained/Qwen2-VL-7B-Instruct"),
              label("--backend", "vllm", "--model", "merged/icl"),
              label("--backend", "openai", "--base-url", "http://h:8000/v1", "--served-model",
                    "icl"),
              label("--backend", "openai", "--base-url", "http://h:8000/v1", "--served-model",
                    "qwen2-vl"),
              label("--backend", "simulated"), label("--backend", "simulated", "--error-rate", "0.3")]
    assert labels[:2] == ["vllm-Qwen2-VL-7B-Instruct", "vllm-Qwen2-VL-7B-Instruct+icl_lora"]
    assert labels[4] == "openai-icl" and labels[6] == "simulated"
    assert len(set(labels)) == len(labels)
    assert all("/" not in x for x in labels)


def test_empty_query_in_eval_folder_names_the_file(run_dir, tmp_path):
    import shutil

    from thi.cli import load_eval_dir

    run = tmp_path / "run"
    shutil.copytree(os.path.join(run_dir, "eval"), run / "eval")
    path = run / "eval" / "SynthPEDES" / "captions.json"
    captions = json.load(open(path))
    captions[5] = ""
    path.write_text(json.dumps(captions))
    with pytest.raises(ValueError, match=r"captions\.json: 1 empty queries \(first: #5\).*"
                                         r"python test\.py"):
        load_eval_dir(str(run), "SynthPEDES", None)


def test_run_vllm_icl_script_writes_the_backends_own_folder(run_dir, synth_root):
    """Before: run_vllm_ICL.sh wrote every backend to RUN/thi/TARGET."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", "run_vllm_ICL.sh", "--source", "SynthPEDES", "--run", run_dir,
                           "--root", synth_root, "--simulated", "--", "--rounds", "3",
                           "--device", "cpu", "--no-progress"], cwd=repo,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = os.path.join(run_dir, "thi", "SynthPEDES", "simulated")
    assert f"THI results in {out}" in proc.stdout
    assert os.path.isfile(os.path.join(out, "final_similarity.npy"))
    assert not os.path.exists(os.path.join(run_dir, "thi", "SynthPEDES", "state.json"))


def test_changed_settings_are_one_message_and_exit_2(run_dir, synth_root, capsys):
    """Issue 28 #12. Before: a folder of a run with another xi was refused with a traceback."""
    out = os.path.join(run_dir, "thi_refusal")
    assert main(_args(run_dir, synth_root, "--rounds", "1", "--xi", "0.68", "--out", out)) == 0
    capsys.readouterr()
    assert main(_args(run_dir, synth_root, "--rounds", "1", "--xi", "0.5", "--out", out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m thi: error: ") and "Traceback" not in err
    assert "xi: saved 0.68, now 0.5" in err and f"rm -r {out}" in err
