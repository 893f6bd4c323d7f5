"""The closed-form distinct-destination counts vs a Monte-Carlo count of real ``select_experts`` choices, counted
the way the all-to-all dispatcher deduplicates them (``raymoe.model.dispatch.plan_rows``)."""

from __future__ import annotations

import pytest
import torch

from raymoe.model.dispatch import plan_rows
from raymoe.parallel.dispatcher import contiguous_placement
from raymoe.plan.destinations import expected_destinations
from raymoe.routing.gate import select_experts


def _monte_carlo(*, num_experts, num_groups, groups_kept, top_k, ep, ranks_per_node, tokens=20000, seed=0):
    """Real selections, counted by the dispatcher's own deduplication (``plan_rows``): rows per destination rank,
    and, with the experts placed by node, rows per destination node. Tokens come from every source rank in turn."""
    gen = torch.Generator().manual_seed(seed)
    scores_TE = torch.randn(tokens, num_experts, generator=gen).sigmoid()  # balanced: i.i.d. affinities
    ids_TK, _ = select_experts(scores_TE, None, top_k=top_k, num_groups=num_groups, groups_kept=groups_kept)
    per_node = min(ranks_per_node, ep)
    num_nodes = ep // per_node
    by_rank, by_node = contiguous_placement(num_experts, ep), contiguous_placement(num_experts, num_nodes)
    ranks = nodes = remote_ranks = remote_nodes = 0
    for source, ids_NK in enumerate(ids_TK.chunk(ep)):
        rank_counts = plan_rows(ids_NK, by_rank, ep)[2]
        node_counts = plan_rows(ids_NK, by_node, num_nodes)[2]
        ranks, nodes = ranks + sum(rank_counts), nodes + sum(node_counts)
        remote_ranks += sum(rank_counts) - rank_counts[source]
        remote_nodes += sum(node_counts) - node_counts[source // per_node]
    return ranks / tokens, nodes / tokens, remote_ranks / tokens, remote_nodes / tokens


SHAPES = {
    # name: (experts, groups, kept, top_k, ep, ranks per node)
    "deepseek-v3 ep64": (256, 8, 4, 8, 64, 8),
    "deepseek-v3 ep32": (256, 8, 4, 8, 32, 8),
    "deepseek-v3 ep128": (256, 8, 4, 8, 128, 8),
    "deepseek-v3 ep16": (256, 8, 4, 8, 16, 8),
    "deepseek-v2 ep8": (160, 8, 3, 6, 8, 8),
    "deepseek-v2 ep16": (160, 8, 3, 6, 16, 8),
    "small": (16, 4, 2, 4, 4, 2),
    "no group limit": (64, 1, 1, 6, 8, 4),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_closed_form_matches_monte_carlo_of_real_selections(name):
    experts, groups, kept, top_k, ep, per_node = SHAPES[name]
    shape = dict(num_experts=experts, num_groups=groups, groups_kept=kept, top_k=top_k, ep=ep,
                 ranks_per_node=per_node)
    want = expected_destinations(**shape)
    ranks, nodes, remote_ranks, remote_nodes = _monte_carlo(**shape)
    # 20,000 tokens: the Monte-Carlo standard error is < 0.01 on these counts; the seeded model is within 2%.
    for got, mc in ((want.ranks, ranks), (want.nodes, nodes), (want.remote_ranks, remote_ranks),
                    (want.remote_nodes, remote_nodes)):
        assert got == pytest.approx(mc, rel=0.02, abs=0.02), (name, got, mc)
    nodes_per_group = max(1, (ep // min(ep, per_node)) // groups)
    if groups > 1:  # node-limited: never more nodes than the kept groups span
        assert want.nodes <= kept * nodes_per_group + 1e-9


def test_known_values():
    # One rank: everything stays home.
    d = expected_destinations(num_experts=8, num_groups=2, groups_kept=1, top_k=2, ep=1, ranks_per_node=8)
    assert (d.ranks, d.nodes, d.remote_ranks, d.remote_nodes) == (1.0, 1.0, 0.0, 0.0)
    # No group limit, one expert per rank, top-1: exactly one destination rank, remote with chance 3/4.
    d = expected_destinations(num_experts=4, num_groups=1, groups_kept=1, top_k=1, ep=4, ranks_per_node=4)
    assert d.ranks == pytest.approx(1.0) and d.remote_ranks == pytest.approx(0.75) and d.remote_nodes == 0.0
    # Hand count: 4 experts on 4 ranks, top-2 uniform -> 2 ranks; on 2 nodes of 2 -> 1 + C(2,2)/C(4,2)... :
    # P(a node is missed) = C(2,2)/C(4,2) = 1/6, so nodes = 2 * 5/6.
    d = expected_destinations(num_experts=4, num_groups=1, groups_kept=1, top_k=2, ep=4, ranks_per_node=2)
    assert d.ranks == pytest.approx(2.0) and d.nodes == pytest.approx(5 / 3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        expected_destinations(num_experts=10, num_groups=4, groups_kept=2, top_k=2, ep=2, ranks_per_node=8)
    with pytest.raises(ValueError, match="straddle"):
        expected_destinations(num_experts=24, num_groups=4, groups_kept=2, top_k=2, ep=6, ranks_per_node=6)
    with pytest.raises(ValueError, match="divisible by groups_kept"):
        expected_destinations(num_experts=32, num_groups=8, groups_kept=4, top_k=2, ep=8, ranks_per_node=2)
    with pytest.raises(ValueError, match="impossible"):
        expected_destinations(num_experts=8, num_groups=4, groups_kept=1, top_k=3, ep=2, ranks_per_node=2)
