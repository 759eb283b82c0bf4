"""Re-create the CSVs of docs/paper/ from the two papers' text (a provenance record, not run by CI).

    git -C <ICL mirror> show HEAD:src/ICL_paper.pdf > icl.pdf && pdftotext -layout icl.pdf icl.txt
    git -C <RDE mirror> show HEAD:src/RDE_main.pdf > rde.pdf && pdftotext -layout rde.pdf rde.txt
    python docs/paper/extract.py icl.txt rde.txt docs/paper

Rows are found by their printed label and the numbers read from the same line, in the order the
paper prints its columns; nothing is typed by hand. Every table was then checked by eye against
the PDF (see README.md in this folder).
"""
from __future__ import annotations

import csv
import os
import re
import sys

FIELDS = ["paper", "table", "row", "method", "group", "thi", "train", "test", "noise",
          "checkpoint", "metric", "value"]
M5 = ["R1", "R5", "R10", "mAP", "mINP"]
COARSE = ["CUHK-PEDES", "ICFG-PEDES", "RSTPReid"]
ICL, RDE = "ICL (CVPR 2025)", "RDE (CVPR 2024)"
NUM = re.compile(r"(?<![\w.])(-|\d+\.\d+)(?![\w.])")


def numbers(line: str, count: int) -> list:
    """The first ``count`` numbers (or '-') of a line; the right-hand column of two-column
    pages follows after a wide gap and is cut off first."""
    left = re.split(r"\s{6,}(?=[A-Za-z(])", line.strip())[0]
    vals = NUM.findall(left)[:count]
    if len(vals) != count:
        raise ValueError(f"expected {count} numbers in: {line!r}")
    return [None if v == "-" else float(v) for v in vals]


def find(lines, pattern, start=0):
    rx = re.compile(pattern)
    for i in range(start, len(lines)):
        if rx.search(lines[i]):
            return i
    raise ValueError(f"no line matches {pattern!r}")


def emit(rows, base, metrics, values):
    for metric, value in zip(metrics, values):
        if value is not None:
            rows.append({**base, "metric": metric, "value": f"{value:.2f}"})


def row(paper, table, label, method, *, group="", thi=0, train="", test="", noise="0",
        checkpoint=""):
    return {"paper": paper, "table": table, "row": label, "method": method, "group": group,
            "thi": thi, "train": train, "test": test, "noise": noise, "checkpoint": checkpoint}


def icl_table1(lines):
    out = []
    start = find(lines, r"VL-Backbones w/o ReID-domain")
    group2 = find(lines, r"VL-Backbones with ReID-domain")
    end = find(lines, r"^Table 1\. Performance")
    methods = {"IVT": "IVT", "LCR2 S": "LCR2S", "CFine": "CFine", "RaSa": "RaSa",
               "IRRA♭": "IRRA (MALS pre-trained)", "IRRA": "IRRA", "TBPS": "TBPS",
               "CFAM": "CFAM", "RDE": "RDE", "APTM": "APTM", "NAM♮": "NAM (reproduced by ICL)",
               "Our ICL⋆": "ICL", "Our ICL": "ICL"}
    for i in range(start + 1, end):
        line = lines[i]
        label = next((k for k in methods if line.strip().startswith(k)), None)
        if label is None:
            continue
        group = 1 if i < group2 else 2
        vals = numbers(line.split("CLIP-X.")[-1] if "CLIP-X." in line else
                       re.sub(r"^.*?BERT", "", line), 15)
        thi = int(label == "Our ICL⋆")
        for d, ds in enumerate(COARSE):
            emit(out, row(ICL, "Table 1", label, methods[label], group=group, thi=thi, train=ds,
                          test=ds), M5, vals[5 * d:5 * d + 5])
    return out


def icl_table2(lines):
    out = []
    start = find(lines, r"^\s*Methods\s+Rank-1\s+Rank-5\s+Rank-10\s+mAP\s+mINP")
    end = find(lines, r"^Table 2\. Performance", start)
    for i in range(start + 1, end):
        m = re.match(r"^\s*(❶ |❷ )?(LGUR|SSAN|IRRA|RDE|CFAM\((?:B/16|L/14)\)|Our ICL⋆|Our ICL)(?=\s)", lines[i])
        if not m:
            continue
        label = (m.group(1) or "") + m.group(2)
        group = {"❶ ": 1, "❷ ": 2}.get(m.group(1) or "", "")
        method = "ICL" if "ICL" in label else m.group(2)
        rest = lines[i][m.end():]
        emit(out, row(ICL, "Table 2", label.strip(), method, group=group,
                      thi=int("⋆" in label), train="UFine6926", test="UFine6926"), M5, numbers(rest, 5))
    return out


