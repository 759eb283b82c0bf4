"""RDE training on SynthPEDES with a tiny random CLIP on CPU: resume, learning, CCD, RDA."""
import json
import os

import numpy as np
import pytest
import torch

from processor.trainer import train
from utils.config import load_config


def tiny_cfg(tiny_clip_path, synth_root, out, **kw):
    items = {
        "dataset_name": "SynthPEDES", "root_dir": synth_root, "output_dir": str(out),
        "pretrain_choice": tiny_clip_path, "img_size": [64, 32], "tse_embed_dim": 64,
        "batch_size": 32, "test_batch_size": 64, "num_workers": 0, "img_aug": False, "txt_aug": False,
        "lr": 5e-4, "lr_factor": 2.0, "adam_eps": 1e-8, "warmup_epochs": 1, "num_epoch": 2,
        "log_period": 1000, "device": "cpu", "save_eval": False, "seed": 0,
    }
    items.update(kw)
    return load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_is_bit_identical(tiny_clip_path, synth_root, tmp_path):
    cfg = tiny_cfg(tiny_clip_path, synth_root, tmp_path, img_aug=True, txt_aug=True)
    train(cfg, str(tmp_path / "straight"), progress=False)
    # "Killed" after epoch 1, then resumed by a new process-like call with resume=true.
    train(cfg.copy(), str(tmp_path / "resumed"), progress=False, stop_after_epoch=1)
    again = cfg.copy()
    again.resume = True
    train(again, str(tmp_path / "resumed"), progress=False)
    a, b = _weights(tmp_path / "straight" / "last.pth"), _weights(tmp_path / "resumed" / "last.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    metrics = json.load(open(tmp_path / "resumed" / "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for name in ("config.yaml", "best.pth", "ccd/epoch_1.npz", "ccd/epoch_2.npz", "train.log"):
        assert os.path.exists(tmp_path / "straight" / name), name
