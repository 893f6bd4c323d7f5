"""Every assumption of the step-time and memory model, by name, with its default and why.

Nothing here is fitted to a result it is checked against: each default is a measurement we made, a published
figure or a stated engineering assumption (``ASSUMPTION_SOURCES``). ``raymoe plan --assume NAME=VALUE`` overrides
any of them (``--assume device.FIELD=VALUE`` a device-table field) and the result prints them all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, kw_only=True)
class Assumptions:
    recompute: bool = True
    """Recompute what DeepSeek-V3 recomputes (RMSNorms, MLA up-projections, SwiGLU outputs) in the backward."""
    keep_logits: bool = False
    """Keep the head's logits for the backward (False: fused chunked cross-entropy)."""
    gate_weight_in_expert: bool = True
    """Multiply the gate weight into the SwiGLU output inside the expert, so the gate's gradient needs only the
    (recomputable) SwiGLU output; False keeps every routed expert's D-wide output for it."""
    grouped_gemm_efficiency: float = 0.87
    """Routed-expert grouped GEMMs as a fraction of the device's dense GEMM throughput."""
    dense_gemm_efficiency: float = 1.0
    """Other GEMMs as a fraction of the table's (already achieved, large square) GEMM throughput."""
    hbm_efficiency: float = 0.8
    """Achieved fraction of HBM bandwidth in memory-bound kernels."""
    fp8_quantize_s_per_element: float = 3.0e-12
    """Time to quantize one activation element into 1x128 FP8 tiles (fused kernel)."""
    comm_sm_fraction: float = 20 / 132
    """Share of the SMs running the all-to-all kernels while DualPipe overlaps them with compute."""
    overlap_shared_expert: bool = True
    """Outside DualPipe's F&B pairs, the shared expert's compute hides part of each all-to-all."""
    p2p_latency_s: float = 10e-6
    """Fixed latency of one pipeline send, on top of bytes / bandwidth."""
    dp_overlap: float = 0.0
    """Fraction of the data-parallel gradient reduction and parameter all-gather hidden behind compute."""
    usable_memory_fraction: float = 0.9
    """Device memory left for parameters, gradients, optimizer state and activations."""
    fp32_grads: bool = False
    """Accumulate gradients in FP32 (DeepSeek-V3) instead of the parameter dtype."""
    a2a_remote_ranks: float = -1.0
    """Override the expected distinct remote destination ranks per token (-1: ``expected_destinations``)."""
    a2a_remote_nodes: float = -1.0
    """Override the expected distinct remote destination nodes per token (-1: ``expected_destinations``)."""

    def __post_init__(self) -> None:
        for name in ("grouped_gemm_efficiency", "dense_gemm_efficiency", "hbm_efficiency", "usable_memory_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"assumption {name} must be in (0, 1], got {value}")
        if not 0 <= self.comm_sm_fraction < 1:
            raise ValueError(f"assumption comm_sm_fraction must be in [0, 1), got {self.comm_sm_fraction}")
        if not 0 <= self.dp_overlap <= 1:
            raise ValueError(f"assumption dp_overlap must be in [0, 1], got {self.dp_overlap}")
        for name in ("fp8_quantize_s_per_element", "p2p_latency_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"assumption {name} must be >= 0, got {getattr(self, name)}")

    def with_overrides(self, overrides: dict[str, str]) -> Assumptions:
        """``{"recompute": "false", "hbm_efficiency": "0.7"}`` -> a copy; ValueError names unknown names."""
        kinds = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        values: dict[str, object] = {}
        for key, text in overrides.items():
            if key not in kinds:
                raise ValueError(f"unknown assumption {key!r}; choose one of {sorted(kinds)} or device.FIELD")
            if kinds[key] is bool:
                if text.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"assumption {key}={text!r}: expected true or false")
                values[key] = text.strip().lower() in ("true", "1")
            else:
                try:
                    values[key] = float(text)
                except ValueError:
                    raise ValueError(f"assumption {key}={text!r} is not a number") from None
        return replace(self, **values) if values else self

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ASSUMPTION_SOURCES: dict[str, str] = {
    "recompute": "DeepSeek-V3 report, section 3.3.3 (RMSNorm, MLA up-projection) and 3.3.2 (SwiGLU output)",
    "keep_logits": "assumed: fused linear-cross-entropy kernels never hold a micro-batch's full logits",
    "gate_weight_in_expert": "Megatron-Core's weighted SwiGLU (routing probabilities applied before fc2); "
                             "the DeepSeek-V3 report does not say how its gate gradient is formed",
    "grouped_gemm_efficiency": "measured (DESIGN.md, H100): torch._grouped_mm 659 vs 744 TFLOP/s dense at "
                               "V2-Lite shapes (0.89), 670-695 vs 790 at V3 shapes (0.85-0.88)",
    "dense_gemm_efficiency": "assumed 1: the table's GEMM figures are already achieved throughputs",
    "hbm_efficiency": "assumed: streaming kernels reach ~80% of the data-sheet bandwidth",
    "fp8_quantize_s_per_element": "measured (DESIGN.md, H100): 1x128 quantization of 4096x4096 in ~0.05 ms "
                                  "under torch.compile",
    "comm_sm_fraction": "DeepSeek-V3 report, section 3.2.2: 20 of the H800's 132 SMs run the all-to-all",
    "overlap_shared_expert": "DeepSeek-V2 report, section 3.2.2: shared-expert compute overlaps the EP "
                             "all-to-all",
    "p2p_latency_s": "assumed: ~10 us per NCCL send on top of the bytes",
    "dp_overlap": "assumed 0: the ZeRO-1 reduce-scatter and all-gather are counted fully exposed",
    "usable_memory_fraction": "assumed: CUDA context, NCCL/DeepEP buffers and fragmentation take ~10%",
    "fp32_grads": "DeepSeek-V3 keeps FP32 gradients for accumulation (section 3.3.3); default: param dtype",
    "a2a_remote_ranks": "computed by raymoe.plan.destinations unless set",
    "a2a_remote_nodes": "computed by raymoe.plan.destinations unless set",
}


def split_overrides(items: tuple[str, ...] | list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``["recompute=false", "device.bf16_tflops=700"]`` -> (assumption overrides, device overrides)."""
    plain: dict[str, str] = {}
    device: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad --assume {item!r}: expected NAME=VALUE")
        key = key.strip()
        if key.startswith("device."):
            device[key[len("device."):]] = value.strip()
        else:
            plain[key] = value.strip()
    return plain, device
