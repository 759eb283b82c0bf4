"""python -m repro: the published numbers, xi from the Fig. 3 histograms, the writers, dry runs
of both worlds, and (slow) the whole mini paper at CI scale, twice (the second run reuses
every run directory)."""
from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pytest

from repro import paper, report, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Published numbers ----------------------------------------------------------------------------
def test_paper_tables_hold_the_printed_numbers():
    assert paper.lookup("icl1", "R1", method="RDE", group=1, test="CUHK-PEDES") == 75.94
    assert paper.lookup("icl1", "R1", method="ICL", group=2, thi=1, test="RSTPReid") == 72.55
    assert paper.lookup("icl1", "mINP", method="ICL", group=1, thi=0, test="ICFG-PEDES") == 8.18
    assert paper.lookup("icl2", "mAP", method="ICL", group=2, thi=1) == 90.33
    assert paper.lookup("icl3", "R1", method="ICL", thi=1, train="ICFG-PEDES", test="RSTPReid") == 60.15
    assert paper.lookup("icl4", "R1", method="RDE", train="UFine6926", test="CUHK-PEDES") == 39.41
    assert paper.lookup("icl4", "mINP", method="ICL", thi=1, train="RSTPReid", test="UFine6926") == 21.80
    assert paper.lookup("icl5", "R1", method="CLIP", thi=1, test="RSTPReid") == 61.45
    assert paper.lookup("icl5", "dAvg", method="IRRA") == 1.86
    assert paper.lookup("icl6", "mAP", row="#1", test="CUHK-PEDES") == 69.32
    assert paper.lookup("rde_noise", "mINP", method="RDE", noise="0.8", checkpoint="best",
                        test="RSTPReid") == 18.28
    assert paper.lookup("rde_noise", "R1", method="IRRA", noise="0.5", checkpoint="last",
                        test="CUHK-PEDES") == 42.79
    assert paper.lookup("rde_ablation", "R1", row="#7") == 63.11
    # a dash in the paper is no number
    assert paper.lookup("icl1", "mINP", method="RaSa", test="CUHK-PEDES") is None
    with pytest.raises(ValueError):
        paper.lookup("icl1", "R1", method="ICL", test="CUHK-PEDES")  # groups and THI differ


def test_paper_files_are_complete_and_unique():
    counts = {"icl1": 199, "icl2": 46, "icl3": 180, "icl4": 120, "icl5": 39, "icl6": 24,
              "rde_noise": 597, "rde_ablation": 35}
    keys = ("table", "row", "method", "group", "thi", "train", "test", "noise", "checkpoint", "metric")
    for name, n in counts.items():
        rows = paper.load(name)
        assert len(rows) == n, name
        assert len({tuple(r[k] for k in keys) for r in rows}) == n, f"{name}: duplicate rows"
        assert all(0.0 <= r["value"] <= 100.0 for r in rows)
    # Table 1's group 1 ICL rows equal Table 3's diagonal and Table 6 #3 (the same models)
    for ds in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid"):
        t1 = paper.lookup("icl1", "R1", method="ICL", group=1, thi=0, test=ds)
        assert t1 == paper.lookup("icl3", "R1", method="ICL", thi=0, train=ds, test=ds)
        assert t1 == paper.lookup("icl6", "R1", row="#3", test=ds)


# Reading run directories ----------------------------------------------------------------------
def test_xi_crossover_by_hand():
    top1 = np.array([0.6, 0.2, 0.7, 0.3, 0.8, 0.5, 0.85])
    correct = np.array([1, 0, 1, 0, 1, 0, 0], dtype=bool)
    # sorted: 0.2 w, 0.3 w, 0.5 w, 0.6 c, 0.7 c, 0.8 c, 0.85 w: one misplaced query at 0.55
    # (the wrong 0.85 above it), two or more at any other cut
    assert results.xi_crossover(top1, correct) == pytest.approx(0.55)
    assert results.xi_crossover(np.array([0.1, 0.9]), np.array([False, True])) == pytest.approx(0.5)
    # everything wrong: a threshold at the highest similarity (no query passes it)
    assert results.xi_crossover(np.array([0.3, 0.4]), np.array([False, False])) == pytest.approx(0.4)


