"""The full-size path on CPU: every paper config (configs/{rde,icl}_*.yaml) with a ViT-B/16 CLIP
(random weights, OpenAI's TorchScript fp16 archive), 384x128 images from source files of varied
real sizes, 77 or 168 text tokens, on data in each benchmark's own file layout.

Per config: a few training steps with every loss the config names (BGE + TSE; the RDA terms for
ICL, from an RDA file in the authors' format), CCD on, "+pre" from a 77-token checkpoint into
the 168-token UFine6926 model; the CCD pass, evaluation into the run directory,
``python test.py RUN`` and THI with the simulated MLLM over that evaluation. One config also runs
on two CPU processes (gloo). Any shape, dtype or path problem that only appears at full size
fails here. Batch 4, a handful of images: the cost is the model's size (docs/notes: ~40 s per
config on 2 cores). Checkpoints are large (best.pth 0.6 GB, last.pth 1.8 GB): every run's folder
is removed when its test ends.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils import run_dir as rd

from fullsize_data import VIT_B16, write_benchmark, write_rda_file, write_vit_b16

pytestmark = pytest.mark.slow

DATASETS = {"cuhk_pedes": "CUHK-PEDES", "icfg_pedes": "ICFG-PEDES", "rstpreid": "RSTPReid",
            "ufine6926": "UFine6926"}
PAPER_CONFIGS = [f"configs/{m}_{d}.yaml" for d in DATASETS for m in ("rde", "icl")]
GRID = (384 // 16) * (128 // 16)     # 24 x 8 patches at stride 16
TRAIN_CAPTIONS = 8                   # 4 train identities x 1 image x 2 captions: 2 steps of batch 4


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vitb16")
    yield write_vit_b16(folder / "ViT-B-16.pt")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    """Captions, attributes and source pictures: 10 identities, 1 image each (4 train, 2 val, 4 test)."""
    from offline.synthpedes import generate

    root = tmp_path_factory.mktemp("synth_small")
    return str(generate(root / "SynthPEDES", num_ids=10, images_per_id=1, captions_per_image=2,
                        splits=(0.4, 0.2, 0.4), seed=0))


@pytest.fixture(scope="module")
def pre77(vit_b16, tmp_path_factory):
    """A 77-token group-2 checkpoint as the releases save it: {'model': {'module.' + key}}, fp16."""
    from model import build_model
    from utils.config import load_config

    folder = tmp_path_factory.mktemp("pre77")
    cfg = load_config("configs/rde_cuhk_pedes.yaml", [f"pretrain_choice={vit_b16}"])
    torch.manual_seed(5)
    model = build_model(cfg)
    sd = {f"module.{k}": (v + 0.01 * torch.randn_like(v)).half() if v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    path = folder / "best0.pth"
    torch.save({"model": sd}, path)
    del model, sd
    yield str(path)
    shutil.rmtree(folder, ignore_errors=True)


def _overrides(config, root, clip, out, **extra):
    items = {"root_dir": root, "pretrain_choice": clip, "output_dir": out, "batch_size": 4,
             "test_batch_size": 8, "num_workers": 0, "num_epoch": 1, "device": "cpu", "log_period": 1,
             "seed": 0, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def _prepare(config, tmp, synth, clip, pre):
    """(overrides, dataset name, benchmark info) for ``config`` on its own file layout in ``tmp``."""
    dataset = DATASETS[config.split("_", 1)[1][:-5]]
    root = tmp / "data"
    bench = write_benchmark(root, dataset, synth)
    extra = {}
    if "/icl_" in config:
        extra["anno_file"] = write_rda_file(bench, tmp / "rda.json")
    if dataset == "UFine6926":
        extra["init_checkpoint"] = pre
    return _overrides(config, root, clip, tmp / "runs", **extra), dataset, bench


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_config_runs_at_full_size(config, vit_b16, synth_small, pre77, tmp_path):
    from processor.trainer import train
    from utils.config import load_config

    try:
        overrides, dataset, bench = _prepare(config, tmp_path, synth_small, vit_b16, pre77)
        widths = {w for w, _ in bench["sizes"]}
        assert len(widths) > 3 and min(h for _, h in bench["sizes"]) > 100  # varied, real-sized sources
        cfg = load_config(config, overrides)
        icl, ufine = "/icl_" in config, dataset == "UFine6926"
        run = str(tmp_path / "runs" / cfg.name)
        history = train(cfg, run, progress=False)

        # Training: every loss the config names, finite; RDA's weight g = 1 - 0.03 at epoch 1.
        epoch = history["epochs"][0]
        names = {"bge_loss", "tse_loss"} | ({"bge_aug_loss", "tse_aug_loss"} if icl else set())
        assert names <= set(epoch), sorted(epoch)
        assert {k for k in epoch if k.endswith("_loss")} == names
        assert all(np.isfinite(epoch[k]) and epoch[k] > 0 for k in names)
        assert epoch.get("rda_gamma") == (pytest.approx(0.97) if icl else None)
        # CCD: per-sample labels of both views over every training pair.
        ccd = np.load(rd.ccd_file(run, 1))
        assert all(ccd[k].shape[0] == TRAIN_CAPTIONS for k in ccd.files), {k: ccd[k].shape for k in ccd.files}
        # The weights hold a ViT-B/16 at 384x128 and the config's text length, in float32.
        saved = torch.load(rd.checkpoint_path(run, rd.BEST), map_location="cpu", weights_only=False)["model"]
        text_length = 168 if ufine else 77
        assert saved["base_model.positional_embedding"].shape == (text_length, VIT_B16["text_width"])
        assert saved["base_model.visual.positional_embedding"].shape == (GRID + 1, VIT_B16["vision_width"])
        assert all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point())
        log = open(os.path.join(run, "train.log")).read()
        if ufine:  # +pre: the 77-row table of the group-2 checkpoint interpolated to 168 rows
            assert "interpolated ['base_model.positional_embedding']" in log
        del saved

        # Evaluation into the run directory, then python test.py RUN gives the same similarity.
        test_split = [r for r in bench["records"] if r["split"] == "test"]
        n_captions = sum(len(r["captions"]) for r in test_split)
        eval_dir = rd.eval_dir(run, dataset, rd.BEST)
        sim = np.load(os.path.join(eval_dir, "similarity.npy"))
        assert sim.shape == (n_captions, len(test_split))
        os.remove(os.path.join(eval_dir, "similarity.npy"))
        import test as test_cli

        assert test_cli.main([run, "--checkpoint", rd.BEST, "--device", "cpu", "--no-progress"]) == 0
        np.testing.assert_allclose(np.load(os.path.join(eval_dir, "similarity.npy")), sim, atol=1e-5)

        # THI over that evaluation with the simulated MLLM.
        from thi.cli import main as thi_main

        assert thi_main(["--run", run, "--backend", "simulated", "--device", "cpu", "--no-progress",
                         "--rounds", "2"]) == 0
        out = rd.thi_dir(run, dataset, rd.BEST, "simulated")
        rounds = json.load(open(os.path.join(out, "rounds.json")))
        assert len(rounds["rounds"]) == 2
        assert np.load(os.path.join(out, "final_similarity.npy")).shape == sim.shape
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_two_cpu_processes_at_full_size(vit_b16, synth_small, pre77, tmp_path):
    """torchrun, 2 processes (gloo), ICL on UFine6926 (RDA, 168 tokens, +pre): DDP's gathered
    losses, the sharded CCD pass and rank 0's checkpoint and evaluation at full size."""
    config = "configs/icl_ufine6926.yaml"
    try:
        overrides, dataset, bench = _prepare(config, tmp_path, synth_small, vit_b16, pre77)
        run = str(tmp_path / "runs" / "ddp")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "train.py", "--config", config, "--run-dir", run,
                               "--no-progress", *overrides, "batch_size=2"],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        epoch = metrics["epochs"][0]
        assert {"bge_loss", "tse_loss", "bge_aug_loss", "tse_aug_loss"} <= set(epoch)
        ccd = np.load(rd.ccd_file(run, 1))
        assert all(ccd[k].shape[0] == TRAIN_CAPTIONS for k in ccd.files)
        assert "world size 2" in open(os.path.join(run, "train.log")).read()
        sim = np.load(os.path.join(rd.eval_dir(run, dataset, rd.BEST), "similarity.npy"))
        n_captions = sum(len(r["captions"]) for r in bench["records"] if r["split"] == "test")
        assert sim.shape[0] == n_captions
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
