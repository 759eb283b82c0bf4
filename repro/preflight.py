"""``python -m repro preflight --world real TABLES...``: check every input the asked tables need
before a GPU hour is spent; print one row per input (expected, found, ok / missing / wrong, what
to do) and exit 1 when anything needed is missing or wrong. Starts no job, writes nothing.

    python -m repro preflight --world real table1 table2 --root data --mllm /models/Qwen2-VL-7B-Instruct \
        --lora /models/icl_lora --pre-checkpoint pretrained/mllm4textreid --noise-dir noiseindex

Path options are those of the real runs (``python -m repro TABLE --world real ...``) plus
``--clip`` (OpenAI's ViT-B-16.pt, default the paper configs' ``pretrained/ViT-B-16.pt``).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from prettytable import PrettyTable

from datasets import get_reader
from datasets.annotations import load_records
from datasets.noise import RELEASE_NOISE_SHA256, RELEASE_NOISE_WHERE, release_noise_name
from model import read_state_dict
from processor.memory import plan as plan_memory
from utils.config import load_config
from utils.io import file_sha256 as sha256
from utils.pre_checkpoints import PRE_CHECKPOINT_FILES, PRE_SOURCE

from .options import build_parser, pairs, pre_checkpoints
from .worlds import RealWorld

COARSE = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
ALL_DATASETS = (*COARSE, "UFine6926")
TABLE_NAMES = ("table1", "table2", "table34", "table5", "table6", "rde_noise", "fig3", "fig5", "fig6", "fig7")

# OpenAI's ViT-B/16 (the URL's path carries the file's sha256; clip/clip.py of openai/CLIP).
CLIP_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            f"{CLIP_SHA256}/ViT-B-16.pt")
# Shapes of ViT-B/16's CLIP inside an RDE/ICL checkpoint (base_model.*), 384x128 at stride 16.
VIT_B16_SHAPES = {"base_model.visual.conv1.weight": (768, 3, 16, 16),
                  "base_model.token_embedding.weight": (49408, 512),
                  "base_model.text_projection": (512, 512),
                  "base_model.visual.proj": (768, 512)}

# Published split sizes (identities, images, captions), from the dataset papers as IRRA/RDE use
# them: CUHK-PEDES (Li et al., CVPR 2017), ICFG-PEDES (Ding et al., arXiv 2107.12666, 2021; no
# val split), RSTPReid (Zhu et al., ACM MM 2021). UFine6926 (Zuo et al., CVPR 2024): the per-split
# figures are not verified in this repository, so its sizes are reported, not checked.
PUBLISHED: dict[str, dict[str, tuple[int, int, int]]] = {
    "CUHK-PEDES": {"train": (11003, 34054, 68126), "val": (1000, 3078, 6158), "test": (1000, 3074, 6156)},
    "ICFG-PEDES": {"train": (3102, 34674, 34674), "test": (1000, 19848, 19848)},
    "RSTPReid": {"train": (3701, 18505, 37010), "val": (200, 1000, 2000), "test": (200, 1000, 2000)},
}
DATASET_SOURCES = {
    "CUHK-PEDES": "request from the authors: github.com/ShuangLI59/Person-Search-with-Natural-Language-Description "
                  "(reid_raw.json + imgs/)",
    "ICFG-PEDES": "request from the authors: github.com/zifyloo/SSAN (ICFG-PEDES.json + imgs/)",
    "RSTPReid": "request from the authors: github.com/NjtechCVLab/RSTPReid-Dataset (data_captions.json + imgs/)",
    "UFine6926": "request from the authors: github.com/Zplusdragon/UFineBench (annotation json + images/)",
}
# The anchor-localization LoRA as the paper trains it (configs/llamafactory/qwen2vl_lora_sft.yaml):
# rank 8, alpha 16, every linear layer of the language model.
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MLLM_ARCH = "Qwen2VLForConditionalGeneration"


@dataclass
class Row:
    input: str
    expected: str
    found: str
    status: str          # ok | missing | wrong | info
    fix: str = ""
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.required and self.status in ("missing", "wrong")


# ----------------------------------------------------------------------------- what tables need
def needs(tables: Sequence[str], datasets: Sequence[str]) -> dict:
    """Inputs the asked tables need: datasets, whether CLIP / noise files / group-2 checkpoints /
    RDA files / the MLLM and LoRA / GPUs are needed."""
    tables = list(TABLE_NAMES) if "all" in tables else list(tables)
    unknown = [t for t in tables if t not in TABLE_NAMES]
    if unknown:
        raise SystemExit(f"preflight: unknown table(s) {unknown}; choose from {', '.join(TABLE_NAMES)} or all")
    coarse = [d for d in datasets if d in COARSE]
    ds: list[str] = []
    out = {"noise": [], "pre": [], "rda": [], "mllm": False, "lora": False}
    for t in tables:
        if t in ("table1", "table5", "table6", "rde_noise"):
            ds += coarse
        elif t == "table2":
            ds += [d for d in datasets if d == "UFine6926"]
        elif t in ("table34", "fig3", "fig6"):
            ds += list(datasets)
        else:                                  # fig5, fig7: the first dataset
            ds += list(datasets[:1])
        if t == "rde_noise":
            out["noise"] += coarse
        if t in ("table1", "table2"):
            out["pre"] += coarse if t == "table1" else [d for d in datasets if d == "UFine6926"]
        if t != "rde_noise":
            out["mllm"] = True
            out["lora"] = True
            out["rda"] += coarse if t in ("table1", "table6") else (
                [d for d in datasets if d == "UFine6926"] if t == "table2" else [])
    out["datasets"] = list(dict.fromkeys(ds))
    out["rda"] = list(dict.fromkeys(out["rda"]))
    out["pre"] = list(dict.fromkeys(out["pre"]))
    out["noise"] = list(dict.fromkeys(out["noise"]))
    return out


# ----------------------------------------------------------------------------- checks
def _find_elsewhere(dataset_dir: str, rel: str) -> Optional[str]:
    """A folder under ``dataset_dir`` (two levels deep) holding ``rel``: images put in another subfolder."""
    for depth in ("", "*", "*/*"):
        for hit in glob.glob(os.path.join(dataset_dir, depth, rel)):
            return os.path.dirname(hit[: len(hit) - len(rel)].rstrip("/") + "/")
    return None


def check_dataset(root: str, name: str, published: dict = PUBLISHED) -> list[Row]:
    """Annotation parses in its reader, splits have the published sizes, every image exists."""
    reader = get_reader(name)
    folder = os.path.join(root, name)
    anno = os.path.join(folder, reader.anno_names[0])
    source = DATASET_SOURCES[name]
    if not os.path.isdir(folder):
        return [Row(f"{name} folder", folder, "absent", "missing", f"put the dataset there ({source})")]
    try:
        ds = reader(root, check_images=False)
    except FileNotFoundError:
        found = sorted(os.listdir(folder))[:6]
        fix = f"put {reader.anno_names[0]} in {folder} ({source})"
        what = "absent"
        if name == "CUHK-PEDES" and os.path.isfile(os.path.join(folder, "caption_all.json")):
            what = "only caption_all.json (the original CUHK-PEDES release)"
            fix = ("caption_all.json is the original release's caption file without the train/val/test split; the "
                   "readers (IRRA, RDE, ICL, this one) need reid_raw.json, the same captions with 'split' and "
                   "'processed_tokens' (RDE issue #4, IRRA issue #49): it comes with the dataset from its authors "
                   f"({source}); put it at {anno}")
        return [Row(f"{name} annotation", anno, what if what != "absent" else f"absent (folder has {found})",
                    "missing", fix)]
    except (ValueError, KeyError) as err:
        return [Row(f"{name} annotation", f"{anno} in the official format", str(err)[:160], "wrong",
                    f"replace it with the official file ({source})")]
    rows = [Row(f"{name} annotation", reader.anno_names[0], str(ds.anno_path), "ok")]
    for split, want in (published.get(name) or {}).items():
        if split == "train":
            got = (len(ds.train_id_container), ds.num_images["train"], len(ds.train))
        else:
            part = ds.split(split)
            got = (len(set(part["image_pids"])), len(part["img_paths"]), len(part["captions"]))
        ok = tuple(got) == tuple(want)
        rows.append(Row(f"{name} {split} split", "ids/images/captions " + "/".join(f"{x:,}" for x in want),
                        "/".join(f"{x:,}" for x in got), "ok" if ok else "wrong",
                        "" if ok else f"{ds.anno_path} is not the published annotation; get the official one ({source})"))
    if name not in published:
        rows.append(Row(f"{name} splits", "published sizes (not verified here)", ds.summary().replace("\n", " ")[:120],
                        "info", required=False))
    paths = sorted({p for _, _, p, _ in ds.train} | set(ds.val["img_paths"]) | set(ds.test["img_paths"]))
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        rows.append(Row(f"{name} images", f"{len(paths):,} files under {ds.img_dir}", "all present", "ok"))
    else:
        rel = os.path.relpath(missing[0], ds.img_dir)
        other = _find_elsewhere(folder, rel)
        fix = (f"the images are under {other}, not {ds.img_dir}: move them (or link the folder) there"
               if other and os.path.abspath(other) != os.path.abspath(str(ds.img_dir))
               else f"copy the dataset's images to {ds.img_dir}/ ({source})")
        rows.append(Row(f"{name} images", f"{len(paths):,} files under {ds.img_dir}",
                        f"{len(missing):,} missing, e.g. {missing[0]}", "missing", fix))
    return rows


def check_clip(path: str) -> Row:
    fix = f"download {CLIP_URL} to {path}"
    if not os.path.isfile(path):
        return Row("CLIP ViT-B/16", f"{path}, sha256 {CLIP_SHA256[:12]}…", "absent", "missing", fix)
    got = sha256(path)
    if got != CLIP_SHA256:
        return Row("CLIP ViT-B/16", f"sha256 {CLIP_SHA256[:12]}…", f"sha256 {got[:12]}… ({path})", "wrong",
                   f"not OpenAI's ViT-B-16.pt (a truncated download or another model): {fix}")
    return Row("CLIP ViT-B/16", f"sha256 {CLIP_SHA256[:12]}…", path, "ok")


def check_noise(noise_dir: str, dataset: str, rates=(0.2, 0.5, 0.8)) -> list[Row]:
    rows = []
    for rate in rates:
        name = release_noise_name(dataset, rate)
        path = os.path.join(noise_dir, name)
        want = RELEASE_NOISE_SHA256[name]
        if not os.path.isfile(path):
            rows.append(Row(f"noise {name}", f"{path}", "absent", "missing", f"copy it from {RELEASE_NOISE_WHERE}"))
            continue
        got = sha256(path)
        rows.append(Row(f"noise {name}", f"sha256 {want[:12]}…", f"sha256 {got[:12]}…",
                        "ok" if got == want else "wrong",
                        "" if got == want else f"not the release's permutation: copy it from {RELEASE_NOISE_WHERE}"))
    return rows


class _Pre:
    """What RealWorld.pre_checkpoint_for reads: the --pre-checkpoint values."""

    def __init__(self, pre) -> None:
        self.pre_checkpoint = pre


def check_pre(pre: Optional[dict | str], dataset: str) -> Row:
    label = f"+pre checkpoint {dataset}"
    expected = f"{PRE_CHECKPOINT_FILES.get(dataset, '?')} of MLLM4Text-ReID, ViT-B/16 CLIP"
    fix = (f"pass --pre-checkpoint DIR holding {PRE_SOURCE} best0/1/2.pth (docs/REPRODUCE.md says "
           "which file each dataset uses); without it group 2's rows are not run")
    # The real runs' own choice of file (RealWorld.pre_checkpoint_for), not a copy of it.
    path = RealWorld.pre_checkpoint_for(_Pre(pre), dataset) if pre else None
    if path is None:
        return Row(label, expected, "not given" if not pre else "not given for this dataset", "missing", fix,
                   required=False)
    if not os.path.isfile(path):
        return Row(label, expected, f"{path} absent", "missing", fix)
    try:
        sd = read_state_dict(path)
    except Exception as err:  # noqa: BLE001  (any unreadable file is reported, not raised)
        return Row(label, expected, f"{path}: unreadable ({str(err)[:80]})", "wrong", fix)
    bad = [f"{k} {tuple(sd[k].shape) if k in sd else 'absent'}" for k, shape in VIT_B16_SHAPES.items()
           if k not in sd or tuple(sd[k].shape) != shape]
    if bad:
        return Row(label, expected, f"{path}: {', '.join(bad[:3])}", "wrong",
                   "not an RDE/ICL/IRRA checkpoint of a ViT-B/16 CLIP: " + fix)
    return Row(label, expected, path, "ok")


def check_rda(root: str, dataset: str, rda_file: Optional[str]) -> Row:
    """The RDA file parses and gives ``diversity_captions`` to every training caption of the
    dataset's own annotation (matched by image path and captions)."""
    label = f"RDA file {dataset}"
    if not rda_file:
        return Row(label, "the authors' RDA json (RDA_data.zip, ICL release) or a generated one", "not given",
                   "info", "generated by `python -m rda generate` (needs the MLLM) when the tables run", required=False)
    if not os.path.isfile(rda_file):
        return Row(label, "an RDA annotation json", f"{rda_file} absent", "missing",
                   "unzip RDA_data.zip of github.com/QinYang79/ICL and pass --rda-file DATASET=PATH")
    reader = get_reader(dataset)
    try:
        base = load_records(reader(root, check_images=False).anno_path, reader.path_field)
        rda = load_records(rda_file, reader.path_field)
    except (ValueError, KeyError, FileNotFoundError) as err:
        return Row(label, "parses in the reader", str(err)[:160], "wrong", "pass the RDA json of this dataset")
    subs = {r[reader.path_field]: r for r in rda if r["split"] == "train" and "diversity_captions" in r}
    want = [r for r in base if r["split"] == "train"]
    uncovered = [r for r in want if r[reader.path_field] not in subs
                 or subs[r[reader.path_field]]["captions"] != r["captions"]]
    n_captions = sum(len(r["captions"]) for r in want)
    expected = f"sub-sentences for all {n_captions:,} training captions"
    if uncovered:
        n = sum(len(r["captions"]) for r in uncovered)
        return Row(label, expected, f"{n:,} without, e.g. {uncovered[0][reader.path_field]}", "wrong",
                   f"{rda_file} is not this dataset's RDA file (or is partial): use the authors' file for {dataset} "
                   "(RDA_data.zip of github.com/QinYang79/ICL) or regenerate it with `python -m rda generate`")
    return Row(label, expected, rda_file, "ok")


