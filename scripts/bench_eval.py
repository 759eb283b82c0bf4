"""Time and peak memory of the retrieval metrics (utils/metrics.py).

(a) a [6156, 3074] similarity (CUHK-PEDES test size, 1,000 identities): the chunked metrics
    against a plain full-argsort implementation (the TIReID way), same numbers, speed ratio;
(b) 100,000 query x 100,000 gallery features (D = 512, float16), metrics from features
    without the full similarity matrix; the total peak RSS must stay under 4 GiB.

Each case runs in its own child process. "input" is the size of the arrays handed to the
metric; "call peak" the peak RSS during the metric call (Linux VmHWM, reset just before the
call); "working" = call peak - RSS before the call; "proc peak" the child's peak RSS over its
whole life (imports and input generation included).

    .venv/bin/python scripts/bench_eval.py                 # both cases (b takes minutes)
    .venv/bin/python scripts/bench_eval.py --queries 20000 --gallery 20000   # smaller (b)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.metrics import METRIC_KEYS, t2i_metrics, t2i_metrics_from_features  # noqa: E402

MB = 1024.0 * 1024.0
LIMIT_B_MB = 4096.0


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        return peak_mb()


def reset_peak() -> None:
    """Restart the peak-RSS count so it covers only what follows (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak RSS since the last reset_peak() (Linux VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / MB


def identity_features(pids: np.ndarray, protos: torch.Tensor, noise: float, seed: int, rows: int = 8192) -> torch.Tensor:
    """L2-normalised float16 features: identity prototype + Gaussian noise, built in row chunks."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(len(pids), protos.shape[1], dtype=torch.float16)
    for s in range(0, len(pids), rows):
        p = torch.from_numpy(pids[s:s + rows])
        x = protos[p] + noise * torch.randn(len(p), protos.shape[1], generator=gen)
        out[s:s + rows] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def make_case(num_q: int, num_g: int, num_ids: int, dim: int, seed: int):
    """Query/gallery features and pids with a retrieval signal (so the metrics are not ~0)."""
    rng = np.random.default_rng(seed)
    g_pids = np.arange(num_g) % num_ids  # every identity has gallery images
    rng.shuffle(g_pids)
    q_pids = rng.choice(g_pids, num_q)
    protos = torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(seed))
    q = identity_features(q_pids, protos, noise=2.5, seed=seed + 1)
    g = identity_features(g_pids, protos, noise=2.5, seed=seed + 2)
    return q, g, q_pids, g_pids


def full_sort_metrics(sim: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor) -> dict[str, float]:
    """Plain reference: argsort the whole [Q, G] matrix at once, then cumulative sums."""
    order = torch.argsort(sim, dim=1, descending=True)
    matches = g_pids[order] == q_pids[:, None]
    del order
    num_rel = matches.sum(1)
    cum = matches.cumsum(1)
    positions = torch.arange(1, sim.shape[1] + 1, dtype=torch.float64)
    ap = ((cum / positions) * matches).sum(1) / num_rel
    last = (matches * positions).max(1).values
    first_hit = cum[:, :10] > 0
    out = {"R1": first_hit[:, 0], "R5": first_hit[:, 4], "R10": first_hit[:, 9], "mAP": ap, "mINP": num_rel / last}
    return {k: float(v.double().mean() * 100) for k, v in out.items()}


def run_case(name: str, args) -> dict:
    torch.set_num_threads(args.threads)
    if name in ("a_chunked", "a_fullsort"):
        q, g, q_pids, g_pids = make_case(6156, 3074, 1000, 512, seed=0)
        sim = (q.float() @ g.float().t()).contiguous()
        del q, g
        inputs = sim.numel() * sim.element_size()
        reset_peak()
        before = rss_mb()
        t0 = time.perf_counter()
        if name == "a_chunked":
            metrics = t2i_metrics(sim, q_pids, g_pids, chunk_size=args.chunk_size)
        else:
            metrics = full_sort_metrics(sim, torch.from_numpy(q_pids), torch.from_numpy(g_pids))
    elif name == "b_features":
        q, g, q_pids, g_pids = make_case(args.queries, args.gallery, args.gallery // 4, args.dim, seed=1)
        inputs = q.numel() * q.element_size() + g.numel() * g.element_size()
        reset_peak()
        before = rss_mb()
        t0 = time.perf_counter()
        metrics = t2i_metrics_from_features(q, g, q_pids, g_pids, chunk_size=args.chunk_size, progress=True)
    else:
        raise ValueError(f"unknown case {name!r}")
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    whole_run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else MB)
    return {"case": name, "seconds": seconds, "input_mb": inputs / MB, "rss_before_mb": before,
            "peak_mb": peak, "working_mb": peak - before,
            "process_peak_mb": max(peak, whole_run_peak), "metrics": metrics}


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--chunk-size", str(args.chunk_size),
           "--queries", str(args.queries), "--gallery", str(args.gallery), "--dim", str(args.dim),
           "--threads", str(args.threads)]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100_000, help="(b) number of query features")
    parser.add_argument("--gallery", type=int, default=100_000, help="(b) number of gallery features")
    parser.add_argument("--dim", type=int, default=512, help="(b) feature dimension")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per chunk")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-b", action="store_true", help="only run case (a)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    names = ["a_chunked", "a_fullsort"] + ([] if args.skip_b else ["b_features"])
    res = {n: run_child(n, args) for n in names}
    print(f"\nthreads={args.threads} chunk_size={args.chunk_size}")
    print(f"{'case':12s} {'seconds':>9s} {'input MB':>9s} {'RSS before':>11s} {'call peak':>9s} {'working':>9s} "
          f"{'proc peak':>9s}  "
          + " ".join(f"{k:>7s}" for k in METRIC_KEYS))
    for n in names:
        r = res[n]
        print(f"{n:12s} {r['seconds']:9.2f} {r['input_mb']:9.1f} {r['rss_before_mb']:11.1f} {r['peak_mb']:9.1f} "
              f"{r['working_mb']:9.1f} {r['process_peak_mb']:9.1f}  " + " ".join(f"{r['metrics'][k]:7.3f}" for k in METRIC_KEYS))
    a, b = res["a_chunked"], res["a_fullsort"]
    diff = max(abs(a["metrics"][k] - b["metrics"][k]) for k in METRIC_KEYS)
    print(f"\n(a) 6156 x 3074: chunked {a['seconds']:.2f} s vs full argsort {b['seconds']:.2f} s "
          f"-> {b['seconds'] / a['seconds']:.1f}x faster; working memory {a['working_mb']:.0f} MB vs "
          f"{b['working_mb']:.0f} MB; max metric difference {diff:.2e}")
    if "b_features" in res:
        r = res["b_features"]
        full_gb = args.queries * args.gallery * (4 + 8) / 1024**3
        verdict = "OK" if r["process_peak_mb"] < LIMIT_B_MB else "OVER"
        print(f"(b) {args.queries} x {args.gallery} (D={args.dim}, float16 inputs {r['input_mb']:.0f} MB): "
              f"{r['seconds']:.1f} s, process peak RSS {r['process_peak_mb']:.0f} MB "
              f"(< {LIMIT_B_MB:.0f} MB: {verdict}), "
              f"working {r['working_mb']:.0f} MB; a full float32 matrix + argsort would need ~{full_gb:.0f} GiB")


if __name__ == "__main__":
    main()
