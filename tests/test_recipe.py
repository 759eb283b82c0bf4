"""The paper's training recipe as the releases set it (docs/DEVIATIONS.md): per-parameter learning
rates and weight decay of every paper config, "+pre" initialisation, RDA required by the ICL
configs, and the release switches (train_mode, ccd_loss_pass, init_text_pos)."""
import json
import os

import pytest
import torch

from model import TEXT_POS_KEY, build_model, load_init_checkpoint
from model.clip import resize_text_pos_embed
from solver import build_optimizer
from utils.config import DEFAULTS, Config, load_config

DATASETS = {"cuhk_pedes": "CUHK-PEDES", "icfg_pedes": "ICFG-PEDES", "rstpreid": "RSTPReid",
            "ufine6926": "UFine6926"}
PAPER_CONFIGS = [f"configs/{m}_{d}.yaml" for d in DATASETS for m in ("rde", "icl")]
TSE = ("visul_emb_layer.", "texual_emb_layer.")


def _tiny(config, clip, **kw):
    """A paper config on the tiny CLIP (the optimizer rules only look at names and text_length)."""
    items = {"pretrain_choice": clip, "img_size": "[64, 32]", "tse_embed_dim": 32, **kw}
    return load_config(config, [f"{k}={v}" for k, v in items.items()])


def _release_lr_wd(name, text_length):
    """The releases' solver/build.py rules, written out independently of solver/."""
    bias = "bias" in name
    wd = 0.0 if bias else 4e-5
    if name.startswith(TSE):
        return 1e-3, wd                     # biases too, after the bias rule: their wd stays 0
    if name == TEXT_POS_KEY and text_length != 77:
        return 5e-5, wd                     # ICL: lr x lr_factor for the resized text table
    return (2e-5 if bias else 1e-5), wd


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_every_parameter_gets_the_release_lr_and_weight_decay(config, tiny_clip_path):
    cfg = _tiny(config, tiny_clip_path)
    assert (cfg.lr, cfg.emb_lr, cfg.lr_factor, cfg.adam_eps) == (1e-5, 1e-3, 5.0, 1e-3)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert opt.defaults["eps"] == 1e-3
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable
    for name, (lr, wd) in groups.items():
        assert (lr, wd) == pytest.approx(_release_lr_wd(name, cfg.text_length)), name
    # The kinds the issue names, spelled out.
    assert groups["texual_emb_layer.linear.bias"] == pytest.approx((1e-3, 0.0))
    assert groups["visul_emb_layer.fc.weight"] == pytest.approx((1e-3, 4e-5))
    assert groups["base_model.ln_final.bias"] == pytest.approx((2e-5, 0.0))
    pos = 5e-5 if "ufine" in config else 1e-5
    assert groups[TEXT_POS_KEY] == pytest.approx((pos, 4e-5))
    assert groups["base_model.visual.positional_embedding"] == pytest.approx((1e-5, 4e-5))


def test_paper_configs_carry_the_release_switches():
    for config in PAPER_CONFIGS:
        cfg = load_config(config)
        icl = "/icl_" in config
        assert cfg.dataset_name == DATASETS[config.split("_", 1)[1][:-5]]
        assert cfg.text_length == (168 if "ufine" in config else 77)
        assert cfg.train_mode == ("release_icl" if icl else "train"), config
        assert cfg.ccd_loss_pass == "train_loader", config
        assert cfg.rda == ("required" if icl else False), config
        assert cfg.init_checkpoint is None and cfg.init_text_pos == "interpolate"
        assert (cfg.batch_size, cfg.num_epoch, cfg.tau, cfg.margin, cfg.select_ratio) == (64, 60, 0.015, 0.1, 0.3)


