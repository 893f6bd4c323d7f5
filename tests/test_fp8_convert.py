"""convert_linears on a module tree named like raymoe's DeepSeek-V3 model (MLA, dense FFN, MoE, MTP)."""

import pytest
import torch
from torch import nn

from raymoe.fp8 import Fp8Linear, convert_linears, default_filter, fp8_linear_names


class _Mlp(nn.Module):
    def __init__(self, dim, inter):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _Gate(nn.Module):  # the router: a raw Parameter, not an nn.Linear
    def __init__(self, dim, num_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * 0.02)


class _Moe(nn.Module):
    def __init__(self, dim, inter, num_experts):
        super().__init__()
        self.gate = _Gate(dim, num_experts)
        self.shared = _Mlp(dim, inter)
        self.experts = nn.ModuleList(_Mlp(dim, inter) for _ in range(num_experts))

    def forward(self, x):  # dense stand-in for routing: enough to push gradients through every linear
        scores = torch.softmax(x @ self.gate.weight.t(), dim=-1)
        return self.shared(x) + sum(scores[..., i : i + 1] * e(x) for i, e in enumerate(self.experts))


class _Attn(nn.Module):
    def __init__(self, dim, q_lora_rank):
        super().__init__()
        if q_lora_rank:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.wq_b = nn.Linear(q_lora_rank, dim, bias=False)
        else:
            self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv_a = nn.Linear(dim, 48, bias=False)
        self.wkv_b = nn.Linear(32, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_norm = nn.RMSNorm(32)

    def forward(self, x):
        q = self.wq_b(self.wq_a(x)) if hasattr(self, "wq_a") else self.wq(x)
        k, v = self.wkv_b(self.kv_norm(self.wkv_a(x)[..., :32])).chunk(2, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.wo(att @ v)


class _Block(nn.Module):
    def __init__(self, dim, moe, q_lora_rank):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = _Attn(dim, q_lora_rank)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = _Moe(dim, 32, 4) if moe else _Mlp(dim, 96)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class _Mtp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = _Block(dim, moe=True, q_lora_rank=0)


class _TinyDeepSeek(nn.Module):
    def __init__(self, vocab=50, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_Block(dim, moe=False, q_lora_rank=32), _Block(dim, moe=True, q_lora_rank=32)])
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.mtp = nn.ModuleList([_Mtp(dim)])

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        main = self.head(self.norm(h))
        mtp = self.mtp[0]
        h2 = mtp.block(mtp.proj(torch.cat([h, self.embed(tokens)], dim=-1)))
        return main, self.head(self.norm(h2))


def _build(seed=0):
    torch.manual_seed(seed)
    return _TinyDeepSeek()


def test_default_filter_selects_what_deepseek_runs_in_fp8():
    model = convert_linears(_build())
    names = set(fp8_linear_names(model))
    expected_suffixes = {"wq_a", "wq_b", "wq", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"}
    all_linears = {n for n, m in _build().named_modules() if isinstance(m, nn.Linear)}
    assert names == {n for n in all_linears if n.rsplit(".", 1)[-1] in expected_suffixes}
    # Spot checks across nesting: dense FFN, shared expert, routed experts, MTP's block.
    for name in (
        "layers.0.attn.wq_a",
        "layers.0.ffn.w2",
        "layers.1.ffn.shared.w1",
        "layers.1.ffn.experts.3.w3",
        "mtp.0.block.attn.wq",
        "mtp.0.block.ffn.experts.0.w1",
    ):
        assert name in names
    # High precision: head, MTP projection (Linears), embedding, gate, norms.
    assert type(model.head) is nn.Linear and type(model.mtp[0].proj) is nn.Linear
    assert isinstance(model.embed, nn.Embedding) and not isinstance(model.layers[1].ffn.gate, nn.Linear)
    assert not default_filter("head", model.head) and not default_filter("mtp.0.proj", model.mtp[0].proj)


def test_parameters_state_dict_and_optimizer_are_untouched():
    model = _build()
    names_before = [n for n, _ in model.named_parameters()]
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    convert_linears(model)
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert model.state_dict().keys() == state_before.keys()
    # The optimizer built before the swap still updates the converted layers' weights.
    tokens = torch.randint(0, 50, (2, 12))
    main, mtp = model(tokens)
    (main.logsumexp(-1).mean() + mtp.logsumexp(-1).mean()).backward()
    optimizer.step()
    w = model.layers[1].ffn.experts[2].w1.weight
    assert not torch.equal(w, state_before["layers.1.ffn.experts.2.w1.weight"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


def test_outputs_close_to_the_unconverted_model():
    ref, fp8 = _build(), convert_linears(_build())
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (r, _), (f, _) = ref(tokens), fp8(tokens)
    assert ((f - r).norm() / r.norm()).item() < 0.05


def test_custom_filter_options_and_idempotence():
    model = convert_linears(
        _build(),
        lambda name, m: name.endswith("wo"),
        backend="emulate",
        power_of_two_scales=True,
        promotion_interval=128,
    )
    names = fp8_linear_names(model)
    assert names and all(n.endswith("wo") for n in names)
    recipe = model.layers[0].attn.wo.recipe
    assert (recipe.backend, recipe.power_of_two_scales, recipe.promotion_interval) == ("emulate", True, 128)
    convert_linears(model)  # second pass converts the rest and leaves existing Fp8Linears alone
    assert model.layers[0].attn.wo.recipe is recipe
    assert isinstance(model.layers[0].ffn.w1, Fp8Linear)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        convert_linears(_build(), backend="fp8")
    with pytest.raises(ValueError, match="promotion_interval"):
        convert_linears(_build(), promotion_interval=-5)
    with pytest.raises(ValueError, match="only applies to the emulate backend"):
        convert_linears(_build(), backend="scaled_mm", promotion_interval=128)


def test_the_real_model_with_precision_fp8():
    """build_model(precision.fp8=true) on the debug preset: exactly head and the MTP projection stay nn.Linear."""
    from raymoe.config import load_config
    from raymoe.model import build_model

    plain = build_model(load_config("debug"))
    model = build_model(load_config("debug", ["precision.fp8=true"]))
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(kept) == sorted(["head"] + [f"mtp.{i}.proj" for i in range(len(model.mtp))])
    assert {n.rsplit(".", 1)[-1] for n in fp8_linear_names(model)} == {
        "wq_a",
        "wq_b",
        "wkv_a",
        "wkv_b",
        "wo",
        "w1",
        "w2",
        "w3",
    }
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name  # same seed, same init: conversion touches no values
