"""Which layers each pipeline chunk holds, and the module a pipeline rank keeps of the full model.

Legend: B micro-batch, L = T + 1 + D tokens per sample, T positions, D model dim.

The model is cut into ``num_chunks`` contiguous *chunks* of transformer layers (``pp`` for GPipe/1F1B/ZB1P and
for each of DualPipe's two copies, ``2 * pp`` for DualPipeV). Chunk 0 also runs the embedding; the last chunk
also runs the final norm, the output head and the MTP modules, which read the embedding again: the last chunk
therefore holds the embedding too. Where the first and last chunks live on the same rank (pp = 1, DualPipe's
rank 0 and pp-1, DualPipeV's rank 0) they share one embedding module; elsewhere the last rank holds a tied copy
whose gradient the runtime sums with the first rank's (the "embedding group", as in Megatron).

A worker builds the model's *shapes* on ``meta`` (with only its own routed experts), keeps the chunks its rank
holds (``PipelineStage`` takes the very modules, so its parameter names -- ``layers.3.attn.wo.weight``,
``embed.weight``, ``layers.4.ffn.experts.9.w1.weight`` -- are the reference's), and materialises just those
(``build_stage``): every parameter is initialised from its own name-seeded stream (``raymoe.model.build``), so the
stage starts bit-identical to the same tensors of the single-process reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from raymoe.config import Config
from raymoe.model import RouterStats, Transformer, output_losses
from raymoe.model.build import convert_for_precision, materialize
from raymoe.model.moe import Gate, MoE
from raymoe.schedule.layout_rules import layer_counts


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    num_layers: int
    chunk_layers: tuple[tuple[int, int], ...]
    """[start, end) layer range of each chunk."""

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_layers)

    @property
    def last_chunk(self) -> int:
        return self.num_chunks - 1

    def layers_of(self, chunk: int) -> range:
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk {chunk} out of range: the plan has chunks 0..{self.num_chunks - 1}")
        return range(*self.chunk_layers[chunk])

    def counts(self) -> list[int]:
        return [end - start for start, end in self.chunk_layers]


def plan_stages(num_layers: int, num_chunks: int, stage_layers: Sequence[int] = ()) -> StagePlan:
    """Cut ``num_layers`` into ``num_chunks`` chunks: ``stage_layers`` if given, else as even as possible
    (``raymoe.schedule.layout_rules.layer_counts``, the rule the config and the planner apply too)."""
    ranges, start = [], 0
    for n in layer_counts(num_layers, num_chunks, stage_layers):
        ranges.append((start, start + n))
        start += n
    return StagePlan(num_layers=num_layers, chunk_layers=tuple(ranges))


@dataclass
class ChunkOutput:
    """What one chunk's forward on one micro-batch produced."""

    hidden_BTD: torch.Tensor | None
    """Output activations for the next chunk; None for the last chunk."""
    objective: torch.Tensor
    """The differentiable scalar this chunk adds to the loss: its MoE balance losses, plus, on the last chunk,
    main CE + mtp_weight * MTP CE. Backpropagated with weight 1/num_microbatches."""
    balance: torch.Tensor
    """Detached sum of the balance losses computed here (MoE layers, and MTP blocks on the last chunk)."""
    main_ce: torch.Tensor | None = None
    mtp_ce: torch.Tensor | None = None
    router_stats: list[RouterStats] = field(default_factory=list)


