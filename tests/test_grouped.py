"""Grouped expert MLPs: the CPU loop is bitwise the per-expert MLP modules; the grouped_mm plumbing matches it."""

import pytest
import torch
from torch import nn

from raymoe.model.grouped import (
    GROUP_ALIGN,
    grouped_expert_mlp,
    padded_layout,
    resolve_backend,
    stack_expert_weights,
)
from raymoe.model.layers import MLP

DIM, INTER = 32, 24
COUNTS = [5, 0, 3, 0, 9, 1]  # two idle experts, one with a single token, none a multiple of GROUP_ALIGN


def _experts(num_experts: int = len(COUNTS), seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    experts = nn.ModuleList(MLP(DIM, INTER) for _ in range(num_experts))
    for p in experts.parameters():
        nn.init.normal_(p, std=0.2)
    return experts


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(sum(COUNTS), DIM), torch.tensor(COUNTS)


def _module_loop(experts, x_TD, counts):
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, x_TD.split(counts))])


def test_stack_preserves_values_shapes_and_autograd_to_each_expert():
    experts = _experts()
    w1, w3, w2 = stack_expert_weights(experts)
    assert w1.shape == w3.shape == (len(COUNTS), INTER, DIM) and w2.shape == (len(COUNTS), DIM, INTER)
    assert torch.equal(w2[4], experts[4].w2.weight) and torch.equal(w3[0], experts[0].w3.weight)
    (w1[2].sum() + 2 * w2[5].sum()).backward()
    assert torch.equal(experts[2].w1.weight.grad, torch.ones(INTER, DIM))
    assert torch.equal(experts[5].w2.weight.grad, torch.full((DIM, INTER), 2.0))
    assert torch.equal(experts[0].w1.weight.grad, torch.zeros(INTER, DIM))


