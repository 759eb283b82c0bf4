"""Writers: a markdown table (ours: mean ± spread over seeds | paper | difference), the effects
(paired differences with a 95% interval and a verdict), CSV and JSON per table or figure, each
with its provenance (``provenance.py``)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from utils.io import atomic_write_json, atomic_write_text

from . import stats


def diff(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def _f(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def row(label: str, where: str, ours, paper: dict, metrics: Sequence[str], status: str = "ok",
        seeds: Sequence[int] = (), per_query: Optional[list] = None, **extra) -> dict:
    """One table row. ``ours``: one metrics dict, or a list of them (one per seed), or None when
    the row could not be produced (``status`` says why). ``per_query``: per seed, the per-query
    values (``stats.per_query``) or None; kept in memory for the effects, never written."""
    runs = [] if ours is None else ([ours] if isinstance(ours, dict) else list(ours))
    mean, spread = {}, {}
    for m in metrics:
        mean[m], spread[m] = stats.mean_spread([(r or {}).get(m) for r in runs])
    out = {"row": label, "set": where, "status": status, **extra,
           "ours": mean, "spread": spread, "seeds": list(seeds) or list(range(len(runs))),
           "per_seed": [{m: (None if (r or {}).get(m) is None else float(r[m])) for m in metrics}
                        for r in runs],
           "paper": {m: paper.get(m) for m in metrics}}
    out["_per_query"] = per_query
    return out


def effect(name: str, where: str, metric: str, hi: dict, lo: dict, *,
           paper_hi: Optional[dict] = None, paper_lo: Optional[dict] = None) -> dict:
    """An effect = row ``hi`` - row ``lo`` (same seeds, same data): the mean paired difference,
    its 95% interval (``stats.paired_interval``), the paper's difference, and the verdict."""
    o = diff(hi["ours"].get(metric), lo["ours"].get(metric))
    p = diff((paper_hi or hi["paper"]).get(metric), (paper_lo or lo["paper"]).get(metric))
    ci, per_seed, n_q = None, None, None
    pa, pb = hi.get("_per_query"), lo.get("_per_query")
    if pa and pb and len(pa) == len(pb) and all(x is not None for x in pa + pb) \
            and hi["seeds"] == lo["seeds"]:
        res = stats.paired_interval(np.stack([x[metric] for x in pa]), np.stack([x[metric] for x in pb]))
        ci, per_seed, n_q = res["ci"], res["per_seed"], res["queries"]
    return {"effect": name, "set": where, "metric": metric, "ours": o, "ci": ci, "paper": p,
            "verdict": stats.verdict(ci, p), "seeds": len(hi["seeds"]), "queries": n_q,
            "per_seed": per_seed}


def _cell(r: dict, m: str) -> str:
    if r["status"] != "ok":
        return r["status"]
    o, s = r["ours"].get(m), r.get("spread", {}).get(m)
    return _f(o) if s is None else f"{_f(o)} ± {s:.2f}"


def _verdict_cell(v: str) -> str:
    return "**opposite**" if v == "opposite" else v


