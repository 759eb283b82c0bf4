"""The run directory's safety (issue 28 items 1, 2, 3, 6, 7, 9, 11; issue 23 items 7, 8):
one writer per folder, each checkpoint's evaluation apart and stamped with its digest, written
whole, sealed configs, failed starts reusable, every read naming its file, temp files cleaned."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from utils import run_dir as rd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_ckpt_run(tiny_clip_path, synth_root, tmp_path_factory):
    """An untrained run with best.pth and a different last.pth, both evaluated."""
    import torch

    from conftest import write_untrained_run
    from model import build_model
    from processor.evaluate import evaluate_run
    from utils.run_dir import load_run_config

    run = tmp_path_factory.mktemp("two_ckpt")
    write_untrained_run(run, tiny_clip_path, synth_root)
    torch.manual_seed(1)
    torch.save({"model": build_model(load_run_config(run)).state_dict(), "epoch": 1},
               rd.checkpoint_path(run, rd.LAST))
    evaluate_run(str(run), checkpoint=rd.LAST, device="cpu", progress=False)
    return str(run)


@pytest.fixture
def run_copy(two_ckpt_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(two_ckpt_run, dst)
    return str(dst)


# ---- item 1: one writer per folder ----

_HOLD = ("import sys; sys.path.insert(0, sys.argv[1]); from utils.run_dir import folder_lock\n"
         "with folder_lock(sys.argv[2], 'holder'):\n    print('locked', flush=True); sys.stdin.read()\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, REPO, folder], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_one_never_blocks(tmp_path):
    folder = str(tmp_path / "run")
    proc = _holder(folder)
    try:
        with pytest.raises(rd.FolderBusyError, match=rf"pid {proc.pid} on .*holder"):
            with rd.folder_lock(folder, "second"):
                pass
    finally:
        proc.kill()  # a crash: no release code runs
        proc.wait()
    with rd.folder_lock(folder, "after the crash") as path:
        assert json.load(open(path))["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(folder, rd.LOCK_FILE))  # the folder as it was


def test_training_into_a_locked_run_is_refused_before_writing(tmp_path, tiny_clip_path, synth_root):
    from processor.trainer import train
    from utils.config import load_config

    folder = str(tmp_path / "run")
    cfg = load_config("configs/synthpedes_tiny.yaml", [f"root_dir={synth_root}", "num_workers=0",
                                                       f"pretrain_choice={tiny_clip_path}"])
    proc = _holder(folder)
    try:
        with pytest.raises(rd.FolderBusyError, match=rf"pid {proc.pid}"):
            train(cfg, folder, progress=False)
        assert os.listdir(folder) == [rd.LOCK_FILE]  # nothing of the second run
    finally:
        proc.kill()
        proc.wait()


def test_test_py_on_a_locked_run_is_refused(run_copy, capsys):
    import test as test_cli

    proc = _holder(run_copy)
    try:
        with pytest.raises(SystemExit) as exc:
            test_cli.main([run_copy, "--device", "cpu", "--no-progress"])
        assert exc.value.code == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_thi_into_a_locked_results_folder_is_refused_before_writing(run_copy, synth_root, tmp_path, capsys):
    from thi.cli import main as thi_main

    out = str(tmp_path / "thi_out")
    proc = _holder(out)
    try:
        code = _exit_code(thi_main, ["--run", run_copy, "--target", "SynthPEDES", "--root", synth_root,
                                     "--backend", "simulated", "--device", "cpu", "--no-progress",
                                     "--out", out])
        assert code == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [rd.LOCK_FILE]  # the holder's lock, nothing of ours
    finally:
        proc.kill()
        proc.wait()


def test_rda_generate_into_a_locked_state_folder_is_refused_before_writing(synth_root, tmp_path, capsys):
    from rda.cli import main as rda_main
    from rda.generate import default_paths

    root = tmp_path / "data"
    shutil.copytree(os.path.join(synth_root, "SynthPEDES"), root / "SynthPEDES")
    out = str(tmp_path / "rda" / "synth.rda.json")
    state_dir = default_paths(out)[0]
    proc = _holder(state_dir)
    try:
        code = _exit_code(rda_main, ["generate", "--dataset", "SynthPEDES", "--root", str(root),
                                     "--backend", "simulated", "--limit", "2", "--no-progress",
                                     "--out", out])
        assert code == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert not os.path.exists(out)
        assert sorted(os.listdir(state_dir)) == [rd.LOCK_FILE]
    finally:
        proc.kill()
        proc.wait()


# ---- item 2 / issue 23 items 7-8: each checkpoint's evaluation apart, stamped ----

def test_each_checkpoint_has_its_own_evaluation_naming_it(two_ckpt_run):
    best = rd.read_eval(two_ckpt_run, "SynthPEDES", rd.BEST)
    last = rd.read_eval(two_ckpt_run, "SynthPEDES", rd.LAST)
    assert best["folder"] != last["folder"]
    assert best["checkpoint"] == {"file": rd.BEST,
                                  "sha256": rd.file_sha256(rd.checkpoint_path(two_ckpt_run, rd.BEST))}
    assert last["checkpoint"]["file"] == rd.LAST
    assert not np.allclose(best["similarity"], last["similarity"])


def test_an_evaluation_of_a_rewritten_checkpoint_is_refused(run_copy):
    # A resumed training rewrites best.pth: its old evaluation no longer belongs to it.
    shutil.copyfile(rd.checkpoint_path(run_copy, rd.LAST), rd.checkpoint_path(run_copy, rd.BEST))
    with pytest.raises(rd.RunFileError, match=r"was made from best\.pth .*python test\.py"):
        rd.read_eval(run_copy, "SynthPEDES", rd.BEST)
    from thi.cli import load_eval_dir
    with pytest.raises(rd.RunFileError):
        load_eval_dir(run_copy, "SynthPEDES", None, rd.BEST)


def test_thi_fingerprint_holds_the_checkpoint(two_ckpt_run, synth_root, tmp_path, capsys):
    from thi.cli import main

    out = str(tmp_path / "thi")
    common = ["--run", two_ckpt_run, "--target", "SynthPEDES", "--root", synth_root, "--backend",
              "simulated", "--device", "cpu", "--no-progress", "--rounds", "1", "--out", out]
    assert main(common) == 0
    state = json.load(open(os.path.join(out, rd.THI_STATE)))
    assert state["fingerprint"]["checkpoint"]["file"] == rd.BEST
    assert main(common + ["--checkpoint", rd.LAST]) == 2  # refused: one message
    assert "checkpoint.file: saved 'best.pth', now 'last.pth'" in capsys.readouterr().err


def test_test_py_prints_best_and_last_in_one_table(run_copy, capsys):
    import test as test_cli

    shutil.rmtree(os.path.join(run_copy, rd.EVAL_DIR))
    assert test_cli.main([run_copy, "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr()
    table = (printed.out + printed.err).split("| task")[-1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("|")}
    best = rd.read_eval_metrics(run_copy, "SynthPEDES", rd.BEST)["t2i"]
    last = rd.read_eval_metrics(run_copy, "SynthPEDES", rd.LAST)["t2i"]
    assert rows == {"Best": f"{best['R1']:.2f}", "Last": f"{last['R1']:.2f}"}, table
    assert rd.eval_complete(run_copy, "SynthPEDES", rd.LAST)
    # --checkpoint: one of them
    shutil.rmtree(os.path.join(run_copy, rd.EVAL_DIR))
    assert test_cli.main([run_copy, "--device", "cpu", "--no-progress", "--checkpoint", rd.LAST]) == 0
    assert rd.eval_complete(run_copy, "SynthPEDES", rd.LAST)
    assert not rd.eval_complete(run_copy, "SynthPEDES", rd.BEST)


# ---- item 3: an evaluation is written whole ----

def test_a_killed_evaluation_leaves_the_old_one_whole(run_copy, monkeypatch):
    from processor.evaluate import evaluate_run

    before = rd.read_eval(run_copy, "SynthPEDES")
    shutil.copyfile(rd.checkpoint_path(run_copy, rd.LAST), rd.checkpoint_path(run_copy, rd.BEST))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the evaluation's file writes")
    monkeypatch.setattr(rd, "atomic_save_npz", killed)  # after similarity.npy, before the rest
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run_copy, device="cpu", progress=False)
    folder = rd.eval_dir(run_copy, "SynthPEDES")
    np.testing.assert_array_equal(np.load(os.path.join(folder, rd.EVAL_SIMILARITY)),
                                  before["similarity"])
    assert sorted(os.listdir(os.path.dirname(folder))) == ["best", "last"]  # no temp left


# ---- item 6: a torn config ----

def test_a_torn_or_empty_config_is_refused_naming_it(run_copy, capsys):
    import test as test_cli
    from utils.run_dir import load_run_config

    path = rd.config_path(run_copy)
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").writelines(lines[:len(lines) // 2])  # cut at a line boundary
    with pytest.raises(rd.RunFileError, match=rf"{path} lacks its last line"):
        load_run_config(run_copy)
    open(path, "w").close()
    with pytest.raises(SystemExit):
        test_cli.main([run_copy, "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert f"{path} is empty" in err and "best.pth" not in err.split("is empty")[0]


# ---- item 7: a failed start is reused ----

def test_a_failed_start_is_reused_and_named(tmp_path, tiny_clip_path, synth_root):
    from utils.config import load_config
    from utils.run_dir import save_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("configs/synthpedes_tiny.yaml", [f"root_dir={synth_root}", "lr=0.5"])
    save_config(cfg, rd.config_path(run))
    open(rd.log_path(run), "w").write("crashed before epoch 1\n")
    retry = load_config("configs/synthpedes_tiny.yaml", [f"root_dir={synth_root}"])
    notes = rd.check_train_target(retry, run)  # neither refused nor asked for resume=true
    assert any("failed before its first checkpoint" in n for n in notes)
    with pytest.raises(rd.RunDirError, match="failed before its first checkpoint"):
        rd.require_run_dir(run)


# ---- item 9: every read names its file ----

@pytest.mark.parametrize("name", [rd.EVAL_SIMILARITY, rd.EVAL_GALLERY, rd.EVAL_CAPTIONS])
def test_a_garbled_evaluation_file_is_named(run_copy, name):
    path = os.path.join(rd.eval_dir(run_copy, "SynthPEDES"), name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(rd.RunFileError, match=rf"{path} cannot be read.*python test\.py"):
        rd.read_eval(run_copy, "SynthPEDES")


def test_garbled_ccd_metrics_and_thi_files_are_named(tmp_path):
    from repro import results

    ccd = rd.ccd_file(tmp_path, 3)
    os.makedirs(os.path.dirname(ccd))
    open(ccd, "wb").write(b"PK\x03\x04 cut")
    with pytest.raises(rd.RunFileError, match=rf"{ccd} cannot be read"):
        rd.read_ccd(ccd)
    open(rd.metrics_path(tmp_path), "w").write('{"epochs": [')
    with pytest.raises(rd.RunFileError, match=rf"{rd.metrics_path(tmp_path)} cannot be read"):
        results.best_and_last(str(tmp_path))
    sim = os.path.join(tmp_path, rd.THI_FINAL_SIMILARITY)
    open(sim, "wb").write(b"\x93NUMPY")
    with pytest.raises(rd.RunFileError, match=rf"{sim} cannot be read"):
        rd.read_npy(sim, "run THI again")


# ---- item 11: each entry point removes its own stale temp files, never a live writer's ----

def test_test_py_removes_stale_temp_files(run_copy):
    import test as test_cli

    stale = [os.path.join(run_copy, ".tmp-abc"),
             os.path.join(rd.eval_dir(run_copy, "SynthPEDES"), ".tmp-x"),
             os.path.join(os.path.dirname(rd.eval_dir(run_copy, "SynthPEDES")), ".tmp-best-999")]
    for p in stale[:2]:
        open(p, "wb").write(b"\0" * 10)
    os.makedirs(stale[2])
    assert test_cli.main([run_copy, "--device", "cpu", "--no-progress", "--checkpoint", rd.LAST]) == 0
    assert not any(os.path.exists(p) for p in stale)


def test_rda_generate_removes_stale_temp_files_of_its_state_folder(synth_root, tmp_path):
    from rda.cli import main as rda_main
    from rda.generate import default_paths

    root = tmp_path / "data"
    shutil.copytree(os.path.join(synth_root, "SynthPEDES"), root / "SynthPEDES")
    out = str(tmp_path / "rda" / "synth.rda.json")
    state_dir = default_paths(out)[0]
    stale = [os.path.join(state_dir, ".tmp-state-1"), os.path.join(state_dir, "mllm_cache", ".tmp-c")]
    for p in stale:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(b"\0" * 10)
    assert rda_main(["generate", "--dataset", "SynthPEDES", "--root", str(root), "--backend",
                     "simulated", "--limit", "2", "--no-progress", "--out", out]) == 0
    assert os.path.isfile(out)
    assert not any(os.path.exists(p) for p in stale)


def test_thi_cleaning_skips_a_live_writers_folder(tmp_path):
    out = tmp_path / "thi"
    live = out / "sweep"
    live.mkdir(parents=True)
    (out / ".tmp-dead").write_bytes(b"x")
    (live / ".tmp-live").write_bytes(b"x")
    proc = _holder(str(live))
    try:
        removed = rd.clean_temp_tree(out)
    finally:
        proc.kill()
        proc.wait()
    assert removed == [str(out / ".tmp-dead")] and (live / ".tmp-live").exists()


# ---- issue 23 item 9: a release's run folder (configs.yaml + best.pth) ----

def _release_folder(folder, tiny_clip_path, synth_root, **extra):
    """A run folder as the ICL/RDE release writes it: its argparse namespace dumped by yaml
    (img_size a tuple), best.pth = {"model": state_dict}; the model is our tiny one with the
    release's fixed TSE size (1024)."""
    import argparse

    import torch
    import yaml

    from model import build_model
    from utils.config import load_config

    cfg = load_config("configs/synthpedes_tiny.yaml", [f"root_dir={synth_root}", "num_workers=0",
                                                       f"pretrain_choice={tiny_clip_path}",
                                                       "tse_embed_dim=1024"])
    torch.manual_seed(0)
    os.makedirs(folder)
    torch.save({"model": build_model(cfg).state_dict()}, os.path.join(folder, "best.pth"))
    args = argparse.Namespace(
        noisy_rate=0.0, noisy_file="", tau=0.015, select_ratio=0.3, margin=0.1, local_rank=0,
        name="RDE", output_dir="logs", log_period=100, eval_period=1, val_dataset="test",
        resume=False, resume_ckpt_file="", pretrain_choice="ViT-B/16", temperature=cfg.temperature,
        img_aug=False, txt_aug=False, cmt_depth=4, masked_token_rate=0.8,
        masked_token_unchanged_rate=0.1, lr_factor=5.0, loss_names="TAL", img_size=tuple(cfg.img_size),
        stride_size=cfg.stride_size, text_length=cfg.text_length, vocab_size=49408, optimizer="Adam",
        lr=1e-5, num_epoch=60, milestones=(20, 50), dataset_name="SynthPEDES",
        root_dir="/home/someone/data", batch_size=64, test_batch_size=64, num_workers=0,
        training=True, **extra)
    with open(os.path.join(folder, "configs.yaml"), "w") as f:
        yaml.dump(vars(args), f, default_flow_style=False)
    return str(folder)


