"""CCD: GMM settings, clean split on synthetic losses, the 1% rule, and the consensus vote."""

import numpy as np
import pytest
import torch

from processor.ccd import clean_probability, consensus, gmm_params, split_by_probability, split_clean


def test_gmm_params_follow_rde():
    loose = {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}
    tight = {"max_iter": 100, "tol": 1e-4, "reg_covar": 1e-6}
    assert gmm_params(0.2, "CUHK-PEDES") == loose
    assert gmm_params(0.4, "ICFG-PEDES") == loose  # strictly above 0.4 switches
    assert gmm_params(0.0, "RSTPReid") == tight
    assert gmm_params(0.5, "CUHK-PEDES") == tight
    assert gmm_params(0.8, "ICFG-PEDES") == tight


def bimodal(n, noise_rate, seed):
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < noise_rate
    loss = np.where(noisy, rng.normal(2.5, 0.4, n), rng.normal(0.6, 0.25, n)).clip(min=0)
    return loss, ~noisy


@pytest.mark.parametrize("noise_rate", [0.2, 0.5, 0.8])
def test_split_recovers_the_low_mode(noise_rate):
    loss, clean = bimodal(4000, noise_rate, seed=int(noise_rate * 10))
    params = gmm_params(noise_rate, "CUHK-PEDES")
    pred = split_clean(torch.from_numpy(loss), seed=0, **params)
    assert pred.dtype == np.int64 and set(np.unique(pred)) <= {0, 1}
    tp = np.count_nonzero((pred == 1) & clean)
    assert tp / np.count_nonzero(pred == 1) > 0.95  # precision
    assert tp / np.count_nonzero(clean) > 0.95  # recall
    # Deterministic for a seed; invariant to the loss scale (min-max normalised).
    assert np.array_equal(pred, split_clean(loss * 7.0 + 3.0, seed=0, **params))


def test_clean_probability_is_the_low_mean_component():
    loss, clean = bimodal(2000, 0.3, seed=1)
    prob = clean_probability(loss)
    assert prob.shape == (2000,)
    assert prob[clean].mean() > 0.9 and prob[~clean].mean() < 0.1


def test_one_percent_rule():
    # Nothing at or below 0.5: the (N // 100)-th smallest becomes the threshold (strict >).
    prob = np.linspace(0.6, 1.0, 1000)
    pred = split_by_probability(prob)
    assert np.count_nonzero(pred == 0) == 11
    assert np.array_equal(np.flatnonzero(pred == 0), np.arange(11))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(np.linspace(0.51, 0.99, 250))
    pred = split_by_probability(shuffled)
    assert np.count_nonzero(pred == 0) == 3  # 250 // 100 + 1
    assert set(np.flatnonzero(pred == 0)) == set(np.argsort(shuffled)[:3])
    # Fewer than 100 pairs: only the single least likely clean pair is noisy.
    assert split_by_probability(np.array([0.9, 0.7, 0.95])).tolist() == [1, 0, 1]
    # Some probability at or below 0.5: the plain rule, no forced noisy pairs.
    assert split_by_probability(np.array([0.9, 0.5, 0.95, 0.51])).tolist() == [1, 0, 1, 1]


def test_unimodal_losses_still_mark_some_noisy_and_constant_losses_keep_all():
    rng = np.random.default_rng(2)
    pred = split_clean(rng.normal(1.0, 0.05, 500))
    assert 0 < np.count_nonzero(pred == 0) < 500
    assert split_clean(np.full(10, 0.3)).tolist() == [1] * 10


def test_split_clean_input_errors():
    with pytest.raises(ValueError, match="NaN or infinite"):
        split_clean(np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="1-D"):
        split_clean(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        split_clean(np.array([0.1]))


def test_consensus_table_and_seeded_coins():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    b = np.array([1, 0, 1, 0, 0, 1, 1, 0])
    disagree = np.array([1, 2, 4, 5])

    w = consensus(a, b, np.random.default_rng(123))
    assert w.dtype == np.float32
    assert w[[0, 6]].tolist() == [1.0, 1.0] and w[[3, 7]].tolist() == [0.0, 0.0]
    # One coin per disagreement, drawn in index order from the generator.
    assert w[disagree].tolist() == np.random.default_rng(123).integers(0, 2, size=4).astype(float).tolist()
    assert np.array_equal(w, consensus(a, b, np.random.default_rng(123)))

    wt = consensus(torch.tensor(a), torch.tensor(b), torch.Generator().manual_seed(7))
    coins = torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(7)).numpy()
    assert wt[disagree].tolist() == coins.astype(float).tolist()
    assert wt[[0, 6, 3, 7]].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_consensus_coins_are_fair_and_errors():
    n = 20000
    w = consensus(np.ones(n, dtype=int), np.zeros(n, dtype=int), np.random.default_rng(0))
    assert abs(w.mean() - 0.5) < 0.02
    with pytest.raises(ValueError, match="only 0"):
        consensus(np.array([2, 1]), np.array([1, 1]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="pred_b has 1"):
        consensus(np.array([1, 1]), np.array([1]), np.random.default_rng(0))
    with pytest.raises(TypeError, match="generator"):
        consensus(np.array([1, 0]), np.array([0, 1]), 42)
