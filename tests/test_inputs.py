"""Inputs read wrongly or accepted out of range (issue 28, items 5, 8, 9, 10): each case is a
file or value a user really hands the project, and each must be refused (or read correctly)
with the file, record or key named, before anything is written."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from utils.config import DEFAULTS, ConfigError, load_config
from utils.errors import InputFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- 8. values out of range
@pytest.mark.parametrize("item, key, expected", [
    ("lr=.nan", "lr", "a finite number > 0"),
    ("margin=.nan", "margin", "a finite number >= 0"),
    ("temperature=.inf", "temperature", "a finite number > 0"),
    ("select_ratio=1.5", "select_ratio", "in (0, 1]"),
    ("select_ratio=0", "select_ratio", "in (0, 1]"),
    ("img_size=[64,-32]", "img_size", "positive integers"),
    ("tau=-1", "tau", "a finite number > 0"),
    ("seed=-3", "seed", ">= 0"),
    ("momentum=1.0", "momentum", "in [0, 1)"),
    ("alpha=1.2", "alpha", "in [0, 1)"),
    ("adam_eps=0", "adam_eps", "> 0"),
    ("warmup_factor=0", "warmup_factor", "in (0, 1]"),
    ("milestones=[50,20]", "milestones", "increasing"),
    ("emb_lr=-1e-3", "emb_lr", "> 0"),
    ("rda_gamma_min=.nan", "rda_gamma_min", "finite"),
    ("weight_decay=.inf", "weight_decay", "finite"),
])
def test_out_of_range_values_are_refused_with_the_valid_range(item, key, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    msg = str(exc.value)
    assert f"'{key}'" in msg and expected in msg, msg


def test_every_numeric_key_has_a_range():
    from utils.config import RANGES

    numeric = {k for k, v in DEFAULTS.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool))
               or (isinstance(v, list) and v and all(isinstance(x, int) for x in v))}
    numeric |= {"emb_lr"}
    assert numeric - set(RANGES) == set(), "numeric keys without a range"


def test_paper_and_demo_configs_are_in_range():
    folder = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml") and not name.startswith("repro"):  # repro_*: orchestration, not a run
            load_config(os.path.join(folder, name))


def test_nan_in_a_yaml_file_is_refused_and_train_writes_nothing(tmp_path, capsys):
    import train as train_cli

    path = tmp_path / "exp.yaml"
    path.write_text("lr: .nan\n")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--config", str(path), "--run-dir", str(run), "device=cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'lr'" in err and "finite" in err, err
    assert not run.exists()


def test_non_utf8_config_file_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"name: caf\xe9\nlr: 1e-5\n")
    with pytest.raises(InputFileError) as exc:
        load_config(str(path))
    msg = str(exc.value)
    assert str(path) in msg and "not UTF-8" in msg and "0xe9" in msg and "line 1" in msg, msg


# ---------------------------------------------------------------- 5. / 9. dataset files
def _image(path, array=None, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.full((8, 4, 3), 120, np.uint8)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _dataset(tmp_path, records=None, anno_bytes=None):
    """A CUHK-PEDES-layout folder with 2 train and 2 test records (images written)."""
    records = records if records is not None else [
        {"split": "train", "id": 1, "file_path": "a/1.png", "captions": ["a man in red", "red shirt"]},
        {"split": "train", "id": 2, "file_path": "a/2.png", "captions": ["a woman in blue"]},
        {"split": "test", "id": 7, "file_path": "t/7.png", "captions": ["a child"]},
        {"split": "test", "id": 8, "file_path": "t/8.png", "captions": ["an old man"]},
    ]
    folder = tmp_path / "CUHK-PEDES"
    folder.mkdir(parents=True, exist_ok=True)
    anno = folder / "reid_raw.json"
    if anno_bytes is not None:
        anno.write_bytes(anno_bytes)
    else:
        anno.write_text(json.dumps(records))
    for r in records:
        if not (folder / "imgs" / r["file_path"]).exists():
            _image(folder / "imgs" / r["file_path"])
    return folder, records


def _build(tmp_path, **kw):
    from datasets import build_dataset

    return build_dataset("CUHK-PEDES", tmp_path, **kw)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    from datasets.bases import read_image

    gray = (np.arange(64 * 32).reshape(64, 32) % 256).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(gray * 257).save(path)          # 16-bit grey: 0..65535
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(read_image(str(path)))
    assert rgb.shape == (64, 32, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], gray) and abs(rgb.mean() - gray.mean()) < 1e-9, rgb.mean()


def test_float_image_is_refused_by_name(tmp_path):
    from datasets.bases import read_image
    from utils.errors import InputFileError

    path = tmp_path / "f.tiff"
    Image.fromarray(np.random.default_rng(0).random((8, 4)).astype(np.float32), "F").save(path)
    with pytest.raises(InputFileError, match=str(path)):
        read_image(str(path))


def test_zero_byte_and_non_image_files_are_refused_at_start_up_naming_the_record(tmp_path):
    from utils.errors import InputFileError

    folder, _ = _dataset(tmp_path)
    (folder / "imgs" / "a/2.png").write_bytes(b"")
    (folder / "imgs" / "t/8.png").write_text("<html>not an image</html>")
    with pytest.raises(InputFileError) as exc:
        _build(tmp_path)
    msg = str(exc.value)
    assert "2 of 4 images" in msg and "a/2.png (record 1): empty file (0 bytes)" in msg, msg
    assert "t/8.png (record 3): not an image" in msg and "reid_raw.json" in msg, msg


def test_duplicated_test_record_is_refused_naming_both_records(tmp_path):
    from utils.errors import InputFileError

    _, records = _dataset(tmp_path)
    records.append(dict(records[2]))
    _dataset(tmp_path, records)
    with pytest.raises(InputFileError) as exc:
        _build(tmp_path)
    msg = str(exc.value)
    assert "records 2 and 4" in msg and "t/7.png" in msg and "'test'" in msg, msg


def test_duplicated_train_record_is_reported_not_refused(tmp_path, caplog):
    _, records = _dataset(tmp_path)
    records.append(dict(records[0]))
    _dataset(tmp_path, records)
    with caplog.at_level("WARNING", logger="ICL.datasets"):
        ds = _build(tmp_path)
    assert len(ds.train) == 5
    assert any("records 0 and 4" in r.getMessage() and "a/1.png" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("split, field", [("test", "captions[0]"), ("train", "captions[1]")])
def test_caption_with_a_lone_surrogate_is_refused_at_load(tmp_path, split, field):
    from utils.errors import InputFileError

    _, records = _dataset(tmp_path)
    index = 0 if split == "train" else 2
    text = '{"split": "%s", "id": %d, "file_path": "%s", "captions": ["a man", "bag \\udcff"]}' % (
        split, records[index]["id"], records[index]["file_path"])
    if split == "test":
        text = text.replace('["a man", "bag \\udcff"]', '["bag \\udcff"]')
    body = json.dumps(records)
    start = body.index(json.dumps(records[index]))
    body = body[:start] + text + body[start + len(json.dumps(records[index])):]
    folder = tmp_path / "CUHK-PEDES"
    (folder / "reid_raw.json").write_text(body)
    with pytest.raises(InputFileError) as exc:
        _build(tmp_path)
    msg = str(exc.value)
    assert f"record {index}: field '{field}'" in msg and "\\udcff" in msg and "reid_raw.json" in msg, msg


def test_non_utf8_annotation_file_names_the_file(tmp_path):
    from utils.errors import InputFileError

    body = json.dumps([{"split": "test", "id": 7, "file_path": "t/7.png", "captions": ["caf-X"]}]).encode()
    _dataset(tmp_path, anno_bytes=body.replace(b"caf-X", b"caf\xe9"))
    with pytest.raises(InputFileError) as exc:
        _build(tmp_path, check_images=False)
    msg = str(exc.value)
    assert "reid_raw.json: not UTF-8" in msg and "0xe9" in msg and "iconv" in msg, msg


# ---------------------------------------------------------------- 9. RDA state and meta files
def test_rda_state_line_cut_inside_a_utf8_character_is_skipped_and_counted(tmp_path, caplog):
    from rda.store import AnswerLog

    path = tmp_path / "vqa.jsonl"
    good = json.dumps({"k": "a.png", "v": "1. a café"}, ensure_ascii=False).encode() + b"\n"
    torn = json.dumps({"k": "b.png", "v": "1. a caf\u00e9 wall"}, ensure_ascii=False).encode()
    torn = torn[: torn.index("\u00e9".encode()) + 1]  # the kill cut the two-byte é in half
    path.write_bytes(good + torn)
    with caplog.at_level("WARNING"):
        log = AnswerLog(path)
    assert log.data == {"a.png": "1. a café"} and log.torn == 1
    assert any("skipped 1 torn" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == good  # rewritten without the torn line: appends start clean
    log.add_many([("c.png", "ünïcode")])
    assert AnswerLog(path).data == {"a.png": "1. a café", "c.png": "ünïcode"}


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from offline.synthpedes import generate

    root = tmp_path_factory.mktemp("inputs-data")
    generate(root / "SynthPEDES", num_ids=3, images_per_id=2, seed=1)
    return root / "SynthPEDES"


@pytest.mark.parametrize("content", [b'{"format": 2, "prompt_v', b'{"format": "caf\xe9"}'])
def test_rda_meta_json_cut_or_garbled_names_the_file_and_the_fix(tiny_synth, tmp_path, content):
    from rda import generate_rda
    from rda.generate import default_paths
    from utils.mllm import build_client

    records = json.loads((tiny_synth / "reid_raw.json").read_text())
    out = tmp_path / "x.json"
    state = default_paths(str(out))[0]
    os.makedirs(state)
    with open(os.path.join(state, "meta.json"), "wb") as f:
        f.write(content)
    client = build_client("simulated", attributes=str(tiny_synth), error_rate=0.0, seed=0)
    with pytest.raises(InputFileError) as exc:
        generate_rda(records, client, image_root=str(tiny_synth / "imgs"), out_path=out, limit=2,
                     progress=False)
    msg = str(exc.value)
    assert os.path.join(state, "meta.json") in msg and f"delete {state}" in msg, msg


def test_noise_index_file_that_is_not_npy_names_the_file(tmp_path):
    from datasets.noise import build_noise_index

    path = tmp_path / "noise.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(InputFileError) as exc:
        build_noise_index(10, 0.5, path)
    assert f"noisy_file {path}" in str(exc.value) and "Delete it" in str(exc.value)


@pytest.mark.parametrize("content", [b'{"other": {"file_na', b'{"other": "caf\xe9"}', b'[1, 2]'])
def test_rda_sft_existing_dataset_info_unreadable_names_the_file(tmp_path, content):
    from rda.sft import write_llamafactory_dataset

    info = tmp_path / "dataset_info.json"
    info.write_bytes(content)
    with pytest.raises(InputFileError) as exc:
        write_llamafactory_dataset([], tmp_path, "anchor")
    assert str(info) in str(exc.value) and "delete it" in str(exc.value), str(exc.value)
    assert info.read_bytes() == content and not (tmp_path / "anchor.json").exists()


# ---------------------------------------------------------------- 10. a nearly full disk
_FSIZE_SCRIPT = r'''
import resource, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from utils.io import atomic_save_npy
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (57312, 57312))
try:
    atomic_save_npy({path!r}, np.zeros(16200, np.float32))  # 64800 bytes of data
except Exception as err:
    print(type(err).__name__, "|", getattr(err, "errno", None), "|", err)
'''


def test_numpy_real_write_path_on_a_full_disk_names_the_file(tmp_path):
    """np.save into a real file goes through ndarray.tofile (C fwrite), which reports a short
    write as ``OSError: 64800 requested and 57312 written`` with no errno: a file size limit
    makes the kernel cut the write exactly as a disk filling up does."""
    path = tmp_path / "final_similarity.npy"
    path.write_bytes(b"previous result")
    script = _FSIZE_SCRIPT.format(root=ROOT, path=str(path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    kind, code, msg = (out.stdout.strip().split(" | ", 2) + ["", ""])[:3]
    assert kind == "DiskFullError" and code == str(errno.ENOSPC), out.stdout + out.stderr
    assert f"No space left on device writing {path}" in msg and "requested and" in msg, msg
    assert "(64928 bytes)" in msg, msg  # header (128) + data: what the write needed
    assert path.read_bytes() == b"previous result" and os.listdir(tmp_path) == [path.name]


@pytest.fixture
def dev_full():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")  # Linux always has it
    return "/dev/full"


def test_real_enospc_from_the_kernel_names_the_file_for_numpy_json_and_torch(tmp_path, dev_full, monkeypatch):
    """The temp file of an atomic write is /dev/full: every write fails with the kernel's real
    ENOSPC, through numpy's, json's and torch's own write paths."""
    import torch

    import utils.io

    real_open = open
    monkeypatch.setattr(utils.io, "open", lambda f, mode="r", *a, **k: real_open(dev_full, mode, *a, **k),
                        raising=False)
    cases = [("sim.npy", lambda p: utils.io.atomic_save_npy(p, np.zeros(20000, np.float32))),
             ("feats.npz", lambda p: utils.io.atomic_save_npz(p, a=np.zeros(20000, np.float32))),
             ("cost.json", lambda p: utils.io.atomic_write_json(p, {"x": "y" * 20000})),
             ("last.pth", lambda p: utils.io.atomic_torch_save(p, {"w": torch.zeros(20000)}))]
    for name, write in cases:
        with pytest.raises(utils.io.DiskFullError) as exc:
            write(tmp_path / name)
        assert f"No space left on device writing {tmp_path / name}" in str(exc.value), (name, str(exc.value))
    assert os.listdir(tmp_path) == []


