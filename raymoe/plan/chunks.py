"""Seconds and bytes of one model chunk (a pipeline stage's layers) on one micro-batch, split by what they are.

A chunk is what one stage computes: chunk ``c`` of ``raymoe.plan.split_layers`` (the simulator's
``StageInfo.chunk``). Chunk 0 also looks up the embedding; the last chunk also runs the final norm, the output
head with its loss and the MTP modules (each an input projection, one MoE block and the shared head).

For every chunk we keep compute and communication apart, so the schedule can hide the all-to-all where it does
(``raymoe.plan.step``):

  * ``f``, ``b``, ``w``: compute seconds of the forward, the full backward, and the weight-gradient half of the
    backward (zero-bubble W), from ``raymoe.plan.flops`` at the device's throughput per precision;
  * ``a2a_f``, ``a2a_b``: the expert all-to-all of all its MoE layers, forward and backward;
  * ``shared_f``, ``shared_b``: the shared experts' compute, which can hide part of the all-to-all;
  * ``act_bytes``: activation bytes kept from F until B, per micro-batch, with and without recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import Config
from raymoe.plan.activations import (
    attention_saved,
    ffn_saved,
    head_saved,
    mtp_input_saved,
    saved_bytes,
)
from raymoe.plan.assumptions import Assumptions
from raymoe.plan.comm import AllToAll
from raymoe.plan.devices import DeviceSpec
from raymoe.plan.flops import BlockWork, attention_block, ffn_block, head_block, mtp_input_block


@dataclass(frozen=True, kw_only=True)
class ChunkCost:
    chunk: int
    layers: tuple[int, ...]
    moe_layers: int
    """MoE layers in the chunk, MTP blocks included: each one all-to-all forward and one backward."""
    f: float
    b: float
    w: float
    a2a_f: float
    a2a_b: float
    shared_f: float
    shared_b: float
    fwd_flops: float
    """Model FLOPs of the forward on one micro-batch (no recomputation): the MFU numerator's share."""
    act_bytes: float
    """Activation bytes per micro-batch with the assumed recomputation."""
    act_bytes_no_recompute: float
    act_bytes_recompute: float

    def as_dict(self) -> dict[str, object]:
        return {"chunk": self.chunk, "layers": [min(self.layers), max(self.layers)] if self.layers else [],
                "moe_layers": self.moe_layers, "f_s": self.f, "b_s": self.b, "w_s": self.w,
                "a2a_f_s": self.a2a_f, "a2a_b_s": self.a2a_b, "shared_f_s": self.shared_f,
                "shared_b_s": self.shared_b, "fwd_flops": self.fwd_flops, "act_bytes": self.act_bytes,
                "act_bytes_no_recompute": self.act_bytes_no_recompute,
                "act_bytes_recompute": self.act_bytes_recompute}


@dataclass(frozen=True, kw_only=True)
class _Seconds:
    f: float = 0.0
    b: float = 0.0
    w: float = 0.0

    def __add__(self, other: _Seconds) -> _Seconds:
        return _Seconds(f=self.f + other.f, b=self.b + other.b, w=self.w + other.w)


def block_seconds(work: BlockWork, *, tokens: int, device: DeviceSpec, assume: Assumptions, fp8: bool,
                  recomputed_bytes: float) -> _Seconds:
    """F, B and W seconds of ``work`` on ``tokens`` tokens (conventions: ``raymoe.plan.flops``)."""
    f = b = w = 0.0
    for g in work.gemms:
        in_fp8 = fp8 and g.fp8
        eff = assume.grouped_gemm_efficiency if g.grouped else assume.dense_gemm_efficiency
        once = tokens * g.flops / (device.gemm_tflops("fp8" if in_fp8 else "bf16") * 1e12 * eff)
        f += once
        b += 2 * once + (once if assume.recompute and g.recomputed else 0.0)
        w += once
        if in_fp8:  # quantize the activation operand forward, the gradient twice and the input again backward
            rows = tokens * g.rows_per_token
            f += rows * g.k * assume.fp8_quantize_s_per_element
            b += rows * (2 * g.n + g.k) * assume.fp8_quantize_s_per_element
    core = tokens * work.attention_flops / (device.attention_tflops * 1e12)
    hbm = device.hbm_gbps * 1e9 * assume.hbm_efficiency
    moved = tokens * work.elementwise_bytes / hbm
    # Recomputing reads what was kept and writes the dropped tensor again.
    redo = 2 * tokens * recomputed_bytes / hbm if assume.recompute else 0.0
    return _Seconds(f=f + core + moved, b=b + 2.5 * core + 2 * moved + redo, w=w)