def test_a_release_run_folder_is_evaluated_from_its_configs_yaml(tmp_path, tiny_clip_path, synth_root):
    import test as test_cli

    rel = _release_folder(tmp_path / "rel", tiny_clip_path, synth_root)
    assert "!!python/tuple" in open(os.path.join(rel, "configs.yaml")).read()
    assert test_cli.main([rel, "--root", synth_root, "--device", "cpu", "--no-progress"]) == 0
    ev = rd.read_eval(rel, "SynthPEDES", rd.BEST)
    assert ev["checkpoint"]["file"] == rd.BEST and ev["similarity"].shape[0] == len(ev["captions"])


def test_a_release_arg_we_cannot_map_is_refused_by_name(tmp_path, tiny_clip_path, synth_root, capsys):
    import test as test_cli

    rel = _release_folder(tmp_path / "rel", tiny_clip_path, synth_root, mystery_switch=3,
                          vocab_size_extra=None)
    with pytest.raises(SystemExit):
        test_cli.main([rel, "--root", synth_root, "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert "configs.yaml: release settings that cannot be mapped" in err
    assert "mystery_switch: 3" in err and "--weights" in err


def test_a_garbled_thi_cost_report_is_named(two_ckpt_run, synth_root, tmp_path, capsys):
    from thi.cli import main

    out = str(tmp_path / "thi")
    args = ["--run", two_ckpt_run, "--target", "SynthPEDES", "--root", synth_root, "--backend",
            "simulated", "--device", "cpu", "--no-progress", "--rounds", "1", "--out", out]
    assert main(args) == 0
    cost = os.path.join(out, rd.THI_COST)
    open(cost, "w").write('{"calls_total": ')
    assert main(args) == 2  # one message, no traceback
    assert f"{cost} cannot be read" in capsys.readouterr().err


def test_thi_state_with_a_short_list_names_the_file(tmp_path):
    """Issue 28 item 9: a state.json whose per-query lists are cut (or edited) was accepted and
    failed later with a broadcasting error; now it is refused naming the file."""
    from thi.state import THIState, fingerprint, load_state, save_state

    sim = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    fp = fingerprint(sim, ["a", "b", "c", "d"], ["x", "y", "z"], lam=0.8)
    state = THIState.fresh(fp, 4)
    save_state(str(tmp_path), state)
    assert load_state(str(tmp_path), fp) is not None
    path = tmp_path / rd.THI_STATE
    data = json.loads(path.read_text())
    data["said_yes"] = data["said_yes"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(rd.RunFileError, match=r"state\.json: said_yes holds 2 entries for 4 queries"):
        load_state(str(tmp_path), fp)
    path.write_text('{"fingerprint": ')
    with pytest.raises(rd.RunFileError, match=r"state\.json: unreadable THI resume state"):
        load_state(str(tmp_path), fp)
