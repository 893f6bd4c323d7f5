"""Swap the Linears DeepSeek-V3 runs in FP8 for ``Fp8Linear``, in place.

The paper (section 3.3, "Mixed precision framework") runs the GEMM-heavy linears in FP8 and keeps in their
original precision what is cheap or sensitive: the embedding, the output head, the MoE gate, the norms and the
attention core (softmax(QK^T)V, which is not an nn.Linear anyway). We select by the *last* component of a module's
qualified name, so the choice holds wherever the layers are nested (a transformer block, a pipeline stage, an
expert shard, an MTP module's block):

    FP8:   wq, wq_a, wq_b, wkv_a, wkv_b, wo   attention projections (MLA)
           w1, w2, w3                         every SwiGLU MLP: dense FFN, shared experts, routed experts
    kept:  head, embed, gate, proj (the MTP projection), norms, anything else

The replacement reuses the Linear's own ``weight``/``bias`` Parameter objects, so parameter names,
``state_dict`` keys and an optimizer built before the conversion are all unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from raymoe.fp8.gemm import NEVER_PROMOTE
from raymoe.fp8.linear import Fp8Linear, Fp8Recipe

FP8_LINEAR_NAMES = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"})


def default_filter(name: str, module: nn.Linear) -> bool:
    """True for the attention projections and MLP linears that DeepSeek-V3 computes in FP8."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in FP8_LINEAR_NAMES


def convert_linears(
    model: nn.Module,
    filter: Callable[[str, nn.Linear], bool] | None = None,
    *,
    backend: str = "auto",
    power_of_two_scales: bool = False,
    promotion_interval: int = 0,
    fused_quantization: bool = True,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` for which ``filter(qualified_name, module)`` holds; return ``model``.

    ``filter`` defaults to ``default_filter``. ``backend``: ``auto`` (real FP8 kernels for CUDA inputs, emulation
    otherwise), ``emulate`` or ``scaled_mm``. ``promotion_interval`` (emulation only): 0 accumulates in exact
    float32; N_C > 0 emulates ~14-bit tensor-core accumulation promoted to float32 every N_C elements; -1 never
    promotes. ``fused_quantization`` (CUDA only): quantize through ``torch.compile``d kernels. Linears that are
    already ``Fp8Linear`` are left alone, so converting twice is harmless.
    """
    if promotion_interval != NEVER_PROMOTE and promotion_interval < 0:
        raise ValueError(f"promotion_interval must be >= 0 or {NEVER_PROMOTE}, got {promotion_interval}")
    recipe = Fp8Recipe(
        backend=backend,
        power_of_two_scales=power_of_two_scales,
        promotion_interval=promotion_interval,
        fused_quantization=fused_quantization,
    )
    keep = filter if filter is not None else default_filter
    # Collect first: replacing children while named_modules() walks them would skip or revisit modules.
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear) and name and keep(name, module)
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(module, recipe))
    return model


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``Fp8Linear`` modules in ``model`` (for logs and tests)."""
    return [name for name, module in model.named_modules() if isinstance(module, Fp8Linear)]
