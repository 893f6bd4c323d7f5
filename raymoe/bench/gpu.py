"""The GPU hot path, measured: ``python -m raymoe bench --only gpu`` (issue 17).

Four measurements, each against a reference taken in the same run on the same device:

1. ``gemm``: BF16 ``mm`` and FP8 block-scaled GEMM (1x128 activation tiles x 128x128 weight blocks,
   ``torch._scaled_mm``) TFLOP/s at 4096^3 and 8192^3; the FP8 GEMM also with its activation quantization (fused)
   counted in. The best BF16 figure is the *ceiling* the training step is measured against.
2. ``fp8_linear``: ``Fp8Linear`` forward + backward (three FP8 GEMMs and their quantizations) against a BF16
   ``nn.Linear`` at 4096 tokens x 4096 -> 4096, both with FP32 master weights under BF16 autocast, as training runs
   them; with fused and with eager quantization. Target: >= 1.4x.
3. ``grouped``: routed-expert GEMMs at the ``16b`` preset's shapes (64 experts, 2048 -> 1408, 16k tokens x top-6 =
   98,304 token copies): one ``torch._grouped_mm`` projection against one dense GEMM of equal FLOPs, under uniform
   and 3:1 skewed load, and the whole SwiGLU expert MLP forward + backward, grouped vs a loop over experts.
4. ``step`` (``gpu_step.py``): one training step of a ``16b``-shaped slice (its first layers at full width, real
   routing) in BF16 and in FP8: tokens/s, model TFLOP/s, that as a fraction of the BF16 GEMM ceiling (target
   >= 40%), peak memory.

Only torch and raymoe's torch-only core are imported: neither ray nor deepspeed (the accelerator machine has
neither; ``tests/test_gpu_bench.py`` checks it with an import blocker). Without CUDA (or with ``--tiny``) the same
code runs at tiny shapes, FP8 emulated and BF16 replaced by FP32 where the CPU has no BF16 units, so the
default test suite exercises every line; those numbers say nothing about speed and the JSON says so.

Timing: CUDA events around ``iters`` calls, ``repeats`` times; reported as min / median / max seconds per call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from raymoe.bench.load import machine_load
from raymoe.bench.timing import Timer, tflops
from raymoe.fp8 import Fp8Linear, Fp8Recipe, fp8_matmul
from raymoe.fp8.fused import quantize_activation
from raymoe.fp8.quant import quantize_blocks, quantize_tiles
from raymoe.model.grouped import grouped_expert_mlp

FP8_LINEAR_TARGET = 1.4
STEP_CEILING_TARGET = 0.40


@dataclass(frozen=True, kw_only=True)
class GpuBenchShapes:
    """What the benchmark runs; ``FULL`` on a GPU, ``TINY`` on CPU or with ``--tiny``."""

    gemm_sizes: tuple[int, ...]
    linear_tokens: int
    linear_dim: int
    num_experts: int
    expert_dim: int
    expert_inter: int
    expert_copies: int
    """Token copies routed to the experts (tokens x top_k)."""
    step_preset: str
    step_overrides: tuple[str, ...]
    step_batch: int
    step_seq_len: int
    warmup: int
    iters: int
    repeats: int
    step_warmup: int
    """Training steps are ~1000x a GEMM: fewer of them (the first FP8 ones also compile the quantizers)."""
    step_iters: int
    step_repeats: int


FULL = GpuBenchShapes(
    gemm_sizes=(4096, 8192),
    linear_tokens=4096,
    linear_dim=4096,
    num_experts=64,
    expert_dim=2048,
    expert_inter=1408,
    expert_copies=16384 * 6,
    step_preset="16b",
    # The first four layers of 16b (one dense, three MoE) at full width and vocabulary, no MTP module.
    step_overrides=("model.num_layers=4", "mtp.depth=0"),
    step_batch=4,
    step_seq_len=4096,
    warmup=3,
    iters=10,
    repeats=5,
    step_warmup=2,
    step_iters=3,
    step_repeats=3,
)
TINY = GpuBenchShapes(
    gemm_sizes=(128, 256),
    linear_tokens=128,
    linear_dim=256,
    num_experts=8,
    expert_dim=64,
    expert_inter=48,
    expert_copies=1024,
    step_preset="debug",
    step_overrides=("mtp.depth=0",),
    step_batch=2,
    step_seq_len=16,
    warmup=1,
    iters=1,
    repeats=2,
    step_warmup=1,
    step_iters=1,
    step_repeats=2,
)


def half_dtype(device: torch.device) -> torch.dtype:
    """BF16 on CUDA; FP32 on CPU, which has no BF16 units (a BF16 GEMM there runs ~100x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bench_gemm(shapes: GpuBenchShapes, device: torch.device, timer: Timer) -> list[dict]:
    return [_gemm_row(size, device, timer) for size in shapes.gemm_sizes]


def _gemm_row(size: int, device: torch.device, timer: Timer) -> dict:
    dtype = half_dtype(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a_q, b_q = quantize_tiles(a), quantize_blocks(b)
    flops = 2 * size**3
    dense_s = timer(lambda: a @ b.t())
    fp8_s = timer(lambda: fp8_matmul(a_q, b_q, out_dtype=dtype))
    fp8_q_s = timer(lambda: fp8_matmul(quantize_activation(a, power_of_two=False, fused=True), b_q, out_dtype=dtype))
    got = fp8_matmul(a_q, b_q, out_dtype=dtype).float()
    ref = a_q.dequantize() @ b_q.dequantize().t()
    return {
        "size": size,
        "dense_dtype": str(dtype).removeprefix("torch."),
        "dense_s": dense_s,
        "fp8_blockwise_s": fp8_s,
        "fp8_blockwise_with_quant_s": fp8_q_s,
        "dense_tflops": tflops(flops, dense_s),
        "fp8_blockwise_tflops": tflops(flops, fp8_s),
        "fp8_blockwise_with_quant_tflops": tflops(flops, fp8_q_s),
        "fp8_speedup": dense_s["median"] / fp8_s["median"],
        "fp8_rel_err_vs_dequantized": float((got - ref).norm() / ref.norm()),
    }


def _linear_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype):
    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)
        y.backward(dy)
        x.grad = None
        layer.weight.grad = None

    return step


