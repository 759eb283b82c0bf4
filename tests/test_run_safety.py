"""Nothing lost, nothing stale (issue 19): refusals before anything is written, clear errors
that name the file, temp-file cleanup, one TensorBoard stream per resumed run."""
import errno
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

import utils.io
from processor.trainer import train
from utils.config import ConfigError, load_config
from utils.io import CheckpointReadError, DiskFullError, atomic_torch_save, atomic_write_json
from utils.run_dir import RunDirError


def tiny_cfg(tiny_clip_path, synth_root, out, **kw):
    """test_train's tiny config, without CCD unless asked (these tests are about files)."""
    from test_train import tiny_cfg as train_cfg

    return train_cfg(tiny_clip_path, synth_root, out, **{"ccd": False, **kw})


def snapshot(folder) -> dict:
    """{relative path: sha1} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def half_run(tiny_clip_path, synth_root, tmp_path_factory):
    """A run of num_epoch=2 stopped after epoch 1 (as if killed): (config, run folder)."""
    out = tmp_path_factory.mktemp("half")
    cfg = tiny_cfg(tiny_clip_path, synth_root, out)
    run = str(out / "run")
    train(cfg.copy(), run, progress=False, stop_after_epoch=1)
    return cfg, run


@pytest.fixture
def run_copy(half_run, tmp_path):
    cfg, run = half_run
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return cfg.copy(), dst


# ---------------------------------------------------------------- 1. existing run without resume
def test_training_into_an_existing_run_without_resume_is_refused(run_copy, capsys):
    import train as train_cli

    cfg, run = run_copy
    before = snapshot(run)
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cfg.items()
                 if v is not None]
    assert train_cli.main(["--run-dir", run, *overrides, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert run in err and "resume=true" in err and "name=" in err, err
    assert snapshot(run) == before, "a refused run changed files"


# ---------------------------------------------------------------- 2. resume with other settings
def test_resume_with_changed_model_settings_is_refused_and_lists_the_keys(run_copy):
    cfg, run = run_copy
    before = snapshot(run)
    again = cfg.copy()
    again.update(resume=True, lr=0.5, seed=7)
    with pytest.raises(RunDirError) as exc:
        train(again, run, progress=False)
    msg = str(exc.value)
    assert "lr: saved 0.0005, now 0.5" in msg and "seed: saved 0, now 7" in msg, msg
    assert "name=" in msg
    assert snapshot(run) == before


def test_resume_opt_in_only_for_the_listed_keys(run_copy):
    cfg, run = run_copy
    before = snapshot(run)
    more = cfg.copy()
    more.update(resume=True, num_epoch=3)
    with pytest.raises(RunDirError, match=r"resume_change=\[num_epoch\]"):
        train(more, run, progress=False)
    bad = cfg.copy()
    bad.update(resume=True, lr=0.5, resume_change=["lr"])
    with pytest.raises(RunDirError, match="only .* may change on resume"):
        train(bad, run, progress=False)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 7. temp files, TensorBoard
def _scalars(tb_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_resume_after_kill_cleans_temp_files_and_keeps_one_tensorboard_stream(run_copy):
    from torch.utils.tensorboard import SummaryWriter

    cfg, run = run_copy
    # A write killed mid-way leaves its temp file (up to a checkpoint's size) in the run folder.
    stale = [os.path.join(run, ".tmp-k1ll3d"), os.path.join(run, "ccd", ".tmp-x0"),
             os.path.join(run, "eval", "SynthPEDES", ".tmp-y1")]
    for path in stale:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
    # Killed after epoch 2 reached TensorBoard but before its last.pth was written.
    tags = ("train/loss", "train/lr", "eval/R1")
    with SummaryWriter(os.path.join(run, "tb")) as tb:
        for tag in tags:
            tb.add_scalar(tag, 999.0, 2)

    again = cfg.copy()
    again.update(resume=True, log_period=7)  # a key that does not change the model may differ
    train(again, run, progress=False)
    assert not [p for p in stale if os.path.exists(p)], "temp files of a killed write survived the restart"
    metrics = json.load(open(os.path.join(run, "metrics.json")))["epochs"]
    for tag in tags:
        points = _scalars(os.path.join(run, "tb"), tag)
        assert [s for s, _ in points] == [1, 2], f"{tag}: {points} (a redone epoch must replace its old points)"
        assert points[1][1] != 999.0
    assert _scalars(os.path.join(run, "tb"), "train/loss")[1][1] == pytest.approx(metrics[1]["loss"])
    assert "log_period changed from 1000 to 7" in open(os.path.join(run, "train.log")).read()


def test_resume_with_explicit_opt_in_is_accepted_and_logged(run_copy):
    from utils.run_dir import check_train_target

    cfg, run = run_copy
    more = cfg.copy()
    more.update(resume=True, num_epoch=3, resume_change="num_epoch", num_workers=1)
    assert check_train_target(more, run) == ["resume: num_epoch changed from 2 to 3",
                                             "resume: num_workers changed from 0 to 1"]


# ---------------------------------------------------------------- 6. config types
@pytest.mark.parametrize("item, key, expected", [
    ("batch_size=abc", "batch_size", "an integer"), ("lr=abc", "lr", "a number"),
    ("img_size=[64]", "img_size", "[height, width]"), ("ccd=maybe", "ccd", "a boolean"),
    ("batch_size=0", "batch_size", "positive"), ("sampler=foo", "sampler", "random, identity"),
])
def test_config_values_are_type_checked_when_loaded(item, key, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    msg = str(exc.value)
    assert f"'{key}'" in msg and repr(item.split("=", 1)[1]).strip("'") in msg and expected in msg, msg


def test_config_types_coerced_and_checked_in_yaml_files(tmp_path):
    good = load_config(None, ["lr=1", "batch_size=64.0", "name=2024", "resume_change=num_epoch,eval_period"])
    assert (good.lr, good.batch_size, good.name, good.resume_change) == (1.0, 64, "2024", ["num_epoch", "eval_period"])
    path = tmp_path / "bad.yaml"
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=rf"{path}: config key 'lr' = 'fast'"):
        load_config(str(path))


def test_bad_value_on_the_command_line_writes_nothing(tmp_path, capsys):
    import train as train_cli

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--run-dir", str(run), "batch_size=abc", "device=cpu"])
    assert exc.value.code == 2
    assert "batch_size" in capsys.readouterr().err
    assert not run.exists()


# ---------------------------------------------------------------- 7. flags and overrides mixed
def test_flags_and_overrides_can_be_mixed(monkeypatch):
    import processor.trainer
    import train as train_cli

    seen = {}
    monkeypatch.setattr(processor.trainer, "train", lambda cfg, run_dir, progress: seen.update(
        cfg=cfg, run_dir=run_dir, progress=progress))
    assert train_cli.main(["--config", "configs/synthpedes_tiny.yaml", "lr=0.001", "--no-progress",
                           "batch_size=8", "--run-dir", "x"]) == 0
    assert (seen["cfg"].lr, seen["cfg"].batch_size, seen["progress"], seen["run_dir"]) == (0.001, 8, False, "x")


# ---------------------------------------------------------------- 6. data files
def _anno_with(synth_root, tmp_path, edit):
    records = json.load(open(os.path.join(synth_root, "SynthPEDES", "reid_raw.json")))
    edit(records)
    path = tmp_path / "anno.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_annotation_without_the_evaluated_split_is_refused_before_training(synth_root, tmp_path,
                                                                          tiny_clip_path):
    from datasets import build_dataloader

    anno = _anno_with(synth_root, tmp_path, lambda rs: rs.__setitem__(slice(None), [r for r in rs if r["split"] != "test"]))
    cfg = tiny_cfg(tiny_clip_path, synth_root, tmp_path, anno_file=anno)
    with pytest.raises(ValueError) as exc:
        build_dataloader(cfg)
    msg = str(exc.value)
    assert anno in msg and "'test' split" in msg and "val_dataset=" in msg, msg


def test_empty_training_caption_is_refused_naming_file_and_record(synth_root, tmp_path, tiny_clip_path):
    from datasets import build_dataset

    def edit(records):
        idx = next(i for i, r in enumerate(records) if r["split"] == "train" and i > 3)
        records[idx]["captions"][1] = "  "
        edit.idx = idx
    anno = _anno_with(synth_root, tmp_path, edit)
    with pytest.raises(ValueError) as exc:
        build_dataset("SynthPEDES", synth_root, anno)
    assert f"{anno}: record {edit.idx}: field 'captions[1]'" in str(exc.value), str(exc.value)


def test_missing_image_error_names_the_record(synth_root, tmp_path):
    from datasets import build_dataset

    anno = _anno_with(synth_root, tmp_path, lambda rs: rs[5].__setitem__("file_path", "nowhere/x.jpg"))
    with pytest.raises(FileNotFoundError) as exc:
        build_dataset("SynthPEDES", synth_root, anno)
    assert anno in str(exc.value) and "nowhere/x.jpg (record 5)" in str(exc.value), str(exc.value)


# ---------------------------------------------------------------- 6. truncated checkpoint
def test_truncated_checkpoint_error_names_its_path(run_copy):
    from model import load_run

    cfg, run = run_copy
    for name in ("best.pth", "last.pth"):
        path = os.path.join(run, name)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=os.path.join(run, "best.pth")):
        load_run(run)
    again = cfg.copy()
    again.resume = True
    with pytest.raises(CheckpointReadError, match=os.path.join(run, "last.pth")):
        train(again, run, progress=False)


# ---------------------------------------------------------------- 6. disk full
class _FullDisk:
    """A file that accepts ``quota`` bytes, then fails as a full disk does."""

    def __init__(self, f, quota):
        self.f, self.left = f, quota

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if n > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= n
        return self.f.write(data)

    def __getattr__(self, name):
        if name in ("fileno", "readinto"):  # as a pipe: no direct fd writes that bypass the quota
            raise AttributeError(name)
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real_open = open
    monkeypatch.setattr(utils.io, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), 4096), raising=False)


def test_disk_full_names_the_file_and_the_space_needed(tmp_path, full_disk):
    obj = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "epoch": 3}
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / "last.pth"
    path.write_bytes(b"previous checkpoint")
    with pytest.raises(DiskFullError) as exc:
        atomic_torch_save(path, obj)
    msg = str(exc.value)
    assert str(path) in msg and "No space left" in msg and f"({len(buf.getvalue())} bytes)" in msg, msg
    assert exc.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["last.pth"], "the temp file of the failed write was left"
    with pytest.raises(DiskFullError, match="metrics.json: the file needs"):
        atomic_write_json(tmp_path / "metrics.json", {"x": "y" * 10_000})
    with pytest.raises(DiskFullError, match="sim.npy"):
        utils.io.atomic_save_npy(tmp_path / "sim.npy", np.zeros(5000, np.float32))


# ---------------------------------------------------------------- 7. test.py on a folder that is not a run
def _test_cli():
    import importlib.util

    # By path: "import test" could find the standard library's test package.
    spec = importlib.util.spec_from_file_location("icl_test_cli", os.path.join(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))), "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_test_py_on_a_folder_that_is_not_a_run_writes_nothing(tmp_path, capsys):
    test_cli = _test_cli()

    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as exc:
        test_cli.main([str(folder), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "best.pth" in err and "not a run directory" in err, err
    assert sorted(os.listdir(folder)) == ["notes.txt"]


def test_test_py_weights_never_overwrite_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name, data in {"config.yaml": b"lr: 0.1\n", "best.pth": b"trained", "last.pth": b"trained"}.items():
        (run / name).write_bytes(data)
    external = tmp_path / "release.pth"
    external.write_bytes(b"release")
    before = snapshot(run)
    with pytest.raises(SystemExit):
        _test_cli().main([str(run), "--weights", str(external), "--config", "configs/rde_cuhk_pedes.yaml"])
    assert "would overwrite" in capsys.readouterr().err
    assert snapshot(run) == before