class PipelineStage(nn.Module):
    """The chunks of the model one pipeline rank holds (one, or two for DualPipe/DualPipeV), as one module."""

    def __init__(self, model: Transformer, plan: StagePlan, chunks: Iterable[int]) -> None:
        super().__init__()
        self.plan = plan
        self.chunks = tuple(sorted(set(chunks)))
        if not self.chunks:
            raise ValueError("a PipelineStage needs at least one chunk")
        self.mtp_depth = model.mtp_depth
        self.layers = nn.ModuleDict(
            {str(i): model.layers[i] for chunk in self.chunks for i in plan.layers_of(chunk)}
        )
        self.holds_first = 0 in self.chunks
        self.holds_last = plan.last_chunk in self.chunks
        if self.holds_first or (self.holds_last and self.mtp_depth > 0):
            self.embed = model.embed
        if self.holds_last:
            self.norm = model.norm
            self.head = model.head
            self.mtp = model.mtp
        self.rope = model.rope
        self.forward_listener: Callable[[int], None] | None = None
        """Told the chunk before each chunk forward: the weight-gradient store uses it to know which forward runs
        (``raymoe.parallel.weight_grad``)."""

    def forward_chunk(
        self, chunk: int, x_BTD: torch.Tensor | None, tokens_BL: torch.Tensor | None, mtp_weight: float
    ) -> ChunkOutput:
        """Run chunk ``chunk``: from tokens (chunk 0) or the previous chunk's activations ``x_BTD``."""
        if chunk not in self.chunks:
            raise ValueError(f"chunk {chunk} is not held here (this stage holds chunks {list(self.chunks)})")
        if self.forward_listener is not None:
            self.forward_listener(chunk)
        if chunk == 0:
            h_BTD = self.embed(tokens_BL[:, : tokens_BL.shape[1] - 1 - self.mtp_depth])
        else:
            h_BTD = x_BTD
        rope = self.rope.tables(h_BTD.shape[1], h_BTD.device)
        stats: list[RouterStats] = []
        for i in self.plan.layers_of(chunk):
            h_BTD, layer_stats = self.layers[str(i)](h_BTD, rope)
            if layer_stats is not None:
                stats.append(layer_stats)
        balance = sum((s.balance_loss for s in stats), h_BTD.new_zeros(()))
        if chunk != self.plan.last_chunk:
            return ChunkOutput(hidden_BTD=h_BTD, objective=balance, balance=balance.detach(), router_stats=stats)
        main_ce, mtp_ce, loss, mtp_stats = output_losses(self, h_BTD, tokens_BL, mtp_weight)
        mtp_balance = sum((s.balance_loss for s in mtp_stats), h_BTD.new_zeros(()))
        return ChunkOutput(
            hidden_BTD=None,
            objective=loss + balance,
            balance=(balance + mtp_balance).detach(),
            main_ce=main_ce.detach(),
            mtp_ce=mtp_ce.detach(),
            router_stats=stats + mtp_stats,
        )

    def gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


def build_stage(config: Config, plan: StagePlan, chunks: Iterable[int], *, device: str | torch.device = "cpu",
                expert_ids: Sequence[int] | None = None) -> PipelineStage:
    """The stage of ``chunks`` with routed experts ``expert_ids`` (default all), materialised on ``device`` and
    nothing else: the rest of the model exists only as ``meta`` shapes and is dropped."""
    with torch.device("meta"):
        model = Transformer(config.model, config.routing, config.mtp, expert_ids=expert_ids)
    stage = PipelineStage(model, plan, chunks)
    if torch.device(device).type != "meta":
        materialize(stage, device=device, std=config.model.init_std, run_seed=config.run.seed)
    return convert_for_precision(stage, config)


@dataclass(frozen=True, kw_only=True)
class GradSync:
    """How a rank's gradients combine with other pipeline ranks' before the optimizer step.

    ``embedding``: parameter names whose gradient is summed over the embedding group (the first rank's input
    embedding and the last rank's tied copy for MTP). ``mirror``: names summed over the mirror group (DualPipe's
    rank p and pp-1-p hold the same chunks). ``not_in_norm``: replicas another rank already counts in the global
    gradient norm, so that every logical parameter is counted once.
    """

    embedding: tuple[str, ...] = ()
    mirror: tuple[str, ...] = ()
    not_in_norm: frozenset[str] = frozenset()


def grad_sync_plan(family: str, pp: int, pipeline_rank: int, stage: PipelineStage) -> GradSync:
    """The ``GradSync`` of pipeline rank ``pipeline_rank`` under a placement family (see ``raymoe.schedule``)."""
    names = tuple(name for name, p in stage.named_parameters() if p.requires_grad)
    if pp == 1:
        return GradSync()
    if family == "dualpipe":
        # Rank p holds chunks p (copy 0) and pp-1-p (copy 1), its mirror the same two: the whole rank is a replica.
        return GradSync(mirror=names, not_in_norm=frozenset(names) if pipeline_rank >= pp // 2 else frozenset())
    if family == "one-per-rank" and stage.mtp_depth > 0 and (stage.holds_first or stage.holds_last):
        # Without MTP the last rank needs no embedding and there is nothing to tie.
        tied = ("embed.weight",)
        return GradSync(embedding=tied, not_in_norm=frozenset(tied) if not stage.holds_first else frozenset())
    return GradSync()
