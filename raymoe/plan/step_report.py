"""``StepPlan`` as JSON-able values and as the text ``raymoe plan --gpu`` prints: every figure, every assumption."""

from __future__ import annotations

from raymoe.plan.assumptions import ASSUMPTION_SOURCES
from raymoe.plan.step import StepPlan


def step_report(plan: StepPlan, *, tokens: float | None = None) -> dict[str, object]:
    sim = plan.sim
    peak = plan.peak_memory
    out: dict[str, object] = {
        "device": plan.device.as_dict(),
        "assumptions": {k: {"value": v, "source": ASSUMPTION_SOURCES.get(k, "")}
                        for k, v in plan.assume.as_dict().items()},
        "num_devices": plan.num_devices,
        "num_microbatches": plan.num_microbatches,
        "tokens_per_microbatch": plan.tokens_per_microbatch,
        "tokens_per_step": plan.tokens_per_step,
        "destinations_per_token": plan.destinations.as_dict(),
        "all_to_all_per_moe_layer_microbatch": plan.a2a.as_dict(),
        "a2a_overlap": ("hidden inside F&B pairs (FB = max(compute / (1 - comm_sm_fraction), all-to-all)); "
                        "exposed in lone F/B/I" if any(k == "FB" for k, _ in plan.costs.per_chunk)
                        else "exposed in every F/B/I")
        + (" less the shared expert's compute" if plan.assume.overlap_shared_expert else ""),
        "p2p_bytes": plan.p2p_bytes,
        "p2p_s": plan.p2p_s,
        "chunks": [c.as_dict() for c in plan.chunks],
        "simulator_costs": str(plan.costs),
        "makespan_s": sim.makespan,
        "bubble_s": sim.bubble,
        "dp_reduction": plan.reduction.as_dict(),
        "dp_reduction_exposed_s": plan.dp_exposed_s,
        "optimizer_s": plan.optimizer_s,
        "step_s": plan.step_s,
        "breakdown_s": plan.breakdown,
        "tokens_per_s": plan.tokens_per_s,
        "tokens_per_s_per_device": plan.tokens_per_s / plan.num_devices,
        "model_flops_per_step": plan.model_flops_per_step,
        "mfu": plan.mfu,
        "gpu_hours_per_trillion_tokens": plan.gpu_hours(1e12),
        "memory": {
            "ranks": [r.as_dict() for r in plan.rank_memory],
            "peak": peak.as_dict(),
            "usable_bytes": plan.usable_bytes,
            "fits": plan.fits,
            "fits_without_recompute": peak.state_bytes + peak.activation_bytes_no_recompute <= plan.usable_bytes,
        },
    }
    if tokens is not None:
        out["tokens"] = tokens
        out["gpu_hours"] = plan.gpu_hours(tokens)
        out["wall_hours"] = plan.wall_hours(tokens)
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def format_step(plan: StepPlan, *, tokens: float | None = None) -> str:
    d, lay, sim, b = plan.device, plan.layout, plan.sim, plan.breakdown
    dest, a2a = plan.destinations, plan.a2a
    rows = [
        f"step model on {plan.num_devices} x {d.name}: {lay.schedule} pp={lay.pp} ep={lay.ep} dp={lay.dp} "
        f"zero={lay.zero_stage}, {plan.num_microbatches} micro-batches of {plan.tokens_per_microbatch} tokens "
        f"per pipeline, {plan.tokens_per_step:,} tokens per step",
        f"device {d.name}: bf16 {d.bf16_tflops:g} / fp8 {d.fp8_tflops:g} / attention {d.attention_tflops:g} "
        f"TFLOP/s (MFU peak {d.peak_bf16_tflops:g}), {d.memory_gb:g} GB, HBM {d.hbm_gbps:g} GB/s, "
        f"intra-node {d.intra_node_gbps:g} GB/s, inter-node {d.inter_node_gbps:g} GB/s, {d.devices_per_node} per node",
        f"  source: {d.source}",
        "assumptions (--assume NAME=VALUE; device.FIELD=VALUE for the device):",
    ]
    rows += [f"  {k} = {v}   [{ASSUMPTION_SOURCES.get(k, '')}]" for k, v in plan.assume.as_dict().items()]
    rows += [
        f"all-to-all: a token reaches {dest.ranks:.2f} ranks on {dest.nodes:.2f} nodes (remote: "
        f"{dest.remote_ranks:.2f} ranks, {dest.remote_nodes:.2f} nodes); per MoE layer and micro-batch "
        f"{_gb(a2a.ib_bytes)} IB + {_gb(a2a.nvlink_bytes)} NVLink per rank each way = "
        f"{a2a.seconds * 1e3:.2f} ms forward, same backward",
        f"  overlap: {step_report(plan)['a2a_overlap']}",
        f"pipeline send {_gb(plan.p2p_bytes)} in {plan.p2p_s * 1e3:.2f} ms per micro-batch and stage boundary, "
        "each way",
        f"{'chunk':>5} {'layers':>7} {'F ms':>8} {'B ms':>8} {'W ms':>8} {'a2a F ms':>9} {'act/mb':>10} "
        f"{'no recompute':>13}",
    ]
    for c in plan.chunks:
        layers = f"{min(c.layers)}-{max(c.layers)}" if c.layers else "-"
        rows.append(f"{c.chunk:>5} {layers:>7} {c.f * 1e3:>8.2f} {c.b * 1e3:>8.2f} {c.w * 1e3:>8.2f} "
                    f"{c.a2a_f * 1e3:>9.2f} {_gb(c.act_bytes):>10} {_gb(c.act_bytes_no_recompute):>13}")
    rows += [
        f"simulated pipeline makespan {sim.makespan:.3f} s (largest bubble {sim.bubble:.3f} s); + data-parallel "
        f"reduction {plan.dp_exposed_s:.3f} s exposed + optimizer {plan.optimizer_s:.3f} s = step {plan.step_s:.3f} s",
        f"breakdown of the busiest rank ({b['rank']}): compute {b['compute']:.3f} s, exposed all-to-all "
        f"{b['a2a_exposed']:.3f} s, SMs lent to overlapped communication {b['comm_sm_share']:.3f} s, bubble "
        f"{b['bubble']:.3f} s, dp reduction {b['dp_reduction_exposed']:.3f} s, optimizer {b['optimizer']:.3f} s",
        f"throughput {plan.tokens_per_s:,.0f} tokens/s ({plan.tokens_per_s / plan.num_devices:,.0f} per device), "
        f"MFU {plan.mfu:.1%} of {d.peak_bf16_tflops:g} TFLOP/s BF16 peak, "
        f"{plan.gpu_hours(1e12):,.0f} GPU-hours per trillion tokens",
    ]
    if tokens is not None:
        rows.append(f"{tokens:.4g} tokens: {plan.gpu_hours(tokens):,.0f} GPU-hours, {plan.wall_hours(tokens):,.1f} "
                    f"hours ({plan.wall_hours(tokens) / 24:,.1f} days) on {plan.num_devices} devices")
    peak = plan.peak_memory
    rows.append(f"memory per device (state + peak live activations; usable {_gb(plan.usable_bytes)}):")
    rows.append(f"{'pp rank':>7} {'live mb':>7} {'state':>10} {'act':>10} {'total':>10} {'act no-rc':>10} "
                f"{'total no-rc':>12}")
    for r in plan.rank_memory:
        mark = "  <- peak" if r is peak else ""
        rows.append(f"{r.pp_rank:>7} {r.peak_live_microbatches:>7} {_gb(r.state_bytes):>10} "
                    f"{_gb(r.activation_bytes):>10} {_gb(r.total_bytes):>10} "
                    f"{_gb(r.activation_bytes_no_recompute):>10} "
                    f"{_gb(r.state_bytes + r.activation_bytes_no_recompute):>12}{mark}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    rows.append(f"{verdict}: peak {_gb(peak.total_bytes)} vs {_gb(plan.usable_bytes)} usable of "
                f"{d.memory_gb:g} GB ({'with' if plan.assume.recompute else 'without'} recomputation)")
    return "\n".join(rows)
