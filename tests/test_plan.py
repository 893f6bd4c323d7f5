"""The planner: analytic parameter counts (vs the paper and vs the real nn.Module) and per-device memory."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from raymoe.commands.plan import plan
from raymoe.config import ModelConfig, PrecisionConfig, load_config
from raymoe.plan import BytesPerElement, Layout, count_params, plan_memory, split_layers


def _params(preset: str, overrides: tuple[str, ...] = ()):
    cfg = load_config(preset, list(overrides))
    return cfg, count_params(cfg.model, top_k=cfg.routing.top_k, mtp_depth=cfg.mtp.depth)


# -- parameter counts ----------------------------------------------------------------------------------------


def test_671b_matches_the_published_figures():
    # DeepSeek-V3 (arXiv 2412.19437 section 4.2): 671B total, 37B active per token; README_WEIGHTS.md: the MTP
    # module has 11.5B unique parameters besides the shared embedding and head.
    _, p = _params("671b")
    assert abs(p.total / 671e9 - 1) < 0.01, p.total
    assert abs(p.active / 37e9 - 1) < 0.02, p.active
    assert abs(p.mtp_total / 11.5e9 - 1) < 0.02, p.mtp_total
    assert p.embedding == p.head == 129280 * 7168
    assert p.routing_bias_elems == (58 + 1) * 256


@pytest.mark.parametrize(("preset", "total", "active"), [("16b", 15.7e9, 2.4e9), ("236b", 236e9, 21e9)])
def test_v2_shaped_presets_match_deepseek_v2(preset, total, active):
    _, p = _params(preset)
    assert abs(p.total / total - 1) < 0.01
    assert abs(p.active / active - 1) < 0.03


def test_breakdown_sums_to_the_totals():
    _, p = _params("small")
    assert p.total == p.embedding + sum(layer.total for layer in p.layers) + p.final_norm + p.head
    assert p.active == p.dim + sum(layer.active for layer in p.layers) + p.final_norm + p.head
    assert p.active_with_embedding - p.active == p.embedding - p.dim
    for layer in p.layers:
        parts = layer.attention_total + layer.norms + layer.dense_ffn + layer.gate
        assert layer.total == parts + layer.shared_experts + layer.routed_experts
    assert p.mtp_total == sum(m.norms + m.proj + m.block.total for m in p.mtp)


def test_hand_counted_tiny_model():
    cfg = ModelConfig(
        vocab_size=10,
        dim=8,
        num_layers=2,
        num_dense_layers=1,
        dense_inter_dim=16,
        moe_inter_dim=4,
        num_routed_experts=4,
        num_shared_experts=1,
        num_heads=2,
        q_lora_rank=6,
        kv_lora_rank=4,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=3,
    )
    p = count_params(cfg, top_k=2, mtp_depth=1)
    attention = {
        "wq_a": 8 * 6,
        "q_norm": 6,
        "wq_b": 6 * 2 * 4,
        "wkv_a": 8 * 6,
        "kv_norm": 4,
        "wkv_b": 4 * 2 * 5,
        "wo": 2 * 3 * 8,
    }
    assert p.layers[0].attention == attention
    attn = sum(attention.values())  # 334
    dense = attn + 16 + 3 * 8 * 16
    expert = 3 * 8 * 4
    moe = attn + 16 + 4 * 8 + expert + 4 * expert
    assert [layer.total for layer in p.layers] == [dense, moe]
    assert p.total == 10 * 8 + dense + moe + 8 + 8 * 10
    assert p.active == 8 + dense + (moe - 2 * expert) + 8 + 80
    assert p.mtp_total == 3 * 8 + 2 * 8 * 8 + moe
    # Without a query bottleneck the queries come from one D x H*(N+R) matrix.
    direct = count_params(replace(cfg, q_lora_rank=0), top_k=2)
    assert direct.layers[0].attention["wq"] == 8 * 2 * 4 and "wq_a" not in direct.layers[0].attention


def _check_against_module(preset: str) -> None:
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("raymoe.model")
    cfg, p = _params(preset)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = model_mod.Transformer(cfg.model, cfg.routing, cfg.mtp)
    named = dict(model.named_parameters())
    assert sum(t.numel() for n, t in named.items() if not n.startswith("mtp.")) == p.total
    assert sum(t.numel() for n, t in named.items() if n.startswith("mtp.")) == p.mtp_total
    assert [sum(t.numel() for t in layer.parameters()) for layer in model.layers] == [
        x.total for x in p.layers
    ]
    # The balancing bias is a buffer, not a parameter.
    gate_biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("gate.bias"))
    assert gate_biases == p.routing_bias_elems


@pytest.mark.parametrize("preset", ["debug", "small"])
def test_counts_match_the_real_module(preset):
    _check_against_module(preset)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["16b", "236b", "671b"])
def test_counts_match_the_real_module_at_scale(preset):
    _check_against_module(preset)  # ~15 s for 671b on 2 cores: building 14k meta modules dominates


def test_count_params_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        count_params(ModelConfig(num_routed_experts=8), top_k=9)


# -- memory --------------------------------------------------------------------------------------------------

BF16 = BytesPerElement.from_precision(PrecisionConfig(dtype="bf16", bf16_optimizer_states=True))


def _memory(p, n_experts, **layout):
    return plan_memory(p, Layout(**layout), BF16, num_routed_experts=n_experts)


def test_bytes_per_element_follow_the_precision_config():
    fp32 = BytesPerElement.from_precision(PrecisionConfig(dtype="fp32"))
    assert (fp32.param, fp32.grad, fp32.master, fp32.moments) == (4, 4, 0, 8)
    assert (BF16.param, BF16.grad, BF16.master, BF16.moments) == (2, 2, 4, 4)
    bf16_fp32_states = BytesPerElement.from_precision(PrecisionConfig(dtype="bf16"), fp32_grads=True)
    assert (bf16_fp32_states.grad, bf16_fp32_states.optimizer) == (4, 12)


def test_zero1_optimizer_halves_when_dp_doubles():
    cfg, p = _params("671b")
    n = cfg.model.num_routed_experts
    small = _memory(p, n, pp=16, ep=64, dp=128, zero_stage=1, schedule="dualpipe")
    large = _memory(p, n, pp=16, ep=64, dp=256, zero_stage=1, schedule="dualpipe")
    for a, b in zip(small.devices, large.devices):
        assert a.param_bytes == b.param_bytes and a.grad_bytes == b.grad_bytes
        assert abs(b.optimizer_bytes / a.optimizer_bytes - 0.5) < 1e-6
    unsharded = _memory(p, n, pp=16, ep=64, dp=128, zero_stage=0, schedule="dualpipe")
    zero2 = _memory(p, n, pp=16, ep=64, dp=128, zero_stage=2, schedule="dualpipe")
    for z0, z1, z2 in zip(unsharded.devices, small.devices, zero2.devices):
        assert z0.optimizer_bytes == (z0.dense_params + z0.expert_params) * BF16.optimizer
        assert z2.grad_bytes == z1.optimizer_bytes // BF16.optimizer * BF16.grad < z1.grad_bytes


def test_experts_split_over_ep_and_shard_over_expert_dp():
    cfg, p = _params("small")
    n = cfg.model.num_routed_experts
    one = _memory(p, n).devices[0]
    assert one.dense_params + one.expert_params == p.total + p.mtp_total
    four = _memory(p, n, ep=4, dp=4).devices[0]
    assert four.expert_params * 4 == one.expert_params and four.dense_params == one.dense_params
    # Experts are data-parallel over dp // ep = 1 rank: their optimizer state is not sharded further.
    expected = -(-four.dense_params // 4) + four.expert_params
    assert four.optimizer_bytes == expected * BF16.optimizer


def test_stage_placement_of_embedding_head_and_mtp():
    cfg, p = _params("671b")
    n = cfg.model.num_routed_experts
    # DualPipe: rank 0 holds stages 0 and pp-1, so embedding, head and MTP share one physical copy.
    dual = _memory(p, n, pp=16, ep=64, dp=128, schedule="dualpipe")
    assert dual.devices[0].stages == (0, 15) and dual.peak.pp_rank == 0
    # One stage per rank: the last stage also keeps a copy of the embedding for MTP.
    plain = _memory(p, n, pp=16, ep=64, dp=128, schedule="1f1b")
    last, first = plain.devices[-1], plain.devices[0]
    last_layers = sum(p.layers[i].non_expert for i in last.layers)
    mtp_dense = p.mtp_total - p.mtp[0].block.routed_experts
    assert last.dense_params == last_layers + p.final_norm + p.head + mtp_dense + p.embedding
    assert first.dense_params == sum(p.layers[i].non_expert for i in first.layers) + p.embedding
    no_mtp = count_params(cfg.model, top_k=cfg.routing.top_k, mtp_depth=0)
    assert plan_memory(no_mtp, Layout(pp=16), BF16, num_routed_experts=n).devices[-1].dense_params == (
        sum(no_mtp.layers[i].non_expert for i in last.layers) + p.final_norm + p.head
    )


def test_split_layers():
    assert [len(r) for r in split_layers(61, Layout(pp=16))] == [4] * 13 + [3] * 3
    assert [len(r) for r in split_layers(10, Layout(pp=2, schedule="dualpipev"))] == [3, 3, 2, 2]
    assert [r.start for r in split_layers(6, Layout(pp=2, stage_layers=(2, 4)))] == [0, 2]
    with pytest.raises(ValueError, match=r"stage_layers \[2, 3\]"):
        split_layers(6, Layout(pp=2, stage_layers=(2, 3)))


def test_layout_errors_name_the_values():
    _, p = _params("debug")
    with pytest.raises(ValueError, match=r"pp=8.*cannot cut 4 layers into 8 pipeline chunks"):
        plan_memory(p, Layout(pp=8), BF16, num_routed_experts=8)
    with pytest.raises(ValueError, match=r"num_routed_experts \(8\) must be divisible by ep \(3\)"):
        plan_memory(p, Layout(ep=3, dp=3), BF16, num_routed_experts=8)
    with pytest.raises(ValueError, match=r"dp \(6\) must be divisible by ep \(4\)"):
        Layout(ep=4, dp=6)
    with pytest.raises(ValueError, match="even pp, got 3"):
        Layout(pp=3, schedule="dualpipe")


# -- command line --------------------------------------------------------------------------------------------


def test_cli_json_for_671b():
    result = CliRunner().invoke(plan, ["--preset", "671b", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert abs(report["total_params"] / 671e9 - 1) < 0.01
    assert abs(report["active_params"] / 37e9 - 1) < 0.02
    assert abs(report["mtp_params"] / 11.5e9 - 1) < 0.02
    assert len(report["layers"]) == 61 and report["layers"][3]["kind"] == "moe"
    assert report["memory"]["layout"] == {
        "pp": 16,
        "ep": 64,
        "dp": 128,
        "expert_dp": 2,
        "zero_stage": 1,
        "schedule": "dualpipe",
        "num_stages": 16,
    }
    peak = report["memory"]["peak"]
    assert peak["total_bytes"] == peak["param_bytes"] + peak["grad_bytes"] + peak["optimizer_bytes"]


def test_cli_overrides_layout_and_text_output():
    runner = CliRunner()
    result = runner.invoke(
        plan, ["--preset", "debug", "--pp", "2", "--ep", "2", "--dp", "4", "model.num_layers=6"]
    )
    assert result.exit_code == 0, result.output
    assert "layers 1-5 moe x5" in result.output and "pp=2 ep=2 dp=4" in result.output
    bad = runner.invoke(plan, ["--preset", "debug", "--ep", "3", "--dp", "3"])
    assert bad.exit_code == 2 and "num_routed_experts (8) must be divisible by ep (3)" in bad.output
    bad = runner.invoke(plan, ["--preset", "debug", "--pp", "5"])
    assert bad.exit_code == 2 and "cannot cut 4 layers into 5 pipeline chunks" in bad.output


def test_cli_reads_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: debug\nmodel:\n  num_layers: 5\n")
    result = CliRunner().invoke(plan, ["--config", str(path), "--json", "mtp.depth=2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == 5 and [m["depth"] for m in report["mtp"]] == [1, 2]
    assert report["mtp_params"] == 2 * report["mtp"][0]["total"]


def test_plan_cluster_says_whether_the_layout_fits():
    from click.testing import CliRunner

    from raymoe.cli import main

    fits = CliRunner().invoke(main, ["plan", "--preset", "671b", "--cluster", "cluster/aws.yaml", "--json"])
    assert fits.exit_code == 0, fits.output
    report = json.loads(fits.output)
    assert report["cluster"]["fits"] and report["cluster"]["num_nodes_to_launch"] == 256
    too_small = CliRunner().invoke(main, ["plan", "--preset", "671b", "--cluster", "cluster/kuberay/rayjob.yaml"])
    assert too_small.exit_code == 1 and "DOES NOT FIT" in too_small.output
