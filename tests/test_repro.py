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


def test_report_rows_and_markdown(tmp_path):
    hi = report.row("ICL", "A", [{"R1": 12.0}, {"R1": 14.0}], {"R1": 76.41}, ["R1"], seeds=[0, 1])
    lo = report.row("RDE", "A", {"R1": 10.0}, {"R1": 75.94}, ["R1"])
    assert hi["ours"]["R1"] == pytest.approx(13.0) and hi["spread"]["R1"] == pytest.approx(2 ** 0.5)
    e = report.effect("RDA", "A", "R1", hi, lo)
    assert e["ours"] == pytest.approx(3.0) and e["paper"] == pytest.approx(0.47)
    report.write(str(tmp_path), "t", "T", [hi, lo], ["R1"], effects=[e])
    md = (tmp_path / "t.md").read_text()
    assert "| ICL | A | 13.00 ± 1.41 | 76.41 | -63.41 |" in md and "| RDE | A | 10.00 | 75.94 | -65.94 |" in md
    assert "| RDA | A | R1 | +3.00 | - | +0.47 | - |" in md  # no per-query values: no interval
    rows = list(csv.DictReader(line for line in open(tmp_path / "t.csv") if not line.startswith("#")))
    assert [r["row"] for r in rows] == ["ICL", "RDE", "RDA"] and float(rows[0]["difference"]) == pytest.approx(-63.41)


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
    import re

    assert re.search("init_checkpoint=" + re.escape(str(tmp_path / "r" / "s0" / "rde_ICFG-PEDES-"))
                     + r"[0-9a-f]{10}/best\.pth", out)
    assert "--mllm-profile tiny-qwen2vl" in out and "--mllm-profile oracle" in out
    assert not os.path.exists(tmp_path / "o")


# The mini paper at CI scale -------------------------------------------------------------------
@pytest.mark.slow
def test_mini_paper_ci_scale_writes_every_table_and_reuses_runs(tmp_path, capsys, monkeypatch):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    _main(["all", "--world", "mini", "--scale", "ci", "--runs", runs, "--out", out], capsys, monkeypatch)
    for name in ("table1", "table2", "table34", "table5", "table6", "rda_modes", "rde_noise", "fig6"):
        for ext in ("md", "csv", "json"):
            assert os.path.isfile(os.path.join(out, f"{name}.{ext}")), (name, ext)
    for name in ("fig3", "fig5", "fig6", "fig7"):
        from PIL import Image

        with Image.open(os.path.join(out, f"{name}.png")) as im:
            assert im.size[0] > 300 and im.size[1] > 150
    # shapes: two domains; table1 5 rows each, table34 3 rows per (source, target), 5 metrics
    t1 = json.load(open(os.path.join(out, "table1.json")))
    # 5 rows + 2 oracle rows per domain; effects with intervals (over queries: one seed) and verdicts
    assert len(t1["rows"]) == 14 and all(r["status"] == "ok" for r in t1["rows"])
    assert all(e["ci"] is not None and e["ci"][0] - 1e-9 <= e["ours"] <= e["ci"][1] + 1e-9 for e in t1["effects"])
    assert {e["verdict"] for e in t1["effects"]} <= {"paper's direction", "opposite", "within noise"}
    assert len(json.load(open(os.path.join(out, "table34.json")))["rows"]) == 12
    # Table 6 again with a second seed, two jobs side by side: only seed 1's jobs run
    text = _main(["table6", "--world", "mini", "--scale", "ci", "--runs", runs, "--out", out,
                  "--seeds", "2", "--jobs", "2"], capsys, monkeypatch)
    assert "[repro] [cached] train rde_CUHK-PEDES (seed 0)" in text
    started = [line for line in text.splitlines() if line.startswith("[repro] start ")]
    assert any("train rde_CUHK-PEDES (seed 1)" in line for line in started)
    assert not any("(seed 0)" in line for line in started)
    t6 = json.load(open(os.path.join(out, "table6.json")))
    assert len(t6["rows"]) == 10
    assert all(r["seeds"] == [0, 1] and len(r["per_seed"]) == 2 for r in t6["rows"])
    assert all(e["ci"] is not None for e in t6["effects"])
    # provenance in every result file: each run's folder, identity and seed
    prov = t6["provenance"]
    assert prov["commit"] and prov["seeds"] == [0, 1] and "torch" in prov["packages"]
    assert any(r["seed"] == 1 and "/s1/" in r["dir"] for r in prov["runs"])
    assert "Provenance: commit" in open(os.path.join(out, "table1.md")).read()
    assert open(os.path.join(out, "table1.csv")).readline().startswith("# provenance:")
    for name in ("fig3", "fig5", "fig7"):
        assert json.load(open(os.path.join(out, f"{name}.json")))["provenance"]["runs"]
    rda = json.load(open(os.path.join(out, "rda_modes.json")))
    lengths = rda["token_lengths"]
    assert {k.split()[-1] for k in lengths} == {"keep", "concise"}
    assert all(v["original"]["n"] > 0 and v["rda"]["mean"] > v["original"]["mean"] for v in lengths.values())
    noise = json.load(open(os.path.join(out, "rde_noise.json")))
    assert len(noise["rows"]) == 2 + 4  # CUHK domain: clean best/last + 50% with and without CCD
    for path in glob.glob(os.path.join(out, "*.json")):
        data = json.load(open(path))
        for r in data.get("rows", []):
            for v in r.get("ours", {}).values():
                assert v is None or 0.0 <= v <= 100.0
    assert {e["effect"] for e in t1["effects"]} >= {"RDA (ICL - RDE)", "+pre (❷ ICL - ❶ ICL)"}
    series = json.load(open(os.path.join(out, "fig6.json")))["series"]
    assert all(len(s["metrics"]) == 3 for s in series.values())  # base + 2 rounds at CI scale
    # the paper's numbers sit beside ours
    assert t1["rows"][0]["paper"]["R1"] == 75.94
    # a second run reuses every run directory: nothing is trained or run again
    stamp = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(runs, "*", "*", "best.pth"))}
    text = _main(["all", "--world", "mini", "--scale", "ci", "--runs", runs, "--out", out],
                 capsys, monkeypatch)
    assert "[repro] [cached]" in text and "[repro] train " not in text
    assert stamp == {p: os.path.getmtime(p) for p in glob.glob(os.path.join(runs, "*", "*", "best.pth"))}
    assert len(stamp) >= 14
    # another configuration is never taken for this one: a changed --train-config, or the full
    # scale in the same --runs, plans every training again (the dry run marks none [cached])
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "synthpedes_mini.yaml")))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**cfg, "lr": 2e-4}))
    for extra in (["--scale", "ci", "--train-config", str(other)], ["--scale", "full"]):
        text = _main(["table1", "--world", "mini", "--runs", runs, "--out", out, "--dry-run", *extra],
                     capsys, monkeypatch)
        trains = [line for line in text.splitlines() if "] train " in line]
        assert trains and not any("[cached]" in line for line in trains), extra


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
    assert MiniWorld(cfg).seeds == (0, 1, 2) and w.seeds == (0,)  # mini default 3, CI 1
    # CI scale never touches the full-scale folders
    assert all(d["root"].startswith(str(tmp_path)) for d in w.domains.values())
    assert w.pretrained.startswith(str(tmp_path)) and w.rounds == 2


