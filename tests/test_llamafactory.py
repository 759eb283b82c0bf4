"""LLaMA-Factory for real: SFT data from SynthPEDES -> LoRA of a tiny random Qwen2-VL -> merge ->
the adapter served through our MLLM clients -> THI.

- ``llamafactory`` tests need ``.venv-llamafactory`` (``bash scripts/install_llamafactory.sh``)
  and run from any venv: LLaMA-Factory is reached by subprocess, with a work folder as cwd and
  without the repository on its path (our ``datasets/`` would shadow Hugging Face's).
- the ``vllm`` test also needs vLLM, i.e. ``.venv-vllm/bin/python -m pytest -m vllm``.
The LoRA train + export run once per session (about 30 s together on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LF_VENV = os.environ.get("ICL_LF_VENV", os.path.join(REPO, ".venv-llamafactory"))
LF_PYTHON = os.path.join(LF_VENV, "bin", "python")
LF_CLI = os.path.join(LF_VENV, "bin", "llamafactory-cli")
TINY_TRAIN = os.path.join(REPO, "configs", "llamafactory", "tiny_qwen2vl_lora_sft.yaml")
TINY_EXPORT = os.path.join(REPO, "configs", "llamafactory", "tiny_qwen2vl_export.yaml")
# 2 steps at the recipe's 5e-5 from a zero-initialised lora_B barely move a random model (the
# greedy tokens rarely change). 1e-3 changes some greedy continuations while keeping them varied;
# 1e-2 collapses every answer to "<|im_end|>\n", which would make the token comparison trivial.
TEST_LR = "1.0e-3"
N_POS = N_NEG = 8

pytestmark = pytest.mark.llamafactory


def lf_env(work: str) -> dict:
    """Offline, no trackers, caches inside ``work``, and nothing of this repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_DISABLED="true", WANDB_MODE="disabled", GRADIO_ANALYTICS_ENABLED="False",
               DO_NOT_TRACK="1", HF_HOME=os.path.join(work, "hf-home"),
               MPLCONFIGDIR=os.path.join(work, "mpl"), LF_VENV=LF_VENV)
    return env


def run_logged(cmd: list, cwd: str, env: dict, log: str, timeout: int = 600) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log}:\n{tail}")


@pytest.fixture(scope="session")
def lf_run(tmp_path_factory, synth_root):
    """SFT data from SynthPEDES, the tiny float32 Qwen2-VL, a 2-step LoRA and its merge."""
    if not os.path.exists(LF_CLI):
        pytest.skip(f"{LF_CLI} not found: create it with bash scripts/install_llamafactory.sh")
    from datasets import build_dataset
    from rda import make_anchor_sft, write_llamafactory_dataset
    from rda.run_data import training_pairs
    from offline.tiny_qwen2vl import build_tiny_qwen2vl

    work = str(tmp_path_factory.mktemp("llamafactory"))
    pairs = training_pairs(build_dataset("SynthPEDES", synth_root))
    # A retrieval-like similarity: own identity favoured, noisy enough that the top-10 mixes
    # identities (a trained RDE's role; its features are not needed to test the plumbing).
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(len(pairs.captions), len(pairs.image_paths)))
    sim += 2.0 * (pairs.caption_pids[:, None] == pairs.image_pids[None, :])
    records = make_anchor_sft(pairs.captions, pairs.caption_pids, pairs.caption_images,
                              pairs.image_paths, pairs.image_pids, sim, positives=N_POS,
                              negatives=N_NEG, top_k=10, seed=0)
    data = os.path.join(work, "sft")
    write_llamafactory_dataset(records, data, "icl_anchor")
    base = str(build_tiny_qwen2vl(os.path.join(work, "tiny"), seed=0, dtype="float32"))
    adapter, merged = os.path.join(work, "lora"), os.path.join(work, "merged")
    env = lf_env(work)
    script = os.path.join(REPO, "scripts", "sft_lora.sh")
    run_logged(["bash", script, "train", base, data, adapter, f"learning_rate={TEST_LR}"],
               cwd=work, env={**env, "TRAIN_YAML": TINY_TRAIN}, log=os.path.join(work, "train.log"))
    run_logged(["bash", script, "export", base, adapter, merged],
               cwd=work, env={**env, "EXPORT_YAML": TINY_EXPORT}, log=os.path.join(work, "export.log"))
    return {"work": work, "data": data, "records": records, "base": base, "adapter": adapter,
            "merged": merged, "env": env}


