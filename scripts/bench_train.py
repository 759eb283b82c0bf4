"""Training throughput (samples/s) and peak memory of RDE steps, measured side by side.

    python scripts/bench_train.py                 # tiny config on CPU (+ ViT-B/16 on a GPU when present)
    python scripts/bench_train.py --steps 20 --device cuda --vit-b16-only

Random weights in the real architectures (no download); random images and captions of the
real shapes, so the numbers are the model's cost, not the data pipeline's.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from offline.tiny_clip import write_random_clip  # noqa: E402
from solver import build_optimizer  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import autocast  # noqa: E402

VIT_B16 = dict(embed_dim=512, vision_width=768, vision_layers=12, patch_size=16, image_resolution=224,
               text_width=512, text_layers=12, context_length=77)


def bench(name, sizes, img_size, batch, steps, device, amp, tse_dim=1024):
    from model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "clip.pt")
        write_random_clip(ckpt, **sizes)
        cfg = load_config(None, [f"pretrain_choice={ckpt}", f"img_size={list(img_size)}",
                                 f"tse_embed_dim={tse_dim}", "lr=1e-5"])
        model = build_model(cfg).to(device).train()
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *img_size, generator=g).to(device)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    lengths = torch.randint(8, 60, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = 49406
        ids[i, 1:n] = torch.randint(1, 49405, (n - 1,), generator=g)
        ids[i, n] = 49407
    batch_d = {"images": images, "caption_ids": ids.to(device), "pids": torch.arange(batch, device=device) // 2}

    def step():
        with autocast(device, amp):
            losses = model(batch_d)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        mem = f"{peak:.2f} GiB GPU"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"
    sps = batch * steps / dt
    print(f"{name:<40} batch {batch:>3}  {sps:8.1f} samples/s  {dt / steps * 1000:8.1f} ms/step  peak {mem}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--vit-b16-only", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    from utils.device import resolve_device
    device = resolve_device(args.device)
    print(f"device {device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    if not args.vit_b16_only:
        cpu = torch.device("cpu")
        bench("tiny CLIP (width 64) 128x64, fp32, CPU", {}, (128, 64), 32, args.steps, cpu, None, 128)
    if device.type == "cuda":
        fp32 = bench("ViT-B/16 384x128, fp32", VIT_B16, (384, 128), 64, args.steps, device, None)
        bf16 = bench("ViT-B/16 384x128, bf16 autocast", VIT_B16, (384, 128), 64, args.steps, device,
                     torch.bfloat16)
        fp16 = bench("ViT-B/16 384x128, fp16 autocast", VIT_B16, (384, 128), 64, args.steps, device,
                     torch.float16)
        print(f"speed-up over fp32: bf16 x{bf16 / fp32:.2f}, fp16 x{fp16 / fp32:.2f}")
    else:
        print("no CUDA GPU: ViT-B/16 at batch 64 with autocast is measured on a GPU machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
