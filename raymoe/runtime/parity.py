"""Distributed run == single-process reference: the check every layout must pass (DESIGN contract 1).

``run_parity(config)`` trains ``steps`` steps of the configured layout on Ray and of ``ReferenceTrainer`` on the
same global batches, and compares, over all parameter tensors (every copy a rank holds: tied embeddings,
DualPipe mirrors and dp replicas included), the relative norm difference ||x - x_ref|| / ||x_ref|| of

* the gradients of the first step (dp-averaged, before clipping), and
* the parameter updates of the first step (x = after - before),

plus the loss of every step and the parameters after the last one (the trajectory).

Why two update numbers. fp32 gradients of two correct computations that add in a different order differ by
~1e-7 relative. AdamW's first update of an element is lr * g / (|g| + eps): wherever |g| is within a few eps
(1e-8) of zero, that 1e-7 gradient noise becomes a visible update difference, so ``max_rel_update_diff`` can sit
above 1e-5 while nothing is wrong; hence ``reduction_tree``. The same holds for the global clip factor, which
multiplies every gradient: both sides sum the squared norm in float64 (``raymoe.train.clip``), so the layout's
grouping of that sum (ZeRO partitions, dp ranks, stages) does not reach the factor's fp32 bits.
``max_rel_update_diff_same_grads`` isolates the optimizer path (ZeRO partitioning, dp reduction, global
clipping, AdamW): it applies the reference's clipping and AdamW to the *distributed* gradients and compares that
update with the one the workers made.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field, replace

import torch

from raymoe.config import Config
from raymoe.model.build import compute_context
from raymoe.runtime.driver import Driver
from raymoe.runtime.results import StepResult
from raymoe.runtime.worker import Worker
from raymoe.train import ReferenceTrainer, accumulate_gradients, clip_coefficient, make_adamw, set_lr


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    schedule: str
    pp: int
    dp: int
    zero_stage: int
    ep: int = 1
    num_microbatches: int
    steps: int
    loss: float
    loss_ref: float
    loss_abs_diff: float
    loss_rel_diff: float
    max_rel_grad_diff: float
    max_rel_update_diff: float
    max_rel_update_diff_same_grads: float
    grad_norm_rel_diff: float
    max_rel_param_diff_final: float
    """After the last step: max over tensors of ||p - p_ref|| / ||p_ref||."""
    max_loss_rel_diff_trajectory: float
    """Max over the steps of |total_loss - total_loss_ref| / |total_loss_ref|."""
    worst_grad: str
    worst_update: str
    worst_update_same_grads: str
    losses: list[float] = field(default_factory=list)
    optimizer_state_bytes_per_rank: list[int] = field(default_factory=list)
    """Adam moments per rank after the first step (ZeRO-1: 1/dp of the stage's)."""
    gradient_bytes_per_rank: list[int] = field(default_factory=list)
    """Gradient bytes per rank when the first step began (ZeRO-2: ~1/dp of the stage's)."""
    losses_ref: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.double().norm()
    diff = (x.double() - ref.double()).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def reference_config(config: Config) -> Config:
    """The single-process twin of a layout: the same global batch in the same dp x M micro-batches.

    Gradient accumulation over dp * M micro-batches of B / (dp * M) rows computes the same global-batch gradient
    as M micro-batches of B / M rows; choosing the split the workers use makes each micro-batch's arithmetic the
    same on both sides, so what remains is the order in which the runtime sums (pipeline, dp, tied copies).
    """
    p, s = config.parallel, config.schedule
    return replace(
        config,
        parallel=replace(p, pp=1, dp=1, ep=1, stage_layers=[]),
        schedule=replace(s, name="1f1b", num_microbatches=s.num_microbatches * p.dp),
    )


def reduction_tree(config: Config) -> list:
    """The order in which the layout adds micro-batch gradients, for the reference to add them in the same order.

    Rank (pp, d) accumulates the micro-batches of dp shard d (global indices d*M .. d*M+M-1) into its gradient
    buffers; under DualPipe each of the two model copies accumulates half of them (copy 0 the first half) and the
    mirrored ranks then sum the copies; finally the dp all-reduce sums the shards. Two-way sums are exact in either
    order, so matching the tree makes the gradients bitwise equal where nothing else differs. ZeRO-2 turns the
    order around: it reduces each backward pass's gradients over dp at once (micro-batch m of every shard), and
    then accumulates those sums over m.
    """
    p, s = config.parallel, config.schedule
    per_rank = s.num_microbatches
    if p.zero_stage == 2 and p.dp > 1:
        return [[d * per_rank + m for d in range(p.dp)] for m in range(per_rank)]

    def shard(d: int) -> list:
        indices = list(range(d * per_rank, (d + 1) * per_rank))
        if s.name == "dualpipe" and p.pp > 1:
            return [indices[: per_rank // 2], indices[per_rank // 2 :]]
        return indices

    return [shard(d) for d in range(p.dp)] if p.dp > 1 else shard(0)


@contextlib.contextmanager
def _one_thread():
    """The workers compute with one intra-op thread; so does the reference, because multi-threaded kernels split
    their reductions differently and the two would then differ by rounding where they need not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_parity(config: Config, *, steps: int = 1, worker_group=None) -> ParityReport:
    with _one_thread():
        return _run_parity(config, steps=steps, worker_group=worker_group)


def _run_parity(config: Config, *, steps: int, worker_group) -> ParityReport:
    reference = ReferenceTrainer(reference_config(config), reduction_tree=reduction_tree(config))
    driver = Driver(config, worker_group=worker_group).start()
    try:
        losses, losses_ref = [], []
        first: dict = {}
        for i in range(steps):
            tokens_BL = reference.batches.next_batch()
            if i == 0:
                first = _first_step(config, reference, driver, tokens_BL)
                record, record_ref = first["record"], first["record_ref"]
            else:
                record = driver.step(tokens_BL).record
                record_ref = reference.step(tokens_BL)
            losses.append(record["total_loss"])
            losses_ref.append(record_ref["total_loss"])
        final = _merge_copies(driver.worker_group.execute(Worker.parameters, driver.key))
    finally:
        driver.finish()
    ref_params = dict(reference.model.named_parameters())
    p = config.parallel
    return ParityReport(
        schedule=config.schedule.name, pp=p.pp, dp=p.dp, ep=p.ep, zero_stage=p.zero_stage,
        num_microbatches=config.schedule.num_microbatches, steps=steps,
        loss=losses[0], loss_ref=losses_ref[0], loss_abs_diff=abs(losses[0] - losses_ref[0]),
        loss_rel_diff=abs(losses[0] - losses_ref[0]) / abs(losses_ref[0]),
        max_rel_grad_diff=first["grad"][0], worst_grad=first["grad"][1],
        max_rel_update_diff=first["update"][0], worst_update=first["update"][1],
        max_rel_update_diff_same_grads=first["update_same_grads"][0],
        worst_update_same_grads=first["update_same_grads"][1],
        grad_norm_rel_diff=abs(first["record"]["grad_norm"] - first["record_ref"]["grad_norm"])
        / first["record_ref"]["grad_norm"],
        max_rel_param_diff_final=_max_over_copies(final, ref_params),
        max_loss_rel_diff_trajectory=max(abs(a - b) / abs(b) for a, b in zip(losses, losses_ref)),
        losses=losses, losses_ref=losses_ref,
        optimizer_state_bytes_per_rank=first["optimizer_state_bytes"],
        gradient_bytes_per_rank=first["gradient_bytes"],
    )


def _first_step(config: Config, reference: ReferenceTrainer, driver: Driver, tokens_BL: torch.Tensor) -> dict:
    # The reference gradient before clipping, from a copy (ReferenceTrainer.step clips in place).
    probe = copy.deepcopy(reference.model)
    probe.set_routing_biases(reference.routing_bias_RE)
    with compute_context(config, reference.device):  # bf16 autocast when the layout computes in bf16
        accumulate_gradients(
            probe,
            tokens_BL,
            reference.config.schedule.num_microbatches,
            config.mtp.weight_at(0),
            reduction_tree=reference.reduction_tree,
        )
    grads_ref = {n: p.grad for n, p in probe.named_parameters()}
    before_ref = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    optimizer_before = copy.deepcopy(reference.model)

    report = driver.step(tokens_BL, capture=True)
    record_ref = reference.step(tokens_BL)
    updates_ref = {n: p.detach() - before_ref[n] for n, p in reference.model.named_parameters()}

    grad_diffs, update_diffs = [], []
    for result in report.results:
        for name, grad in result.grads.items():
            grad_diffs.append((rel_diff(grad, grads_ref[name]), f"rank {result.rank} {name}"))
            update = result.params_after[name] - result.params_before[name]
            update_diffs.append((rel_diff(update, updates_ref[name]), f"rank {result.rank} {name}"))
    return {
        "record": report.record,
        "record_ref": record_ref,
        "grad": max(grad_diffs),
        "update": max(update_diffs),
        "update_same_grads": _update_from_distributed_grads(config, optimizer_before, report.results, record_ref),
        "optimizer_state_bytes": [r.optimizer_state_bytes for r in report.results],
        "gradient_bytes": [r.optimizer_grad_bytes for r in report.results],
    }


def _update_from_distributed_grads(config: Config, model, results: list[StepResult], record_ref: dict):
    """Clip the distributed gradients by the workers' global norm and apply torch AdamW; compare with the update
    the workers made. Returns (worst relative difference, where)."""
    grad_norm = results[0].grad_norm
    grads = {}
    for result in results:
        for name, grad in result.grads.items():
            grads.setdefault(name, grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    optimizer = make_adamw(model.named_parameters(), config.optim)
    set_lr(optimizer, record_ref["lr"])
    if config.optim.grad_clip > 0:  # the shared clipping factor, from the norm the workers computed
        coef = clip_coefficient(torch.tensor(grad_norm, dtype=torch.float64), config.optim.grad_clip)
        for p in model.parameters():
            p.grad.mul_(coef.to(p.grad.dtype))
    optimizer.step()
    expected = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    worst = (0.0, "")
    for result in results:
        for name in result.grads:
            update = result.params_after[name] - result.params_before[name]
            worst = max(worst, (rel_diff(update, expected[name]), f"rank {result.rank} {name}"))
    return worst


def _merge_copies(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    merged: dict[str, list[torch.Tensor]] = {}
    for params in per_rank:
        for name, tensor in params.items():
            merged.setdefault(name, []).append(tensor)
    return merged


def _max_over_copies(copies: dict[str, list[torch.Tensor]], ref_params) -> float:
    missing = sorted(set(ref_params) - set(copies))
    if missing:
        raise RuntimeError(f"no worker holds parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return max(rel_diff(t, ref_params[n].detach()) for n, ts in copies.items() for t in ts)
