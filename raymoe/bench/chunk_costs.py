"""Standalone costs of pipeline chunks, the simulated ideal they imply, and the stage balance the simulator picks.

A pipeline's *ideal* step is what the schedule reaches when every action costs what it costs alone, on its own
core, with no communication: the simulator run on costs measured here, one chunk at a time in this process
(one thread, like a worker), not on costs fitted to the pipeline's own timings (those already carry its
slowdowns). Per chunk: F, B, and the split I + W (``raymoe.parallel.weight_grad``), medians of a few repeats on
one micro-batch.

Stage balance: DualPipeV's last chunk carries the output head and the MTP modules, so an even layer split leaves
the V's two ends uneven. ``best_stage_layers`` measures every *layer* alone once (chunk 0 with the embedding,
the last with head and MTP), prices every split of the layers into the schedule's chunks as sums of layer costs,
and lets the simulator pick the split with the shortest makespan.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

from raymoe.bench.timing import paired_ratios
from raymoe.schedule import Costs, Kind, Schedule, simulate

KINDS = ("F", "B", "I", "W")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_chunks(config, num_chunks: int, stage_layers, tokens_BL: torch.Tensor, *, mtp_weight: float,
                   repeats: int = 5, between: Callable[[], object] | None = None) -> dict[tuple[str, int], float]:
    """(kind, chunk) -> median seconds of F, B, I and W of each chunk of the cut ``stage_layers`` (() = even).
    ``between`` runs before each repeat: the benchmark runs a whole-model pass there, so that each chunk is timed
    with what a pipeline leaves in the caches (other chunks ran in between), not with its own previous repeat."""
    from raymoe.model import build_model
    from raymoe.parallel.stage_plan import PipelineStage, plan_stages
    from raymoe.parallel.weight_grad import WeightGradStore, defer_weight_grads

    plan = plan_stages(config.model.num_layers, num_chunks, stage_layers)
    stage = PipelineStage(build_model(config), plan, range(num_chunks))
    store = WeightGradStore()
    defer_weight_grads(stage, store)
    x_BTD = torch.randn(tokens_BL.shape[0], config.data.seq_len, config.model.dim)
    grad_BTD = torch.randn_like(x_BTD) * 1e-3
    costs: dict[tuple[str, int], float] = {}
    for chunk in range(num_chunks):
        holder: dict = {}

        def forward(split: bool, chunk=chunk, holder=holder) -> None:
            store.force(split)  # this function says itself which forwards defer (the cheap hooked path)
            x = None if chunk == 0 else x_BTD.clone().requires_grad_()
            out = stage.forward_chunk(chunk, x, tokens_BL, mtp_weight)
            pairs = [(out.objective, torch.ones(())), (out.hidden_BTD, grad_BTD)]
            pairs = [(t, g) for t, g in pairs if t is not None and t.requires_grad]  # a dense chunk: no balance loss
            holder["saved"] = ([t for t, _ in pairs], [g for _, g in pairs])

        def backward(holder=holder) -> None:
            torch.autograd.backward(*holder.pop("saved"))

        def split_backward(chunk=chunk, holder=holder) -> None:
            with store.capture((chunk, 0)):
                backward()

        forward(False)
        backward()  # warm-up
        samples = {kind: [] for kind in KINDS}
        for _ in range(repeats):
            if between is not None:
                between()
            samples["F"].append(_timed(lambda: forward(False)))
            samples["B"].append(_timed(backward))
            forward(True)
            samples["I"].append(_timed(split_backward))
            samples["W"].append(_timed(lambda chunk=chunk: store.flush((chunk, 0))))
        for kind, values in samples.items():
            costs[kind, chunk] = statistics.median(values)
    return costs


def schedule_costs(schedule: Schedule, per_chunk: dict[tuple[str, int], float]) -> Costs:
    """``Costs`` for ``schedule`` from per-(kind, chunk) costs: an FB costs its forward's F plus its backward's
    B (no overlap gain on a CPU), keyed by its forward's chunk; per-kind defaults are the means; P2P 0."""
    placement = schedule.placement
    fb = {}
    for actions in schedule.actions.values():
        for a in actions:
            if a.kind is Kind.FB:
                forward, backward = a.parts()
                chunk, back_chunk = placement.info(forward.stage).chunk, placement.info(backward.stage).chunk
                fb["FB", chunk] = per_chunk["F", chunk] + per_chunk["B", back_chunk]

    def mean(kind: str) -> float:
        return statistics.fmean(v for (k, _), v in per_chunk.items() if k == kind)

    b, w = mean("B"), mean("W")
    return Costs(f=mean("F"), b=b, w=min(w, b), per_chunk={**per_chunk, **fb})


