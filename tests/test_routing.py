"""Router semantics, bias rule, sequence-wise loss and MaxVio against hand-computed cases."""

import pytest
import torch

from raymoe.routing import (
    affinity_scores,
    expert_counts,
    group_limited_mask,
    max_violation,
    select_experts,
    sequence_balance_loss,
    update_bias,
)


def test_bias_changes_selection_but_not_weights():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    ids, weights = select_experts(scores, None, top_k=2)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights, torch.tensor([[0.9 / 1.7, 0.8 / 1.7]]))
    # A large bias on expert 3 makes it chosen, but its weight still comes from its unbiased score 0.2.
    ids, weights = select_experts(scores, torch.tensor([0.0, 0.0, 0.0, 1.0]), top_k=2)
    assert sorted(ids.tolist()[0]) == [0, 3]
    chosen = dict(zip(ids[0].tolist(), weights[0].tolist()))
    assert chosen[3] == pytest.approx(0.2 / 1.1)
    assert chosen[0] == pytest.approx(0.9 / 1.1)


def test_route_scale_multiplies_normalised_weights():
    scores = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    _, weights = select_experts(scores, None, top_k=2, route_scale=2.5)
    assert weights.sum().item() == pytest.approx(2.5)
    _, raw = select_experts(scores, None, top_k=2, normalize=False)
    assert raw.tolist() == [[0.5, 0.25]]


def test_group_limited_routing_keeps_best_groups_by_top_sum():
    # 3 groups of 2 experts, top_k=2, groups_kept=2 -> each group scored by its top-1 expert.
    # group0: (0.9, 0.0) -> 0.9 ; group1: (0.5, 0.5) -> 0.5 ; group2: (0.6, 0.1) -> 0.6
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.6, 0.1]])
    mask = group_limited_mask(scores, num_groups=3, groups_kept=2, top_k=2)
    assert mask.tolist() == [[True, True, False, False, True, True]]
    ids, _ = select_experts(scores, None, top_k=2, num_groups=3, groups_kept=2)
    assert sorted(ids[0].tolist()) == [0, 4]  # 0.5s of group 1 lose although 0.5 < 0.6 only for group ranking


def test_group_score_uses_sum_of_top_k_over_groups_kept():
    # top_k=4, groups_kept=2 -> sum of the top-2 in each group of 3.
    # g0: (0.9, 0.1, 0.1) -> 1.0 ; g1: (0.6, 0.6, 0.0) -> 1.2 ; g2: (0.7, 0.2, 0.0) -> 0.9
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.6, 0.6, 0.0, 0.7, 0.2, 0.0]])
    mask = group_limited_mask(scores, num_groups=3, groups_kept=2, top_k=4)
    assert mask.view(3, 3)[:, 0].tolist() == [True, True, False]


def test_group_ranking_sees_the_bias():
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0])
    ids, weights = select_experts(scores, bias, top_k=1, num_groups=2, groups_kept=1)
    assert ids.tolist() == [[2]]
    assert weights.tolist() == [[1.0]]


def test_softmax_and_sigmoid_affinities():
    logits = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(affinity_scores(logits, "sigmoid"), logits.sigmoid())
    assert affinity_scores(logits, "softmax").sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="score_func"):
        affinity_scores(logits, "relu")


def test_bias_update_sign_rule():
    bias = torch.zeros(4)
    counts = torch.tensor([10, 2, 4, 4])  # mean 5
    new = update_bias(bias, counts, gamma=0.01)
    assert new.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert update_bias(bias, torch.tensor([5, 5, 5, 5]), 0.01).tolist() == [0, 0, 0, 0]
    assert torch.equal(update_bias(bias, counts, 0.0), bias)
    stacked = update_bias(torch.zeros(2, 2), torch.tensor([[3, 1], [0, 4]]), 1.0)
    assert stacked.tolist() == [[-1.0, 1.0], [1.0, -1.0]]
    with pytest.raises(ValueError, match="shape"):
        update_bias(torch.zeros(3), counts, 0.1)


def test_sequence_balance_loss_matches_formula():
    # One sequence, T=2 tokens, E=2 experts, K=1.
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]]])
    ids = torch.tensor([[[0], [0]]])
    # f = E/(K T) * counts = 2/2 * (2, 0) = (2, 0); P = mean of normalised rows = ((0.75+0.5)/2, (0.25+0.5)/2)
    expected = 0.1 * (2 * 0.625 + 0 * 0.375)
    assert sequence_balance_loss(scores, ids, alpha=0.1).item() == pytest.approx(expected)
    assert sequence_balance_loss(scores, ids, alpha=0.0).item() == 0.0


def test_sequence_balance_loss_averages_sequences_and_is_differentiable():
    scores = torch.rand(3, 5, 4, requires_grad=True)
    ids = torch.randint(0, 4, (3, 5, 2))
    per_seq = torch.stack([sequence_balance_loss(scores[i : i + 1], ids[i : i + 1], alpha=1.0) for i in range(3)])
    total = sequence_balance_loss(scores, ids, alpha=1.0)
    assert total.item() == pytest.approx(per_seq.mean().item(), rel=1e-6)
    total.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_max_violation_and_counts():
    assert max_violation(torch.tensor([4, 4, 4, 4])).item() == 0.0
    assert max_violation(torch.tensor([8, 0, 4, 4])).item() == pytest.approx(1.0)
    assert max_violation(torch.tensor([[2, 2], [3, 1]])).tolist() == pytest.approx([0.0, 0.5])
    assert max_violation(torch.zeros(4)).item() == 0.0
    assert expert_counts(torch.tensor([[0, 2], [2, 3]]), 5).tolist() == [1, 0, 2, 1, 0]
