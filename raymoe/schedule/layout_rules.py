"""The layout rules that config validation, the planner and the runtime all apply, written once (pure Python).

* ``rank_chunks`` / ``num_chunks``: which model chunks a pipeline rank holds under a schedule, from the schedule's
  own placement (one chunk per rank; DualPipe's two copies; DualPipeV's V).
* ``layer_counts``: how many transformer layers each chunk gets: ``stage_layers`` when given (validated), else as
  even as possible with the leftover layers on the earliest chunks, so the last chunk, which already carries the
  output head and the MTP modules, never gets one.
* ``check_ep_divides_dp``: expert parallelism is carved out of data parallelism (DeepSeek-V3, DeepSpeed-MoE):
  the dp replicas of a stage form dp / ep groups of ep expert-parallel ranks.
* ``check_zero_stage``: where ZeRO-2 is refused. It reduces and frees each backward pass's gradients at once, so
  parameters copied on two pipeline ranks (DualPipe's mirror, the last stage's MTP embedding copy) would be summed
  too late, and expert shards are not partitioned by it.
"""

from __future__ import annotations

from collections.abc import Sequence

from raymoe.schedule.placement import stage_placement


def num_chunks(schedule: str, pp: int) -> int:
    """Model chunks the layers are cut into: pp, or 2 * pp for DualPipeV."""
    return stage_placement(schedule, pp).num_chunks


def rank_chunks(schedule: str, pp: int, rank: int) -> tuple[int, ...]:
    """The chunks pipeline rank ``rank`` holds, ascending."""
    placement = stage_placement(schedule, pp)
    return tuple(sorted({placement.info(s).chunk for s in placement.stages_of(rank)}))


def layer_counts(num_layers: int, chunks: int, stage_layers: Sequence[int] = (), *,
                 key: str = "stage_layers", layers_key: str = "num_layers") -> list[int]:
    """Layers per chunk; ValueError naming ``key`` / ``layers_key`` when the layers cannot be cut that way."""
    if chunks < 1:
        raise ValueError(f"the number of pipeline chunks must be >= 1, got {chunks}")
    if stage_layers:
        counts = list(stage_layers)
        if len(counts) != chunks or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"{key} {counts} must list {chunks} positive layer counts summing to "
                             f"{layers_key} ({num_layers})")
        return counts
    if num_layers < chunks:
        raise ValueError(f"cannot cut {num_layers} layers into {chunks} pipeline chunks of >= 1 layer "
                         f"({layers_key} ({num_layers}) is smaller than the number of chunks)")
    base, extra = divmod(num_layers, chunks)
    return [base + (1 if c < extra else 0) for c in range(chunks)]


def check_ep_divides_dp(ep: int, dp: int, *, prefix: str = "") -> None:
    if dp % ep:
        raise ValueError(f"{prefix}dp ({dp}) must be divisible by {prefix}ep ({ep}): experts are sharded inside "
                         f"dp, each group of ep data-parallel ranks splitting the experts between them")


def check_zero_stage(*, zero_stage: int, schedule: str, pp: int, ep: int, mtp_depth: int) -> None:
    """ValueError, naming the values and what to use instead, where ``zero_stage`` cannot run this layout."""
    if zero_stage != 2:
        return
    if ep > 1:
        raise ValueError(f"parallel.zero_stage=2 with parallel.ep={ep}: ZeRO-2 does not partition expert shards "
                         f"yet; use parallel.zero_stage=1 (the paper's choice) or 0")
    if pp == 1:
        return
    family = stage_placement(schedule, pp).family
    if family == "dualpipe":
        raise ValueError(
            f"parallel.zero_stage=2 with schedule.name={schedule}, parallel.pp={pp}: DualPipe keeps two copies of "
            f"every stage whose gradients are summed after the last backward, when ZeRO-2 has already reduced and "
            f"freed them; use schedule.name=dualpipev (one copy) or parallel.zero_stage=1"
        )
    if family == "one-per-rank" and mtp_depth > 0:
        raise ValueError(
            f"parallel.zero_stage=2 with schedule.name={schedule}, parallel.pp={pp}, mtp.depth={mtp_depth}: the "
            f"MTP modules on the last stage use a copy of the first stage's embedding, whose gradients are summed "
            f"after the last backward, when ZeRO-2 has already reduced and freed them; use schedule.name=dualpipev "
            f"(first and last stage on one rank), parallel.pp=1, mtp.depth=0 or parallel.zero_stage=1"
        )
