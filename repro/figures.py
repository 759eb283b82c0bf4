"""The figures: Fig. 3 (top-1 similarity of correct vs wrong retrievals, the basis of xi),
Fig. 5 (lambda x xi grid), Fig. 6 (metrics per THI round), Fig. 7 (top-10 before/after THI).
Each plans its jobs like the tables, then reads the run directories and draws a PNG."""
from __future__ import annotations

import os
import textwrap

import numpy as np

from . import paper, report, results
from .jobs import Runner, total
from .tables import M5, world_text
from .worlds import PAPER_XI, Unavailable, World

from utils import run_dir as rd
from utils.io import atomic_write_json

from utils.io import atomic_write_text
from PIL import Image


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _icl(world: World, ds: str):
    """The ICL (group 1) run evaluated on ds: (eval run, target name, jobs)."""
    return world.model("ICL", ds)


def _icl_per_dataset(world: World, runner: Runner, name: str):
    """(dataset, eval run, target name, jobs) of the ICL (group 1) run of every dataset of the
    world that has one; the others are logged and left out of figure ``name``."""
    for ds in world.datasets:
        try:
            erun, tname, jobs = _icl(world, ds)
        except Unavailable as exc:
            runner.log(f"[repro] {name} {ds}: {exc}")
            continue
        yield ds, erun, tname, jobs


def _start(name: str, runner: Runner, jobs) -> "dict | None":
    """Run the figure's jobs (a dry run lists them); on a dry run, the summary to return."""
    runner.log(f"[repro] {name}: {len(jobs)} jobs")
    new = runner.run(jobs)
    if runner.dry_run:
        return {"name": name, "jobs": len(new), "seconds": total(new)}
    return None


def fig3(world: World, runner: Runner, out_dir: str) -> dict:
    plans, jobs = [], []
    for ds, erun, tname, j in _icl_per_dataset(world, runner, "fig3"):
        plans.append((ds, erun, tname))
        jobs += j
    dry = _start("fig3", runner, jobs)
    if dry is not None:
        return dry
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(plans), 1), figsize=(4.6 * max(len(plans), 1), 3.6), squeeze=False)
    rows = []
    for ax, (ds, erun, tname) in zip(axes[0], plans):
        ev = results.load_eval(erun, tname)
        st = results.top1_stats(ev["similarity"], ev["q_pids"], ev["g_pids"])
        top1, ok = st["top1"], st["correct"]
        xi = results.xi_crossover(top1, ok)
        bins = np.linspace(float(top1.min()), float(top1.max()), 31)
        ax.hist(top1[ok], bins=bins, alpha=0.6, density=True, color="tab:green", label=f"correct ({ok.sum()})")
        ax.hist(top1[~ok], bins=bins, alpha=0.6, density=True, color="tab:red", label=f"wrong ({(~ok).sum()})")
        ax.axvline(xi, color="k", ls="--", lw=1, label=f"crossover xi = {xi:.3f}")
        ax.set_title(f"{ds} (ICL ❶)")
        ax.set_xlabel("top-1 similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        above = top1 > xi
        rows.append({"set": ds, "queries": int(top1.size), "top1_correct_pct": 100.0 * ok.mean(),
                     "mean_sim_correct": float(top1[ok].mean()) if ok.any() else None,
                     "mean_sim_wrong": float(top1[~ok].mean()) if (~ok).any() else None,
                     "xi_crossover": xi,
                     "precision_above_xi_pct": 100.0 * ok[above].mean() if above.any() else None,
                     "precision_below_xi_pct": 100.0 * ok[~above].mean() if (~above).any() else None,
                     "paper_xi": PAPER_XI.get(world.paper_dataset(ds), 0.5)})
    fig.suptitle("Fig. 3: top-1 similarity of correct and wrong retrievals", y=1.04)
    os.makedirs(out_dir, exist_ok=True)
    _save(fig, os.path.join(out_dir, "fig3.png"))
    plt.close(fig)
    lines = ["# Fig. 3: top-1 similarity, correct vs wrong retrievals (the basis of xi)", "",
             f"World: {world_text(world)}.", "", "![fig3](fig3.png)", "",
             "| set | queries | top-1 correct % | mean sim. correct | mean sim. wrong | xi (crossover) "
             "| correct % above xi | correct % at/below xi | paper's xi |", "|" + " --- |" * 9]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['set']} | {r['queries']} | {r['top1_correct_pct']:.2f} | {f(r['mean_sim_correct'])} | "
                     f"{f(r['mean_sim_wrong'])} | {r['xi_crossover']:.3f} | {f(r['precision_above_xi_pct'])} | "
                     f"{f(r['precision_below_xi_pct'])} | {r['paper_xi']:g} |")
    lines += ["", "xi (crossover): the threshold with the fewest correct top-1 at or below it plus "
              "wrong top-1 above it, where the two histograms cross. The paper reads its xi "
              "(0.5; 0.55 for ICFG-PEDES) off its Fig. 3; the PDF stores no histogram data."]
    _write_md(out_dir, "fig3", lines, {"rows": rows})
    return {"rows": rows}


