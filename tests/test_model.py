"""The single-device DeepSeek-V3 model: shapes, MoE dispatch, MTP target shifting, routing state, meta build."""

import pytest
import torch
import torch.nn.functional as F

from raymoe.config import load_config
from raymoe.model import MoE, build_model, positions_trained, router_slots, run_routed_experts
from raymoe.train import accumulate_gradients


@pytest.fixture(scope="module")
def debug_cfg():
    return load_config("debug")


def test_forward_shapes_and_router_stats(debug_cfg):
    model = build_model(debug_cfg)
    tokens = torch.randint(0, 260, (2, 18))
    out = model(tokens, mtp_weight=0.3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    slots = router_slots(debug_cfg.model, debug_cfg.mtp.depth)
    assert [s.slot for s in out.router_stats] == list(range(len(slots)))
    for stats in out.router_stats:  # every token picks top_k experts
        assert stats.counts_E.sum().item() == 2 * 16 * debug_cfg.routing.top_k
    expected = out.main_loss + 0.3 * out.mtp_loss + out.balance_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_routed_experts_match_a_per_token_loop():
    torch.manual_seed(0)
    cfg = load_config("debug")
    moe = MoE(cfg.model, cfg.routing, slot=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(7, cfg.model.dim)
    scores, ids, weights = moe.gate(x)
    fast = run_routed_experts(moe.experts, x, ids, weights)
    slow = torch.stack(
        [sum(weights[t, j] * moe.experts[str(int(ids[t, j]))](x[t]) for j in range(ids.shape[1])) for t in range(7)]
    )
    assert torch.allclose(fast, slow, atol=1e-6)


def test_mtp_predicts_shifted_targets(debug_cfg):
    """With depth 1, the MTP loss at position i must score token i+2 given the embedding of token i+1."""
    model = build_model(debug_cfg)
    tokens = torch.randint(0, 260, (1, 10))
    seq_len = positions_trained(10, depth := debug_cfg.mtp.depth)
    assert seq_len == 10 - 1 - depth
    out = model(tokens, mtp_weight=1.0)
    h = model.embed_inputs(tokens)
    rope = model.rope.tables(seq_len, h.device)
    for layer in model.layers:
        h, _ = layer(h, rope)
    main_ce = F.cross_entropy(model.head(model.norm(h))[0], tokens[0, 1 : seq_len + 1])
    module = model.mtp[0]
    h1, _ = module(h, model.embed(tokens[:, 1 : seq_len + 1]), rope)
    mtp_ce = F.cross_entropy(model.head(module.norm(h1))[0], tokens[0, 2 : seq_len + 2])
    assert out.main_loss.item() == pytest.approx(main_ce.item(), rel=1e-5)
    assert out.mtp_loss.item() == pytest.approx(mtp_ce.item(), rel=1e-5)


def test_sample_too_short_for_mtp(debug_cfg):
    with pytest.raises(ValueError, match="too short for MTP depth 1"):
        positions_trained(2, 1)


def test_routing_biases_round_trip_and_steer_selection(debug_cfg):
    model = build_model(debug_cfg)
    bias = torch.zeros(model.num_routers(), debug_cfg.model.num_routed_experts)
    bias[:, 3] = 10.0  # every token must now pick expert 3
    model.set_routing_biases(bias)
    assert torch.equal(model.routing_biases(), bias)
    out = model(torch.randint(0, 260, (2, 12)))
    for stats in out.router_stats:
        assert stats.counts_E[3].item() == 2 * 10


def test_microbatch_accumulation_equals_full_batch(debug_cfg):
    tokens = torch.randint(0, 260, (4, 18))
    grads = []
    for num_micro in (1, 4):
        model = build_model(debug_cfg)
        accumulate_gradients(model, tokens, num_micro, mtp_weight=0.3)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_same_seed_same_weights(debug_cfg):
    a, b = build_model(debug_cfg), build_model(debug_cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_model(debug_cfg, seed=1)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_671b_builds_on_meta_without_memory():
    cfg = load_config("671b", ["precision.fp8=false"])
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    assert 0.99 * 671e9 < total < 1.01 * 671e9
    assert all(p.is_meta for p in model.parameters())
    assert len(model.layers) == 61 and model.num_routers() == 59