def test_rda_state_append_on_a_full_disk_names_the_file(tmp_path, dev_full):
    from rda.store import AnswerLog
    from utils.io import DiskFullError

    path = tmp_path / "state" / "vqa.jsonl"
    log = AnswerLog(path)
    log.add_many([("a.png", "1. a red coat")])
    path.unlink()
    os.symlink(dev_full, path)  # the disk is now full
    with pytest.raises(DiskFullError) as exc:
        log.add_many([("b.png", "1. a blue coat" * 100)])
    msg = str(exc.value)
    assert f"No space left on device writing {path}" in msg and "the append needs" in msg, msg


def test_mllm_cache_append_on_a_full_disk_names_the_file(tmp_path, dev_full):
    from utils.io import DiskFullError
    from utils.mllm.cache import ResponseCache

    cache = ResponseCache(str(tmp_path / "cache"))
    os.makedirs(os.path.dirname(cache.path), exist_ok=True)
    os.symlink(dev_full, cache.path)
    with pytest.raises(DiskFullError) as exc:
        cache.put_many({"k1": "an answer " * 50})
    assert f"No space left on device writing {cache.path}" in str(exc.value), str(exc.value)


# ---------------------------------------------------------------- entry points: one message, exit 2
def _anno_copy(synth_root, tmp_path, edit):
    records = json.loads(open(os.path.join(synth_root, "SynthPEDES", "reid_raw.json")).read())
    edit(records)
    path = tmp_path / "anno.json"
    path.write_text(json.dumps(records))
    return str(path)


