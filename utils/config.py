"""Experiment configuration: flat defaults, one YAML per experiment, ``key=value`` overrides.

The keys are the option names of the RDE/IRRA command lines, so a researcher who knows
``--batch_size 64`` finds ``batch_size: 64``. Every run directory stores the resolved config
(``config.yaml``) so that ``test.py``, THI and RDA rebuild exactly the same model.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Iterable

import yaml

from utils.errors import ProjectError

from utils.io import read_text

# Every key a config may set, with its default (the paper's settings for CUHK-PEDES, except the
# release switches and emb_lr, which configs/rde_*.yaml and configs/icl_*.yaml set explicitly;
# see docs/DEVIATIONS.md).
DEFAULTS: dict[str, Any] = {
    # run
    "name": "RDE",
    "output_dir": "runs",
    "seed": 1,
    "device": "auto",            # auto | cpu | cuda | cuda:1 ...
    "amp": "auto",               # auto (bf16 on GPUs that support it, else fp16; off on CPU) | bf16 | fp16 | none
    "resume": False,             # continue from <run>/last.pth when it exists
    "resume_change": [],         # keys allowed to differ from the saved config on resume (utils/run_dir.py)
    "log_period": 100,
    "eval_period": 1,
    "distributed": False,        # set by train.py when started by torchrun (WORLD_SIZE > 1)
    "sync_bn": True,             # under DDP: BatchNorm statistics over the global batch (processor/sync_bn.py);
                                 # false: each GPU's share (matters with train_mode: train)
    "save_eval": True,           # write eval/<dataset>/best/ for the best epoch (THI reads it)
    # data
    "dataset_name": "CUHK-PEDES",
    "root_dir": "data",
    "anno_file": None,           # another annotation file (e.g. an RDA-augmented json)
    "val_dataset": "test",       # split evaluated during training
    "img_size": [384, 128],
    "img_aug": True,
    "txt_aug": True,
    "text_length": 77,
    "sampler": "random",         # random | identity
    "num_instance": 4,
    "batch_size": 64,
    "test_batch_size": 512,
    "num_workers": 4,
    "noisy_rate": 0.0,
    "noisy_file": None,          # index file of the shuffled pairs: the release's noiseindex/<dataset>_<rate>.npy;
                                 # a missing file is an error unless noise_draw (datasets/noise.py)
    "noise_draw": False,         # true: draw a new permutation from seed when noisy_file is missing (saved
                                 # there, never under a release name) or unset (not saved)
    "noisy_file_sha256": None,   # filled by train.py: sha256 of the noise file read (the run's record)
    "rda": True,                 # true: RDA sub-sentences when the annotation file carries them | false |
                                 # required: refuse to train without them (the ICL configs)
    # model
    "pretrain_choice": "pretrained/ViT-B-16.pt",   # OpenAI CLIP checkpoint
    "init_checkpoint": None,     # optional RDE/IRRA/our checkpoint to start from ("+pre" in the release)
    "init_text_pos": "interpolate",  # init_checkpoint's text position table of another length:
                                 # interpolate | skip (the release: keep the model's own table)
    "clip_text_pos": "interpolate",  # CLIP's 77-row text position table into text_length != 77:
                                 # interpolate (the paper) | release_random (both releases, effectively:
                                 # the table keeps its random init N(0, 0.01); docs/DEVIATIONS.md)
    "stride_size": 16,
    "select_ratio": 0.3,
    "tse_embed_dim": 1024,
    "temperature": 0.02,         # logit scale 1/temperature for InfoNCE/SDM
    # losses
    "loss_names": "TAL",         # TAL | TRL | InfoNCE | SDM
    "tau": 0.015,
    "margin": 0.1,
    "ccd": True,                 # consensus clean-sample division every epoch
    "ccd_loss_pass": "eval_transform",  # CCD's per-sample losses on: eval_transform (test transform,
                                 # no token masking) | train_loader (augmented, as both releases)
    "train_mode": "train",       # train: model.train() every epoch (RDE release) | release_icl:
                                 # eval mode throughout (ICL release: TSE BatchNorm running stats frozen)
    "rda_gamma_start": 1.0,      # g = max(rda_gamma_min, rda_gamma_start - rda_gamma_decay * epoch)
    "rda_gamma_decay": 0.03,
    "rda_gamma_min": 0.1,
    # solver
    "optimizer": "Adam",
    "lr": 1e-5,
    "lr_factor": 5.0,            # randomly initialised modules (TSE layers)
    "emb_lr": None,              # absolute lr for the TSE layers (the RDE release hard-codes 1e-3)
    "bias_lr_factor": 2.0,
    "weight_decay": 4e-5,
    "weight_decay_bias": 0.0,
    "momentum": 0.9,
    "alpha": 0.9,
    "beta": 0.999,
    "adam_eps": 1e-3,
    "num_epoch": 60,
    "lrscheduler": "cosine",     # cosine | step | exp | poly | linear | constant
    "milestones": [20, 50],
    "gamma": 0.1,
    "warmup_epochs": 5,
    "warmup_factor": 0.1,
    "warmup_method": "linear",
    "target_lr": 0.0,
    "power": 0.9,
}


class Config(dict):
    """A dict with attribute access; the resolved experiment settings."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def copy(self) -> "Config":  # type: ignore[override]
        return Config(copy.deepcopy(dict(self)))


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string; researchers write it that way, so read it as a float."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    return key, _number(yaml.safe_load(value)) if value.strip() else None