def check_mllm(path: Optional[str]) -> Row:
    label = "MLLM Qwen2-VL-7B-Instruct"
    fix = "download Qwen/Qwen2-VL-7B-Instruct (huggingface.co) and pass --mllm DIR"
    if not path:
        return Row(label, MLLM_ARCH, "not given", "missing", fix)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return Row(label, f"{cfg} ({MLLM_ARCH})", "absent", "missing", fix)
    with open(cfg, encoding="utf-8") as f:
        arch = json.load(f).get("architectures") or []
    if MLLM_ARCH not in arch:
        return Row(label, MLLM_ARCH, f"architectures {arch}", "wrong", f"{path} is not a Qwen2-VL model: {fix}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if absent:
        return Row(label, f"{len(shards)} weight shard(s)", f"{len(absent)} absent: {absent[:3]}", "missing",
                   f"the download is incomplete: fetch the missing shards into {path}")
    return Row(label, f"{MLLM_ARCH}, {len(shards)} shard(s)", path, "ok")


def check_lora(path: Optional[str], mllm: Optional[str]) -> Row:
    label = "ICL LoRA adapter"
    expected = f"rank {LORA_RANK}, alpha {LORA_ALPHA}, {len(LORA_TARGETS)} LM projections, base Qwen2-VL-7B-Instruct"
    fix = ("pass --lora DIR (the authors' adapter, huggingface.co/Yangsss/ICL, or one trained with "
           "--train-lora); without it THI's tuned rows are not run")
    if not path:
        return Row(label, expected, "not given", "missing", fix, required=False)
    cfg = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg):
        return Row(label, expected, f"{cfg} absent", "missing", fix)
    with open(cfg, encoding="utf-8") as f:
        c = json.load(f)
    targets = c.get("target_modules") or []
    targets = set(targets) if isinstance(targets, list) else {targets}
    base = str(c.get("base_model_name_or_path") or "")
    problems = []
    if c.get("r") != LORA_RANK:
        problems.append(f"rank {c.get('r')}")
    if c.get("lora_alpha") != LORA_ALPHA:
        problems.append(f"alpha {c.get('lora_alpha')}")
    if not LORA_TARGETS <= {t.split(".")[-1] for t in targets}:
        problems.append(f"targets {sorted(targets)[:4]}")
    base_name = os.path.basename(os.path.normpath(base)).lower()
    if "qwen2-vl-7b-instruct" not in base_name and not (mllm and os.path.samefile(base, mllm)
                                                        if base and os.path.exists(base) else False):
        problems.append(f"base {base!r}")
    if problems:
        return Row(label, expected, ", ".join(problems), "wrong", f"{path} is not the paper's adapter: " + fix)
    return Row(label, expected, path, "ok")


