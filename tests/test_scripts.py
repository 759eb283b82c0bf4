"""run_rde.sh and run_vllm_ICL.sh: their --dry-run prints the release's setting by default and
runs nothing (no GPU, data or weights); the choices that leave the paper's setting are explicit
and named in the run's folder."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(*argv: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith(("==", "#"))]


def _value(cmd: list[str], key: str):
    vals = [a.split("=", 1)[1] for a in cmd if a.startswith(key + "=")]
    return vals[-1] if vals else None


def _flag(cmd: list[str], flag: str):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_run_vllm_icl_dry_run_is_the_release_setting(tmp_path):
    """Before: a bare call served the base model without LoRA on one GPU (Table 6 #2)."""
    proc = _script(os.path.join(REPO, "run_vllm_ICL.sh"), "--dry-run", cwd=str(tmp_path))  # nothing on disk
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert ["export", "CUDA_VISIBLE_DEVICES=0,1"] in cmds
    thi = next(c for c in cmds if c[1:3] == ["-m", "thi"])
    assert _flag(thi, "--backend") == "vllm" and _flag(thi, "--tensor-parallel-size") == "2"
    assert _flag(thi, "--lora") == "pretrained/icl_lora" and "--no-lora" not in thi
    assert (_flag(thi, "--lam"), _flag(thi, "--xi"), _flag(thi, "--rounds")) == ("0.8", "0.5", "5")
    assert os.listdir(tmp_path) == []


def test_run_vllm_icl_without_the_tuned_model_is_explicit(tmp_path):
    proc = _script("run_vllm_ICL.sh", "--dry-run", "--no-lora", "--target", "ICFG-PEDES")
    thi = next(c for c in _commands(proc.stdout) if c[1:3] == ["-m", "thi"])
    assert "--no-lora" in thi and "--lora" not in thi and _flag(thi, "--xi") == "0.55"
    assert "WITHOUT the ICL LoRA" in proc.stdout
    merged = _script("run_vllm_ICL.sh", "--dry-run", "--merged", "pretrained/Qwen2-VL-7B-ICL")
    thi = next(c for c in _commands(merged.stdout) if c[1:3] == ["-m", "thi"])
    assert _flag(thi, "--model") == "pretrained/Qwen2-VL-7B-ICL" and "--merged" in thi and "--lora" not in thi
    # Without --dry-run a missing adapter stops the script, naming it and the two alternatives.
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "mllm").mkdir()
    proc = _script("run_vllm_ICL.sh", "--run", str(run), "--mllm", str(tmp_path / "mllm"), "--lora",
                   str(tmp_path / "missing_lora"))
    assert proc.returncode == 2 and "missing_lora not found" in proc.stderr and "--no-lora" in proc.stderr


def test_thi_names_the_untuned_and_merged_models_in_its_folder():
    from thi.cli import build_parsers, check_tuning, mllm_label, tuning_note

    run_ap, _ = build_parsers()
    base = ["--run", "r", "--backend", "vllm", "--model", "/m/Qwen2-VL-7B-Instruct"]
    assert mllm_label(run_ap.parse_args(base + ["--lora", "/m/icl_lora"])) == "vllm-Qwen2-VL-7B-Instruct+icl_lora"
    args = run_ap.parse_args(base + ["--no-lora"])
    assert mllm_label(args) == "vllm-Qwen2-VL-7B-Instruct+nolora" and "Table 6 #2" in tuning_note(args)
    assert mllm_label(run_ap.parse_args(base + ["--merged"])) == "vllm-Qwen2-VL-7B-Instruct+merged"
    with pytest.raises(SystemExit, match="exclude each other"):
        check_tuning(run_ap.parse_args(base + ["--no-lora", "--lora", "x"]))


@pytest.mark.parametrize("dataset,gpus,method,cfg", [("CUHK-PEDES", None, None, "configs/icl_cuhk_pedes.yaml"),
                                                     ("RSTPReid", "2", "rde", "configs/rde_rstpreid.yaml")])
def test_run_rde_dry_run_prints_the_recipe(tmp_path, dataset, gpus, method, cfg):
    argv = [os.path.join(REPO, "run_rde.sh"), "data", dataset, *(a for a in (gpus, method) if a), "--dry-run"]
    proc = _script(*argv)
    assert proc.returncode == 0, proc.stderr
    train, test = _commands(proc.stdout)
    assert train[train.index("--config") + 1] == cfg
    if gpus:
        assert train[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    name = _value(train, "name")
    assert name == f"{(method or 'icl').upper()}_{dataset}_n0.0" and _value(train, "noisy_file") is None
    assert test[1:3] == ["test.py", f"runs/{name}"]


def test_run_rde_noise_reads_the_release_file():
    proc = _script("run_rde.sh", "data", "CUHK-PEDES", "1", "rde", "noisy_rate=0.5", "ccd=false", "--dry-run")
    train, test = _commands(proc.stdout)
    assert _value(train, "noisy_file") == "noiseindex/CUHK-PEDES_0.5.npy"
    assert _value(train, "name") == "RDE_CUHK-PEDES_n0.5_noccd" and test[2] == "runs/RDE_CUHK-PEDES_n0.5_noccd"


@pytest.mark.parametrize("dataset,file", [("CUHK-PEDES", "best0"), ("ICFG-PEDES", "best1"),
                                          ("RSTPReid", "best2"), ("UFine6926", "best0")])
def test_run_rde_pre_takes_the_release_checkpoint_per_dataset(dataset, file):
    """Before: one checkpoint for every dataset, and a group-2 run named like the group-1 run."""
    proc = _script("run_rde.sh", "data", dataset, "--pre", "pretrained/", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    train, test = _commands(proc.stdout)
    assert _value(train, "init_checkpoint") == f"pretrained/{file}.pth"
    assert _value(train, "name") == f"ICL_{dataset}_n0.0_pre-{file}" and test[2] == f"runs/ICL_{dataset}_n0.0_pre-{file}"
    # init_checkpoint=FILE given directly names the run too.
    proc = _script("run_rde.sh", "data", dataset, "init_checkpoint=x/nam.pth", "--dry-run")
    assert _value(_commands(proc.stdout)[0], "name") == f"ICL_{dataset}_n0.0_pre-nam"


def test_run_rde_evaluates_the_folder_it_trained(tmp_path):
    """Before: name=NEW trained into runs/NEW and evaluated runs/ICL_<dataset>_n0.0."""
    proc = _script("run_rde.sh", "data", "ICFG-PEDES", "name=mine", "output_dir=elsewhere", "--dry-run")
    train, test = _commands(proc.stdout)
    assert _value(train, "name") == "mine" and test[2] == "elsewhere/mine"
    proc = _script("run_rde.sh", "data", "CUHK-PEDES", "--pre", str(tmp_path))
    assert proc.returncode == 2 and "best0.pth not found" in proc.stderr and "MLLM4Text-ReID" in proc.stderr