def test_effect_without_per_query_values_has_no_verdict():
    hi = report.row("THI", "A", {"R1": 5.0}, {"R1": 2.0}, ["R1"])
    lo = report.row("base", "A", {"R1": 5.0}, {"R1": 1.0}, ["R1"])
    e = report.effect("THI", "A", "R1", hi, lo)
    assert e["ours"] == 0.0 and e["ci"] is None and e["verdict"] == "-"


# Seeds, intervals and verdicts -----------------------------------------------------------------
def test_verdict_only_with_an_interval_that_excludes_zero():
    from repro.stats import verdict

    assert verdict([-0.4, 2.5], 1.2) == "within noise"   # includes 0: no direction claimed
    assert verdict([0.3, 2.5], 1.2) == "paper's direction"
    assert verdict([0.3, 2.5], -0.8) == "opposite"
    assert verdict([-2.5, -0.1], -0.8) == "paper's direction"
    assert verdict([-2.5, 0.0], -0.8) == "within noise"  # touching 0 is not excluding it
    assert verdict(None, 1.0) == "-" and verdict([1.0, 2.0], 0.0) == "-"


def _seeded_row(label, values, paper_r1):
    """A row with per-seed per-query R1 values (seeds x queries, in percent)."""
    pq = [{"R1": np.asarray(v, float)} for v in values]
    return report.row(label, "A", [{"R1": float(np.mean(v))} for v in values], {"R1": paper_r1},
                      ["R1"], seeds=list(range(len(values))), per_query=pq)


