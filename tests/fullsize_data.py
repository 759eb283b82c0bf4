"""Fixtures at the real sizes for tests/test_fullsize.py: the four benchmarks written in their own
file layouts (annotation file name, path field, image folder, id numbering) with JPEG/PNG images
of varied real-world sizes, the authors' RDA file format, and a random ViT-B/16 CLIP written as
OpenAI's TorchScript archive (fp16, the keys and shapes of ``ViT-B-16.pt``).

Captions and the simulated MLLM's attribute sidecar come from a small SynthPEDES, so THI's
simulated MLLM can answer about these images.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image

# OpenAI's ViT-B/16: embed 512, vision 768 x 12 layers, patch 16 at 224, text 512 x 12 layers, 77 tokens.
VIT_B16 = dict(embed_dim=512, vision_width=768, vision_layers=12, patch_size=16, image_resolution=224,
               text_width=512, text_layers=12, context_length=77, vocab_size=49408)

# Per benchmark: annotation file, image folder (inside the dataset folder), path field, first train
# id, whether it has a val split, image file names and the range of source image sizes (H, W).
LAYOUTS = {
    "CUHK-PEDES": dict(anno="reid_raw.json", image_dir="imgs", field="file_path", first_id=1, val=True,
                       path=lambda pid, j: f"CUHK0{1 + pid % 3}/{pid:04d}{j:03d}.png" if pid % 2
                       else f"train_query/p{pid}_s{1000 + j}.jpg", sizes=((100, 40), (420, 190))),
    "ICFG-PEDES": dict(anno="ICFG-PEDES.json", image_dir="imgs", field="file_path", first_id=0, val=False,
                       path=lambda pid, j: f"train/{pid:04d}/{pid:04d}_{j:03d}_01_0303morning_0008_0.jpg",
                       sizes=((120, 50), (400, 160))),
    "RSTPReid": dict(anno="data_captions.json", image_dir="imgs", field="img_path", first_id=0, val=True,
                     path=lambda pid, j: f"{pid:04d}_c{1 + j}_{j:04d}.jpg", sizes=((200, 80), (500, 220))),
    "UFine6926": dict(anno="UFine6926_Annotations_1024.json", image_dir="", field="file_path", first_id=1,
                      val=False, path=lambda pid, j: f"images/{pid}_{j}.jpg", sizes=((600, 250), (1300, 600))),
}


def write_benchmark(root: str | os.PathLike, name: str, synth: str | os.PathLike, seed: int = 0) -> dict:
    """Copy SynthPEDES at ``synth`` (a dataset folder with reid_raw.json) into ``root/name`` in
    that benchmark's layout; images re-encoded at random real-world sizes. Returns
    ``{"anno": path, "dataset_dir": path, "records": [...], "sizes": [(w, h), ...]}``."""
    lay = LAYOUTS[name]
    synth = Path(synth)
    src_records = json.loads((synth / "reid_raw.json").read_text())
    src_attrs = json.loads((synth / "attributes.json").read_text())
    rng = random.Random(seed)
    out = Path(root) / name
    img_dir = out / lay["image_dir"] if lay["image_dir"] else out
    raw_ids = sorted({int(r["id"]) for r in src_records})
    id_of = {raw: k + lay["first_id"] for k, raw in enumerate(raw_ids)}
    records, sizes, attrs = [], [], {}
    counter: dict[int, int] = {}
    for rec in src_records:
        split = rec["split"] if lay["val"] or rec["split"] != "val" else "test"
        pid = id_of[int(rec["id"])]
        j = counter[pid] = counter.get(pid, -1) + 1
        rel = lay["path"](pid, j)
        (lo_h, lo_w), (hi_h, hi_w) = lay["sizes"]
        size = (rng.randint(lo_w, hi_w), rng.randint(lo_h, hi_h))
        target = img_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(synth / "imgs" / rec["file_path"]) as im:
            im.convert("RGB").resize(size, Image.BILINEAR).save(target, quality=90)
        sizes.append(size)
        new = {"id": pid, lay["field"]: rel, "captions": list(rec["captions"]), "split": split}
        if name in ("CUHK-PEDES", "ICFG-PEDES"):
            new["processed_tokens"] = [c.lower().rstrip(".").split() for c in rec["captions"]]
        records.append(new)
        # The simulated MLLM keys images by their path relative to <dataset>/imgs.
        attrs[os.path.relpath(target, out / "imgs").replace(os.sep, "/")] = src_attrs["images"][rec["file_path"]]
    anno = out / lay["anno"]
    anno.write_text(json.dumps(records))
    sidecar = {k: v for k, v in src_attrs.items() if k != "images"}
    (out / "attributes.json").write_text(json.dumps({**sidecar, "images": attrs}))
    return {"anno": str(anno), "dataset_dir": str(out), "records": records, "sizes": sizes}


def write_rda_file(benchmark: dict, path: str | os.PathLike, seed: int = 0) -> str:
    """The benchmark's annotation with RDA fields in the authors' format (ICL release,
    datasets/*.py): train records carry ``diversity_captions`` (per caption its sub-sentences,
    each a list of rewrites, or one string for the whole caption), val/test records
    ``val_diversity_captions``."""
    rng = random.Random(seed)
    out = []
    for rec in benchmark["records"]:
        rec = dict(rec)
        per_caption = []
        for caption in rec["captions"]:
            parts = [p.strip() for p in caption.replace(". ", ".|").split("|") if p.strip()]
            if rng.random() < 0.25:
                per_caption.append(caption)   # a bare string: the caption itself
            else:
                per_caption.append([[p, p.replace("wears", "is wearing")] for p in parts])
        rec["diversity_captions" if rec["split"] == "train" else "val_diversity_captions"] = per_caption
        out.append(rec)
    Path(path).write_text(json.dumps(out))
    return str(path)


def write_vit_b16(path: str | os.PathLike) -> str:
    """A random ViT-B/16 in OpenAI's format (TorchScript archive, fp16 tensors, ~300 MB)."""
    from offline.tiny_clip import write_random_clip

    write_random_clip(path, torchscript=True, half=True, **VIT_B16)
    return str(path)


def remove(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