class ConfigError(ProjectError, ValueError):
    """A config value of the wrong type or out of range; the message names key, value and source."""


class UnknownConfigKey(ConfigError, KeyError):
    """A key that no config may set; the message lists the valid keys."""

    __str__ = Exception.__str__  # KeyError would print the message in quotes


# Keys whose default is None (or whose default's type is not the whole story): accepted types.
OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "anno_file": (str,), "noisy_file": (str,), "noisy_file_sha256": (str,), "init_checkpoint": (str,), "emb_lr": (float,),
}
# Keys that may also be a bool (YAML reads "amp: false" as a bool; resolve_amp treats it as none).
ALSO_BOOL = {"amp"}
# The valid range of every numeric key: (low, low included, high, high included); None is
# unbounded. Floats must also be finite (YAML reads ``.nan`` and ``.inf``). A value outside its
# range would train silently wrong (nan lr, inf temperature) or fail late (select_ratio 0 selects
# no tokens): refused at load, before anything is written.
INF = float("inf")
RANGES: dict[str, tuple[float, bool, float, bool]] = {
    # run
    "seed": (0, True, INF, False), "log_period": (1, True, INF, False), "eval_period": (1, True, INF, False),
    # data
    "img_size": (1, True, INF, False), "text_length": (1, True, INF, False),
    "num_instance": (1, True, INF, False), "batch_size": (1, True, INF, False),
    "test_batch_size": (1, True, INF, False), "num_workers": (0, True, INF, False),
    "noisy_rate": (0, True, 1, False),
    # model
    "stride_size": (1, True, INF, False), "select_ratio": (0, False, 1, True),
    "tse_embed_dim": (1, True, INF, False), "temperature": (0, False, INF, False),
    # losses
    "tau": (0, False, INF, False), "margin": (0, True, INF, False),
    "rda_gamma_start": (0, True, INF, False), "rda_gamma_decay": (0, True, INF, False),
    "rda_gamma_min": (0, True, INF, False),
    # solver
    "lr": (0, False, INF, False), "lr_factor": (0, False, INF, False), "emb_lr": (0, False, INF, False),
    "bias_lr_factor": (0, False, INF, False), "weight_decay": (0, True, INF, False),
    "weight_decay_bias": (0, True, INF, False), "momentum": (0, True, 1, False),
    "alpha": (0, True, 1, False), "beta": (0, True, 1, False), "adam_eps": (0, False, INF, False),
    "num_epoch": (1, True, INF, False), "milestones": (1, True, INF, False), "gamma": (0, False, INF, False),
    "warmup_epochs": (0, True, INF, False), "warmup_factor": (0, False, 1, True),
    "target_lr": (0, True, INF, False), "power": (0, True, INF, False),
}


