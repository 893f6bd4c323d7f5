"""How many distinct ranks and nodes one token's routed experts live on: what the all-to-all really sends.

A dispatcher that deduplicates (DeepEP; see DESIGN.md) sends a token once per destination *rank*, and across
nodes once per destination *node* (the copy lands on the same-index GPU there and is forwarded over NVLink). So the
bytes of one MoE layer's all-to-all are tokens x (distinct destinations) x bytes per token, not tokens x top_k.

``expected_destinations`` is the expectation of those counts under the routing rule of ``raymoe.routing`` for
balanced routing, in closed form. The model of one token's choice (call it the *seeded* model):

  * its ``groups_kept`` groups are a uniformly random subset of the G groups;
  * every kept group gets at least one of the K experts, in a uniformly random expert of that group; the other
    K - groups_kept experts are uniform without replacement over the rest of the kept groups' experts.

Why seeded: a group is kept because its top-(K / groups_kept) affinities are among the best, so its best expert
nearly always makes the final top-K; a plain "K uniform picks among the kept experts" model would predict that a
kept group is missed with probability ~(1 - 1/M)^K (10% for DeepSeek-V3) where real selections almost never miss
one. ``tests/test_plan_destinations.py`` checks this model against a Monte-Carlo count of ``select_experts`` on
random affinities, deduplicated by the all-to-all dispatcher's own ``raymoe.model.dispatch.plan_rows``: within 2%
on the DeepSeek-V3, V2 and smaller shapes at several ``ep``.

Experts are placed contiguously: rank r holds experts [r*E/ep, (r+1)*E/ep), node n holds ranks
[n*R, (n+1)*R) with R ranks per node. Each rank (node) must lie inside one group or cover whole groups.

Legend: E routed experts, G groups, M groups kept, K experts per token, g = E/G experts per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb


@dataclass(frozen=True, kw_only=True)
class Destinations:
    ranks: float
    """Expected distinct expert-parallel ranks a token's K experts live on (its own rank included if hit)."""
    nodes: float
    """Expected distinct nodes among those ranks."""
    remote_ranks: float
    """Expected destination ranks other than the token's own: copies a deduplicating dispatcher sends."""
    remote_nodes: float
    """Expected destination nodes other than the token's own: copies that cross the inter-node network."""
    ep: int
    ranks_per_node: int

    def as_dict(self) -> dict[str, float]:
        return {"ranks": self.ranks, "nodes": self.nodes, "remote_ranks": self.remote_ranks,
                "remote_nodes": self.remote_nodes, "ep": self.ep, "ranks_per_node": self.ranks_per_node}


def _ratio(n_minus: int, n: int, k: int) -> float:
    """C(n_minus, k) / C(n, k): the chance that k uniform picks from n all miss n - n_minus given items."""
    if k <= 0:
        return 1.0
    if n_minus < k:
        return 0.0
    return comb(n_minus, k) / comb(n, k)


def _hit_probability(cell: int, *, num_experts: int, num_groups: int, groups_kept: int, top_k: int) -> float:
    """Chance that at least one of a token's K experts is among ``cell`` contiguous experts."""
    g = num_experts // num_groups
    if cell >= g:  # the cell covers cell/g whole groups: hit iff one of them is kept (each kept group is hit)
        if cell % g:
            raise ValueError(f"{cell} experts per rank/node straddle groups of {g} experts; make one divide "
                             f"the other (num_routed_experts={num_experts}, num_groups={num_groups})")
        return 1.0 - _ratio(num_groups - cell // g, num_groups, groups_kept)
    if g % cell:
        raise ValueError(f"{cell} experts per rank straddle groups of {g} experts; make one divide the other "
                         f"(num_routed_experts={num_experts}, num_groups={num_groups})")
    kept = groups_kept / num_groups
    # Seeded: the group's one sure pick misses the cell, then the K - M free picks miss it too.
    pool, free = groups_kept * (g - 1), top_k - groups_kept
    missed = (g - cell) / g * _ratio(pool - cell, pool, free)
    return kept * (1.0 - missed)


def expected_destinations(
    *, num_experts: int, num_groups: int, groups_kept: int, top_k: int, ep: int, ranks_per_node: int
) -> Destinations:
    """Expected distinct destination ranks and nodes of one token (module docstring: the model and its check).

    ``ranks_per_node`` is how many of the ``ep`` ranks share a node (8 GPUs per node: ``min(ep, 8)``)."""
    for name, value in (("num_experts", num_experts), ("num_groups", num_groups), ("groups_kept", groups_kept),
                        ("top_k", top_k), ("ep", ep), ("ranks_per_node", ranks_per_node)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_experts % num_groups or num_experts % ep:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_groups ({num_groups}) and ep ({ep})")
    if groups_kept > num_groups or top_k > groups_kept * (num_experts // num_groups):
        raise ValueError(f"top_k={top_k} experts from groups_kept={groups_kept} of {num_groups} groups of "
                         f"{num_experts // num_groups} experts is impossible")
    if num_groups > 1 and top_k % groups_kept:
        raise ValueError(f"top_k ({top_k}) must be divisible by groups_kept ({groups_kept}), as routing config "
                         f"requires: each kept group is scored by its top-(top_k/groups_kept) experts")
    if ep % ranks_per_node and ranks_per_node % ep:
        raise ValueError(f"ep ({ep}) and ranks_per_node ({ranks_per_node}) must divide one another")
    per_node = min(ranks_per_node, ep)
    num_nodes = ep // per_node
    shape = {"num_experts": num_experts, "num_groups": num_groups, "groups_kept": groups_kept, "top_k": top_k}
    ranks = ep * _hit_probability(num_experts // ep, **shape)
    nodes = num_nodes * _hit_probability(num_experts // num_nodes, **shape)
    # By symmetry a given rank (node) is hit with probability ranks/ep (nodes/num_nodes): the token's own.
    return Destinations(ranks=ranks, nodes=nodes, remote_ranks=ranks * (1 - 1 / ep),
                        remote_nodes=nodes * (1 - 1 / num_nodes), ep=ep, ranks_per_node=per_node)
