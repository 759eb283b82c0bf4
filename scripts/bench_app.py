"""The search page's speed: one interaction step (re-encode the refined text + Eq. 6 + the
page's ranking, MLLM time excluded) and requests/s of ``POST /api/search`` under 8 concurrent
clients on 127.0.0.1, for galleries of 3k and 100k images, side by side.

    python scripts/bench_app.py                       # CLIP ViT-B/16's text tower (random weights)
    python scripts/bench_app.py --model tiny          # the tests' tiny CLIP
    python scripts/bench_app.py --galleries 3000 --requests 80
    python scripts/bench_app.py --model tiny --galleries 3000 --compare ../before   # old code too
    python scripts/bench_app.py --model tiny --galleries 3000 --bomb 8   # pixel-bomb memory

``--compare DIR`` serves the same benchmark with the code in DIR (e.g. ``git archive REV |
tar -x -C DIR``) beside this checkout's, for HTTP search and feedback latency side by side.
``--bomb N`` posts N 13000x13000 one-colour PNGs (518 KB each) at once and reports the
server's resident memory before, at its peak and after.

The gallery features are random unit vectors (BGE 512-d, TSE 1024-d as in RDE): the cost of a
step does not depend on their values. The text encoder has CLIP ViT-B/16's text tower shape
(width 512, 12 layers, 77 tokens) with random weights: the same compute as the real one. The
MLLM is a stub answering instantly (its time is excluded anyway). Everything stops by itself:
``--steps`` steps per gallery, ``--requests`` searches per client. Torch runs one thread
(``BENCH_APP_THREADS``) in the benchmark and in the server, so CPU ms stay meaningful on a
shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

THREADS = int(os.environ.get("BENCH_APP_THREADS", "1"))  # torch threads, bench and server
QUERY = ("The woman has long black hair and is wearing a red short-sleeved t-shirt, long blue "
         "jeans and white sneakers. She carries a black backpack.")
VQA = "\n".join(f"{i}. The person wears a {c} item." for i, c in enumerate(
    ["red", "blue", "green", "white", "black", "gray", "brown", "pink", "orange", "purple",
     "yellow", "red", "blue", "green", "white"], start=1))


class StubMLLM:
    """Answers instantly: Yes to localization, 15 VQA lines, a growing aggregation."""

    stats: dict = {}

    def generate(self, requests, temperature=0.01, max_tokens=512):
        out = []
        for r in requests:
            if r.text.startswith("Can this text"):
                out.append("Yes")
            elif r.text.startswith("According to the pedestrian image"):
                out.append(VQA)
            else:
                out.append(QUERY + f" Refined {len(r.text)}.")
        return out


def build_model(kind: str, folder: str):
    from model import build_model as build
    from offline.tiny_clip import write_random_clip
    from utils.config import load_config

    sizes = {} if kind == "tiny" else dict(embed_dim=512, text_width=512, text_layers=12,
                                           vision_width=64, vision_layers=1)
    path = os.path.join(folder, f"clip_{kind}.pt")
    write_random_clip(path, **sizes)
    cfg = load_config("configs/synthpedes_tiny.yaml",
                      [f"pretrain_choice={path}",
                       f"tse_embed_dim={64 if kind == 'tiny' else 1024}"])
    return build(cfg).eval(), cfg


def build_engine(model, cfg, num_g: int, seed: int = 0):
    import numpy as np
    import torch

    from thi.app.engine import SearchEngine
    from thi.scoring import make_score_texts

    rng = np.random.default_rng(seed)
    dims = {"bge": model.base_model.text_projection.shape[1],
            "tse": cfg.tse_embed_dim}
    feats = {}
    for k, d in dims.items():
        x = rng.standard_normal((num_g, d), dtype=np.float32)
        feats[k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    score = make_score_texts(model, feats, cfg.text_length, torch.device("cpu"))
    pids = np.arange(num_g) // 4
    return SearchEngine([f"img_{i}.jpg" for i in range(num_g)], score, client=StubMLLM(),
                        g_pids=pids, max_sessions=256)


def step_latency(engine, steps: int) -> dict:
    """Median ms of: encoding + Eq. 6 (``refine_scores``), the page's ranking view, and the
    whole step without the MLLM (what the person waits for besides the MLLM)."""
    session = engine.search("text", text=QUERY, target_pid=7)
    encode, view, total, cpu = [], [], [], []
    for i in range(steps):
        g = next(int(r["gallery_index"]) for r in engine.results(session)
                 if not r["confirmed"])  # the best candidate not confirmed yet
        c0, t0 = time.process_time(), time.perf_counter()
        step = engine.feedback(session.id, "yes", g)
        t1 = time.perf_counter()
        engine.results(session)
        engine.target_rank(session)
        t2 = time.perf_counter()
        cpu.append((time.process_time() - c0) * 1e3)
        encode.append(step["encode_rerank_seconds"] * 1e3)
        view.append((t2 - t1) * 1e3)
        total.append((t1 - t0 - step["mllm_seconds"]) * 1e3 + view[-1])
        if len(session.anchors) > 8:  # keep sessions realistic: a few confirmations each
            session = engine.search("text", text=QUERY + f" {i}", target_pid=7)
    return {"encode_eq6_ms": statistics.median(encode), "view_ms": statistics.median(view),
            "step_ms": statistics.median(total), "step_cpu_ms": statistics.median(cpu),
            "steps": len(total)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(num_g: int, port: int, kind: str, code: str = "") -> None:
    """Subprocess mode: serve an engine over a synthetic gallery until killed (with the code
    in ``code`` instead of this checkout's when given)."""
    if code:
        sys.path.insert(0, os.path.abspath(code))
        os.chdir(code)
    import torch

    from thi.app import create_app
    from thi.app.launch import serve as serve_app

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg = build_model(kind, tmp)
        engine = build_engine(model, cfg, num_g)
    serve_app(create_app(engine), "127.0.0.1", port)


def _start(num_g: int, kind: str, code: str = ""):
    from thi.app.launch import start_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server([sys.executable, os.path.abspath(__file__), "--serve", str(num_g),
                         "--port", str(port), "--model", kind, "--code", code], cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def _memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak resident) of ``pid`` in kB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def bomb_memory(num_g: int, kind: str, parallel: int, code: str = "") -> dict:
    """Post ``parallel`` 13000x13000 PNGs at once; the server's memory before/peak/after."""
    import httpx

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_app import _huge_png

    bomb = _huge_png(13000, 13000)
    proc, url = _start(num_g, kind, code)
    try:
        with httpx.Client() as warm:
            warm.post(url + "/api/search", data={"kind": "text", "text": QUERY})
        before = _memory_kb(proc.pid)
        statuses, seconds = [], []

        def post():
            t0 = time.perf_counter()
            with httpx.Client(timeout=300) as http:
                r = http.post(url + "/api/search", data={"kind": "image"},
                              files={"image": ("bomb.png", bomb, "image/png")})
            seconds.append(time.perf_counter() - t0)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=post) for _ in range(parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = _memory_kb(proc.pid)
        return {"png_bytes": len(bomb), "parallel": parallel, "statuses": sorted(statuses),
                "max_seconds": max(seconds), "rss_before_mb": before["VmRSS"] / 1024,
                "peak_mb": after["VmHWM"] / 1024, "rss_after_mb": after["VmRSS"] / 1024,
                "peak_growth_mb": (after["VmHWM"] - before["VmHWM"]) / 1024}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def feedback_latency(http, url: str, per_client: int, c: int, out: list) -> None:
    """``per_client`` "not this one" answers on one session, each on the best candidate."""
    d = http.post(url + "/api/search", data={"kind": "text", "text": f"{QUERY} f{c}"}).json()
    for _ in range(per_client):
        g = d["results"][0]["gallery_index"]
        t0 = time.perf_counter()
        r = http.post(url + "/api/feedback", json={"session": d["session"], "answer": "no",
                                                   "gallery_index": g})
        out.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"feedback failed: {r.status_code} {r.text[:200]}")
        d = r.json()


