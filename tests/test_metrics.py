"""Retrieval metrics: hand-computed cases, and the chunked code against a plain full sort."""


import numpy as np
import pytest
import torch

import utils.metrics as metrics
from utils.metrics import (
    metrics_table,
    t2i_metrics,
    t2i_metrics_from_features,
    topk,
    topk_from_features,
)


def full_sort_metrics(sim, q_pids, g_pids):
    """Independent reference: stable full argsort of every row, then the textbook formulas."""
    sim = np.asarray(sim, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    r1, r5, r10, aps, inps = [], [], [], [], []
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        hits = np.flatnonzero(g_pids[order] == q_pids[i])
        if hits.size == 0:
            continue
        r1.append(hits[0] < 1)
        r5.append(hits[0] < 5)
        r10.append(hits[0] < 10)
        aps.append(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))
        inps.append(hits.size / (hits[-1] + 1))
    return {k: 100 * float(np.mean(v)) for k, v in zip(("R1", "R5", "R10", "mAP", "mINP"), (r1, r5, r10, aps, inps))}


def assert_metrics_close(a, b, tol=1e-9):
    assert set(a) == {"R1", "R5", "R10", "mAP", "mINP"}
    for k in a:
        assert isinstance(a[k], float)
        assert a[k] == pytest.approx(b[k], abs=tol), k


# ---------------------------------------------------------------- hand-computed cases

def test_hand_computed_with_ties_broken_by_gallery_order():
    g_pids = [1, 2, 1, 2, 3, 3]
    q_pids = [1, 2, 3, 1]
    sim = torch.tensor([
        # q0 (pid 1): order 0, 1, 2 (0.5 tie: 1 before 2), 3, 4, 5 -> hits at ranks 0, 2
        [0.9, 0.5, 0.5, 0.1, 0.0, -0.1],
        # q1 (pid 2): all tied -> gallery order; hits (1, 3) at ranks 1, 3
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
        # q2 (pid 3): order 0, 1, 2, 3, 5, 4 (4 and 5 below) -> hits at ranks 4, 5
        [0.6, 0.5, 0.4, 0.3, 0.1, 0.2],
        # q3 (pid 1): order 2, 3, 4, 5, 1, 0 -> hits (2 then 0) at ranks 0, 5
        [-0.5, -0.4, 0.9, 0.8, 0.7, 0.6],
    ])
    ap = [(1 / 1 + 2 / 3) / 2, (1 / 2 + 2 / 4) / 2, (1 / 5 + 2 / 6) / 2, (1 / 1 + 2 / 6) / 2]
    inp = [2 / 3, 2 / 4, 2 / 6, 2 / 6]
    expected = {
        "R1": 100 * 2 / 4,  # q0, q3
        "R5": 100 * 4 / 4,  # q2's first hit is at rank 4 (5th place)
        "R10": 100.0,
        "mAP": 100 * sum(ap) / 4,
        "mINP": 100 * sum(inp) / 4,
    }
    assert_metrics_close(t2i_metrics(sim, q_pids, g_pids), expected, tol=1e-6)
    # Same answer from numpy float16 input and from chunks of one query.
    assert_metrics_close(t2i_metrics(sim.numpy().astype(np.float16), np.array(q_pids), np.array(g_pids),
                                     chunk_size=1), expected, tol=1e-6)


def test_r5_boundary_and_single_hit():
    g_pids = list(range(12))
    sim = -torch.arange(12, dtype=torch.float32).repeat(3, 1)  # gallery 0 first, 11 last
    result = t2i_metrics(sim, [4, 5, 9], g_pids)  # ranks 4, 5, 9
    assert result["R1"] == 0.0
    assert result["R5"] == pytest.approx(100 / 3)
    assert result["R10"] == pytest.approx(100.0)
    assert result["mAP"] == pytest.approx(100 * (1 / 5 + 1 / 6 + 1 / 10) / 3)
    assert result["mINP"] == pytest.approx(result["mAP"])  # one hit: INP == AP


def test_queries_without_match_are_skipped_with_warning():
    sim = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    with pytest.warns(RuntimeWarning, match="1 of 2 queries"):
        result = t2i_metrics(sim, [1, 7], [1, 2])
    assert result == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}
    with pytest.raises(ValueError, match="same id space"):
        t2i_metrics(sim, [8, 9], [1, 2])