def icl_table3(lines):
    out = []
    start = find(lines, r"Methods\s+Training Sets")
    end = find(lines, r"Table 3\. Comparison of mutual", start)
    method = None
    for i in range(start + 1, end):
        line = lines[i]
        m = re.match(r"^\s*(IRRA \[12\]|RDE \[21\]|Our ICL⋆|Our ICL)?\s*(CUHK-PEDES|ICFG-PEDES|RSTPReid)\s", line)
        if not m:
            continue
        train = m.group(2)
        # the method label sits on the middle line of each block of three
        block_label = None
        for j in (i, i + 1, i - 1):
            mm = re.match(r"^\s*(IRRA \[12\]|RDE \[21\]|Our ICL⋆|Our ICL)\s", lines[j])
            if mm:
                block_label = mm.group(1)
                break
        if block_label is not None:
            method = block_label
        vals = numbers(line[m.end():], 15)
        name = {"IRRA [12]": "IRRA", "RDE [21]": "RDE"}.get(method, "ICL")
        for d, ds in enumerate(COARSE):
            emit(out, row(ICL, "Table 3", method, name, thi=int("⋆" in method), train=train,
                          test=ds), M5, vals[5 * d:5 * d + 5])
    return out


SHORT = {"CUHK.": "CUHK-PEDES", "CUHK": "CUHK-PEDES", "ICFG.": "ICFG-PEDES", "RSTP.": "RSTPReid",
         "UFine.": "UFine6926"}


def icl_table4(lines):
    out = []
    start = find(lines, r"Source → Target Methods")
    end = find(lines, r"^Table 4\. Generalization", start)
    block = []  # (label, values) rows of the current 4-row block
    pair = None
    for i in range(start + 1, end):
        line = lines[i]
        p = re.match(r"^\s*(CUHK\.|ICFG\.|RSTP\.|UFine\.)\s*→\s*(UFine\.|CUHK|ICFG\.|RSTP\.)", line)
        if p:
            pair = (SHORT[p.group(1)], SHORT[p.group(2)])
        m = re.match(r"^\s*(?:(?:CUHK\.|ICFG\.|RSTP\.|UFine\.)\s*→\s*\S+\s+)?(IRRA \[12\]|RDE \[21\]|Our ICL⋆|Our ICL)\s", line)
        if m:
            block.append((m.group(1), numbers(line[m.end():], 5)))
        if len(block) == 4 and pair is not None:
            for label, vals in block:
                name = {"IRRA [12]": "IRRA", "RDE [21]": "RDE"}.get(label, "ICL")
                emit(out, row(ICL, "Table 4", label, name, thi=int("⋆" in label), train=pair[0],
                              test=pair[1]), M5, vals)
            block, pair = [], None
    if block:
        raise ValueError(f"Table 4: unfinished block {block}")
    return out


def icl_table5(lines):
    out = []
    start = find(lines, r"Methods\s+THI\s+Rank-1\s+mAP")
    end = find(lines, r"Table 5\. Transferability", start)
    method = None
    pending = []
    for i in range(start + 1, end + 1):
        line = lines[i]
        right = line[60:] if len(line) > 60 else ""
        mm = re.search(r"(CLIP \[24\]|IRRA \[12\]|RDE \[21\])\s+\+(\d+\.\d+)", right)
        if mm:
            method = mm.group(1).split()[0]
            out.append({**row(ICL, "Table 5", f"{mm.group(1)} ΔAvg", method, thi=1),
                        "metric": "dAvg", "value": mm.group(2)})
        t = re.search(r"(✘|✔)\s+((?:\d+\.\d+\s+){5}\d+\.\d+)", right)
        if t:
            vals = [float(v) for v in t.group(2).split()]
            pending.append((f"THI {t.group(1)}", int(t.group(1) == "✔"), vals))
            if t.group(1) == "✔":  # the row after a method's label closes that method's pair
                if method is None:
                    raise ValueError(f"Table 5: a THI row before any method label: {line!r}")
                for label, thi, vals in pending:
                    for d, ds in enumerate(COARSE):
                        emit(out, row(ICL, "Table 5", label, method, thi=thi, train=ds, test=ds),
                             ["R1", "mAP"], vals[2 * d:2 * d + 2])
                pending, method = [], None
    if pending:
        raise ValueError(f"Table 5: rows without a method: {pending}")
    return out


def icl_table6(lines):
    out = []
    start = find(lines, r"No\.\s+THI\s+RDA\s+LoRA")
    method = {"#1": "RDE+RDA+THI (LoRA MLLM)", "#2": "RDE+RDA+THI (MLLM without LoRA)",
              "#3": "RDE+RDA", "#4": "RDE"}
    for i in range(start + 1, start + 10):
        m = re.match(r"^\s*(#[1-4])\s+(✔|✘)\s+(✔|✘)\s+(✔|✘)\s+((?:\d+\.\d+\s+){5}\d+\.\d+)", lines[i])
        if not m:
            continue
        vals = [float(v) for v in m.group(5).split()]
        for d, ds in enumerate(COARSE):
            emit(out, row(ICL, "Table 6", m.group(1), method[m.group(1)], thi=int(m.group(2) == "✔"),
                          train=ds, test=ds), ["R1", "mAP"], vals[2 * d:2 * d + 2])
    return out


