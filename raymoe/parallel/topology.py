"""Who is who in a pp x ep x dp job: ranks <-> coordinates, peers, and the member lists of every group.

Legend: P = pp (pipeline ranks), E = ep (expert-parallel ranks), D = dp (dense data-parallel ranks).

Layout. A job has ``P * D`` workers. Expert parallelism is carved out of data parallelism (DeepSeek-V3 and
DeepSpeed-MoE do the same): the D data-parallel replicas of one pipeline stage are arranged as ``D / E``
expert-data-parallel groups of ``E`` expert-parallel ranks. A worker's global rank is stage-major,

    rank = pp_rank * D + dp_rank,        ep_rank = dp_rank % E,        edp_rank = dp_rank // E,

which is the layout DeepSpeed's expert-group helpers assume. The groups a worker belongs to:

    group      members (same ...)                    reduces / carries
    pp         dp_rank, different pp_rank            activations and gradients (P2P), the global grad norm
    dp         pp_rank, all D replicas               dense gradients (ZeRO partitions optimizer state here)
    ep         pp_rank and edp_rank                  MoE token all-to-all
    edp        pp_rank and ep_rank                   expert gradients
    embedding  dp_rank, pp_rank in {0, P-1}          the tied input/MTP embedding of one-stage-per-rank schedules
    mirror     dp_rank, pp_rank in {p, P-1-p}        DualPipe's two model copies of the same chunks

Pure Python: nothing here touches torch.distributed, so the maps are unit-tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.schedule.layout_rules import check_ep_divides_dp


@dataclass(frozen=True, kw_only=True)
class Coord:
    pp_rank: int
    dp_rank: int
    """Dense data-parallel rank, 0 .. dp-1."""
    ep_rank: int
    edp_rank: int
    """Expert-data-parallel rank: which replica of this ep rank's experts, 0 .. dp/ep-1."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    pp: int
    ep: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "ep", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"topology {name} must be >= 1, got {getattr(self, name)}")
        check_ep_divides_dp(self.ep, self.dp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    # -- rank <-> coordinates ----------------------------------------------------------------------------------
    def rank(self, *, pp_rank: int, dp_rank: int) -> int:
        if not (0 <= pp_rank < self.pp and 0 <= dp_rank < self.dp):
            raise ValueError(f"coordinates pp_rank={pp_rank}, dp_rank={dp_rank} outside pp={self.pp}, dp={self.dp}")
        return pp_rank * self.dp + dp_rank

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        pp_rank, dp_rank = divmod(rank, self.dp)
        return Coord(pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=dp_rank % self.ep, edp_rank=dp_rank // self.ep)

    def actor_name(self, rank: int) -> str:
        """The Ray actor name of ``rank``: readable in the dashboard, unique within a job."""
        c = self.coord(rank)
        return f"raymoe/pp{c.pp_rank}-ep{c.ep_rank}-dp{c.dp_rank}"

    def pipeline_peer(self, rank: int, pp_rank: int) -> int:
        """The global rank holding pipeline position ``pp_rank`` in ``rank``'s pipeline (same dp_rank)."""
        return self.rank(pp_rank=pp_rank, dp_rank=self.coord(rank).dp_rank)

    # -- group member lists (every rank creates every group, in this order) ----------------------------------
    def pp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.rank(pp_rank=p, dp_rank=d) for p in range(self.pp)) for d in range(self.dp)]

    def dp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.rank(pp_rank=p, dp_rank=d) for d in range(self.dp)) for p in range(self.pp)]

    def ep_groups(self) -> list[tuple[int, ...]]:
        return [
            tuple(self.rank(pp_rank=p, dp_rank=i * self.ep + e) for e in range(self.ep))
            for p in range(self.pp)
            for i in range(self.edp)
        ]

    def ep_backward_groups(self) -> list[tuple[int, ...]]:
        """The ep groups again: a second communicator per ep group for backward all-to-alls."""
        return self.ep_groups()

    def edp_groups(self) -> list[tuple[int, ...]]:
        return [
            tuple(self.rank(pp_rank=p, dp_rank=i * self.ep + e) for i in range(self.edp))
            for p in range(self.pp)
            for e in range(self.ep)
        ]

    def embedding_groups(self) -> list[tuple[int, ...]]:
        """First and last pipeline rank of each pipeline; empty when pp == 1 (one rank holds both)."""
        if self.pp == 1:
            return []
        return [(self.rank(pp_rank=0, dp_rank=d), self.rank(pp_rank=self.pp - 1, dp_rank=d)) for d in range(self.dp)]

    def mirror_groups(self) -> list[tuple[int, ...]]:
        """Pipeline ranks p and P-1-p of each pipeline (p < P/2): DualPipe's two copies of the same chunks."""
        return [
            (self.rank(pp_rank=p, dp_rank=d), self.rank(pp_rank=self.pp - 1 - p, dp_rank=d))
            for d in range(self.dp)
            for p in range(self.pp // 2)
        ]

    def group_of(self, groups: list[tuple[int, ...]], rank: int) -> tuple[int, ...] | None:
        """The member list in ``groups`` that contains ``rank`` (None if it is in none)."""
        return next((g for g in groups if rank in g), None)