def search_throughput(num_g: int, kind: str, clients: int, per_client: int,
                      code: str = "") -> dict:
    import httpx

    proc, url = _start(num_g, kind, code)
    try:
        with httpx.Client() as warm:  # first requests pay one-off costs
            for i in range(3):
                warm.post(url + "/api/search", data={"kind": "text", "text": f"{QUERY} w{i}"})
        latencies: list = []
        errors = []

        def client(c: int):
            with httpx.Client(timeout=120) as http:
                for i in range(per_client):
                    t0 = time.perf_counter()
                    r = http.post(url + "/api/search",
                                  data={"kind": "text", "text": f"{QUERY} c{c} r{i}"})
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors.append(r.status_code)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_cpu = _cpu_seconds(proc.pid) - cpu0
        if errors:
            raise RuntimeError(f"{len(errors)} searches failed: {errors[:5]}")
        latencies.sort()
        answers: list = []
        threads = [threading.Thread(target=lambda c=c: feedback_latency(
            httpx.Client(timeout=120), url, per_client, c, answers)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answers.sort()
        return {"requests": len(latencies), "rps": len(latencies) / wall,
                "server_cpu_ms": server_cpu / len(latencies) * 1e3,
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1e3,
                "feedback_p50_ms": answers[len(answers) // 2] * 1e3 if answers else float("nan"),
                "feedback_p95_ms": (answers[int(len(answers) * 0.95) - 1] * 1e3 if answers
                                    else float("nan"))}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", choices=("base", "tiny"),
                    help="text tower: CLIP ViT-B/16's shape (base) or the tests' tiny CLIP")
    ap.add_argument("--galleries", default="3000,100000")
    ap.add_argument("--steps", type=int, default=20, help="interaction steps timed per gallery")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="searches per client")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--compare", metavar="DIR", help="also serve with the code in DIR (the "
                                                     "version before), HTTP figures side by side")
    ap.add_argument("--bomb", type=int, metavar="N", help="only: N parallel 13000x13000 PNG "
                                                          "uploads, server memory before/peak/after")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--code", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.serve:
        serve(args.serve, args.port, args.model, args.code)
        return 0
    if args.bomb:
        load = os.getloadavg()[0]
        for label, code in [("this checkout", "")] + ([("--compare", args.compare)]
                                                       if args.compare else []):
            r = bomb_memory(int(args.galleries.split(",")[0]), args.model, args.bomb, code)
            print(f"{label}: {r['parallel']} x {r['png_bytes'] // 1024} KB PNG of 13000x13000 "
                  f"-> HTTP {r['statuses']} in at most {r['max_seconds']:.2f} s; server RSS "
                  f"{r['rss_before_mb']:.0f} MB before, peak {r['peak_mb']:.0f} MB "
                  f"(+{r['peak_growth_mb']:.0f}), {r['rss_after_mb']:.0f} MB after "
                  f"(load average {load:.1f})")
        return 0
    import torch

    torch.set_num_threads(THREADS)
    load = os.getloadavg()[0]
    sizes = [int(x) for x in args.galleries.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg = build_model(args.model, tmp)
        for num_g in sizes:
            engine = build_engine(model, cfg, num_g)
            engine.feedback(engine.search("text", text=QUERY).id, "yes", 0)  # warm-up
            rows.append({"gallery": num_g, **step_latency(engine, args.steps)})
    for row in rows:
        row.update(search_throughput(row["gallery"], args.model, args.clients, args.requests))
        if args.compare:
            old = search_throughput(row["gallery"], args.model, args.clients, args.requests,
                                    args.compare)
            row.update({f"before_{k}": v for k, v in old.items()})
    print(f"text tower: {args.model} ({'CLIP ViT-B/16 shape, random weights' if args.model == 'base' else 'tiny CLIP'}), "
          f"CPU threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    print(f"load average before: {load:.1f} (wall times grow with other "
          f"processes; CPU ms do not)")
    head = ("gallery", "encode+Eq.6 ms", "ranking view ms", "step ms (no MLLM)", "step CPU ms",
            f"search req/s ({args.clients} clients)", "search p50 ms", "p95 ms",
            "server CPU ms per search")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(f"{r['gallery']:,} | {r['encode_eq6_ms']:.1f} | {r['view_ms']:.1f} | "
              f"{r['step_ms']:.1f} | {r['step_cpu_ms']:.1f} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['server_cpu_ms']:.1f}")
    if args.compare:
        print(f"HTTP latency, this checkout vs {args.compare} ({args.clients} clients, "
              f"{args.requests} searches then {args.requests} 'not this one' answers each):")
        print("gallery | search p50 ms (before -> now) | search p95 ms | feedback p50 ms | "
              "feedback p95 ms | search req/s | server CPU ms per search")
        print("--- | --- | --- | --- | --- | --- | ---")
        for r in rows:
            print(f"{r['gallery']:,} | {r['before_p50_ms']:.0f} -> {r['p50_ms']:.0f} | "
                  f"{r['before_p95_ms']:.0f} -> {r['p95_ms']:.0f} | "
                  f"{r['before_feedback_p50_ms']:.1f} -> {r['feedback_p50_ms']:.1f} | "
                  f"{r['before_feedback_p95_ms']:.1f} -> {r['feedback_p95_ms']:.1f} | "
                  f"{r['before_rps']:.1f} -> {r['rps']:.1f} | "
                  f"{r['before_server_cpu_ms']:.1f} -> {r['server_cpu_ms']:.1f}")
    else:
        print("gallery | feedback p50 ms | feedback p95 ms")
        for r in rows:
            print(f"{r['gallery']:,} | {r['feedback_p50_ms']:.1f} | {r['feedback_p95_ms']:.1f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"{b['gallery']:,} vs {a['gallery']:,} images: step x{b['step_ms'] / a['step_ms']:.2f}, "
              f"search throughput x{b['rps'] / a['rps']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