def test_top1_and_first_correct_rank():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]], dtype=np.float32)
    q, g = np.array([7, 8]), np.array([9, 8, 7])
    st = results.top1_stats(sim, q, g)
    assert st["top1"].tolist() == pytest.approx([0.9, 0.8])
    assert st["correct"].tolist() == [False, False]
    assert results.first_correct_rank(sim, q, g).tolist() == [2, 2]


def test_best_and_last_from_metrics_json(tmp_path):
    def ep(e, r1):
        return {"epoch": e, "metrics": {"t2i": {"R1": r1, "R5": 1, "R10": 2, "mAP": 3, "mINP": 4}}}

    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [ep(1, 10.0), ep(2, 30.0), ep(3, 20.0)]}))
    r = results.best_and_last(str(tmp_path))
    assert (r["best_epoch"], r["best"]["R1"], r["last_epoch"], r["last"]["R1"]) == (2, 30.0, 3, 20.0)


def test_report_effects_and_markdown(tmp_path):
    hi = report.row("ICL", "A", {"R1": 12.0}, {"R1": 76.41}, ["R1"])
    lo = report.row("RDE", "A", {"R1": 10.0}, {"R1": 75.94}, ["R1"])
    e = report.effect("RDA", "A", "R1", hi["ours"], lo["ours"], hi["paper"], lo["paper"])
    assert e["ours"] == pytest.approx(2.0) and e["paper"] == pytest.approx(0.47) and e["same_sign"]
    e2 = report.effect("RDA", "A", "R1", lo["ours"], hi["ours"], hi["paper"], lo["paper"])
    assert e2["same_sign"] is False
    report.write(str(tmp_path), "t", "T", [hi, lo], ["R1"], effects=[e])
    md = (tmp_path / "t.md").read_text()
    assert "| ICL | A | 12.00 | 76.41 | -64.41 |" in md
    assert "| RDA | A | R1 | +2.00 | +0.47 | yes |" in md
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["row"] for r in rows] == ["ICL", "RDE"] and float(rows[0]["difference"]) == pytest.approx(-64.41)


# Dry runs: the commands, no files ------------------------------------------------------------
def _main(argv, capsys, monkeypatch):
    from repro.cli import main

    monkeypatch.chdir(ROOT)
    assert main(argv) == 0
    return capsys.readouterr().out


def test_dry_run_real_world_prints_the_paper_commands(tmp_path, capsys, monkeypatch):
    out = _main(["all", "--world", "real", "--dry-run", "--root", "data", "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "res"), "--mllm", "/m/Qwen2-VL-7B-Instruct", "--lora", "/m/lora",
                 "--gpus", "2", "--pre-checkpoint", "/m/pre"], capsys, monkeypatch)
    assert "torchrun --nproc_per_node 2 train.py --config configs/rde_cuhk_pedes.yaml" in out
    assert "configs/icl_ufine6926.yaml" in out and "init_checkpoint=/m/pre/best0.pth" in out
    assert "noisy_rate=0.8" in out and "-m rda generate --dataset RSTPReid" in out
    assert "test.py " + str(tmp_path / "runs" / "rde_CUHK-PEDES") + " --dataset ICFG-PEDES" in out
    assert "--xi 0.55" in out and "--lora /m/lora" in out
    nolora = [line for line in out.splitlines() if "SynthPEDES_nolora" in line or "_nolora --cache" in line]
    assert nolora and all("--lora" not in line for line in nolora)
    for name in ("table1", "table2", "table34", "table5", "table6", "rde_noise", "fig3", "fig5", "fig6", "fig7"):
        assert f"  {name}" in out
    assert "basis:" in out and "pairs/s" in out
    assert not os.path.exists(tmp_path / "res") and not os.path.exists(tmp_path / "runs")


def _thi_lines(out):
    return [line for line in out.splitlines() if " -m thi " in line]