def test_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"similarity: expected shape \[len\(q_pids\), len\(g_pids\)\]"):
        t2i_metrics(torch.zeros(2, 3), [1, 2], [1, 2])
    with pytest.raises(ValueError, match="q_pids: person ids must be integers"):
        t2i_metrics(torch.zeros(2, 2), [1.0, 2.0], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        t2i_metrics(torch.tensor([[float("nan"), 0.0]]), [1], [1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        t2i_metrics(torch.zeros(1, 2), [1], [1, 2], chunk_size=0)


# ---------------------------------------------------------------- chunked vs full sort

def random_case(rng, num_q, num_g, num_ids, ties=False, dtype=np.float32):
    g_pids = rng.integers(0, num_ids, num_g)
    q_pids = rng.choice(g_pids, num_q)
    sim = rng.standard_normal((num_q, num_g))
    if ties:
        sim = np.round(sim, 1)  # many exact ties
    return sim.astype(dtype), q_pids, g_pids


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_matches_full_sort(ties, chunk_size):
    rng = np.random.default_rng(chunk_size + 10 * ties)
    sim, q_pids, g_pids = random_case(rng, 150, 120, 25, ties=ties)  # 150 % 7 and % 64 != 0
    expected = full_sort_metrics(sim, q_pids, g_pids)
    assert_metrics_close(t2i_metrics(sim, q_pids, g_pids, chunk_size=chunk_size), expected)
    assert_metrics_close(t2i_metrics(torch.from_numpy(sim), torch.from_numpy(q_pids), torch.from_numpy(g_pids),
                                     chunk_size=chunk_size), expected)


def test_float64_and_float16_inputs_match_full_sort():
    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float16):
        sim, q_pids, g_pids = random_case(rng, 80, 90, 12, dtype=dtype)
        assert_metrics_close(t2i_metrics(sim, q_pids, g_pids, chunk_size=33), full_sort_metrics(sim, q_pids, g_pids))


def test_many_positives_use_the_row_sort_and_agree(monkeypatch):
    rng = np.random.default_rng(4)
    sim, q_pids, g_pids = random_case(rng, 40, 200, 3, ties=True)  # ~67 positives per query
    expected = full_sort_metrics(sim, q_pids, g_pids)
    monkeypatch.setattr(metrics, "_MAX_POSITIVES_FOR_COUNTING", 8)
    assert_metrics_close(t2i_metrics(sim, q_pids, g_pids, chunk_size=16), expected)


def test_device_sort_path_agrees_with_counting():
    # The accelerator path (stable argsort of the chunk) run on the CPU tensor directly.
    rng = np.random.default_rng(5)
    sim, q_pids, g_pids = random_case(rng, 60, 70, 10, ties=True)
    gallery = metrics._GalleryIndex(torch.from_numpy(g_pids))
    cols = gallery.columns(q_pids)
    rows_c, ranks_c = metrics._ranks_by_counting(sim, cols)
    rows_s, ranks_s = metrics._ranks_by_sorting(torch.from_numpy(sim), cols)
    np.testing.assert_array_equal(rows_c, rows_s)
    np.testing.assert_array_equal(ranks_c, ranks_s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    sim, q_pids, g_pids = random_case(rng, 300, 250, 40, ties=True)
    expected = full_sort_metrics(sim, q_pids, g_pids)
    assert_metrics_close(t2i_metrics(torch.from_numpy(sim).to("cuda"), q_pids, g_pids, chunk_size=64), expected)


# ---------------------------------------------------------------- from features

def test_from_features_equals_from_similarity():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(90, 16, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(70, 16, generator=gen), dim=1)
    q_pids = torch.randint(0, 15, (90,), generator=gen)
    g_pids = torch.cat([torch.arange(15), torch.randint(0, 15, (55,), generator=gen)])
    expected = t2i_metrics(q @ g.t(), q_pids, g_pids)
    for chunk in (1, 13, 500):
        assert_metrics_close(t2i_metrics_from_features(q, g, q_pids, g_pids, chunk_size=chunk), expected)
    # Half-precision numpy features: similarity computed in float32 from the same values.
    q16, g16 = q.half(), g.half()
    assert_metrics_close(
        t2i_metrics_from_features(q16.numpy(), g16.numpy(), q_pids.numpy(), g_pids.numpy(), chunk_size=17),
        t2i_metrics(q16.float() @ g16.float().t(), q_pids, g_pids),
    )


def test_from_features_averages_views_like_rde():
    gen = torch.Generator().manual_seed(1)
    qa, qb = torch.randn(40, 8, generator=gen), torch.randn(40, 4, generator=gen)
    ga, gb = torch.randn(30, 8, generator=gen), torch.randn(30, 4, generator=gen)
    q_pids = torch.randint(0, 6, (40,), generator=gen)
    g_pids = torch.arange(30) % 6
    sim = (qa @ ga.t() + qb @ gb.t()) / 2
    got = t2i_metrics_from_features((qa, qb), (ga, gb), q_pids, g_pids, chunk_size=9)
    assert_metrics_close(got, full_sort_metrics(sim.numpy(), q_pids.numpy(), g_pids.numpy()), tol=1e-6)
    with pytest.raises(ValueError, match="pass one pid per feature row"):
        t2i_metrics_from_features(qa, ga, q_pids[:-1], g_pids)
    with pytest.raises(ValueError, match="views"):
        t2i_metrics_from_features((qa, qb), (ga,), q_pids, g_pids)


# ---------------------------------------------------------------- top-k

def test_topk_follows_stable_ranking():
    rng = np.random.default_rng(7)
    sim = np.round(rng.standard_normal((50, 40)), 1).astype(np.float32)  # plenty of ties
    vals, idx = topk(sim, 6, chunk_size=11)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_array_equal(vals.numpy(), np.take_along_axis(sim, order, 1))
    q, g = torch.randn(20, 5), torch.randn(33, 5)
    v2, i2 = topk_from_features(q, g, 4, chunk_size=6)
    v3, i3 = topk(q @ g.t(), 4)
    assert torch.equal(i2, i3) and torch.allclose(v2, v3)
    with pytest.raises(ValueError, match="k must be in"):
        topk(sim, 41)


# ---------------------------------------------------------------- table

def test_metrics_table_format():
    row = {"R1": 60.0, "R5": 80.123, "R10": 87.5, "mAP": 55.556, "mINP": 40.0}
    text = metrics_table({"BGE+TSE-t2i": row}, title="CUHK-PEDES")
    lines = text.splitlines()
    assert "CUHK-PEDES" in lines[1]
    header = [c.strip() for c in lines[3].strip("|").split("|")]
    assert header == ["task", "R1", "R5", "R10", "mAP", "mINP", "rSum"]
    cells = [c.strip() for c in lines[5].strip("|").split("|")]
    assert cells == ["BGE+TSE-t2i", "60.00", "80.12", "87.50", "55.56", "40.00", "227.62"]
    assert metrics_table([("a", row), ("b", row)]).count("227.62") == 2
    with pytest.raises(KeyError, match="lacks"):
        metrics_table({"x": {"R1": 1.0}})