@dataclass(frozen=True, kw_only=True)
class _Part:
    """One block of a chunk (a layer, the head, an MTP input) per token, ready to be summed."""

    seconds: _Seconds
    shared: _Seconds
    """The shared experts' share of ``seconds`` (it can hide an all-to-all)."""
    flops: float
    saved: float
    """Activation bytes per token without recomputation."""
    saved_recompute: float


def chunk_costs(cfg: Config, *, layer_ranges: tuple[range, ...], tokens: int, device: DeviceSpec,
                assume: Assumptions, a2a: AllToAll) -> tuple[ChunkCost, ...]:
    """Costs of every chunk of ``layer_ranges`` for a micro-batch of ``tokens`` tokens per rank."""
    m = cfg.model
    act = 2 if cfg.precision.dtype == "bf16" else 4
    fp8, top_k = cfg.precision.fp8, cfg.routing.top_k

    def seconds(work: BlockWork, dropped_bytes: float = 0.0) -> _Seconds:
        return block_seconds(work, tokens=tokens, device=device, assume=assume, fp8=fp8,
                             recomputed_bytes=dropped_bytes)

    def part(works: list[BlockWork], saved: list, shared: _Seconds | None = None) -> _Part:
        full = saved_bytes(saved, act_bytes=act, fp8=fp8, recompute=False)
        kept = saved_bytes(saved, act_bytes=act, fp8=fp8, recompute=True)
        # The recomputed bytes are charged once, with the first block (they are a per-part total).
        secs = sum((seconds(w, full - kept if i == 0 else 0.0) for i, w in enumerate(works)), _Seconds())
        return _Part(seconds=secs, shared=shared or _Seconds(), flops=sum(w.flops for w in works), saved=full,
                     saved_recompute=kept)

    attn = attention_block(m, seq_len=cfg.data.seq_len, act_bytes=act)

    def layer(moe: bool) -> _Part:
        ffn = ffn_block(m, moe=moe, top_k=top_k, act_bytes=act)
        saved = attention_saved(m) + ffn_saved(m, moe=moe, top_k=top_k,
                                               gate_weight_in_expert=assume.gate_weight_in_expert)
        shared = seconds(BlockWork(gemms=tuple(g for g in ffn.gemms if g.name.startswith("shared"))))
        return part([attn, ffn], saved, shared)

    dense_layer, moe_layer = layer(False), layer(True)
    head = part([head_block(m, act_bytes=act)], head_saved(m, keep_logits=assume.keep_logits))
    mtp_input = part([mtp_input_block(m, act_bytes=act)], mtp_input_saved(m))
    last = len(layer_ranges) - 1
    out = []
    for c, ids in enumerate(layer_ranges):
        parts = [moe_layer if m.is_moe_layer(i) else dense_layer for i in ids]
        moe_count = sum(1 for i in ids if m.is_moe_layer(i))
        if c == last:  # the head, then each MTP module: input projection, one MoE block, the shared head
            parts += [head] + [mtp_input, moe_layer, head] * cfg.mtp.depth
            moe_count += cfg.mtp.depth
        secs = sum((p.seconds for p in parts), _Seconds())
        shared = sum((p.shared for p in parts), _Seconds())
        full, kept = sum(p.saved for p in parts) * tokens, sum(p.saved_recompute for p in parts) * tokens
        out.append(ChunkCost(
            chunk=c, layers=tuple(ids), moe_layers=moe_count, f=secs.f, b=secs.b, w=secs.w,
            a2a_f=moe_count * a2a.seconds, a2a_b=moe_count * a2a.seconds, shared_f=shared.f, shared_b=shared.b,
            fwd_flops=sum(p.flops for p in parts) * tokens, act_bytes=kept if assume.recompute else full,
            act_bytes_no_recompute=full, act_bytes_recompute=kept))
    return tuple(out)