# ---------------------------------------------------------------------------------- +pre
@pytest.fixture(scope="module")
def pre_checkpoint(tiny_clip_path, tmp_path_factory):
    """A 77-token TIReID checkpoint as the release saves it under DDP: {'model': {'module.' + key}}."""
    torch.manual_seed(3)
    model = build_model(_tiny(None, tiny_clip_path))
    sd = {f"module.{k}": v.clone() + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("pre") / "best0.pth"
    torch.save({"model": sd}, path)
    return str(path), {k[len("module."):]: v for k, v in sd.items()}


@pytest.mark.parametrize("mode", ["interpolate", "skip"])
def test_pre_from_77_tokens_into_168(pre_checkpoint, tiny_clip_path, mode):
    path, ref = pre_checkpoint
    plain = build_model(_tiny("configs/icl_ufine6926.yaml", tiny_clip_path))
    model = build_model(_tiny("configs/icl_ufine6926.yaml", tiny_clip_path, init_checkpoint=path,
                              init_text_pos=mode))
    assert ref[TEXT_POS_KEY].shape[0] == 77 and model.state_dict()[TEXT_POS_KEY].shape[0] == 168
    report = load_init_checkpoint(build_model(_tiny("configs/icl_ufine6926.yaml", tiny_clip_path)), path,
                                  text_pos=mode)
    assert report["interpolated" if mode == "interpolate" else "skipped"] == [TEXT_POS_KEY]
    assert report["skipped" if mode == "interpolate" else "interpolated"] == []
    assert set(report["loaded"]) == set(ref) - {TEXT_POS_KEY} and report["unexpected"] == []
    assert report["missing"] == []                          # a skipped key is reported as skipped
    sd = model.state_dict()
    for key in ("texual_emb_layer.mlp.layers.0.weight", "base_model.visual.conv1.weight",
                "visul_emb_layer.mlp.bns.0.running_mean"):
        assert torch.equal(sd[key], ref[key]), key
    want = resize_text_pos_embed(ref[TEXT_POS_KEY], 168) if mode == "interpolate" else plain.state_dict()[TEXT_POS_KEY]
    assert torch.equal(sd[TEXT_POS_KEY], want)


def test_pre_rejects_other_shape_mismatches(pre_checkpoint, tiny_clip_path):
    path, _ = pre_checkpoint
    with pytest.raises(RuntimeError, match="visul_emb_layer.fc.weight"):
        build_model(_tiny(None, tiny_clip_path, init_checkpoint=path, tse_embed_dim=16))
    with pytest.raises(ValueError, match="init_text_pos"):
        build_model(_tiny(None, tiny_clip_path, init_checkpoint=path, init_text_pos="resize"))


# ------------------------------------------------------------------------ RDA required
@pytest.mark.parametrize("config", [c for c in PAPER_CONFIGS if "/icl_" in c])
def test_icl_configs_refuse_to_train_without_their_rda_file(config, tmp_path):
    from processor.trainer import train

    ds = DATASETS[config.split("_", 1)[1][:-5]]
    out = tmp_path / "runs"
    cfg = load_config(config, [f"root_dir={tmp_path / 'data'}", f"output_dir={out}", "device=cpu",
                               f"noisy_file={tmp_path / 'noise.npy'}", "noisy_rate=0.2", "noise_draw=true"])
    with pytest.raises(FileNotFoundError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert str(tmp_path / "data" / ds) in msg and ".rda.json" in msg
    assert "python -m rda generate" in msg and "RDA_data.zip" in msg and "anno_file=" in msg
    assert os.listdir(tmp_path) == []                       # nothing written: no run dir, no noise index

    # A plain annotation file is not an RDA file.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"id": 1, "file_path": "a.jpg", "captions": ["x"], "split": "train"}]))
    cfg.anno_file = str(plain)
    with pytest.raises(ValueError, match="diversity_captions"):
        train(cfg, progress=False)
    assert not out.exists() and not (tmp_path / "noise.npy").exists()


def test_rda_file_found_at_the_generated_default(tmp_path):
    from datasets.rda_file import expected_rda_file, require_rda_file

    path = expected_rda_file("ICFG-PEDES", tmp_path)
    assert path == tmp_path / "ICFG-PEDES" / "ICFG-PEDES.rda.json"
    path.parent.mkdir()
    path.write_text('[{"id": 0, "diversity_captions": []}]')
    cfg = load_config("configs/icl_icfg_pedes.yaml", [f"root_dir={tmp_path}"])
    assert require_rda_file(cfg) == str(path)
    assert require_rda_file(load_config("configs/rde_icfg_pedes.yaml", [f"root_dir={tmp_path}"])) is None
    with pytest.raises(ValueError, match="rda"):
        load_config(None, ["rda=sometimes"])
    with pytest.raises(ValueError, match="rda="):
        require_rda_file(Config({**DEFAULTS, "rda": "sometimes"}))


# ------------------------------------------------------------------------ switches
def _synth_cfg(clip, root, out, **kw):
    items = {"dataset_name": "SynthPEDES", "root_dir": root, "output_dir": str(out), "pretrain_choice": clip,
             "img_size": "[64, 32]", "tse_embed_dim": 32, "batch_size": 32, "test_batch_size": 128,
             "num_workers": 0, "img_aug": True, "txt_aug": True, "num_epoch": 1, "warmup_epochs": 0,
             "log_period": 1000, "device": "cpu", "save_eval": False, "seed": 0, "ccd": False, "eval_period": 100}
    items.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def test_ccd_loss_pass_selects_augmented_or_plain_batches(tiny_clip_path, synth_root, tmp_path):
    from datasets import build_dataloader
    from processor.trainer import ccd_loader
    from utils.tokenizer import tokenize

    cfg = _synth_cfg(tiny_clip_path, synth_root, tmp_path, ccd_loss_pass="eval_transform")
    loaders = build_dataloader(cfg)
    loaders.set_epoch(1)
    captions = [item[3] for item in loaders.train.dataset.train]
    plain = next(iter(ccd_loader(loaders, cfg, 1)))
    want = torch.stack([tokenize(captions[i]) for i in plain["index"].tolist()])
    assert torch.equal(plain["caption_ids"], want)        # no token masking
    cfg.ccd_loss_pass = "train_loader"
    aug = next(iter(ccd_loader(loaders, cfg, 1)))
    assert torch.equal(aug["index"], plain["index"])       # same pairs, same batches
    assert not torch.equal(aug["caption_ids"], plain["caption_ids"])
    assert (aug["caption_ids"] == 49405).any()              # RDE's <|mask|> token: txt_aug ran
    assert not torch.allclose(aug["images"], plain["images"])
    # Fresh draws: not the augmentations the training pass of the same epoch sees.
    train_view = torch.stack([loaders.train.dataset[i]["caption_ids"] for i in aug["index"].tolist()])
    assert not torch.equal(aug["caption_ids"], train_view)
    assert loaders.train.dataset.epoch == 1                 # the training pass's epoch is untouched


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """10 identities: one training step per epoch keeps the two training runs below short."""
    from offline.synthpedes import generate

    root = tmp_path_factory.mktemp("micro")
    generate(root / "SynthPEDES", num_ids=10, images_per_id=2, seed=0)
    return str(root)


@pytest.mark.parametrize("mode", ["train", "release_icl"])
def test_train_mode_updates_batchnorm_statistics_or_not(tiny_clip_path, micro_root, tmp_path, mode):
    from processor.trainer import train

    cfg = _synth_cfg(tiny_clip_path, micro_root, tmp_path, train_mode=mode, batch_size=64, img_aug=False,
                     txt_aug=False)
    train(cfg, str(tmp_path / mode), progress=False)
    sd = torch.load(tmp_path / mode / "last.pth", map_location="cpu", weights_only=False)["model"]
    fresh = build_model(cfg).state_dict()
    for layer in ("visul_emb_layer", "texual_emb_layer"):
        key = f"{layer}.mlp.bns.0"
        tracked = int(sd[f"{key}.num_batches_tracked"])
        moved = not torch.equal(sd[f"{key}.running_mean"], fresh[f"{key}.running_mean"])
        if mode == "train":
            assert tracked > 0 and moved, key
        else:
            assert tracked == 0 and not moved, key
        # BatchNorm's affine parameters train in both modes.
        assert not torch.equal(sd[f"{key}.weight"], fresh[f"{key}.weight"]), key
    with pytest.raises(ValueError, match="train_mode"):
        train(_synth_cfg(tiny_clip_path, micro_root, tmp_path / "x", train_mode="eval"), progress=False)
    assert not (tmp_path / "x").exists()


def test_thi_generates_up_to_the_release_limit():
    """The release's vLLM max_tokens (2048): a 15-answer VQA reply can exceed 512 tokens."""
    import inspect

    from thi.cli import build_parsers
    from thi.pipeline import run_thi
    from thi.sweep import run_sweep

    for parser in build_parsers():
        assert parser.get_default("max_tokens") == 2048, parser.prog
    for fn in (run_thi, run_sweep):
        assert inspect.signature(fn).parameters["max_tokens"].default == 2048, fn.__name__


def test_special_tokens_written_in_a_caption_are_one_token_each():
    """As the releases' utils/simple_tokenizer.py: <|startoftext|>, <|endoftext|> and RDE/IRRA's
    <|mask|> (id 49405, which replaces CLIP's last merge) are matched before BPE."""
    from utils.tokenizer import SimpleTokenizer, tokenize

    tok = SimpleTokenizer()
    assert tok.encode("a <|mask|> coat<|endoftext|>") == [320, 49405, 7356, 49407]
    assert tok.encode("<|StartOfText|>man") == [49406, 786]
    assert tokenize("<|mask|>")[:3].tolist() == [49406, 49405, 49407]
    assert tok.decode([49405]) == "<|mask|>" and tok.vocab_size == 49408


# ------------------------------------------------------------------------ noise files
def test_noisy_run_refuses_a_missing_noise_file_and_records_the_one_it_reads(tiny_clip_path, micro_root,
                                                                          tmp_path, capsys):
    """The release's run_rde.sh names noiseindex/<dataset>_<rate>.npy: a missing file stops the run
    before anything is written (no new permutation under the release's name); the file read is
    recorded with its sha256 in the run's config.yaml."""
    import hashlib

    import numpy as np
    import yaml

    from datasets.noise import NoiseFileError
    from processor.trainer import train

    missing = tmp_path / "noiseindex" / "SynthPEDES_0.5.npy"
    cfg = _synth_cfg(tiny_clip_path, micro_root, tmp_path / "runs", noisy_rate=0.5, noisy_file=str(missing),
                     batch_size=64, img_aug=False, txt_aug=False)
    with pytest.raises(NoiseFileError, match="2024-CVPR-RDE/noiseindex"):
        train(cfg, progress=False)
    assert not (tmp_path / "runs").exists() and not missing.parent.exists()
    import train as train_cli  # the command line says the same, without a traceback
    assert train_cli.main(["device=cpu", f"noisy_file={missing}", "noisy_rate=0.5",
                           f"output_dir={tmp_path / 'runs'}"]) == 2
    assert "2024-CVPR-RDE/noiseindex" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

    # The release's files are read as they are (int64 permutation), and identified in the run.
    from datasets import build_dataset
    n = len(build_dataset("SynthPEDES", micro_root).train)
    index = np.arange(n)
    index[: n // 2] = np.roll(index[: n // 2], 1)
    missing.parent.mkdir()
    np.save(missing, index)
    train(cfg, str(tmp_path / "runs" / "noisy"), progress=False)
    saved = yaml.safe_load((tmp_path / "runs" / "noisy" / "config.yaml").read_text())
    assert saved["noisy_file"] == str(missing)
    assert saved["noisy_file_sha256"] == hashlib.sha256(missing.read_bytes()).hexdigest()
    assert np.array_equal(np.load(missing), index)          # read, never rewritten


# ------------------------------------------------------------------- UFine6926's 168 positions
@pytest.mark.parametrize("mode", ["interpolate", "release_random"])
def test_168_token_text_positions_from_clip(tiny_clip_path, pre_checkpoint, mode):
    """Both releases resize the 77-row table with F.interpolate(posemb.reshape(1, 1, 77, D), 168,
    mode='bilinear'), which gives [1, 168, 168]; copying that into the [168, D] table fails inside a
    bare except, so the table keeps its random N(0, 0.01) init (and "+pre" skips it). Ours by
    default: linear interpolation (the paper's text). clip_text_pos=release_random: the release."""
    import torch.nn.functional as F

    from model.clip import read_clip_state_dict

    clip_pos = read_clip_state_dict(tiny_clip_path)["positional_embedding"].float()
    width = clip_pos.shape[1]
    released = F.interpolate(clip_pos.reshape(1, 1, 77, width), 168, mode="bilinear").squeeze(0)
    assert released.shape == (1, 168, 168) != (168, width)          # the copy cannot succeed
    torch.manual_seed(0)
    model = build_model(_tiny("configs/rde_ufine6926.yaml", tiny_clip_path, clip_text_pos=mode))
    table = model.state_dict()[TEXT_POS_KEY]
    assert table.shape == (168, width)
    if mode == "interpolate":
        assert torch.equal(table, resize_text_pos_embed(clip_pos, 168))
    else:
        assert abs(float(table.std()) - 0.01) < 0.002                 # the random init, N(0, 0.01)
        assert not torch.allclose(table[:77], clip_pos, atol=1e-3)
        # "+pre" with the release's skip keeps that random table too.
        path, _ = pre_checkpoint
        pre = build_model(_tiny("configs/rde_ufine6926.yaml", tiny_clip_path, clip_text_pos=mode,
                                init_checkpoint=path, init_text_pos="skip"))
        assert abs(float(pre.state_dict()[TEXT_POS_KEY].std()) - 0.01) < 0.002
    # At 77 tokens both modes load CLIP's table unchanged.
    short = build_model(_tiny("configs/rde_cuhk_pedes.yaml", tiny_clip_path, clip_text_pos=mode))
    assert torch.equal(short.state_dict()[TEXT_POS_KEY], clip_pos)