def describe_range(key: str) -> str:
    """The valid values of numeric ``key`` in words ("a finite number > 0", "in (0, 1]")."""
    lo, lo_in, hi, hi_in = RANGES[key]
    default = DEFAULTS.get(key)
    if isinstance(default, list):
        return ("[height, width] of positive integers" if key == "img_size"
                else "a list of positive integers in increasing order")
    kind = "integer" if isinstance(default, int) and not isinstance(default, bool) else "number"
    if hi == INF:
        if kind == "integer":
            return "a positive integer" if (lo, lo_in) == (1, True) else f"an integer >= {lo}"
        return f"a finite number {'>=' if lo_in else '>'} {lo:g}"
    return f"a {kind} in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _in_range(key: str, value: Any) -> bool:
    lo, lo_in, hi, hi_in = RANGES[key]
    values = value if isinstance(value, list) else [value]
    if key == "milestones" and any(b <= a for a, b in zip(values, values[1:])):
        return False
    for v in values:  # nan fails every comparison and inf the open upper bound: both refused
        if not ((v >= lo) if lo_in else (v > lo)) or not ((v <= hi) if hi_in else (v < hi)):
            return False
    return True


CHOICES = {"sampler": ("random", "identity"), "val_dataset": ("val", "test"),
           # release switches (docs/DEVIATIONS.md)
           "train_mode": ("train", "release_icl"), "ccd_loss_pass": ("eval_transform", "train_loader"),
           "init_text_pos": ("interpolate", "skip"), "clip_text_pos": ("interpolate", "release_random")}
_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number (float)", str: "a string",
               list: "a list"}


def _coerce(key: str, value: Any, where: str) -> Any:
    """``value`` checked against the type of ``DEFAULTS[key]`` (ints accepted as floats, numbers as
    strings); raises ``ConfigError`` naming key, value, source and the expected type."""
    default = DEFAULTS.get(key)

    def fail(expected: str) -> ConfigError:
        example = f" (default: {default!r})" if key in DEFAULTS and default is not None else ""
        return ConfigError(f"{where}: config key '{key}' = {value!r} ({type(value).__name__}): "
                           f"expected {expected}{example}")

    if key == "resume_change" and isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if key == "rda":  # a bool, or "required" (the ICL configs)
        if isinstance(value, bool) or value == "required":
            return value
        raise fail("true, false or required")
    if value is None:
        if key in OPTIONAL_TYPES or default is None:
            return None
        raise fail(_TYPE_NAMES.get(type(default), type(default).__name__) + ", not empty")
    if key in OPTIONAL_TYPES:
        kinds = OPTIONAL_TYPES[key]
    elif default is None:
        return value  # a key without a known type (e.g. added later with a None default)
    else:
        kinds = (type(default),)
    kind = kinds[0]
    if key in ALSO_BOOL and isinstance(value, bool):
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise fail(_TYPE_NAMES[bool])
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(_TYPE_NAMES[int])
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(_TYPE_NAMES[float])
        value = float(value)
    elif kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # name=2024
        if not isinstance(value, str):
            raise fail(_TYPE_NAMES[str])
    elif kind is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise fail(_TYPE_NAMES[list])
        elem = {type(v) for v in default}
        if elem == {int}:
            if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise fail("a list of integers")
            if key == "img_size" and len(value) != 2:
                raise fail("[height, width]")
        elif elem == {str} or (key == "resume_change"):
            if not all(isinstance(v, str) for v in value):
                raise fail("a list of strings")
    if key in RANGES and not _in_range(key, value):
        raise fail(describe_range(key))
    if key in CHOICES and value not in CHOICES[key]:
        raise fail("one of " + ", ".join(CHOICES[key]))
    return value


def check_types(cfg: dict, where: str = "config") -> dict:
    """Every value of ``cfg`` type-checked (and lightly coerced) against ``DEFAULTS``."""
    return {k: _coerce(k, v, where) for k, v in cfg.items()}


def _check_keys(keys: Iterable[str], where: str, allowed: dict) -> None:
    unknown = sorted(k for k in keys if k not in allowed)
    if unknown:
        raise UnknownConfigKey(f"{where}: unknown config key(s) {unknown}; valid keys: {sorted(allowed)}")


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                base: dict | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides; unknown keys are an error naming them."""
    cfg = copy.deepcopy(DEFAULTS if base is None else dict(base))
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} not found (see configs/ for examples)")
        try:
            data = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}); fix the line shown or start from a file "
                              "under configs/") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of key: value")
        _check_keys(data, str(path), cfg)
        cfg.update(check_types({k: _number(v) for k, v in data.items()}, str(path)))
    pairs = [_parse_override(o) for o in overrides]
    _check_keys([k for k, _ in pairs], "command line", cfg)
    cfg.update((k, _coerce(k, v, "command line")) for k, v in pairs)
    return Config(cfg)