def _no_traceback(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_train_py_zero_byte_image_is_one_message_and_exit_2(synth_root, tiny_clip_path, tmp_path, capsys):
    import train as train_cli

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    anno = _anno_copy(synth_root, tmp_path, lambda rs: rs[3].__setitem__("file_path", str(empty)))
    code = train_cli.main(["--run-dir", str(tmp_path / "run"), "--no-progress", "dataset_name=SynthPEDES",
                           f"root_dir={synth_root}", f"anno_file={anno}", f"pretrain_choice={tiny_clip_path}",
                           "device=cpu", "img_size=[64,32]", "tse_embed_dim=64", "num_workers=0"])
    assert code == 2
    _no_traceback(capsys, "train.py: error:", f"{empty} (record 3): empty file (0 bytes)", anno)


def test_test_py_weights_with_nan_config_is_one_message_and_exit_2(tmp_path, capsys):
    from test_run_safety import _test_cli

    cfg = tmp_path / "release.yaml"
    cfg.write_text("temperature: .inf\n")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    run = tmp_path / "rde_release"
    assert _test_cli().main([str(run), "--weights", str(weights), "--config", str(cfg)]) == 2
    _no_traceback(capsys, "test.py: error:", str(cfg), "'temperature'")
    assert not run.exists()


def test_rda_generate_non_utf8_annotation_is_one_message_and_exit_2(tiny_synth, tmp_path, capsys):
    import shutil

    from rda.cli import main

    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root / "SynthPEDES")
    anno = root / "SynthPEDES" / "reid_raw.json"
    anno.write_bytes(anno.read_bytes().replace(b'"captions": ["', b'"captions": ["\xff', 1))
    assert main(["generate", "--dataset", "SynthPEDES", "--root", str(root), "--backend", "simulated",
                 "--limit", "2", "--no-progress"]) == 2
    _no_traceback(capsys, "python -m rda: error:", f"{anno}: not UTF-8", "0xff")


@pytest.mark.parametrize("module", ["thi.cli", "repro.cli"])
def test_thi_and_repro_print_project_errors_without_traceback(module, monkeypatch, capsys):
    """Their inputs come from run directories (helper "rundir"): here only the wiring, with an
    error of this issue's kind raised where they read their inputs."""
    import importlib

    from utils.io import DiskFullError

    cli = importlib.import_module(module)

    def full(*a, **k):
        raise DiskFullError(errno.ENOSPC, "No space left on device writing /x/final_similarity.npy: ...")
    monkeypatch.setattr(cli, "_prepare" if module == "thi.cli" else "make_world", full)
    argv = ["--run", "r", "--backend", "simulated"] if module == "thi.cli" else ["table1", "--dry-run"]
    assert cli.main(argv) == 2
    prog = "python -m thi" if module == "thi.cli" else "python -m repro"
    _no_traceback(capsys, f"{prog}: error: No space left on device writing /x/final_similarity.npy")