def _write_md(out_dir, name, lines, payload):
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), payload)


def fig5(world: World, runner: Runner, out_dir: str) -> dict:
    ds = world.datasets[0]
    erun, tname, jobs = _icl(world, ds)
    sweep_dir, sj = world.sweep(erun, tname, ds)
    jobs = jobs + sj
    dry = _start("fig5", runner, jobs)
    if dry is not None:
        return dry
    data = results.sweep_grid(sweep_dir)
    lams, xis = data["lams"], data["xis"]
    grid = {(p["xi"], p["lam"]): p for p in data["points"]}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("R1", "mAP")):
        z = np.array([[grid[(x, l)]["metrics"][metric] for l in lams] for x in xis])
        im = ax.imshow(z, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lams)), [f"{l:g}" for l in lams])
        ax.set_yticks(range(len(xis)), [f"{x:.3g}" for x in xis])
        ax.set_xlabel("lambda")
        ax.set_ylabel("xi")
        for i in range(len(xis)):
            for j in range(len(lams)):
                ax.text(j, i, f"{z[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"{metric} after THI (base {data['base'][metric]:.2f})")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"Fig. 5: lambda x xi on {ds} (ICL ❶ + THI)", y=1.04)
    os.makedirs(out_dir, exist_ok=True)
    _save(fig, os.path.join(out_dir, "fig5.png"))
    plt.close(fig)
    lines = ["# Fig. 5: THI over lambda x xi", "", f"World: {world_text(world)}.", "",
             "![fig5](fig5.png)", ""]
    for metric in ("R1", "mAP"):
        lines += [f"{metric} (base {data['base'][metric]:.2f}); rows xi, columns lambda:", "",
                  "| xi \\ lambda | " + " | ".join(f"{l:g}" for l in lams) + " |", "|" + " --- |" * (len(lams) + 1)]
        for x in xis:
            lines.append(f"| {x:.4g} | " + " | ".join(f"{grid[(x, l)]['metrics'][metric]:.2f}" for l in lams) + " |")
        lines.append("")
    best = max(data["points"], key=lambda p: p["metrics"]["R1"])
    lines += [f"Best R1 at xi {best['xi']:.4g}, lambda {best['lam']:g}. The paper plots xi and lambda "
              "one at a time (no data in the PDF) and recommends xi 0.5-0.6 and lambda 0.8 (Sec. 4.6)."]
    _write_md(out_dir, "fig5", lines, data)
    return data


def fig6(world: World, runner: Runner, out_dir: str) -> dict:
    plans, jobs = [], []
    for ds, erun, tname, j in _icl_per_dataset(world, runner, "fig6"):
        out, tj = world.thi(erun, tname, ds)
        plans.append((ds, out))
        jobs += j + tj
    dry = _start("fig6", runner, jobs)
    if dry is not None:
        return dry
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(plans), 1), figsize=(4.4 * max(len(plans), 1), 3.4), squeeze=False)
    rows, payload = [], {}
    for ax, (ds, out) in zip(axes[0], plans):
        r = results.thi_rounds(out)
        series = [r["base"], *r["rounds"]]
        x = list(range(len(series)))
        ax.plot(x, [s["mAP"] for s in series], "o-", label="mAP (ours)")
        ax.plot(x, [s["R1"] for s in series], "s--", label="R1 (ours)")
        pd = world.paper_dataset(ds)
        p0 = paper.metrics("icl1", M5, method="ICL", group=1, thi=0, test=pd)
        p5 = paper.metrics("icl1", M5, method="ICL", group=1, thi=1, test=pd)
        if world.name == "real" and p0["mAP"] is not None:
            ax.plot([0, 5], [p0["mAP"], p5["mAP"]], "k^", label="mAP (paper, rounds 0 and 5)")
        ax.set_title(ds)
        ax.set_xlabel("round")
        ax.set_xticks(x)
        ax.legend(fontsize=8)
        payload[ds] = series
        K = len(series) - 1
        rows.append(report.row("round 0 (no THI)", ds, series[0], p0, M5))
        rows.append(report.row(f"round {K}", ds, series[-1], p5 if K == 5 else {}, M5))
    fig.suptitle("Fig. 6: metrics per THI round (round 0 = without THI)", y=1.04)
    os.makedirs(out_dir, exist_ok=True)
    _save(fig, os.path.join(out_dir, "fig6.png"))
    plt.close(fig)
    effects = []
    for ds in [p[0] for p in plans]:
        a = next(r for r in rows if r["set"] == ds and r["row"] != "round 0 (no THI)")
        b = next(r for r in rows if r["set"] == ds and r["row"] == "round 0 (no THI)")
        for m in ("R1", "mAP"):
            effects.append(report.effect("THI, all rounds", ds, m, a["ours"], b["ours"], a["paper"], b["paper"]))
    report.write(out_dir, "fig6", "Fig. 6: metrics per THI round", rows, M5, effects=effects,
                 world=world_text(world),
                 notes=["![fig6](fig6.png)", "Per-round values: fig6.json. The paper's round 0 and "
                        "round 5 are Table 1's ICL and ICL⋆ (group ❶); its other rounds are plot "
                        "points without data in the PDF."], meta={"series": payload})
    return {"rows": rows, "series": payload}