def test_real_plan_lists_what_it_will_not_run(tmp_path, capsys, monkeypatch):
    """Before: without --lora the starred rows and Table 6 #1 ran THI on the base model; without
    --pre-checkpoint group 2 vanished from the plan and its time; no SFT step; nine no-CCD runs."""
    out = _main(["all", "--world", "real", "--dry-run", "--runs", str(tmp_path / "runs"),
                 "--mllm", "/m/Qwen2-VL-7B-Instruct", "--gpus", "2"], capsys, monkeypatch)
    # every THI command names its model's tuning: only Table 6 #2 runs without the LoRA, explicitly
    assert _thi_lines(out) and all("--no-lora" in line for line in _thi_lines(out))
    assert "[not run, would take ~" in out and "#1 + RDA + THI on CUHK-PEDES: needs THI's LoRA-tuned MLLM" in out
    assert "❶ ICL⋆ on RSTPReid: needs THI's LoRA-tuned MLLM" in out
    assert "❷ ICL on ICFG-PEDES: group 2 (+pre) needs --pre-checkpoint" in out and "best1.pth" in out
    assert "fig5: not run: needs THI's LoRA-tuned MLLM" in out
    summary = out[out.index("not run as configured"):]
    assert "table1" in summary and "table2" in summary and "sft" in summary
    # the SFT step: inputs, commands and the supplement's estimate (11 h on two GPUs)
    assert "[repro] sft: not run: pass --train-lora" in out and "would take ~11.7 h" in out  # 11 h + 4 x 10 min
    assert out.count(" -m rda sft --run ") == 4 and "scripts/sft_lora.sh train /m/Qwen2-VL-7B-Instruct" in out
    assert "dataset=icl_anchor_cuhk_pedes,icl_anchor_icfg_pedes,icl_anchor_rstpreid,icl_anchor_ufine6926" in out
    # the noise table: the release's files, and one no-CCD run (RDE Table 2 #7: CUHK-PEDES, 50 %)
    trains = [line for line in out.splitlines() if "train.py --config" in line]
    assert sum("ccd=false" in line for line in trains if "rde-noccd" in line) == 1
    assert any("rde-noccd_CUHK-PEDES_n0.5" in line and "noisy_file=noiseindex/CUHK-PEDES_0.5.npy" in line
               for line in trains)
    assert "noisy_file=noiseindex/RSTPReid_0.8.npy" in out and "(needs noiseindex/RSTPReid_0.8.npy" in out


def test_real_plan_with_a_tuned_model(tmp_path, capsys, monkeypatch):
    base = ["--world", "real", "--dry-run", "--runs", str(tmp_path / "runs"), "--mllm", "/m/base"]
    out = _main(["table6", *base, "--merged-mllm", "/m/merged"], capsys, monkeypatch)
    thi = _thi_lines(out)
    assert sum("--model /m/merged --merged" in line for line in thi) == 3          # #1 on three sets
    assert sum("--no-lora" in line and "--model /m/merged" not in line for line in thi) == 3  # #2
    out = _main(["table1", *base, "--train-lora", "--datasets", "CUHK-PEDES,RSTPReid",
                 "--pre-checkpoint", "CUHK-PEDES=/m/a.pth", "--pre-checkpoint", "RSTPReid=/m/b.pth"],
                capsys, monkeypatch)
    adapter = os.path.join(str(tmp_path / "runs"), "sft", "icl_lora")
    assert out.index("anchor-localization LoRA") < out.index(" -m thi ")
    assert all(f"--lora {adapter}" in line for line in _thi_lines(out))
    assert "init_checkpoint=/m/a.pth" in out and "name=icl_RSTPReid_pre-b" in out
    assert "icl_CUHK-PEDES_pre-a" in out and "not run" not in out
    out = _main(["table5", *base, "--lora", "/m/l", "--datasets", "CUHK-PEDES", "--rde-weights",
                 "CUHK-PEDES=/m/rde_best.pth"], capsys, monkeypatch)
    assert "evaluate RDE's released weights on CUHK-PEDES" in out and "--weights /m/rde_best.pth" in out
    from repro.cli import main
    with pytest.raises(SystemExit, match="one file"):
        main(["table1", *base, "--pre-checkpoint", os.path.join(ROOT, "README.md")])


