"""Config loading/overrides and the optimizer/schedule of RDE."""
import math

import pytest
import torch

from solver import build_optimizer, build_scheduler, lr_factor
from utils.config import DEFAULTS, load_config
from utils.run_dir import load_run_config, save_config


def test_defaults_overrides_and_unknown_keys(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("batch_size: 8\nimg_size: [96, 48]\n")
    cfg = load_config(p, ["lr=5e-5", "--txt-aug=false", "noisy_file=", "milestones=[3, 4]"])
    assert cfg.batch_size == 8 and cfg.img_size == [96, 48]
    assert cfg.lr == pytest.approx(5e-5) and cfg.txt_aug is False and cfg.noisy_file is None
    assert cfg.milestones == [3, 4] and cfg.text_length == DEFAULTS["text_length"]
    with pytest.raises(KeyError, match="bach_size"):
        load_config(p, ["bach_size=2"])
    (tmp_path / "bad.yaml").write_text("nosuchkey: 1\n")
    with pytest.raises(KeyError, match="nosuchkey"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trip(tmp_path):
    cfg = load_config(None, ["name=abc", "text_length=168"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_run_config(tmp_path)
    assert dict(again) == dict(cfg)
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_run_config(tmp_path / "nope")


def test_paper_configs_resolve():
    ufine = load_config("configs/icl_ufine6926.yaml")
    assert ufine.text_length == 168 and ufine.lr == pytest.approx(1e-5)  # 5e-5 only for the text positions
    cuhk = load_config("configs/rde_cuhk_pedes.yaml")
    assert (cuhk.batch_size, cuhk.num_epoch, cuhk.tau, cuhk.margin, cuhk.select_ratio) == (64, 60, 0.015, 0.1, 0.3)
    assert cuhk.optimizer == "Adam" and cuhk.weight_decay == pytest.approx(4e-5)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base_model = torch.nn.Linear(2, 2)
        self.visul_emb_layer = torch.nn.Linear(2, 2)


def test_param_groups_lr_factors():
    cfg = load_config(None)
    opt = build_optimizer(cfg, _Toy())
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["base_model.weight"] == (pytest.approx(1e-5), pytest.approx(4e-5))
    assert lrs["base_model.bias"] == (pytest.approx(2e-5), 0.0)
    assert lrs["visul_emb_layer.weight"][0] == pytest.approx(5e-5)
    assert lrs["visul_emb_layer.bias"][0] == pytest.approx(5e-5)  # TSE factor wins over bias
    cfg.emb_lr = 1e-3
    opt = build_optimizer(cfg, _Toy())
    assert {g["name"]: g["lr"] for g in opt.param_groups}["visul_emb_layer.weight"] == pytest.approx(1e-3)


def test_cosine_schedule_with_linear_warmup():
    cfg = load_config(None)  # 60 epochs, 5 warm-up epochs from factor 0.1
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(1, cfg) == pytest.approx(0.1 * 0.8 + 0.2)
    assert lr_factor(5, cfg) == pytest.approx(1.0)
    assert lr_factor(cfg.num_epoch, cfg) == pytest.approx(0.0, abs=1e-12)
    mid = (5 + 60) / 2
    assert lr_factor(int(mid), cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 55)))
    opt = build_optimizer(cfg, _Toy())
    sched = build_scheduler(cfg, opt)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen[0] == pytest.approx(1e-6) and seen[5] == pytest.approx(1e-5)
    assert seen[6] < seen[5]
