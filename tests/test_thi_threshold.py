"""xi from the top-1 similarity histograms of correct vs wrong retrievals (the paper's Fig. 3)."""
import numpy as np
import pytest

from thi.threshold import choose_xi, similarity_histograms, top1_outcomes


def test_xi_separates_the_two_histograms():
    # Wrong retrievals at 0.1-0.4, correct ones at 0.5-0.8: any xi in (0.4, 0.5) misplaces none;
    # the rule takes the midpoint of the neighbouring similarities.
    top1 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    correct = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    assert choose_xi(top1, correct) == pytest.approx(0.45)
    # Shuffled input gives the same threshold.
    perm = np.random.default_rng(0).permutation(8)
    assert choose_xi(top1[perm], correct[perm]) == pytest.approx(0.45)


def test_xi_minimises_misplaced_queries_when_histograms_overlap():
    top1 = np.array([0.10, 0.20, 0.30, 0.35, 0.40, 0.50, 0.55, 0.60, 0.70])
    correct = np.array([0, 0, 1, 0, 0, 1, 1, 0, 1], bool)
    xi = choose_xi(top1, correct)
    misplaced = lambda t: int(((top1 <= t) & correct).sum() + ((top1 > t) & ~correct).sum())  # noqa: E731
    assert misplaced(xi) == min(misplaced(t) for t in np.linspace(0, 1, 1001))
    assert xi == pytest.approx(0.45)        # 0.40 | 0.50: 2 misplaced (0.30 correct, 0.60 wrong)
    # Not the median of top-1 (the old demo's gate), which ignores correctness.
    assert xi != pytest.approx(float(np.median(top1)))


def test_no_threshold_between_equal_similarities():
    top1 = np.array([0.3, 0.5, 0.5, 0.7])
    correct = np.array([0, 0, 1, 1], bool)
    xi = choose_xi(top1, correct)
    assert xi == pytest.approx(0.4) or xi == pytest.approx(0.6)


def test_top1_outcomes_and_histograms():
    sim = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.4]])
    top1, correct = top1_outcomes(sim, np.array([7, 8]), np.array([7, 8, 9]))
    assert top1.tolist() == pytest.approx([0.9, 0.4])
    assert correct.tolist() == [True, False]
    h = similarity_histograms(top1, correct, bins=2)
    assert h["correct"] == [0, 1] and h["wrong"] == [1, 0]
    with pytest.raises(ValueError):
        choose_xi(np.array([]), np.array([], bool))
