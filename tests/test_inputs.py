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
