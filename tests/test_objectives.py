"""Per-sample losses against hand computations with math.exp/log."""

import math

import pytest
import torch

from model.objectives import (
    LOSSES,
    compute_loss,
    cosine_scores,
    infonce_loss,
    positive_mask,
    sdm_loss,
    tal_loss,
    trl_loss,
)

S = [[0.8, 0.3, -0.2],
     [0.1, 0.6, 0.4],
     [0.5, 0.2, 0.7]]  # rows = texts, columns = images


def scores(requires_grad=False):
    return torch.tensor(S, dtype=torch.float64, requires_grad=requires_grad)


def col(j):
    return [S[i][j] for i in range(3)]


def lse(values, tau):
    return tau * math.log(sum(math.exp(v / tau) for v in values))


def weighted(values, tau):
    w = [math.exp(v / tau) for v in values]
    return sum(wi * v for wi, v in zip(w, values)) / sum(w)


def test_tal_by_hand_distinct_pids():
    tau, m = 0.5, 0.1
    got = tal_loss(scores(), torch.tensor([0, 1, 2]), tau=tau, margin=m)
    assert got.shape == (3,)
    for b in range(3):
        row = max(0.0, m - S[b][b] + lse([S[b][j] for j in range(3) if j != b], tau))
        column = max(0.0, m - S[b][b] + lse([col(b)[i] for i in range(3) if i != b], tau))
        assert got[b].item() == pytest.approx(row + column, rel=1e-12)


def test_tal_by_hand_shared_pid():
    # Pairs 0 and 1 show the same person: each other's positives.
    tau, m = 0.2, 0.3
    got = tal_loss(scores(), torch.tensor([5, 5, 9]), tau=tau, margin=m)
    pos = {0: [0, 1], 1: [0, 1], 2: [2]}
    for b in range(3):
        neg = [j for j in range(3) if j not in pos[b]]
        row = max(0.0, m - weighted([S[b][j] for j in pos[b]], tau) + lse([S[b][j] for j in neg], tau))
        column = max(0.0, m - weighted([col(b)[i] for i in pos[b]], tau) + lse([col(b)[i] for i in neg], tau))
        assert got[b].item() == pytest.approx(row + column, rel=1e-12)


def test_tal_positive_weights_are_constants():
    # RDE detaches alpha: d(row term)/d s_bp = -alpha_p, without the softmax's own derivative.
    tau, m = 0.2, 5.0  # a big margin keeps every hinge active
    s = scores(requires_grad=True)
    tal_loss(s, torch.tensor([5, 5, 9]), tau=tau, margin=m)[0].backward()
    w = [math.exp(S[0][j] / tau) for j in (0, 1)]
    alpha = [wi / sum(w) for wi in w]
    # s[0,0] is a positive of both row 0 and column 0; s[0,1] only of row 0 (column 0 uses s[1,0]).
    assert s.grad[0, 1].item() == pytest.approx(-alpha[1], rel=1e-9)
    beta = [math.exp(col(0)[i] / tau) for i in (0, 1)]
    assert s.grad[0, 0].item() == pytest.approx(-alpha[0] - beta[0] / sum(beta), rel=1e-9)


def test_tal_zero_when_positives_far_above_negatives():
    b = 6
    s = torch.full((b, b), -0.9) + torch.eye(b) * 1.8  # positives 0.9, negatives -0.9
    s.requires_grad_(True)
    loss = tal_loss(s, torch.arange(b))
    assert torch.equal(loss, torch.zeros(b))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros(b, b))


def test_trl_by_hand():
    tau, m = 0.2, 0.3
    got = trl_loss(scores(), torch.tensor([5, 5, 9]), tau=tau, margin=m)
    pos = {0: [0, 1], 1: [0, 1], 2: [2]}
    for b in range(3):
        neg = [j for j in range(3) if j not in pos[b]]
        row = max(0.0, m + max(S[b][j] for j in neg) - weighted([S[b][j] for j in pos[b]], tau))
        column = max(0.0, m + max(col(b)[i] for i in neg) - weighted([col(b)[i] for i in pos[b]], tau))
        assert got[b].item() == pytest.approx(row + column, rel=1e-12)