def check_gpus(count: int, tables_configs: Sequence[str], probe: Callable[[], list] ) -> list[Row]:
    """GPU count and memory, and the memory plan's verdict for the configs the tables train."""
    gpus = probe()
    rows = []
    if len(gpus) < count:
        rows.append(Row("GPUs", f"{count} CUDA GPU(s)", f"{len(gpus)}", "missing",
                        "run on the GPU box (or pass --gpus N with the GPUs it has)"))
        return rows
    memory = min(m for _, m in gpus[:count])
    rows.append(Row("GPUs", f"{count} CUDA GPU(s)", ", ".join(f"{n} {m / 2**30:.0f} GiB" for n, m in gpus[:count]),
                    "ok"))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import memory_plan  # scripts/memory_plan.py: a script, reachable only through sys.path
    for config in tables_configs:
        cfg = load_config(config)
        meas = next((e for e in memory_plan.load_cache(memory_plan.CACHE)
                     if e["geometry"] == memory_plan.geometry(cfg)), None)
        if meas is None:
            rows.append(Row(f"memory plan {config}", "a measurement", "none cached", "info",
                            f"python scripts/memory_plan.py --config {config}", required=False))
            continue
        batch = cfg.batch_size if cfg.batch_size % count == 0 else count
        p = plan_memory(meas, cfg, batch, count, "bf16")
        fits = p["peak"] <= memory
        rows.append(Row(f"memory plan {os.path.basename(config)}", f"<= {memory / 2**30:.0f} GiB per GPU",
                        f"{p['peak'] / 2**30:.1f} GiB", "ok" if fits else "wrong",
                        "" if fits else f"lower batch_size (python scripts/memory_plan.py --config {config} "
                                        f"--gpus {count} --memory {memory / 2**30:.0f}GiB prints the largest that fits)"))
    return rows