def ideal_makespan(schedule: Schedule, per_chunk: dict[tuple[str, int], float]) -> float:
    return simulate(schedule, schedule_costs(schedule, per_chunk)).makespan


def compositions(total: int, parts: int):
    """Every way to cut ``total`` layers into ``parts`` chunks of at least one layer each."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def chunk_costs_from_layers(per_layer: dict[tuple[str, int], float], counts: tuple[int, ...]):
    """Per-(kind, chunk) costs of the cut ``counts`` as sums of the per-layer costs (layer i = chunk i of the
    one-layer-per-chunk cut, so the embedding stays with the first and head + MTP with the last)."""
    out, start = {}, 0
    for chunk, n in enumerate(counts):
        for kind in KINDS:
            out[kind, chunk] = sum(per_layer[kind, i] for i in range(start, start + n))
        start += n
    return out


def best_stage_layers(schedule: Schedule, per_layer: dict[tuple[str, int], float], num_layers: int) -> dict:
    """The simulator's choice among all cuts of ``num_layers`` into the schedule's chunks (per-layer costs)."""
    from raymoe.schedule.layout_rules import layer_counts

    num_chunks = schedule.placement.num_chunks
    even_counts = tuple(layer_counts(num_layers, num_chunks, ()))
    even = (ideal_makespan(schedule, chunk_costs_from_layers(per_layer, even_counts)), even_counts)
    ranked = sorted((ideal_makespan(schedule, chunk_costs_from_layers(per_layer, counts)), counts)
                    for counts in compositions(num_layers, num_chunks))
    best = ranked[0]
    return {"best_stage_layers": list(best[1]), "best_makespan_s": best[0], "even_stage_layers": list(even[1]),
            "even_makespan_s": even[0], "predicted_gain": 1.0 - best[0] / even[0], "candidates": len(ranked)}


def whole_model_pass(model, tokens_BL: torch.Tensor, num_microbatches: int, mtp_weight: float) -> float:
    """Seconds of the single-process forward+backward of ``tokens_BL`` in ``num_microbatches`` micro-batches
    (``accumulate_gradients``, as the reference trainer runs it), gradients cleared first and outside the time."""
    from raymoe.train import accumulate_gradients

    model.zero_grad(set_to_none=True)
    return _timed(lambda: accumulate_gradients(model, tokens_BL, num_microbatches, mtp_weight))


def in_turn_over_whole(config, num_chunks: int, tokens_BL: torch.Tensor, *, mtp_weight: float, rounds: int,
                       before: Callable[[], object] | None = None) -> list[float]:
    """Per round: the model cut into ``num_chunks`` chunks, run in one process on each of the config's micro-batches
    of ``tokens_BL`` in turn (its chunks' forwards, then their backwards, activations handed on detached as between
    ranks), over the whole model on the same micro-batches (``whole_model_pass``), timed right before or after it
    (the order alternates by round). The same weights serve both, so this is what cutting alone costs with warm
    caches: ``measure_chunks`` times each chunk cold."""
    from raymoe.model import build_model
    from raymoe.parallel.stage_plan import PipelineStage, plan_stages

    model = build_model(config)
    stage = PipelineStage(model, plan_stages(config.model.num_layers, num_chunks, ()), range(num_chunks))
    m = config.schedule.num_microbatches
    scale = 1.0 / m

    def chunked() -> None:
        model.zero_grad(set_to_none=True)
        for micro_BL in tokens_BL.chunk(m):
            saved, x = [], None
            for chunk in range(num_chunks):
                out = stage.forward_chunk(chunk, x, micro_BL, mtp_weight)
                saved.append((x, out))
                x = None if out.hidden_BTD is None else out.hidden_BTD.detach().requires_grad_()
            grad_BTD = None
            for x_in, out in reversed(saved):
                pairs = [(out.objective * scale, torch.ones(())), (out.hidden_BTD, grad_BTD)]
                pairs = [(t, g) for t, g in pairs if t is not None and t.requires_grad]
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                grad_BTD = None if x_in is None else x_in.grad

    def whole() -> float:
        return whole_model_pass(model, tokens_BL, m, mtp_weight)

    whole()
    chunked()  # warm-up
    return paired_ratios(lambda: _timed(chunked), whole, rounds=rounds, before=before)
