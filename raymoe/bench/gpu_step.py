"""One training step of a ``16b``-shaped slice on one device: tokens/s and model TFLOP/s against the GEMM ceiling.

The slice is the ``16b`` preset cut to its first layers (``GpuBenchShapes.step_overrides``): full width, full
vocabulary, real routing through the sigmoid gate, no MTP module. A step is what the single-process trainer does:
forward under BF16 autocast (FP32 master weights), backward, AdamW, zero the gradients. Three arms, each on a fresh
model from the same seed:

    bf16              routed experts as BF16 grouped GEMMs (``MoE.expert_backend = "auto"`` on CUDA)
    fp8               attention, dense-FFN and shared-expert linears as ``Fp8Linear`` (block-scaled
                      ``_scaled_mm``, fused quantization); routed experts still BF16 grouped GEMMs, because torch
                      has no block-scaled grouped FP8 GEMM
    bf16_expert_loop  routed experts one after another (``MoE.expert_backend = "loop"``)

Until ``raymoe/model/moe.py`` calls the grouped path itself, the grouped arms swap it in for the duration of the
arm (``routed_experts``), and put the original back afterwards.

Model FLOPs per token (the "model TFLOP/s" convention, recomputation not counted): 6 x the active parameters
(``raymoe.plan.count_params``, less the embedding row, which is a lookup), plus causal attention's score and value
products, 3 x layers x heads x (qk_head_dim + v_head_dim) x seq_len.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ARMS = ("bf16", "fp8", "bf16_expert_loop")


@contextmanager
def routed_experts(kind: str, model: torch.nn.Module) -> Iterator[None]:
    """``grouped``: the MoE layers of ``model`` run their routed experts as grouped GEMMs where the kernel applies
    (``MoE.expert_backend = "auto"``: BF16 on CUDA); ``loop``: one expert after another."""
    from raymoe.model.moe import MoE

    if kind not in ("grouped", "loop"):
        raise ValueError(f"routed experts must be 'grouped' or 'loop', got {kind!r}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.expert_backend for m in layers]
    for m in layers:
        m.expert_backend = "auto" if kind == "grouped" else "loop"
    try:
        yield
    finally:
        for m, backend in zip(layers, saved):
            m.expert_backend = backend


def model_flops_per_token(model_cfg, top_k: int, seq_len: int) -> int:
    from raymoe.plan import count_params

    active = count_params(model_cfg, top_k=top_k, mtp_depth=0).active - model_cfg.dim
    heads, layers = model_cfg.num_heads, model_cfg.num_layers
    attention = 3 * layers * heads * (model_cfg.qk_head_dim + model_cfg.v_head_dim) * seq_len
    return 6 * active + attention


def step_config(shapes, device: torch.device, arm: str):
    from raymoe.config import load_config

    dtype = "bf16" if device.type == "cuda" else "fp32"  # the CPU has no BF16 units
    overrides = [
        *shapes.step_overrides,
        f"precision.dtype={dtype}",
        f"precision.fp8={'true' if arm == 'fp8' else 'false'}",
        f"parallel.device={device.type}",
        f"data.seq_len={shapes.step_seq_len}",
    ]
    return load_config(shapes.step_preset, overrides)


def bench_arm(shapes, device: torch.device, timer, arm: str) -> dict:
    from raymoe.model import build_model
    from raymoe.model.build import compute_context
    from raymoe.train.optim import make_adamw

    config = step_config(shapes, device, arm)
    model = build_model(config, device=device, seed=0)
    optimizer = make_adamw(model.named_parameters(), config.optim)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (shapes.step_batch, shapes.step_seq_len + 1)
    tokens = torch.randint(0, config.model.vocab_size, shape, generator=generator).to(device)
    losses: list[float] = []

    def step():
        with compute_context(config, device):
            out = model(tokens)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.main_loss)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with routed_experts("loop" if arm == "bf16_expert_loop" else "grouped", model):
        seconds = timer(step)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tokens_per_step = shapes.step_batch * shapes.step_seq_len
    flops = model_flops_per_token(config.model, config.routing.top_k, shapes.step_seq_len) * tokens_per_step
    result = {
        "compute_dtype": config.precision.dtype,
        "fp8": config.precision.fp8,
        "routed_experts": "loop" if arm == "bf16_expert_loop" else "grouped",
        "step_s": seconds,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / seconds["median"],
        "model_flops_per_step": flops,
        "model_tflops": flops / seconds["median"] / 1e12,
        "peak_memory_gib": peak,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "steps_run": len(losses),
    }
    return result


def bench_steps(shapes, device: torch.device, timer, ceiling_tflops: float, *, target: float) -> dict:
    arms = {}
    for arm in ARMS:
        result = bench_arm(shapes, device, timer, arm)
        if device.type == "cuda":  # the arm's model and optimizer are gone: give their memory back
            torch.cuda.empty_cache()
        result["fraction_of_ceiling"] = result["model_tflops"] / ceiling_tflops
        arms[arm] = result
    return {
        "preset": shapes.step_preset,
        "overrides": list(shapes.step_overrides),
        "batch": shapes.step_batch,
        "seq_len": shapes.step_seq_len,
        "ceiling_tflops": ceiling_tflops,
        "target_fraction": target,
        "meets_target": {arm: r["fraction_of_ceiling"] >= target for arm, r in arms.items()},
        "arms": arms,
    }
