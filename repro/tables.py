"""One function per table: plan the jobs, run (or print) them, read the run directories, write
the table beside the paper's numbers. Figures are in ``figures.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from . import paper, provenance, report, results
from .jobs import Runner, _fmt, chain, total
from .worlds import SFT_BASIS  # noqa: F401  (documents the estimate)
from .worlds import Unavailable, World

M5 = ("R1", "R5", "R10", "mAP", "mINP")
M2 = ("R1", "mAP")
COARSE = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")


@dataclass
class Plan:
    """Rows of one table: each a label and, per seed, the jobs it needs and how to read its
    numbers (and its per-query values, for the paired effects)."""

    seeds: tuple = (0,)
    jobs: list = field(default_factory=list)
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (label, where, why, seconds) of rows not run

    def add(self, label: str, where: str, build: Callable, paper_values: dict, **extra) -> None:
        """``build(seed)`` -> (jobs, read metrics, read per-query values or None)."""
        reads = []
        try:
            for seed in self.seeds:
                jobs, read, pq = build(seed)
                known = {j.done_file for j in self.jobs}
                self.jobs += [j for j in chain(jobs) if j.done_file not in known and not known.add(j.done_file)]
                reads.append((seed, read, pq))
        except Unavailable as exc:
            self.items.append((label, where, None, paper_values, f"not run: {exc}", extra))
            self.skipped.append((label, where, str(exc), exc.seconds))
            return
        self.items.append((label, where, reads, paper_values, None, extra))

    def rows(self, metrics) -> list:
        out = []
        for label, where, reads, pv, status, extra in self.items:
            per_seed, per_query = [], []
            if reads is not None:
                for _seed, read, pq in reads:
                    m = results.maybe(read)
                    per_seed.append(m)
                    per_query.append(results.maybe(pq) if (pq is not None and m is not None) else None)
                status = "ok" if all(m is not None for m in per_seed) else "missing"
            out.append(report.row(label, where, per_seed if status == "ok" else None, pv, metrics,
                                  status=status, seeds=[r[0] for r in reads or []],
                                  per_query=per_query if status == "ok" else None, **extra))
        return out


# Row builders: (jobs, reader, per-query reader) ------------------------------------------------
def base(world: World, method: str, ds: str, target: Optional[str] = None, *, noise: float = 0.0,
         group: int = 1):
    def build(seed):
        erun, tname, jobs = world.model(method, ds, target, noise=noise, group=group, seed=seed)
        return (jobs, lambda: results.eval_metrics(erun, tname),
                lambda: results.eval_per_query(erun, tname))
    return build


def with_thi(world: World, method: str, ds: str, target: Optional[str] = None, *, group: int = 1,
             lora: bool = True, mllm: str = "calibrated"):
    def build(seed):
        try:
            erun, tname, jobs = world.model(method, ds, target, group=group, seed=seed)
        except Unavailable as exc:  # the THI run it would also need counts in the estimate
            thi_s = getattr(world, "_thi_seconds", lambda t: 0.0)(target or ds)
            raise Unavailable(str(exc), seconds=exc.seconds + thi_s) from None
        out, tjobs = world.thi(erun, tname, target or ds, lora=lora, mllm=mllm, seed=seed)
        return (jobs + tjobs, lambda: results.thi_metrics(out),
                lambda: results.thi_per_query(erun, tname, out))
    return build


def checkpoint(world: World, method: str, ds: str, noise: float, which: str):
    def build(seed):
        run, jobs = world.train(method, ds, noise=noise, seed=seed)
        # "best" is the checkpoint the run evaluated (eval/): its per-query values exist
        pq = (lambda: results.eval_per_query(run, results.eval_target(run))) if which == "best" else None
        return jobs, lambda: results.best_and_last(run)[which], pq
    return build


def _finish(name: str, title: str, plan: Plan, metrics, world: World, runner: Runner,
            out_dir: str, effects_fn: Optional[Callable] = None, notes=(), extra_cols=()) -> dict:
    runner.log(f"[repro] {name}: {len(plan.jobs)} jobs")
    new = runner.run(plan.jobs)
    for label, where, why, secs in plan.skipped:
        runner.log(f"  [not run{', would take ~' + _fmt(secs) if secs else ''}] {label} on {where}: {why}")
    if runner.dry_run:
        return {"name": name, "jobs": len(new), "seconds": total(new), "not_run": len(plan.skipped),
                "not_run_seconds": sum(s for *_, s in plan.skipped)}
    rows = plan.rows(metrics)
    effects = effects_fn(rows) if effects_fn else []
    return report.write(out_dir, name, title, rows, metrics, effects=effects, notes=notes,
                        world=world_text(world), extra_cols=extra_cols,
                        provenance=provenance.collect(plan.jobs, world))


def world_text(world: World) -> str:
    if world.name == "mini":
        doms = ", ".join(f"{ds}-like domain = SynthPEDES seed {d.get('seed', 0)} ({d['num_ids']} ids)"
                         for ds, d in world.domains.items())
        return (f"SynthPEDES mini (scale {world.scale_name}, {len(world.seeds)} seed(s)): {doms}; "
                f"training config {world.train_config}, backbone {world.pretrained}; THI with the "
                f"simulated MLLM, profile '{world.profiles['calibrated']}' unless a row says "
                f"otherwise; the paper columns are the real benchmark each domain stands for: "
                f"compare the effects, not the levels")
    return "real benchmarks, the paper's configs"


def _find(rows, label, where):
    for r in rows:
        if r["row"] == label and r["set"] == where and r["status"] == "ok":
            return r
    return None


def _effects(rows, specs, metrics):
    """specs: (effect name, label high, label low, set)."""
    out = []
    for name, hi, lo, where in specs:
        a, b = _find(rows, hi, where), _find(rows, lo, where)
        if a is None or b is None:
            continue
        for m in metrics:
            out.append(report.effect(name, where, m, a, b))
    return out


# Tables -------------------------------------------------------------------------------------------
def _oracle(world: World) -> bool:
    return world.name == "mini"


ORACLE_NOTE = ("⋆ rows use the calibrated simulated MLLM (profile measured from the tiny Qwen2-VL: "
               "localization Yes on 70% of matching and 20% of non-matching pairs, VQA 100%, "
               "aggregation 97%); '(oracle MLLM, upper bound)' rows use a simulated MLLM that never "
               "errs: what THI gives at best, not evidence for the paper's THI.")


def table1(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    sets = [d for d in world.datasets if d in COARSE]
    for ds in sets:
        pd = world.paper_dataset(ds)
        plan.add("❶ RDE", ds, base(world, "RDE", ds),
                 paper.metrics("icl1", M5, method="RDE", group=1, test=pd))
        for g in (1, 2):
            mark = "❶" if g == 1 else "❷"
            plan.add(f"{mark} ICL", ds, base(world, "ICL", ds, group=g),
                     paper.metrics("icl1", M5, method="ICL", group=g, thi=0, test=pd))
            plan.add(f"{mark} ICL⋆", ds, with_thi(world, "ICL", ds, group=g),
                     paper.metrics("icl1", M5, method="ICL", group=g, thi=1, test=pd))
            if _oracle(world):
                plan.add(f"{mark} ICL⋆ (oracle MLLM, upper bound)", ds,
                         with_thi(world, "ICL", ds, group=g, mllm="oracle"), {})
    specs = []
    for ds in sets:
        specs += [("RDA (ICL - RDE)", "❶ ICL", "❶ RDE", ds), ("THI (ICL⋆ - ICL), ❶", "❶ ICL⋆", "❶ ICL", ds),
                  ("THI (ICL⋆ - ICL), ❷", "❷ ICL⋆", "❷ ICL", ds), ("+pre (❷ ICL - ❶ ICL)", "❷ ICL", "❶ ICL", ds)]
    notes = ["❶: CLIP without ReID-domain pre-training; ❷: initialised from ReID-domain "
             "pre-trained weights ('+pre', init_checkpoint). ⋆: with THI."]
    if _oracle(world):
        notes.append(ORACLE_NOTE)
    if not sets:
        notes.append("this world has none of CUHK-PEDES, ICFG-PEDES, RSTPReid")
    return _finish("table1", "Table 1: coarse-grained benchmarks, groups ❶ and ❷", plan, M5, world,
                   runner, out_dir, lambda rows: _effects(rows, specs, ("R1", "mAP")), notes)


def table2(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    ds = "UFine6926"
    notes = []
    if ds in world.datasets:
        plan.add("RDE", ds, base(world, "RDE", ds), paper.metrics("icl2", M5, method="RDE"))
        for g in (1, 2):
            mark = "❶" if g == 1 else "❷"
            plan.add(f"{mark} ICL", ds, base(world, "ICL", ds, group=g),
                     paper.metrics("icl2", M5, method="ICL", group=g, thi=0))
            plan.add(f"{mark} ICL⋆", ds, with_thi(world, "ICL", ds, group=g),
                     paper.metrics("icl2", M5, method="ICL", group=g, thi=1))
    else:
        notes.append(f"UFine6926 is not a dataset of this world ({', '.join(world.datasets)}); "
                     f"add a domain for it to the mini config to fill this table")
    specs = [("RDA (❶ ICL - RDE)", "❶ ICL", "RDE", ds), ("THI ❶", "❶ ICL⋆", "❶ ICL", ds),
             ("THI ❷", "❷ ICL⋆", "❷ ICL", ds), ("+pre", "❷ ICL", "❶ ICL", ds)]
    return _finish("table2", "Table 2: UFine6926 (fine-grained)", plan, M5, world, runner, out_dir,
                   lambda rows: _effects(rows, specs, ("R1", "mAP")), notes)


def table34(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    sets = list(world.datasets)
    for s in sets:
        for t in sets:
            ps, pt = world.paper_dataset(s), world.paper_dataset(t)
            key = "icl3" if ps in COARSE and pt in COARSE else "icl4"
            where = f"{s} → {t}"
            for label, method, thi in (("RDE", "RDE", 0), ("ICL", "ICL", 0), ("ICL⋆", "ICL", 1)):
                pv = paper.metrics(key, M5, method=method, thi=thi, train=ps, test=pt)
                build = with_thi(world, "ICL", s, t) if thi else base(world, method, s, t)
                plan.add(label, where, build, pv, table="3" if key == "icl3" else "4")
    specs = []
    for s in sets:
        for t in sets:
            if s != t:
                w = f"{s} → {t}"
                specs += [("RDA cross-domain (ICL - RDE)", "ICL", "RDE", w), ("THI cross-domain (ICL⋆ - ICL)", "ICL⋆", "ICL", w)]
    notes = ["Rows 'A → B': trained on A, tested on B (paper Tables 3 and 4; UFine6926 pairs are Table 4, "
             "which the paper prints for coarse <-> fine pairs only)."]
    if len(sets) < 2:
        notes.append("one dataset only: no cross-domain pair")
    return _finish("table34", "Tables 3-4: cross-domain", plan, M5, world, runner, out_dir,
                   lambda rows: _effects(rows, specs, ("R1", "mAP")), notes, extra_cols=("table",))


def table5(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    sets = [d for d in world.datasets if d in COARSE]
    for ds in sets:
        pd = world.paper_dataset(ds)
        for method in ("CLIP", "IRRA", "RDE"):
            # --rde-weights: RDE's released checkpoint instead of the RDE run trained here (said in the row)
            released = method == "RDE" and ds in getattr(world, "rde_weights", {})
            run_method, label = ("RDE-release", "RDE (released checkpoint)") if released else (method, method)
            plan.add(f"{label}", ds, base(world, run_method, ds),
                     paper.metrics("icl5", M2, method=method, thi=0, test=pd))
            plan.add(f"{label} + THI", ds, with_thi(world, run_method, ds),
                     paper.metrics("icl5", M2, method=method, thi=1, test=pd))
    specs = [(f"THI on {m}", f"{m} + THI", m, ds) for ds in sets
             for m in ("CLIP", "IRRA", "RDE", "RDE (released checkpoint)")]
    notes = ["CLIP and IRRA: released weights where given (real world, --irra-weights), otherwise "
             "the RDE architecture trained with InfoNCE (CLIP) or SDM (IRRA) and no CCD. RDE: the RDE run "
             "trained here, or RDE's released checkpoint with --rde-weights (the row says so)."]
    if _oracle(world):
        notes.append(ORACLE_NOTE)
    return _finish("table5", "Table 5: THI on other base models", plan, M2, world, runner, out_dir,
                   lambda rows: _effects(rows, specs, M2), notes)


def table6(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    sets = [d for d in world.datasets if d in COARSE]
    for ds in sets:
        pd = world.paper_dataset(ds)
        pv = lambda k, pd=pd: paper.metrics("icl6", M2, row=k, test=pd)  # noqa: E731
        plan.add("#4 RDE", ds, base(world, "RDE", ds), pv("#4"))
        plan.add("#3 + RDA", ds, base(world, "ICL", ds), pv("#3"))
        plan.add("#2 + RDA + THI (no LoRA)", ds, with_thi(world, "ICL", ds, lora=False), pv("#2"))
        plan.add("#1 + RDA + THI", ds, with_thi(world, "ICL", ds), pv("#1"))
        if _oracle(world):
            plan.add("#1 + RDA + THI (oracle MLLM, upper bound)", ds,
                     with_thi(world, "ICL", ds, mllm="oracle"), {})
    specs = []
    for ds in sets:
        specs += [("RDA (#3 - #4)", "#3 + RDA", "#4 RDE", ds), ("THI (#1 - #3)", "#1 + RDA + THI", "#3 + RDA", ds),
                  ("LoRA (#1 - #2)", "#1 + RDA + THI", "#2 + RDA + THI (no LoRA)", ds)]
    notes = []
    if _oracle(world):
        notes = [ORACLE_NOTE,
                 "LoRA rows, mini world: #1 uses the profile measured from the tiny Qwen2-VL after its "
                 "tuning (tiny-qwen2vl), #2 the same model before tuning (untuned-tiny-qwen2vl: "
                 "random weights, measured never to answer Yes). With no Yes there is no anchor, so "
                 "#2 equals #3 by construction and 'LoRA (#1 - #2)' is THI's own gain with the "
                 "calibrated MLLM: it says nothing about LoRA beyond that. The tiny model is tuned "
                 "in full, not with a LoRA."]
    return _finish("table6", "Table 6: ablation (RDE, +RDA, +THI)", plan, M2, world, runner, out_dir,
                   lambda rows: _effects(rows, specs, M2), notes)


def rda_modes(world: World, runner: Runner, out_dir: str) -> dict:
    """Mini world: RDA with the simulated MLLM's two aggregation modes, and the token lengths of
    the original and RDA captions."""
    if world.name != "mini":
        raise Unavailable("the aggregation modes are the simulated MLLM's (mini world)")
    plan = Plan(world.seeds)
    sets = [d for d in world.datasets if d in COARSE]
    modes = {world.rda_aggregation: "ICL", **{m: f"ICL-{m}" for m in ("keep", "concise")
                                              if m != world.rda_aggregation}}
    files = {}
    for ds in sets:
        pd = world.paper_dataset(ds)
        plan.add("RDE", ds, base(world, "RDE", ds), paper.metrics("icl6", M2, row="#4", test=pd))
        for mode, method in modes.items():
            default = " (default)" if mode == world.rda_aggregation else ""
            plan.add(f"ICL, {mode} aggregation{default}", ds, base(world, method, ds),
                     paper.metrics("icl6", M2, row="#3", test=pd))
            files[(ds, mode)] = world.rda_file(ds, aggregation=mode)[0]
    specs = [(f"RDA, {mode} aggregation (ICL - RDE)",
              f"ICL, {mode} aggregation{' (default)' if mode == world.rda_aggregation else ''}", "RDE", ds)
             for ds in sets for mode in modes]
    notes = ["Aggregation modes of the simulated MLLM: 'keep' appends every new VQA answer to the "
             "caption; 'concise' follows the aggregation prompt ('continuous and concise' text): "
             "new facts are added while the whole stays within the text length (77 CLIP tokens), "
             "no sentence cut. 'concise' is the mini world's default because the prompt asks for "
             "it, not because of its effect on this table."]

    def effects(rows):
        return _effects(rows, specs, M2)

    res = _finish("rda_modes", "RDA: the simulated MLLM's two aggregation modes", plan, M2, world,
                  runner, out_dir, effects, notes)
    if runner.dry_run:
        return res
    lengths = {f"{ds} {mode}": results.token_lengths(path, 77) for (ds, mode), path in files.items()}
    lines = ["", "## Token lengths (CLIP tokenizer, start and end tokens included)", "",
             "| set | captions | n | mean | median | p90 | max | % over 77 (cut) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, d in lengths.items():
        for which in ("original", "rda"):
            t = d[which]
            lines.append(f"| {key} | {which} | {t['n']} | {t['mean']:.1f} | {t['median']:.0f} | "
                         f"{t['p90']:.0f} | {t['max']} | {t['over_pct']:.1f} |")
    report.append_section(out_dir, "rda_modes", lines, {"token_lengths": lengths})
    return res


def rde_noise(world: World, runner: Runner, out_dir: str) -> dict:
    plan = Plan(world.seeds)
    rates = tuple(float(r) for r in world.noise_rates)
    sets = [d for d in world.datasets if d in COARSE and d in (world.noise_datasets or COARSE)]
    for ds in sets:
        pd = world.paper_dataset(ds)
        for rate in rates:
            for which in ("best", "last"):
                pv = paper.metrics("rde_noise", M5, method="RDE", noise=f"{rate:g}", checkpoint=which, test=pd)
                plan.add(f"RDE {which}", ds, checkpoint(world, "RDE", ds, rate, which),
                         pv, noise=f"{rate:g}")
                if rate > 0 and (not world.noccd_rates or rate in world.noccd_rates) and \
                        (not world.noccd_datasets or ds in world.noccd_datasets):
                    pv = (paper.metrics("rde_ablation", M5, row="#7", noise=f"{rate:g}", test=pd)
                          if which == "best" else {})
                    plan.add(f"RDE without CCD {which}", ds,
                             checkpoint(world, "RDE-noCCD", ds, rate, which), pv, noise=f"{rate:g}")

    def effects(rows):
        out = []
        for ds in sets:
            for rate in rates:
                get = lambda label: next((r for r in rows if r["row"] == label and r["set"] == ds  # noqa: E731, B023
                                          and r["noise"] == f"{rate:g}" and r["status"] == "ok"), None)  # noqa: B023
                a, b = get("RDE best"), get("RDE without CCD best")
                if a and b:
                    p_hi = paper.metrics("rde_ablation", M5, row="#1", noise=f"{rate:g}", test=world.paper_dataset(ds))
                    for m in ("R1", "mAP"):
                        out.append(report.effect(f"CCD at noise {rate:g} (RDE - without CCD)", ds, m,
                                                 a, b, paper_hi=p_hi))
                z = next((r for r in rows if r["row"] == "RDE best" and r["set"] == ds
                          and r["noise"] == "0" and r["status"] == "ok"), None)
                if rate > 0 and a and z:
                    for m in ("R1", "mAP"):
                        out.append(report.effect(f"noise {rate:g} vs clean (RDE best)", ds, m, a, z))
        return out

    notes = ["Best: the epoch of the best test Rank-1 (as both releases select); Last: the final epoch.",
             "The paper's 'without CCD' numbers are RDE's Table 2 #7 (CUHK-PEDES, 50% noise) only."]
    return _finish("rde_noise", "RDE: noisy correspondence (0 / 20 / 50 / 80 %)", plan, M5, world,
                   runner, out_dir, effects, notes, extra_cols=("noise",))


def sft(world: World, runner: Runner, out_dir: str) -> dict:
    """The anchor-localization SFT + LoRA training (THI's tuned MLLM) as a plan step: run with
    --train-lora; listed (commands, inputs, estimate) and marked not run otherwise."""
    if world.name != "real":
        raise Unavailable("the mini world's simulated MLLM has no LoRA (its tuned/untuned models are "
                          "measured error profiles)")
    adapter, jobs = world.lora_jobs()
    sft_jobs = [j for j in jobs if j.label.startswith(("SFT data", "anchor-localization LoRA"))]
    needs = ("needs: the ICL run of each dataset (best.pth, ccd/epoch_<k>.npz), the base MLLM (--mllm), "
             "LLaMA-Factory (bash scripts/install_llamafactory.sh); writes " + adapter)
    if world.train_lora:
        runner.log(f"[repro] sft: {len(jobs)} jobs; {needs}")
        new = runner.run(jobs)
        if runner.dry_run:
            return {"name": "sft", "jobs": len(new), "seconds": total(new)}
        return {"name": "sft", "adapter": adapter}
    why = (f"--lora {world.lora} given: THI uses that adapter" if world.lora else
           f"--merged-mllm {world.merged_mllm} given: THI uses that model" if world.merged_mllm else
           "pass --train-lora to train the LoRA here (or --lora / --merged-mllm to use the released one)")
    secs = sum(j.seconds for j in sft_jobs)
    runner.log(f"[repro] sft: not run: {why}; would take ~{_fmt(secs)} ({SFT_NOTE}); {needs}")
    for j in sft_jobs:
        runner.log(f"  [not run] {j.label}\n      {j.text()}")
    return {"name": "sft", "jobs": 0, "seconds": 0.0, "not_run": len(sft_jobs), "not_run_seconds": secs}


SFT_NOTE = "the supplement: ~11 h on two RTX 3090s, ~170k records over the four datasets"

TABLES = {"sft": sft, "table1": table1, "table2": table2, "table34": table34, "table5": table5,
          "table6": table6, "rda_modes": rda_modes, "rde_noise": rde_noise}