def markdown(title: str, rows: Sequence[dict], metrics: Sequence[str], *, effects=(),
             notes: Sequence[str] = (), world: str = "", extra_cols: Sequence[str] = (),
             provenance: Optional[dict] = None) -> str:
    lines = [f"# {title}", ""]
    if world:
        lines += [f"World: {world}.", ""]
    seeds = max((len(r.get("seeds", [])) for r in rows), default=0)
    if seeds > 1:
        lines += [f"Ours: mean ± standard deviation over {seeds} seeds.", ""]
    head = ["row", "set", *extra_cols]
    for m in metrics:
        head += [m, f"{m} paper", f"Δ{m}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    for r in rows:
        cells = [r["row"], r["set"], *(str(r.get(c, "")) for c in extra_cols)]
        for m in metrics:
            o, p = r["ours"].get(m), r["paper"].get(m)
            cells += [_cell(r, m), _f(p), _f(diff(o, p), True)]
        lines.append("| " + " | ".join(cells) + " |")
    if effects:
        lines += ["", "## Effects: paired differences (same seed, same data), ours and the paper's", "",
                  "Ours: the mean difference over seeds and its 95% interval, a paired bootstrap "
                  "over seeds and test queries (repro/stats.py). Verdict: \"paper's direction\" or "
                  "\"opposite\" only when the interval excludes 0, otherwise \"within noise\".", "",
                  "| effect | set | metric | ours | 95% interval | paper | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for e in effects:
            ci = "-" if e["ci"] is None else f"[{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}]"
            lines.append(f"| {e['effect']} | {e['set']} | {e['metric']} | {_f(e['ours'], True)} | "
                         f"{ci} | {_f(e['paper'], True)} | {_verdict_cell(e['verdict'])} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if provenance:
        lines += ["", *provenance_footer(provenance)]
    return "\n".join(lines) + "\n"


def provenance_footer(prov: dict) -> list:
    """The markdown footer: commit, command, machine, packages, and every run."""
    lines = ["---", "", "Provenance: commit " + f"{prov.get('commit')}"
             + (" (uncommitted changes)" if prov.get("dirty") else "")
             + f"; command `{prov.get('command')}`; {prov.get('machine')}; "
             + ", ".join(f"{k} {v}" for k, v in (prov.get("packages") or {}).items()) + "."]
    runs = prov.get("runs") or []
    if runs:
        lines += ["", "<details><summary>runs (directory, config identity, seed)</summary>", ""]
        lines += [f"- `{r['dir']}` {r['identity']} seed {r['seed']}" for r in runs]
        lines += ["", "</details>"]
    return lines


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def write(out_dir: str, name: str, title: str, rows: Sequence[dict], metrics: Sequence[str], *,
          effects=(), notes=(), world: str = "", extra_cols=(), meta: Optional[dict] = None,
          provenance: Optional[dict] = None) -> dict:
    """``name.md``, ``name.csv`` (one line per row and metric, then the effects) and ``name.json``,
    each with the provenance."""
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(title, rows, metrics, effects=effects, notes=notes, world=world,
                  extra_cols=extra_cols, provenance=provenance)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), md)
    buf = io.StringIO()
    if provenance:
        buf.write("# provenance: " + json.dumps({k: v for k, v in provenance.items() if k != "runs"},
                                                 sort_keys=True) + "\n")
        for r in provenance.get("runs") or []:
            buf.write(f"# run: {r['dir']} identity {r['identity']} seed {r['seed']}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "row", "set", *extra_cols, "metric", "ours", "spread", "seeds", "paper",
                "difference", "status", "ci_low", "ci_high", "verdict"])
    for r in rows:
        for m in metrics:
            o, p = r["ours"].get(m), r["paper"].get(m)
            d, sp = diff(o, p), r.get("spread", {}).get(m)
            w.writerow(["row", r["row"], r["set"], *(r.get(c, "") for c in extra_cols), m,
                        "" if o is None else round(o, 4), "" if sp is None else round(sp, 4),
                        len(r.get("seeds", [])), "" if p is None else p,
                        "" if d is None else round(d, 4), r["status"], "", "", ""])
    for e in effects:
        ci = e["ci"] or ["", ""]
        w.writerow(["effect", e["effect"], e["set"], *("" for _ in extra_cols), e["metric"],
                    "" if e["ours"] is None else round(e["ours"], 4), "", e["seeds"],
                    "" if e["paper"] is None else round(e["paper"], 4), "", "ok",
                    "" if ci[0] == "" else round(ci[0], 4), "" if ci[1] == "" else round(ci[1], 4),
                    e["verdict"]])
    atomic_write_text(os.path.join(out_dir, f"{name}.csv"), buf.getvalue())
    payload = {"title": title, "world": world, "metrics": list(metrics),
               "rows": [public(r) for r in rows], "effects": list(effects), "notes": list(notes),
               **(meta or {}), "provenance": provenance}
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), payload)
    return payload


def append_section(out_dir: str, name: str, lines: Sequence[str], extra: dict) -> None:
    """Add a section before the provenance footer of ``name.md`` and keys to ``name.json``."""
    md_path, js_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")
    with open(md_path, encoding="utf-8") as f:
        md = f.read()
    head, sep, foot = md.partition("\n---\n")
    atomic_write_text(md_path, head.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + (sep + foot if sep else ""))
    with open(js_path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(extra)
    atomic_write_json(js_path, data)