YAML_SNIPPET = r"""
import json, sys, yaml
from transformers import HfArgumentParser
from llamafactory.hparams.parser import _INFER_ARGS, _TRAIN_ARGS
out = {}
for path in sys.argv[1:]:
    d = yaml.safe_load(open(path))
    kind = _TRAIN_ARGS if d.get("do_train") else _INFER_ARGS
    if "bf16" in d:
        d["bf16"] = False  # this machine may have no bf16 GPU; everything else as written
    parsed = HfArgumentParser(kind).parse_dict(d, allow_extra_keys=False)  # unknown keys raise
    out[path] = {k: getattr(o, k) for o in parsed for k in (
        "template", "finetuning_type", "lora_rank", "lora_alpha", "lora_target", "learning_rate",
        "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
        "infer_dtype") if hasattr(o, k)}
print("LF-RESULT " + json.dumps(out, default=str))
"""


def test_recipe_yamls_parse_with_llamafactory(tmp_path):
    """Every YAML of configs/llamafactory/ is valid for LLaMA-Factory 0.9.5 (no unknown key) and
    the 7B recipe holds the paper's settings."""
    if not os.path.exists(LF_PYTHON):
        pytest.skip(f"{LF_PYTHON} not found: create it with bash scripts/install_llamafactory.sh")
    folder = os.path.join(REPO, "configs", "llamafactory")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))
    assert len(paths) == 4
    proc = subprocess.run([LF_PYTHON, "-c", YAML_SNIPPET, *paths], cwd=str(tmp_path),
                          env=lf_env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LF-RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    parsed = json.loads(line[0][len("LF-RESULT "):])
    sft = parsed[os.path.join(folder, "qwen2vl_lora_sft.yaml")]
    assert sft == {"template": "qwen2_vl", "finetuning_type": "lora", "lora_rank": 8,
                   "lora_alpha": 16, "lora_target": ["all"], "learning_rate": 5e-5,
                   "num_train_epochs": 2.0, "per_device_train_batch_size": 4,
                   "gradient_accumulation_steps": 16, "infer_dtype": "auto"}
    export = parsed[os.path.join(folder, "qwen2vl_export.yaml")]
    assert export["finetuning_type"] == "lora" and export["template"] == "qwen2_vl"


LOADER_SNIPPET = r"""
import json, sys
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model, data, out = sys.argv[1:4]
args = dict(stage="sft", do_train=True, model_name_or_path=model, dataset="icl_anchor",
            dataset_dir=data, template="qwen2_vl", cutoff_len=512, output_dir=out,
            overwrite_cache=True, preprocessing_num_workers=1, finetuning_type="lora",
            report_to="none", image_max_pixels=12544, image_min_pixels=3136,
            per_device_train_batch_size=1)
model_args, data_args, training_args, _, _ = get_train_args(args)
tm = load_tokenizer(model_args)
tok = tm["tokenizer"]
template = get_template_and_fix_tokenizer(tok, data_args)
ds = get_dataset(template, model_args, data_args, training_args, stage="sft", **tm)["train_dataset"]
pad = tok.convert_tokens_to_ids("<|image_pad|>")
rows = [{"text": tok.decode(ex["input_ids"]),
         "answer": tok.decode([t for t in ex["labels"] if t != -100]),
         "images": ex["images"], "image_tokens": ex["input_ids"].count(pad)} for ex in ds]
print("LF-RESULT " + json.dumps(rows))
"""


def test_sft_dataset_loads_with_llamafactory_loader(lf_run):
    """LLaMA-Factory's own loader + the qwen2_vl template read every record: the prompt with
    its image, and only the answer ("Yes"/"No" + end of turn) as the training target."""
    work = lf_run["work"]
    proc = subprocess.run([LF_PYTHON, "-c", LOADER_SNIPPET, lf_run["base"], lf_run["data"],
                           os.path.join(work, "loader-out")], cwd=work, env=lf_run["env"],
                          capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LF-RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    rows = json.loads(line[0][len("LF-RESULT "):])
    records = lf_run["records"]
    assert len(rows) == len(records) == N_POS + N_NEG
    for row, rec in zip(rows, records):
        caption_prompt = rec["messages"][0]["content"][len("<image>"):]
        assert caption_prompt in row["text"]
        assert row["text"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                      "<|im_start|>user\n<|vision_start|><|image_pad|>")
        assert row["answer"] == rec["label"] + "<|im_end|>\n"
        assert row["images"] == rec["images"]
        assert 4 <= row["image_tokens"] <= 16  # the tiny processor's 3,136-12,544 pixel budget


def _load(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_lora_train_and_export_merge_exactly(lf_run):
    """The adapter trained (non-zero lora_B), and the exported model equals base + (alpha/r) B A
    in exactly the 14 LoRA-targeted language-model layers, every other tensor unchanged."""
    import torch

    with open(os.path.join(lf_run["adapter"], "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = _load(os.path.join(lf_run["adapter"], "adapter_model.safetensors"))
    base = _load(os.path.join(lf_run["base"], "model.safetensors"))
    merged = _load(os.path.join(lf_run["merged"], "model.safetensors"))
    assert set(base) == set(merged)
    assert all(v.dtype == torch.float32 for v in merged.values())

    modules = sorted({k.split(".lora_")[0] for k in lora})
    assert len(modules) == 14  # q/k/v/o + gate/up/down in both language-model layers
    touched = set()
    for module in modules:
        a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
        assert b.abs().max() > 0, f"{module}: lora_B is still zero, the LoRA did not train"
        path = module.removeprefix("base_model.model.")
        key = next(k for k in (path + ".weight", path.replace("model.language_model.", "model.")
                               + ".weight") if k in base)
        expected = base[key] + scale * (b @ a)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
        assert not torch.equal(merged[key], base[key])
        touched.add(key)
    unchanged = [k for k in base if k not in touched]
    assert all(torch.equal(base[k], merged[k]) for k in unchanged)


@pytest.fixture(scope="session")  # session scope: set up before (not after) lf_run
def vllm_available():
    """Skip (before the LoRA fixture is built) where vLLM is not importable."""
    pytest.importorskip("vllm", reason="run with .venv-vllm/bin/python -m pytest -m vllm")


@pytest.mark.vllm
def test_adapter_in_vllm_equals_merged_in_transformers_and_drives_thi(vllm_available, lf_run,
                                                                       tmp_path):
    """The unmerged adapter through the ``vllm`` backend and the merged model through the
    ``transformers`` backend give the same greedy tokens in float32 (and differ from the base
    model: the adapter is applied); then THI runs once with the adapter."""
    from thi import run_thi
    from utils.mllm import Request, build_client
    from utils.mllm.prompts import loc_prompt

    records = lf_run["records"][:4]
    reqs = [Request(r["messages"][0]["content"][len("<image>"):], image=r["images"][0])
            for r in records]
    vllm_client = build_client("vllm", model=lf_run["base"], lora=lf_run["adapter"],
                               dtype="float32", enforce_eager=True, max_model_len=1024,
                               cache_dir=str(tmp_path / "cache-vllm"))
    hf_client = build_client("transformers", model=lf_run["merged"], dtype="float32",
                             device="cpu", cache_dir=str(tmp_path / "cache-hf"))
    try:
        lora_ids = vllm_client.generate_ids(reqs, max_tokens=8, ignore_eos=True)
        base_ids = vllm_client.generate_ids(reqs, max_tokens=8, ignore_eos=True, use_lora=False)
        merged_ids = hf_client.generate_ids(reqs, max_tokens=8, ignore_eos=True)
        for (p_v, o_v), (p_h, o_h) in zip(lora_ids, merged_ids):
            assert p_v == p_h  # same prompt tokens (image resized once, same chat template)
            assert o_v == o_h and len(o_v) == 8
        print("vLLM+LoRA:", [o for _, o in lora_ids], "\nvLLM base:", [o for _, o in base_ids],
              "\nmerged (transformers):", [o for _, o in merged_ids])
        assert any(o_l != o_b for (_, o_l), (_, o_b) in zip(lora_ids, base_ids))
        assert len({t for _, o in lora_ids for t in o}) > 8  # varied tokens: a real comparison
        # the cached text path agrees as well
        assert vllm_client.generate(reqs, temperature=0.0, max_tokens=8) == \
            hf_client.generate(reqs, temperature=0.0, max_tokens=8)

        # THI once with the adapter: 4 queries x 6 gallery images of SynthPEDES.
        gallery = list(dict.fromkeys(r["images"][0] for r in lf_run["records"]))[:6]
        captions = [r["messages"][0]["content"].split("Text: ")[1].split("\n\nAnswer")[0]
                    for r in records]
        assert reqs[0].text == loc_prompt(captions[0])
        rng = np.random.default_rng(0)
        sim = rng.uniform(0.3, 0.9, size=(len(captions), len(gallery))).astype(np.float32)

        def score_texts(texts):
            return np.full((len(texts), len(gallery)), 0.5, dtype=np.float32)

        before = vllm_client.stats["requests"]
        result = run_thi(sim, captions, gallery, vllm_client, score_texts, rounds=2, xi=0.5,
                         max_tokens=8,  # a random model never stops: cap its answers
                         out_dir=str(tmp_path / "thi"), progress=False)
        assert result.similarity.shape == sim.shape
        assert result.anchors.shape == (len(captions),)
        assert vllm_client.stats["requests"] > before  # the adapter answered THI's questions
        print("THI rounds:", result.rounds)
        assert len(result.rounds) >= 1
        assert sum(r["calls"]["loc"] for r in result.rounds) > 0
    finally:
        vllm_client.close()
        hf_client.close()