def cuda_gpus() -> list:
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm(backend: str) -> Row:
    if backend != "vllm":
        return Row("vLLM", "importable (backend vllm)", f"backend {backend}", "info", required=False)
    ok = vllm_importable()
    return Row("vLLM", "importable", "yes" if ok else "no", "ok" if ok else "missing",
               "" if ok else "pip install vllm in this environment (requirements-gpu.txt), or use --backend openai")


# ----------------------------------------------------------------------------- command
def run_preflight(args, tables: Sequence[str], probe_gpus: Callable[[], list] = cuda_gpus,
                  published: dict = PUBLISHED) -> list[Row]:
    datasets = [d for d in args.datasets.split(",") if d]
    need = needs(tables, datasets)
    rows: list[Row] = []
    for ds in need["datasets"]:
        rows += check_dataset(args.root, ds, published)
    rows.append(check_clip(args.clip))
    for ds in need["noise"]:
        rows += check_noise(args.noise_dir, ds)
    pre = pre_checkpoints(args.pre_checkpoint) if args.pre_checkpoint else None
    for ds in need["pre"]:
        rows.append(check_pre(pre, ds))
    rda_files = pairs(args.rda_file, "--rda-file")
    for ds in need["rda"]:
        rows.append(check_rda(args.root, ds, rda_files.get(ds)))
    if need["mllm"]:
        if args.backend == "openai":
            rows.append(Row("MLLM server", "--base-url and --served-model",
                            f"{args.base_url} {args.served_model}",
                            "ok" if args.base_url and args.served_model else "missing",
                            "" if args.base_url and args.served_model else "pass --base-url and --served-model"))
        else:
            rows.append(check_mllm(args.mllm))
            rows.append(check_vllm(args.backend))
    if need["lora"]:
        rows.append(check_lora(args.lora, args.mllm))
    configs = [f"configs/{m}_{d.lower().replace('-', '_')}.yaml" for d in need["datasets"] for m in ("rde", "icl")]
    rows += check_gpus(args.gpus, [c for c in configs if os.path.isfile(c)], probe_gpus)
    return rows