def rde_noise(lines, caption, table):
    """RDE's Table 1 (0/20/50% noise) or Table 3 (80%): every method, Best and Last.

    The layout puts a method's label on its Last line or between its Best and Last lines, and
    the noise label on a line inside its block; every block starts with SSAN's Best row."""
    out = []
    end = find(lines, caption)
    start = max(i for i in range(end) if re.search(r"Noise\s+Methods\s+R-1", lines[i]))
    methods = ("SSAN", "IVT", "CFine", "IRRA", "CLIP-C", "DECL", "RDE")
    label_rx = re.compile(r"(?<![\w-])(" + "|".join(re.escape(m) for m in methods) + r")(?![\w-])")
    data, labels, noises = [], [], []
    for i in range(start + 1, end):
        line = lines[i]
        nm = re.match(r"^\s*(\d+)%", line)
        if nm:
            noises.append((i, int(nm.group(1)) / 100))
        mm = label_rx.search(line)
        if mm:
            labels.append((i, mm.group(1)))
        cm = re.search(r"\b(Best|Last)\b", line)
        if cm:
            data.append([i, mm.group(1) if mm else None, cm.group(1), numbers(line[cm.end():], 15)])
    for k, rec in enumerate(data):
        if rec[1] is None and rec[2] == "Last":  # the Last row of the Best row before it
            rec[1] = data[k - 1][1]
        elif rec[1] is None:  # a Best row: its label is printed after it
            rec[1] = next(lab for j, lab in labels if j > rec[0])
    blocks = []
    for rec in data:
        if rec[1] == "SSAN" and rec[2] == "Best":
            blocks.append([])
        blocks[-1].append(rec)
    for block in blocks:
        first, last = block[0][0], block[-1][0]
        noise = [nz for j, nz in noises if first <= j <= last]
        if len(noise) != 1:
            raise ValueError(f"{table}: {len(noise)} noise labels in lines {first}-{last}")
        for _, lab, ckpt, v in block:
            for d, ds in enumerate(COARSE):
                emit(out, row(RDE, table, f"{noise[0]:.0%} {lab} {ckpt}", lab, train=ds, test=ds,
                              noise=f"{noise[0]:g}", checkpoint=ckpt.lower()), M5, v[5 * d:5 * d + 5])
    return out


def rde_ablation(lines):
    """RDE's Table 2 (ablation on CUHK-PEDES). The caption gives no noise rate; row #1 equals
    Table 1's 50 % RDE Best row number for number, so the rows are stored with noise 0.5."""
    out = []
    start = find(lines, r"No\.\s+S b\s+S e\s+CCD\s+Loss")
    columns: list = []
    end = find(lines, r"Table 2\. Ablation studies on the CHUK-PEDES", start)
    for i in range(start + 1, end):
        m = re.match(r"^\s*(#\d)\s+(.*?)\s(TAL|TRL-S|TRL|SDM)\s", lines[i])
        if not m:
            continue
        # three flag columns (S^b, S^e, CCD): row #1 has all three ticks and fixes their places
        ticks = [j for j, ch in enumerate(lines[i]) if ch == "✓"]
        if m.group(1) == "#1":
            columns = ticks
        on = [any(abs(t - c) <= 1 for t in ticks) for c in columns]
        method = "+".join(n for n, o in zip(("Sb", "Se", "CCD"), on) if o) + "+" + m.group(3)
        vals = numbers(lines[i][m.end(3):], 5)
        emit(out, row(RDE, "Table 2", m.group(1), method, train="CUHK-PEDES", test="CUHK-PEDES",
                      noise="0.5", checkpoint="best"), M5, vals)
    return out


def write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"{path}: {len(rows)} numbers")


def main(icl_txt, rde_txt, out_dir):
    icl = open(icl_txt, encoding="utf-8").read().splitlines()
    rde = open(rde_txt, encoding="utf-8").read().splitlines()
    write(os.path.join(out_dir, "icl_table1.csv"), icl_table1(icl))
    write(os.path.join(out_dir, "icl_table2.csv"), icl_table2(icl))
    write(os.path.join(out_dir, "icl_table3.csv"), icl_table3(icl))
    write(os.path.join(out_dir, "icl_table4.csv"), icl_table4(icl))
    write(os.path.join(out_dir, "icl_table5.csv"), icl_table5(icl))
    write(os.path.join(out_dir, "icl_table6.csv"), icl_table6(icl))
    write(os.path.join(out_dir, "rde_table1_noise.csv"),
          rde_noise(rde, r"^Table 1\. Performance comparison under different noise", "Table 1")
          + rde_noise(rde, r"^Table 3\. Performance comparison under 80% noise", "Table 3"))
    write(os.path.join(out_dir, "rde_table2_ablation.csv"), rde_ablation(rde))


if __name__ == "__main__":
    main(*sys.argv[1:4])