def test_trl_hardest_negative_may_be_negative():
    # All negatives below zero: the hardest is the largest of them (RDE's mask*scores would use 0).
    s = torch.tensor([[0.2, -0.5], [-0.3, 0.1]])
    got = trl_loss(s, torch.tensor([0, 1]), tau=0.015, margin=0.9)
    expected0 = (0.9 - 0.5 - 0.2) + (0.9 - 0.3 - 0.2)  # row 0, column 0
    expected1 = (0.9 - 0.3 - 0.1) + (0.9 - 0.5 - 0.1)
    assert got.tolist() == pytest.approx([expected0, expected1], abs=1e-7)


def test_infonce_by_hand():
    ls = 3.0
    got = infonce_loss(scores(), logit_scale=ls)
    for b in range(3):
        t2i = -math.log(math.exp(ls * S[b][b]) / sum(math.exp(ls * v) for v in S[b]))
        i2t = -math.log(math.exp(ls * S[b][b]) / sum(math.exp(ls * v) for v in col(b)))
        assert got[b].item() == pytest.approx((t2i + i2t) / 2, rel=1e-12)
    # pids are ignored (only the diagonal is positive, as in RDE)
    assert torch.equal(infonce_loss(scores(), torch.tensor([1, 1, 1]), logit_scale=ls), got)


def test_sdm_by_hand():
    ls, eps = 2.0, 1e-8
    got = sdm_loss(scores(), torch.tensor([5, 5, 9]), logit_scale=ls)
    target = {0: [0.5, 0.5, 0.0], 1: [0.5, 0.5, 0.0], 2: [0.0, 0.0, 1.0]}

    def kl(values, q):
        z = sum(math.exp(ls * v) for v in values)
        p = [math.exp(ls * v) / z for v in values]
        return sum(pi * (math.log(pi) - math.log(qi + eps)) for pi, qi in zip(p, q))

    for b in range(3):
        assert got[b].item() == pytest.approx(kl(S[b], target[b]) + kl(col(b), target[b]), rel=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shapes_and_finite_gradients(name):
    gen = torch.Generator().manual_seed(0)
    for pids in (torch.tensor([0, 1, 1, 2, 3, 3, 3, 4]), torch.zeros(8, dtype=torch.long)):
        t = torch.randn(8, 32, generator=gen, requires_grad=True)
        i = torch.randn(8, 32, generator=gen, requires_grad=True)
        loss = compute_loss(name, cosine_scores(t, i), pids, tau=0.015, margin=0.1, logit_scale=50.0)
        assert loss.shape == (8,)
        assert torch.isfinite(loss).all() and (loss >= 0).all()
        loss.sum().backward()
        assert torch.isfinite(t.grad).all() and torch.isfinite(i.grad).all()
    # Extreme scores at the smallest temperature stay finite too.
    s = torch.tensor([[1.0, -1.0], [1.0, 1.0]], requires_grad=True)
    compute_loss(name, s, torch.tensor([0, 1]), tau=0.001, margin=0.1, logit_scale=1000.0).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_single_identity_batch_has_no_ranking_loss():
    # No negatives anywhere: TAL/TRL give 0 (RDE's code would take log(0)).
    s = torch.rand(4, 4, requires_grad=True)
    for fn in (tal_loss, trl_loss):
        loss = fn(s, torch.zeros(4, dtype=torch.long))
        assert torch.equal(loss, torch.zeros(4))


def test_compute_loss_dispatch_and_errors():
    s, pids = scores(), torch.tensor([0, 1, 2])
    assert torch.equal(compute_loss("tal", s, pids, tau=0.3, margin=0.2, logit_scale=9.0),
                       tal_loss(s, pids, tau=0.3, margin=0.2))
    assert torch.equal(compute_loss("InfoNCE", s, pids, tau=0.3, logit_scale=9.0), infonce_loss(s, logit_scale=9.0))
    assert torch.equal(compute_loss("sdm", s, pids), sdm_loss(s, pids, logit_scale=50.0))
    with pytest.raises(ValueError, match="valid names: TAL, TRL, InfoNCE, SDM"):
        compute_loss("CMPM", s, pids)
    with pytest.raises(TypeError, match="temperature"):
        compute_loss("TAL", s, pids, temperature=0.02)
    with pytest.raises(ValueError, match="square"):
        tal_loss(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_positive_mask_and_cosine_scores():
    assert positive_mask(torch.tensor([3, 1, 3])).tolist() == [[True, False, True], [False, True, False],
                                                               [True, False, True]]
    t = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    i = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    expected = torch.tensor([[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), -1.0]])
    assert torch.allclose(cosine_scores(t, i), expected)
