"""torch.distributed process groups of a ``Topology``, created identically on every rank.

``new_group`` is collective over the whole world: every rank must create every group, in the same order, even
the groups it is not a member of, or the job hangs. ``build_process_groups`` walks the topology's member lists
in one fixed order and keeps the groups this rank belongs to. A group of one rank is kept as ``None``: callers
skip the collective (the local twin of every reduction is doing nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from raymoe.parallel.topology import Topology

_KINDS = ("pp", "dp", "ep", "ep_backward", "edp", "embedding", "mirror")


@dataclass(frozen=True, kw_only=True)
class ProcessGroups:
    """This rank's groups (``None`` where the group would hold only this rank) and their member lists."""

    rank: int
    pp: Any = None
    dp: Any = None
    ep: Any = None
    ep_backward: Any = None
    """The ep group's twin for the all-to-alls of backward passes: forward and backward chunks may then exchange
    tokens at the same time (overlap), each group seeing its collectives in the action list's order."""
    edp: Any = None
    embedding: Any = None
    mirror: Any = None
    members: dict[str, tuple[int, ...]] | None = None


def build_process_groups(topology: Topology, rank: int) -> ProcessGroups:
    mine: dict[str, Any] = {}
    members: dict[str, tuple[int, ...]] = {}
    for kind in _KINDS:
        for group_ranks in getattr(topology, f"{kind}_groups")():
            if len(group_ranks) == 1:
                continue  # no collective needed; skipping is safe because every rank skips the same ones
            group = dist.new_group(list(group_ranks))
            if rank in group_ranks:
                mine[kind] = group
                members[kind] = tuple(group_ranks)
    return ProcessGroups(rank=rank, members=members, **mine)


def grad_or_zeros(p: torch.nn.Parameter) -> torch.Tensor:
    """``p.grad``, set to zeros first where no micro-batch reached ``p`` (an idle expert, a layer a step skipped):
    a zero gradient, and every replica still takes part in the collectives, which need a tensor."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` in one flat buffer (no-op for ``None``, the one-rank group)."""
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