def print_rows(rows: Sequence[Row], out=None) -> None:
    table = PrettyTable(["input", "expected", "found", "status", "what to do"])
    table.align = "l"
    table.max_width = 48
    for r in rows:
        status = r.status if r.required or r.status in ("ok", "info") else f"{r.status} (optional)"
        table.add_row([r.input, r.expected, r.found, status, r.fix])
    print(table, file=out or sys.stdout)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    clip = "pretrained/ViT-B-16.pt"
    if "--clip" in argv:
        i = argv.index("--clip")
        clip = argv[i + 1]
        del argv[i:i + 2]
    parser = build_parser()
    # The tables may stand anywhere among the real runs' options (they are the extra positionals).
    args, rest = parser.parse_known_args(["all", *argv])
    tables = [a for a in rest if not a.startswith("-")]
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.clip = clip
    if args.world != "real":
        raise SystemExit("preflight checks the real world's inputs: pass --world real")
    if not tables:
        raise SystemExit(f"preflight: name the tables to check ({', '.join(TABLE_NAMES)} or all)")
    rows = run_preflight(args, tables, probe_gpus=lambda: cuda_gpus())
    print_rows(rows)
    failed = [r for r in rows if r.failed]
    print(f"preflight: {len(failed)} needed input(s) missing or wrong" if failed
          else "preflight: every needed input is present and is the right one")
    return 1 if failed else 0