def fig7(world: World, runner: Runner, out_dir: str, queries: int = 4) -> dict:
    ds = world.datasets[0]
    erun, tname, jobs = _icl(world, ds)
    out, tj = world.thi(erun, tname, ds)
    jobs = jobs + tj
    dry = _start("fig7", runner, jobs)
    if dry is not None:
        return dry
    ev = results.load_eval(erun, tname)
    after = rd.read_npy(os.path.join(out, rd.THI_FINAL_SIMILARITY), "run its THI job again (python -m repro ...)")
    before = ev["similarity"]
    rb = results.first_correct_rank(before, ev["q_pids"], ev["g_pids"])
    ra = results.first_correct_rank(after, ev["q_pids"], ev["g_pids"])
    gain = rb - ra
    k = min(10, before.shape[1])
    # The queries THI helped most among those whose first correct image ends in the shown top-k
    # (largest rank gain, then the lower index), as the paper's examples: a gain from rank 80 to
    # 20 draws no green at all. What THI does to the others is in Fig. 6 and the tables.
    order = np.lexsort((np.arange(gain.size), -gain, ra > k))
    chosen = [int(q) for q in order[:queries] if gain[q] > 0] or [int(order[0])]
    plt = _plt()

    height = 2 * len(chosen) * 2.75
    fig, axes = plt.subplots(2 * len(chosen), k, figsize=(1.3 * k, height), squeeze=False)
    fig.subplots_adjust(hspace=0.3, wspace=0.08, top=1 - 0.9 / height, bottom=0.01)
    picked = []
    for i, q in enumerate(chosen):
        for j, (name, sim) in enumerate((("before THI", before), ("after THI", after))):
            top = np.argsort(-sim[q], kind="stable")[:k]
            for c, g in enumerate(top):
                ax = axes[2 * i + j][c]
                ax.imshow(Image.open(ev["image_paths"][g]).convert("RGB"))
                ok = ev["g_pids"][g] == ev["q_pids"][q]
                for s in ax.spines.values():
                    s.set_edgecolor("tab:green" if ok else "tab:red")
                    s.set_linewidth(3)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=8)
            if j == 0:
                axes[2 * i][0].set_title("\n".join(textwrap.wrap(f"q{q}: {ev['captions'][q]}", 110)),
                                         fontsize=7, loc="left")
        picked.append({"query": q, "caption": ev["captions"][q], "rank_before": int(rb[q]),
                       "rank_after": int(ra[q])})
    fig.suptitle(f"Fig. 7: top-{k} on {ds} before (upper row) and after THI (lower row); "
                 f"green = same identity", fontsize=9, y=0.995)
    os.makedirs(out_dir, exist_ok=True)
    _save(fig, os.path.join(out_dir, "fig7.png"))
    plt.close(fig)
    lines = ["# Fig. 7: top-10 before and after THI", "", f"World: {world_text(world)}.", "",
             "![fig7](fig7.png)", "", "| query | rank of the first correct image before | after | caption |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {p['query']} | {p['rank_before']} | {p['rank_after']} | {p['caption']} |" for p in picked]
    lines += ["", f"Chosen: the {len(chosen)} queries whose first correct image rose most, those that "
              f"end in the top {k} first. Over all "
              f"{gain.size} queries THI raised it for {int((gain > 0).sum())}, lowered it for "
              f"{int((gain < 0).sum())} and left {int((gain == 0).sum())} unchanged."]
    _write_md(out_dir, "fig7", lines, {"queries": picked, "improved": int((gain > 0).sum()),
                                        "worsened": int((gain < 0).sum()), "unchanged": int((gain == 0).sum())})
    return {"queries": picked}


FIGURES = {"fig3": fig3, "fig5": fig5, "fig6": fig6, "fig7": fig7}