def bench_fp8_linear(shapes: GpuBenchShapes, device: torch.device, timer: Timer) -> dict:
    dtype = half_dtype(device)
    tokens, dim = shapes.linear_tokens, shapes.linear_dim
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, dim, device=device, dtype=dtype)
    flops = 3 * 2 * tokens * dim * dim  # Fprop, Dgrad, Wgrad
    base = torch.nn.Linear(dim, dim, bias=False, device=device)
    times = {"dense": timer(_linear_step(base, x, dy, dtype))}
    for fused in (True, False):
        layer = Fp8Linear(dim, dim, bias=False, device=device, recipe=Fp8Recipe(fused_quantization=fused))
        times["fp8_fused_quant" if fused else "fp8_eager_quant"] = timer(_linear_step(layer, x, dy, dtype))
    result = {
        "tokens": tokens,
        "in_features": dim,
        "out_features": dim,
        "dense_dtype": str(dtype).removeprefix("torch."),
        "seconds": times,
        "tflops": {name: tflops(flops, t) for name, t in times.items()},
    }
    for name in ("fp8_fused_quant", "fp8_eager_quant"):
        result[f"speedup_{name}"] = times["dense"]["median"] / times[name]["median"]
    result["target"] = FP8_LINEAR_TARGET
    result["meets_target"] = result["speedup_fp8_fused_quant"] >= FP8_LINEAR_TARGET
    return result


def skewed_counts(total: int, num_experts: int, ratio: float) -> torch.Tensor:
    """Counts summing to ``total`` with the first half of the experts getting ``ratio`` times the second's."""
    half = num_experts // 2
    light = total / (half * ratio + (num_experts - half))
    counts = torch.tensor([round(light * ratio)] * half + [round(light)] * (num_experts - half))
    counts[-1] += total - int(counts.sum())
    return counts