def test_dry_run_mini_world(tmp_path, capsys, monkeypatch):
    out = _main(["table1", "--world", "mini", "--scale", "ci", "--dry-run", "--runs", str(tmp_path / "r"),
                 "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert "--backend simulated" in out and "<xi: Fig. 3 crossover of" in out
    assert "init_checkpoint=" + str(tmp_path / "r" / "rde_ICFG-PEDES" / "best.pth") in out
    assert not os.path.exists(tmp_path / "o")


# The mini paper at CI scale -------------------------------------------------------------------
@pytest.mark.slow
def test_mini_paper_ci_scale_writes_every_table_and_reuses_runs(tmp_path, capsys, monkeypatch):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    _main(["all", "--world", "mini", "--scale", "ci", "--runs", runs, "--out", out], capsys, monkeypatch)
    for name in ("table1", "table2", "table34", "table5", "table6", "rde_noise", "fig6"):
        for ext in ("md", "csv", "json"):
            assert os.path.isfile(os.path.join(out, f"{name}.{ext}")), (name, ext)
    for name in ("fig3", "fig5", "fig6", "fig7"):
        from PIL import Image

        with Image.open(os.path.join(out, f"{name}.png")) as im:
            assert im.size[0] > 300 and im.size[1] > 150
    # shapes: two domains; table1 5 rows each, table34 3 rows per (source, target), 5 metrics
    t1 = json.load(open(os.path.join(out, "table1.json")))
    assert len(t1["rows"]) == 10 and all(r["status"] == "ok" for r in t1["rows"])
    assert len(json.load(open(os.path.join(out, "table34.json")))["rows"]) == 12
    assert len(json.load(open(os.path.join(out, "table6.json")))["rows"]) == 8
    noise = json.load(open(os.path.join(out, "rde_noise.json")))
    assert len(noise["rows"]) == 2 + 4  # CUHK domain: clean best/last + 50% with and without CCD
    for path in glob.glob(os.path.join(out, "*.json")):
        data = json.load(open(path))
        for r in data.get("rows", []):
            for v in r.get("ours", {}).values():
                assert v is None or 0.0 <= v <= 100.0
    assert {e["effect"] for e in t1["effects"]} >= {"RDA (ICL - RDE)", "+pre (❷ ICL - ❶ ICL)"}
    series = json.load(open(os.path.join(out, "fig6.json")))["series"]
    assert all(len(s) == 3 for s in series.values())  # base + 2 rounds at CI scale
    # the paper's numbers sit beside ours
    assert t1["rows"][0]["paper"]["R1"] == 75.94
    # a second run reuses every run directory: nothing is trained or run again
    stamp = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(runs, "*", "best.pth"))}
    text = _main(["all", "--world", "mini", "--scale", "ci", "--runs", runs, "--out", out], capsys, monkeypatch)
    assert "[repro] cached:" in text and "[repro] train " not in text
    assert stamp == {p: os.path.getmtime(p) for p in glob.glob(os.path.join(runs, "*", "best.pth"))}


def test_mini_config_errors_name_the_problem(tmp_path):
    import yaml

    from repro.worlds import MiniWorld

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "repro_mini.yaml")))
    with pytest.raises(ValueError, match="no scale 'tiny'"):
        MiniWorld(cfg, scale="tiny")
    bad = {**cfg, "domains": {"Market-1501": cfg["domains"]["CUHK-PEDES"]}}
    with pytest.raises(ValueError, match="Market-1501"):
        MiniWorld(bad)
    w = MiniWorld(cfg, scale="ci", runs=str(tmp_path))
    # CI scale never touches the full-scale folders
    assert all(d["root"].startswith(str(tmp_path)) for d in w.domains.values())
    assert w.pretrained.startswith(str(tmp_path)) and w.rounds == 2


def test_effect_without_change_has_no_sign():
    e = report.effect("THI", "A", "R1", {"R1": 5.0}, {"R1": 5.0}, {"R1": 2.0}, {"R1": 1.0})
    assert e["ours"] == 0.0 and e["same_sign"] is None
