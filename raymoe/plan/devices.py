"""The device table the step-time model reads: achieved GEMM throughput per precision, memory, links.

Every entry says where each number comes from (``source``): a measurement we made (DESIGN.md's H100 figures, the
CPU probe of ``raymoe.bench.plan_calibration``) or the vendor's data-sheet peak. Nothing here was tuned to make a
prediction match a published training run. Any field can be overridden on the command line
(``--assume device.bf16_tflops=700``); the override is printed with the result.

Throughputs are dense (no 2:4 sparsity), in TFLOP/s per device; bandwidths are GB/s (1e9 bytes) per device and
per direction, as a collective sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    name: str
    bf16_tflops: float
    """Achieved dense BF16 GEMM throughput (a large square GEMM)."""
    fp8_tflops: float
    """Achieved FP8 GEMM throughput with the fine-grained (1x128 / 128x128) scaling; 0 = no FP8 units."""
    attention_tflops: float
    """Achieved throughput of the attention core (QK^T, softmax, PV) in BF16, a FlashAttention-style kernel."""
    peak_bf16_tflops: float
    """The vendor's dense BF16 peak: the denominator of MFU."""
    memory_gb: float
    """Device memory in GB (1e9 bytes), as the vendor states it."""
    hbm_gbps: float
    """Memory bandwidth, for the memory-bound kernels (norms, activations, permutes, FP8 quantization)."""
    intra_node_gbps: float
    """Per-device bandwidth to a peer in the same node (NVLink), per direction."""
    inter_node_gbps: float
    """Per-device bandwidth to another node (one InfiniBand NIC per device), per direction."""
    devices_per_node: int = 8
    source: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"device {self.name}: {f.name} must be >= 0, got {value}")
        for name in ("bf16_tflops", "attention_tflops", "peak_bf16_tflops", "memory_gb", "hbm_gbps",
                     "intra_node_gbps", "inter_node_gbps", "devices_per_node"):
            if getattr(self, name) <= 0:
                raise ValueError(f"device {self.name}: {name} must be > 0, got {getattr(self, name)}")

    def gemm_tflops(self, precision: str) -> float:
        """Throughput of a GEMM in ``precision`` (``fp8``, ``bf16`` or ``fp32``)."""
        if precision == "fp8":
            if self.fp8_tflops <= 0:
                raise ValueError(f"device {self.name} has no FP8 GEMM throughput (fp8_tflops=0); "
                                 f"set precision.fp8=false or --assume device.fp8_tflops=...")
            return self.fp8_tflops
        return self.bf16_tflops

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, overrides: dict[str, str]) -> DeviceSpec:
        """``{"bf16_tflops": "700"}`` -> a copy with those fields; ValueError names unknown fields."""
        known = {f.name: f.type for f in fields(self)}
        values: dict[str, object] = {}
        for key, text in overrides.items():
            if key not in known or key == "name":
                raise ValueError(f"unknown device field {key!r}; choose one of "
                                 f"{sorted(k for k in known if k != 'name')}")
            kind = type(getattr(self, key))
            try:
                values[key] = text if kind is str else kind(float(text)) if kind is int else float(text)
            except ValueError:
                raise ValueError(f"device.{key}={text!r} is not a number") from None
        return replace(self, **values) if values else self


_HOPPER_MEASURED = (
    "bf16_tflops 790 and fp8_tflops 1260 (block-wise 1x128/128x128 torch._scaled_mm) measured on an H100 SXM at "
    "4096^3 (DESIGN.md, 2026-11-23); attention_tflops 330: FlashAttention-2 on H100 SXM, causal, head dim 128, "
    "as measured in the FlashAttention-3 paper (Shah et al. 2024); peak 989.4 BF16 (NVIDIA data sheet)"
)

DEVICES: dict[str, DeviceSpec] = {
    "h800": DeviceSpec(
        name="h800", bf16_tflops=790.0, fp8_tflops=1260.0, attention_tflops=330.0, peak_bf16_tflops=989.4,
        memory_gb=80.0, hbm_gbps=3350.0, intra_node_gbps=160.0, inter_node_gbps=50.0,
        source="compute: H100 measured (the H800 SXM has the H100 SXM's SMs, clocks and tensor cores; NVIDIA "
               "cut its NVLink and FP64 only): " + _HOPPER_MEASURED + "; links: NVLink 160 GB/s and IB 50 GB/s "
               "per GPU as the DeepSeek-V3 report states them (section 3.2.2; DeepEP measured 153-158 GB/s "
               "intranode and 43-58 GB/s internode); HBM3 3.35 TB/s, 80 GB (data sheet)",
    ),
    "h100": DeviceSpec(
        name="h100", bf16_tflops=790.0, fp8_tflops=1260.0, attention_tflops=330.0, peak_bf16_tflops=989.4,
        memory_gb=80.0, hbm_gbps=3350.0, intra_node_gbps=450.0, inter_node_gbps=50.0,
        source="compute: measured on an H100 SXM: " + _HOPPER_MEASURED + "; links: NVLink 4 900 GB/s "
               "bidirectional = 450 per direction, one 400 Gb/s NDR NIC per GPU = 50 GB/s (vendor peaks); "
               "HBM3 3.35 TB/s, 80 GB (data sheet)",
    ),
    "h200": DeviceSpec(
        name="h200", bf16_tflops=989.4, fp8_tflops=1978.9, attention_tflops=330.0, peak_bf16_tflops=989.4,
        memory_gb=141.0, hbm_gbps=4800.0, intra_node_gbps=450.0, inter_node_gbps=50.0,
        source="vendor peaks (NVIDIA H200 SXM data sheet: 989.4 BF16 / 1978.9 FP8 dense, 141 GB HBM3e at "
               "4.8 TB/s, NVLink 900 GB/s bidirectional); attention_tflops 330 from FlashAttention-2 on the "
               "same Hopper SMs (FlashAttention-3 paper); one 400 Gb/s NIC per GPU = 50 GB/s. Not measured: "
               "expect the GEMM figures to be ~20-35% high, as the H100 measurement was against its peak",
    ),
    "a100": DeviceSpec(
        name="a100", bf16_tflops=312.0, fp8_tflops=0.0, attention_tflops=190.0, peak_bf16_tflops=312.0,
        memory_gb=80.0, hbm_gbps=2039.0, intra_node_gbps=300.0, inter_node_gbps=25.0,
        source="vendor peaks (NVIDIA A100 SXM 80GB data sheet: 312 BF16 dense, no FP8 units, HBM2e 2.04 TB/s, "
               "NVLink 3 600 GB/s bidirectional = 300 per direction; one 200 Gb/s HDR NIC per GPU = 25 GB/s); "
               "attention_tflops 190: FlashAttention-2 paper (Dao 2023) reports 50-73% of peak forward and "
               "less backward on A100, ~60% taken. Not measured",
    ),
}


def device_spec(name: str) -> DeviceSpec:
    """The table entry for ``name`` (``cpu`` is measured, see ``raymoe.bench.plan_calibration``)."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {sorted(DEVICES) + ['cpu']}")
    return DEVICES[key]