def test_effects_use_the_paired_interval_over_seeds_and_queries(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((3, 200)) < 0.4) * 100.0
    # a few queries gained and a few lost: a positive mean that the interval cannot tell from 0
    small = base.copy()
    small[:, :4] = 100.0
    small[:, 4:7] = 0.0
    base[:, :4], base[:, 4:7] = 0.0, 100.0
    lo = _seeded_row("RDE", base, 75.94)
    noisy = report.effect("RDA", "A", "R1", _seeded_row("ICL", small, 76.41), lo)
    assert noisy["ours"] > 0 and noisy["ci"][0] < 0 < noisy["ci"][1]
    assert noisy["verdict"] == "within noise"
    # a large paired gain on every seed: shown, in the paper's direction
    big = np.where(rng.random((3, 200)) < 0.5, 100.0, base)
    shown = report.effect("RDA", "A", "R1", _seeded_row("ICL", big, 76.41), lo)
    assert shown["ci"][0] > 0 and shown["verdict"] == "paper's direction"
    against = report.effect("RDA", "A", "R1", lo, _seeded_row("ICL", big, 76.41),
                            paper_hi={"R1": 76.41}, paper_lo={"R1": 75.94})
    assert against["verdict"] == "opposite"
    # seeds that disagree widen the interval past 0 even without query noise
    flip = np.zeros((3, 50))
    up = flip + np.array([[100.0], [-40.0], [-50.0]])
    e = report.effect("x", "A", "R1", _seeded_row("hi", up + 50, 1.0), _seeded_row("lo", flip + 50, 0.0))
    assert e["ci"][0] < 0 < e["ci"][1] and e["verdict"] == "within noise"
    report.write(str(tmp_path), "t", "T", [lo], ["R1"], effects=[noisy, shown])
    md = (tmp_path / "t.md").read_text()
    assert "| RDA | A | R1 |" in md and "within noise |" in md and "paper's direction |" in md
    assert "±" in md  # mean ± spread over seeds
    data = json.loads((tmp_path / "t.json").read_text())
    assert "_per_query" not in data["rows"][0] and data["effects"][0]["verdict"] == "within noise"


def test_per_query_values_average_to_the_reported_metrics():
    from repro.stats import per_query
    from utils.metrics import t2i_metrics

    rng = np.random.default_rng(1)
    sim = rng.standard_normal((30, 40)).astype(np.float32)
    q, g = rng.integers(0, 8, 30), np.arange(40) % 8
    pq = per_query(sim, q, g)
    ref = t2i_metrics(sim, q, g)
    for m in ("R1", "R5", "R10", "mAP", "mINP"):
        assert float(pq[m].mean()) == pytest.approx(ref[m], abs=1e-4), m


def test_paired_interval_is_deterministic_and_exact_for_a_constant_difference():
    from repro.stats import paired_interval

    a = np.full((2, 20), 7.0)
    r = paired_interval(a + 3.0, a)
    assert r["mean"] == pytest.approx(3.0) and r["ci"] == pytest.approx([3.0, 3.0])
    x = np.random.default_rng(2).random((3, 40)) * 100
    assert paired_interval(x, x[::-1]) == paired_interval(x, x[::-1])


def test_a_result_made_by_another_config_is_not_reused(tmp_path):
    """A job whose result was recorded for another identity is an error naming the folder, not
    '[cached]'; one recorded for its own identity is cached; a mini world at another scale or
    with another training config trains into other run folders."""
    import yaml

    from repro.jobs import Job, Runner, StaleResult
    from repro.worlds import MiniWorld

    done = tmp_path / "out" / "result.json"
    done.parent.mkdir()
    done.write_text("{}")
    job = Job("make it", ["true"], str(done), identity="aaa", run_dir=str(done.parent))
    job.record(1.0)
    log = []
    Runner(log=log.append).run([job])
    assert any("[cached]" in line for line in log)
    again = Job("make it", ["true"], str(done), identity="bbb", run_dir=str(done.parent))
    with pytest.raises(StaleResult, match=str(done.parent)):
        Runner(log=log.append).run([again])

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "repro_mini.yaml")))
    runs = str(tmp_path / "runs")

    def run_dir(**kw):
        return MiniWorld(cfg, runs=runs, **kw).train("RDE", "CUHK-PEDES")[0]

    ci = run_dir(scale="ci")
    assert run_dir(scale="ci") == ci
    assert run_dir() != ci
    other = tmp_path / "t.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(open(os.path.join(ROOT, "configs", "synthpedes_mini.yaml"))),
                                     "num_epoch": 3}))
    assert run_dir(scale="ci", train_config=str(other)) != ci
    w = MiniWorld(cfg, runs=runs, scale="ci", seeds=3)
    assert w.seeds == (0, 1, 2)
    assert len({w.train("RDE", "CUHK-PEDES", seed=s)[0] for s in w.seeds}) == 3