def test_stack_accepts_a_module_dict_and_refuses_non_mlps():
    experts = _experts(2)
    stacked = stack_expert_weights(nn.ModuleDict({"a": experts[0], "b": experts[1]}))
    assert torch.equal(stacked.w1_EID[1], experts[1].w1.weight)
    with pytest.raises(ValueError, match="expert 1 .Linear. is not an MLP"):
        stack_expert_weights([experts[0], nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one expert"):
        stack_expert_weights([])


def test_loop_is_bitwise_the_mlp_modules_forward_and_backward():
    experts, reference = _experts(), _experts()
    x, counts = _inputs()
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    y = grouped_expert_mlp(x, counts, *stack_expert_weights(experts), backend="loop")
    y_ref = _module_loop(reference, x_ref, COUNTS)
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    for e, (mine, theirs) in enumerate(zip(experts, reference)):
        for name in ("w1", "w2", "w3"):
            got, want = getattr(mine, name).weight.grad, getattr(theirs, name).weight.grad
            assert got is not None and torch.equal(got, want), (e, name)
    for idle in (1, 3):  # zero-row experts: a gradient, and it is zero
        for name in ("w1", "w2", "w3"):
            assert torch.count_nonzero(getattr(experts[idle], name).weight.grad) == 0


def test_auto_is_the_loop_on_cpu_even_under_bf16_autocast():
    x, _ = _inputs()
    assert resolve_backend("auto", x) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend("auto", x) == "loop"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cutlass", x)


def test_padded_layout_pads_each_group_without_a_host_sync():
    layout = padded_layout(torch.tensor(COUNTS), sum(COUNTS), align=4)
    # groups padded to [8, 4, 4, 4, 12, 4] rows; the last runs to P = 18 + 6 * 4 = 42
    assert layout.offs_E.dtype == torch.int32
    assert layout.offs_E.tolist() == [8, 12, 16, 20, 32, 42] and layout.num_rows == 42
    assert layout.rows_T.tolist() == [0, 1, 2, 3, 4, 12, 13, 14] + list(range(20, 29)) + [32]


@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 0, 0, 0, 18], [3, 3, 3, 3, 3, 3]])
def test_grouped_mm_backend_matches_the_loop_on_cpu(counts):
    """The CUDA code path (padding, offsets, transposed weights, torch's backward), run by CPU _grouped_mm in fp32."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    experts, reference = _experts(), _experts()
    torch.manual_seed(3)
    x = torch.randn(sum(counts), DIM, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = grouped_expert_mlp(x, torch.tensor(counts), *stack_expert_weights(experts), backend="grouped_mm")
    y_ref = grouped_expert_mlp(x_ref, torch.tensor(counts), *stack_expert_weights(reference), backend="loop")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for mine, theirs, count in zip(experts, reference, counts):
        for name in ("w1", "w2", "w3"):
            got = getattr(mine, name).weight.grad
            torch.testing.assert_close(got, getattr(theirs, name).weight.grad, rtol=1e-5, atol=1e-6)
            if count == 0:
                assert torch.count_nonzero(got) == 0


def test_shape_and_count_errors_name_the_values():
    w1, w3, w2 = stack_expert_weights(_experts())
    x, counts = _inputs()
    with pytest.raises(ValueError, match=r"x_sorted_TD must be \(T, 32\)"):
        grouped_expert_mlp(x[:, :8], counts, w1, w3, w2)
    with pytest.raises(ValueError, match=r"counts_E must be an integer tensor of shape \(6,\)"):
        grouped_expert_mlp(x, counts[:5], w1, w3, w2)
    with pytest.raises(ValueError, match="sum to the 18 rows"):
        grouped_expert_mlp(x, counts + 1, w1, w3, w2, backend="loop")
    with pytest.raises(ValueError, match="expert weights disagree"):
        grouped_expert_mlp(x, counts, w1, w3, w2.transpose(1, 2))


def test_group_align_is_sixteen_bytes_of_bf16():
    assert GROUP_ALIGN * torch.finfo(torch.bfloat16).bits // 8 == 16


def test_the_moe_layers_grouped_path_matches_its_loop():
    """``run_local_experts`` with the grouped GEMM forced (fp32 ``torch._grouped_mm`` exists on CPU) against the
    per-expert loop: same sort, weighting and combine, the experts' rows through one kernel (not bitwise: another
    kernel), every gradient included."""
    from raymoe.config import load_config
    from raymoe.model import MoE, run_routed_experts
    from raymoe.model.dispatch import run_local_experts

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    cfg = load_config("debug", ["model.dim=64", "model.moe_inter_dim=32"])
    torch.manual_seed(0)
    moe = MoE(cfg.model, cfg.routing, slot=0)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(40, cfg.model.dim, requires_grad=True)
    _, ids, weights = moe.gate(x)
    y = run_local_experts(moe.experts, x, ids, weights, backend="grouped_mm")
    y.sum().backward()
    grads = [p.grad.clone() for p in (*moe.experts.parameters(), moe.gate.weight)] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    _, ids, weights = moe.gate(x)  # a fresh graph for the second backward
    y_ref = run_routed_experts(moe.experts, x, ids, weights)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, [p.grad for p in (*moe.experts.parameters(), moe.gate.weight)] + [x.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _meta_experts(num_experts: int, dim: int, inter: int):
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16, requires_grad=True)

    return meta(num_experts, inter, dim), meta(num_experts, inter, dim), meta(num_experts, dim, inter)


def test_grouped_mm_call_passes_torchs_checks_on_meta_at_16b_shapes():
    """No GPU here: torch's meta kernels for _grouped_mm (and its backward) apply the CUDA rules -- BF16, int32
    offsets, 16-byte strides, 2-D x 3-D forward, 2-D x 2-D weight gradient -- so the exact calls of the CUDA path
    are checked at the 16b preset's shapes (64 experts, 2048 -> 1408, 98,304 token copies)."""
    w1, w3, w2 = _meta_experts(64, 2048, 1408)
    x = torch.empty(98304, 2048, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = grouped_expert_mlp(x, torch.empty(64, dtype=torch.int64, device="meta"), w1, w3, w2, backend="grouped_mm")
    assert y.shape == (98304, 2048) and y.dtype == torch.bfloat16
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and w2.grad.shape == w2.shape


def test_grouped_mm_needs_16_byte_rows_on_meta():
    w1, w3, w2 = _meta_experts(4, 256, 100)  # 100 BF16 = 200 bytes: not a multiple of 16
    x = torch.empty(64, 256, device="meta", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="16 bytes"):
        grouped_expert_mlp(x, torch.empty(4, dtype=torch.int64, device="meta"), w1, w3, w2, backend="grouped_mm")


def test_stacking_in_the_compute_dtype_keeps_autograd_and_the_bf16_loop_bitwise():
    experts = _experts()
    x, counts = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _module_loop(experts, x, COUNTS)
        stacked = stack_expert_weights(experts, dtype=torch.bfloat16)
        y = grouped_expert_mlp(x, counts, *stacked, backend="loop")
    assert stacked.w1_EID.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    assert experts[0].w1.weight.grad.dtype == torch.float32 and experts[0].w1.weight.grad.abs().sum() > 0
