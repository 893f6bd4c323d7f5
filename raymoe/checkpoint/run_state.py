"""The trainer's own state in a checkpoint, beside the shards: steps done, tokens seen, the data cursor and the
aux-loss-free routing biases. The Ray driver and the single-process trainer save and restore it alike.

Legend: R = routers (MoE layers + MTP MoE layers), E = routed experts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.checkpoint.compat import check_compatible, config_of
from raymoe.checkpoint.manifest import Layout, Manifest, ShardEntry


@dataclass(frozen=True, kw_only=True)
class RunState:
    step: int
    tokens_seen: int
    cursor: dict
    """``raymoe.data.Cursor.to_dict()``: where the next batch comes from."""
    bias_RE: torch.Tensor
    expert_placement: tuple[int, ...] = ()
    """Expert parallelism: the ep rank of every routed expert (driver-owned routing state, like the biases)."""


def local_layout(config) -> Layout:
    """The single-process trainer's layout: one shard, whatever the config's parallel section says."""
    return Layout(pp=1, ep=1, dp=1, schedule="local", num_microbatches=config.schedule.num_microbatches,
                  stage_layers=[], zero_stage=0)


def build_manifest(config, state: RunState, layout: Layout, shards: list[dict]) -> Manifest:
    from raymoe.config import to_yaml

    return Manifest(
        step=state.step, tokens_seen=state.tokens_seen, data_cursor=state.cursor,
        routing_bias_RE=state.bias_RE.tolist(), config_yaml=to_yaml(config), layout=layout,
        shards=[ShardEntry(**s) for s in shards], created_unix=time.time(),
        versions={"raymoe": _version(), "torch": torch.__version__},
        expert_placement=list(state.expert_placement),
    )


def read_run_state(checkpoint: Path, config, layout: Layout, num_routers: int, *,
                   reshard: bool = False) -> tuple[Manifest, RunState]:
    """The manifest and run state of ``checkpoint``, after checking it continues ``config`` in ``layout`` (with
    ``reshard``: in any layout, ``raymoe.checkpoint.reshard``)."""
    from raymoe.data import Cursor

    manifest = Manifest.read(checkpoint)
    if manifest.layout != layout and not reshard:
        raise ValueError(f"{checkpoint} was saved by the layout {manifest.layout.describe()}; this run is "
                         f"{layout.describe()} (a checkpoint resumes in its own layout and engine; --reshard "
                         f"continues it in another)")
    check_compatible(config_of(manifest), config, source=str(checkpoint), reshard=reshard)
    bias_RE = torch.tensor(manifest.routing_bias_RE, dtype=torch.float32)
    expected = (num_routers, config.model.num_routed_experts)
    if tuple(bias_RE.shape) != expected:
        raise ValueError(f"{checkpoint}: routing biases of shape {tuple(bias_RE.shape)}, the model has {expected}")
    cursor = Cursor.from_dict(manifest.data_cursor).to_dict()  # validated
    return manifest, RunState(step=manifest.step, tokens_seen=manifest.tokens_seen, cursor=cursor, bias_RE=bias_RE,
                              expert_placement=tuple(manifest.expert_placement))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raymoe")
    except PackageNotFoundError:
        return "unknown"
