"""Published training runs, as their reports state them: the planner's test against reality.

Each entry is the layout the report publishes plus, marked as such, what it leaves out and we had to choose
(micro-batching, GPU count for DeepSeek-V2). The published GPU-hours are the answer we compare against; nothing in
the planner reads them. ``raymoe plan --published deepseek-v3`` runs one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class PublishedRun:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    """Config ``key=value`` overrides that turn the preset into the published run."""
    pp: int
    ep: int
    dp: int
    zero_stage: int
    schedule: str
    num_microbatches: int
    gpu: str
    tokens: float
    gpu_hours_per_trillion: float
    """Published H800 GPU-hours per trillion training tokens."""
    assume: dict[str, str] = field(default_factory=dict)
    published: str = ""
    chosen: str = ""
    """What the report does not state and we chose (not fitted: chosen before comparing)."""


PUBLISHED: dict[str, PublishedRun] = {
    "deepseek-v3": PublishedRun(
        name="deepseek-v3", preset="671b", pp=16, ep=64, dp=128, zero_stage=1, schedule="dualpipe",
        num_microbatches=120, gpu="h800", tokens=14.8e12, gpu_hours_per_trillion=180e3,
        assume={"fp32_grads": "true"},
        published="DeepSeek-V3 report (arXiv 2412.19437): 2,048 H800 (8 per node, NVLink + IB), 16-way DualPipe "
                  "PP, 64-way EP over 8 nodes, ZeRO-1 DP, no TP; FP8 training, BF16 moments, FP32 gradients; "
                  "batch 15,360 x 4,096 tokens; MTP depth 1; 180K H800 GPU-hours per trillion tokens (2.664M "
                  "for 14.8T)",
        chosen="120 micro-batches of one 4,096-token sequence per pipeline (15,360 / dp 128 = 120 sequences; "
               "the micro-batch size is not published)",
    ),
    "deepseek-v2": PublishedRun(
        name="deepseek-v2", preset="236b",
        overrides=("mtp.depth=0", "precision.fp8=false", "precision.bf16_optimizer_states=false",
                   "routing.score_func=softmax", "data.batch_size=9216"),
        pp=16, ep=8, dp=128, zero_stage=1, schedule="zb1p", num_microbatches=72, gpu="h800", tokens=8.1e12,
        gpu_hours_per_trillion=172.8e3,
        published="DeepSeek-V2 report (arXiv 2405.04434): H800 cluster (8 per node, NVLink + IB), 16-way "
                  "zero-bubble PP, 8-way EP, ZeRO-1 DP, no TP; BF16, no MTP, device-limited routing to 3 "
                  "devices; batch 9,216 x 4,096 tokens (after the ramp); 172.8K GPU-hours per trillion tokens",
        chosen="dp=128 (2,048 GPUs, the GPU count is not published) and 72 micro-batches of one sequence "
               "(9,216 / 128); FP32 moments and BF16 gradients (not published)",
    ),
}


def published_run(name: str) -> PublishedRun:
    if name not in PUBLISHED:
        raise ValueError(f"unknown published run {name!r}; choose one of {sorted(PUBLISHED)}")
    return PUBLISHED[name]
