"""The typed hand-offs between the driver and its workers: what a step needs, what a step returns.

Legend: R routers (MoE layers, then MTP blocks), E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.parallel.executor import ActionTiming
from raymoe.parallel.interleave import ExchangeTiming, PhaseTiming


@dataclass(frozen=True, kw_only=True)
class StepInputs:
    step: int
    microbatches: dict[int, Any]
    """Micro-batch index -> its (B_micro, L) tokens; only those this rank's first and last stages read (inputs
    at the first, labels at the last)."""
    bias_RE: torch.Tensor
    """The routing state: every router's balancing bias, owned by the driver."""
    lr: float
    mtp_weight: float
    capture: bool = False
    """Also return the gradients (dp-averaged, before clipping) and the parameters before/after the update."""


@dataclass(frozen=True, kw_only=True)
class StepResult:
    rank: int
    pp_rank: int
    dp_rank: int
    step: int
    main_ce: float
    """Sum over the micro-batches whose loss this rank computed of main CE / num_microbatches."""
    mtp_ce: float
    balance: float
    """Sum of the balance losses computed on this rank, / num_microbatches."""
    num_loss_microbatches: int
    counts_RE: torch.Tensor
    """Tokens routed to each expert by this rank's routers, summed over its micro-batches (int64)."""
    grad_norm: float
    """Global gradient norm (whole pipeline, dp-averaged) before clipping; the same on every rank."""
    timings: tuple[ActionTiming, ...]
    timings_origin_s: float
    """``time.perf_counter()`` on this worker when ``timings`` start (the executor's clock origin); comparable
    between workers of one host only (start skew), not across hosts."""
    step_s: float
    """Wall time of ``run_step`` on the worker."""
    compute_s: float
    """Summed duration of this rank's compute actions."""
    optimizer_s: float
    """Gradient sync (embedding / mirror), dp reduction, clipping and the update."""
    replica_sync_s: float = 0.0
    """The part of ``optimizer_s`` spent summing replicated gradients (tied embedding, DualPipe mirror) after the
    last backward: what the overlapped mirror sums still leave exposed."""
    recv_wait_s: float
    send_wait_s: float
    peak_live_activations: int
    param_bytes: int
    optimizer_state_bytes: int
    """Adam moments held by this rank: 1/dp of the stage's under ZeRO."""
    optimizer_master_bytes: int
    optimizer_grad_bytes: int = 0
    """Gradients held when the step began: the full .grad of every parameter, or ZeRO-2's ~1/dp partition."""
    peak_memory_bytes: int
    """Peak resident memory of the worker process (CPU) or peak allocated device memory (CUDA)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """What the worker process (all its threads: compute, gloo, Ray's) used during ``run_step``
    (``getrusage``): ``user_s``, ``sys_s`` (kernel: socket transfers, page faults), ``minor_faults``,
    ``involuntary_switches`` (preempted)."""
    dispatch: dict = field(default_factory=dict)
    """Expert all-to-all of this step on this rank (``raymoe.parallel.dispatcher.DispatchStats``): bytes sent
    (naive / deduplicated / measured same-node and cross-node), seconds, rows received; zeros without EP."""
    phases: tuple[PhaseTiming, ...] = ()
    """The turns of the overlapped F&B pairs (``schedule.overlap_a2a``), on the ``timings`` clock."""
    exchanges: tuple[ExchangeTiming, ...] = ()
    """Every expert all-to-all of the step in issue order, on the ``timings`` clock; empty without EP."""
    grads: dict[str, torch.Tensor] | None = None
    params_before: dict[str, torch.Tensor] | None = None
    params_after: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LoadInfo:
    """What a worker reports after building its stage(s) for a layout."""

    rank: int
    chunks: tuple[int, ...]
    layers: tuple[int, ...]
    num_params: int
    param_bytes: int
    optimizer: str
    expert_ids: tuple[int, ...] = ()
    """Global ids of the routed experts this rank holds."""
