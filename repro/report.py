"""Writers: a markdown table (ours | paper | difference), CSV and JSON per table or figure."""
from __future__ import annotations

import csv
import io
import os
from typing import Optional, Sequence

from utils.io import atomic_write_json, atomic_write_text


def diff(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def _f(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def row(label: str, where: str, ours: Optional[dict], paper: dict, metrics: Sequence[str],
        status: str = "ok", **extra) -> dict:
    """One table row: ``ours`` is None when the row could not be produced (``status`` says why)."""
    ours = ours or {}
    return {"row": label, "set": where, "status": status, **extra,
            "ours": {m: (None if ours.get(m) is None else float(ours[m])) for m in metrics},
            "paper": {m: paper.get(m) for m in metrics}}


def effect(name: str, where: str, metric: str, ours_hi: Optional[dict], ours_lo: Optional[dict],
           paper_hi: dict, paper_lo: dict) -> dict:
    """An effect = a difference between two rows (e.g. ICL - RDE), ours and the paper's."""
    o = diff((ours_hi or {}).get(metric), (ours_lo or {}).get(metric))
    p = diff(paper_hi.get(metric), paper_lo.get(metric))
    # no change (ours or the paper's) has no sign to compare
    same = None if o is None or p is None or abs(o) < 1e-9 or abs(p) < 1e-9 else (o > 0) == (p > 0)
    return {"effect": name, "set": where, "metric": metric, "ours": o, "paper": p,
            "same_sign": same}


def markdown(title: str, rows: Sequence[dict], metrics: Sequence[str], *, effects=(),
             notes: Sequence[str] = (), world: str = "", extra_cols: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    if world:
        lines += [f"World: {world}.", ""]
    head = ["row", "set", *extra_cols]
    for m in metrics:
        head += [m, f"{m} paper", f"Δ{m}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    for r in rows:
        cells = [r["row"], r["set"], *(str(r.get(c, "")) for c in extra_cols)]
        for m in metrics:
            o, p = r["ours"].get(m), r["paper"].get(m)
            cells += [_f(o) if r["status"] == "ok" else r["status"], _f(p), _f(diff(o, p), True)]
        lines.append("| " + " | ".join(cells) + " |")
    if effects:
        lines += ["", "## Effects (differences between rows): sign and size, ours and the paper's", "",
                  "| effect | set | metric | ours | paper | same sign |", "| --- | --- | --- | --- | --- | --- |"]
        for e in effects:
            same = "-" if e["same_sign"] is None else ("yes" if e["same_sign"] else "**no**")
            lines.append(f"| {e['effect']} | {e['set']} | {e['metric']} | {_f(e['ours'], True)} | "
                         f"{_f(e['paper'], True)} | {same} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write(out_dir: str, name: str, title: str, rows: Sequence[dict], metrics: Sequence[str], *,
          effects=(), notes=(), world: str = "", extra_cols=(), meta: Optional[dict] = None) -> dict:
    """``name.md``, ``name.csv`` (one line per row and metric) and ``name.json``."""
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(title, rows, metrics, effects=effects, notes=notes, world=world,
                  extra_cols=extra_cols)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), md)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "set", *extra_cols, "metric", "ours", "paper", "difference", "status"])
    for r in rows:
        for m in metrics:
            o, p = r["ours"].get(m), r["paper"].get(m)
            d = diff(o, p)
            w.writerow([r["row"], r["set"], *(r.get(c, "") for c in extra_cols), m,
                        "" if o is None else round(o, 4), "" if p is None else p,
                        "" if d is None else round(d, 4), r["status"]])
    atomic_write_text(os.path.join(out_dir, f"{name}.csv"), buf.getvalue())
    payload = {"title": title, "world": world, "metrics": list(metrics), "rows": list(rows),
               "effects": list(effects), "notes": list(notes), **(meta or {})}
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), payload)
    return payload