def bench_grouped(shapes: GpuBenchShapes, device: torch.device, timer: Timer) -> dict:
    dtype = half_dtype(device)
    num_e, dim, inter, copies = shapes.num_experts, shapes.expert_dim, shapes.expert_inter, shapes.expert_copies
    x = torch.randn(copies, dim, device=device, dtype=dtype)
    w1 = torch.randn(num_e, inter, dim, device=device, dtype=dtype) * dim**-0.5
    w3 = torch.randn(num_e, inter, dim, device=device, dtype=dtype) * dim**-0.5
    w2 = torch.randn(num_e, dim, inter, device=device, dtype=dtype) * inter**-0.5
    dense_w = w1[0]
    one_gemm_flops = 2 * copies * dim * inter
    result: dict = {"experts": num_e, "dim": dim, "inter_dim": inter, "token_copies": copies}
    result["dense_s"] = timer(lambda: F.linear(x, dense_w))
    for name, counts in (("uniform", torch.full((num_e,), copies // num_e)), ("skew_3to1", None)):
        counts = skewed_counts(copies, num_e, 3.0) if counts is None else counts
        counts[-1] += copies - int(counts.sum())
        offs = counts.cumsum(0).to(device=device, dtype=torch.int32)
        result[f"grouped_{name}_s"] = timer(lambda offs=offs: torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
    result["dense_tflops"] = tflops(one_gemm_flops, result["dense_s"])
    for name in ("uniform", "skew_3to1"):
        result[f"grouped_{name}_tflops"] = tflops(one_gemm_flops, result[f"grouped_{name}_s"])
        result[f"grouped_{name}_vs_dense"] = result["dense_s"]["median"] / result[f"grouped_{name}_s"]["median"]
    # The whole expert MLP, forward + backward: 3 projections x (Fprop, Dgrad, Wgrad).
    counts = torch.full((num_e,), copies // num_e, device=device)
    counts[-1] += copies - int(counts.sum())
    mlp_flops = 9 * one_gemm_flops
    weights = [w.detach().clone().requires_grad_() for w in (w1, w3, w2)]
    xg = x.detach().clone().requires_grad_()
    for backend in ("grouped_mm", "loop"):

        def step(backend=backend):
            y = grouped_expert_mlp(xg, counts, *weights, backend=backend)
            y.backward(torch.ones_like(y))
            xg.grad = None
            for w in weights:
                w.grad = None

        result[f"mlp_{backend}_s"] = timer(step)
        result[f"mlp_{backend}_tflops"] = tflops(mlp_flops, result[f"mlp_{backend}_s"])
    result["mlp_grouped_vs_loop"] = result["mlp_loop_s"]["median"] / result["mlp_grouped_mm_s"]["median"]
    return result


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "device": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    return {"device": f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "cuda": None}


def run(out_dir: Path, *, quick: bool = False, tiny: bool = False) -> dict:
    """All four measurements; ``tiny`` (automatic without CUDA) runs the tiny shapes on whatever device there is."""
    from raymoe.bench.gpu_step import bench_steps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = tiny or device.type != "cuda"
    shapes = TINY if tiny else FULL
    if quick and not tiny:
        shapes = GpuBenchShapes(**{**asdict(shapes), "iters": 3, "repeats": 3, "step_iters": 1})
    timer = Timer(device, warmup=shapes.warmup, iters=shapes.iters, repeats=shapes.repeats)
    result = {
        **device_description(device),
        "tiny": tiny,
        "note": "tiny shapes: checks the code runs, says nothing about speed" if tiny else "measured",
        "load_at_start": machine_load(),
        "shapes": asdict(shapes),
        "gemm": bench_gemm(shapes, device, timer),
        "fp8_linear": bench_fp8_linear(shapes, device, timer),
        "grouped": bench_grouped(shapes, device, timer),
    }
    ceiling = max(row["dense_tflops"]["max"] for row in result["gemm"])
    result["bf16_ceiling_tflops"] = ceiling
    step_timer = Timer(device, warmup=shapes.step_warmup, iters=shapes.step_iters, repeats=shapes.step_repeats)
    result["step"] = bench_steps(shapes, device, step_timer, ceiling, target=STEP_CEILING_TARGET)
    result["load_at_end"] = machine_load()
    result["markdown"] = markdown(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    return {key: value for key, value in result.items() if key not in ("gemm", "grouped", "step")}


def _m(s: dict) -> str:
    return f"{s['median']:.3g}"


def markdown(r: dict) -> str:
    lines = [f"Device: **{r['device']}** (torch {r['torch']}, CUDA {r['cuda']}). {r['note']}.", ""]
    lines += [
        "| GEMM | dense TFLOP/s | FP8 block-wise | FP8 + fused act. quant | speedup | rel. err |",
        "|---|---|---|---|---|---|",
    ]
    for g in r["gemm"]:
        lines.append(
            f"| {g['size']}^3 ({g['dense_dtype']}) | {_m(g['dense_tflops'])} | {_m(g['fp8_blockwise_tflops'])} | "
            f"{_m(g['fp8_blockwise_with_quant_tflops'])} | x{g['fp8_speedup']:.2f} | "
            f"{g['fp8_rel_err_vs_dequantized']:.1e} |"
        )
    f = r["fp8_linear"]
    lines += [
        "",
        f"Fp8Linear fwd+bwd {f['tokens']}x{f['in_features']}->{f['out_features']}: dense {_m(f['tflops']['dense'])}, "
        f"FP8 fused {_m(f['tflops']['fp8_fused_quant'])} (x{f['speedup_fp8_fused_quant']:.2f}), "
        f"FP8 eager quant {_m(f['tflops']['fp8_eager_quant'])} (x{f['speedup_fp8_eager_quant']:.2f}) TFLOP/s; "
        f"target x{f['target']}: {'met' if f['meets_target'] else 'NOT met'}.",
    ]
    g = r["grouped"]
    lines += [
        "",
        f"Grouped expert GEMM ({g['experts']} experts, {g['dim']}->{g['inter_dim']}, {g['token_copies']} copies): "
        f"dense {_m(g['dense_tflops'])}, grouped uniform {_m(g['grouped_uniform_tflops'])} "
        f"({g['grouped_uniform_vs_dense']:.0%} of dense), 3:1 skew {_m(g['grouped_skew_3to1_tflops'])} TFLOP/s; "
        f"expert MLP fwd+bwd grouped {_m(g['mlp_grouped_mm_tflops'])} vs loop {_m(g['mlp_loop_tflops'])} TFLOP/s "
        f"(x{g['mlp_grouped_vs_loop']:.2f}).",
        "",
        "| training step | tokens/s | model TFLOP/s | of BF16 ceiling | peak memory GiB |",
        "|---|---|---|---|---|",
    ]
    for name, s in r["step"]["arms"].items():
        peak = "n/a" if s["peak_memory_gib"] is None else f"{s['peak_memory_gib']:.1f}"
        lines.append(
            f"| {name} | {s['tokens_per_s']:.0f} | {s['model_tflops']:.3g} | {s['fraction_of_ceiling']:.0%} | {peak} |"
        )
    return "\n".join(lines)
