"""Global-norm clipping (``raymoe.train.clip``): the same clip factor however the gradient sum is split.

A layout sums the squared gradient norm per ZeRO partition (slices of tensors), per dp rank and per pipeline
stage; the reference sums it over whole tensors in model order. The factor must come out bitwise the same.
"""

from __future__ import annotations

import torch

from raymoe.train import clip_coefficient, clip_gradients, squared_norm


def _gradients(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64,), (32,), (64, 128), (260, 64), (8, 64), (128, 64), (64, 64), (512,)] * 6
    return [torch.randn(s, generator=g) * torch.rand((), generator=g) for s in shapes]


def _layout_pieces(grads: list[torch.Tensor], seed: int) -> list[list[torch.Tensor]]:
    """Cut the flattened gradients into ``ranks`` contiguous partitions at random offsets (slicing tensors, as ZeRO
    does) and hand each rank its slices."""
    g = torch.Generator().manual_seed(seed)
    flat = [t.reshape(-1) for t in grads]
    total = sum(t.numel() for t in flat)
    ranks = int(torch.randint(2, 9, (), generator=g))
    cuts = sorted(torch.randint(1, total, (ranks - 1,), generator=g).tolist())
    bounds = [0, *cuts, total]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
    start = 0
    for t in flat:
        end = start + t.numel()
        for r in range(ranks):
            lo, hi = max(start, bounds[r]), min(end, bounds[r + 1])
            if lo < hi:
                pieces[r].append(t[lo - start : hi - start])
        start = end
    return pieces


def _fp32_layout_norm(pieces: list[list[torch.Tensor]]) -> torch.Tensor:
    """The old way: fp32 norms per slice, squared and summed per rank in fp32, then across ranks in fp32."""
    per_rank = [torch.stack([torch.linalg.vector_norm(p) for p in rank]).pow(2).sum() for rank in pieces if rank]
    return torch.stack(per_rank).sum().sqrt()


def test_clip_factor_is_the_same_however_the_sum_is_split():
    fp32_mismatches = 0
    for seed in range(40):
        grads = _gradients(seed)
        reference = clip_coefficient(squared_norm(grads).sqrt(), 1.0).float()
        pieces = _layout_pieces(grads, seed + 1000)
        rank_sums = [squared_norm(rank) for rank in pieces]  # each rank's partition, then the all-reduce
        layout = clip_coefficient(torch.stack(rank_sums[::-1]).sum().sqrt(), 1.0).float()
        assert layout.item() == reference.item(), seed
        torch_norm = torch.nn.utils.get_total_norm(grads)
        fp32_mismatches += int(_fp32_layout_norm(pieces).item() != torch_norm.item())
    # Why the float64 sum: summed in fp32, the same regrouping changes the norm's last bits in many of these cases.
    assert fp32_mismatches >= 5, fp32_mismatches


def test_clip_gradients_is_torch_clipping():
    """Same factor as torch.nn.utils.clip_grad_norm_ (to fp32 rounding), same reported pre-clip norm."""
    grads = _gradients(0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    twins = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(params, twins, grads):
        p.grad, q.grad = g.clone(), g.clone()
    norm = clip_gradients(params, 0.5)
    torch_norm = float(torch.nn.utils.clip_grad_norm_(twins, 0.5))
    assert abs(norm - torch_norm) <= 1e-6 * torch_norm
    assert norm > 0.5
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-7, atol=0)
    clipped = squared_norm(p.grad for p in params).sqrt().item()
    assert abs(clipped - 0.5) < 1e-6


def test_no_clipping_when_max_norm_is_zero_or_norm_is_small():
    grads = _gradients(1)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = clip_gradients(params, 0.0)
    assert norm == squared_norm(grads).sqrt().item()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    clip_gradients(params, 10 * norm)  # factor clamps to exactly 1
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert squared_norm([], device="cpu").item() == 0.0
