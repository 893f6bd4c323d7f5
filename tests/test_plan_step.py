"""The step-time and activation model: its pieces by hand, its plumbing through the simulator, the published runs."""

from __future__ import annotations

from functools import cache

import pytest

from raymoe.config import load_config
from raymoe.plan import Layout, count_params
from raymoe.plan.activations import FP8_TILE_BYTES, attention_saved, ffn_saved, peak_live_bytes, saved_bytes
from raymoe.plan.assumptions import Assumptions, split_overrides
from raymoe.plan.comm import all_to_all, ring_seconds
from raymoe.plan.destinations import expected_destinations
from raymoe.plan.devices import DEVICES, device_spec
from raymoe.plan.flops import attention_block, causal_context, ffn_block, head_block
from raymoe.plan.published import PUBLISHED
from raymoe.plan.step import plan_step
from raymoe.schedule import build_schedule
from raymoe.schedule.simulator import peak_live


def _plan(name: str, **assume):
    return _cached_plan(name, tuple(sorted(assume.items())))


@cache
def _cached_plan(name: str, assume: tuple):
    run = PUBLISHED[name]
    cfg = load_config(run.preset, list(run.overrides))
    layout = Layout(pp=run.pp, ep=run.ep, dp=run.dp, zero_stage=run.zero_stage, schedule=run.schedule)
    values = {k: v for k, v in run.assume.items()}
    values.update({k: str(v) for k, v in assume})
    return plan_step(cfg, layout, device=device_spec(run.gpu), assume=Assumptions().with_overrides(values),
                     num_microbatches=run.num_microbatches)


# -- FLOPs ---------------------------------------------------------------------------------------------------


def test_gemm_flops_are_twice_the_active_matrix_parameters():
    # Every weight a token multiplies, counted by the parameter planner, is one multiply-add per token.
    cfg = load_config("671b")
    m, k = cfg.model, cfg.routing.top_k
    params = count_params(m, top_k=k)
    gemm = 0.0
    for layer in params.layers:
        work = [attention_block(m, seq_len=4096, act_bytes=2), ffn_block(m, moe=layer.kind == "moe", top_k=k,
                                                                           act_bytes=2)]
        gemm += sum(w.gemm_flops for w in work)
    gemm += head_block(m, act_bytes=2).gemm_flops
    latent_norms = m.q_lora_rank + m.kv_lora_rank
    matrices = params.active - params.dim - params.final_norm - sum(
        layer.norms + latent_norms for layer in params.layers)
    assert gemm == 2 * matrices


def test_attention_core_is_quadratic_and_causal():
    cfg = load_config("671b").model
    work = attention_block(cfg, seq_len=4096, act_bytes=2)
    h, dqk, dv = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    assert causal_context(4096) == 2048.5
    assert work.attention_flops == 2 * h * (dqk + dv) * 2048.5
    assert attention_block(cfg, seq_len=8192, act_bytes=2).attention_flops == pytest.approx(
        2 * h * (dqk + dv) * 4096.5)


# -- activations ---------------------------------------------------------------------------------------------


def test_activation_inventory_by_hand():
    cfg = load_config("debug").model
    d, h, cq = cfg.dim, cfg.num_heads, cfg.q_lora_rank
    dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = attention_saved(cfg)
    assert cq > 0
    # norm in/out, q latent + q_norm out, kv latent + rope key, kv_norm out, q, k, v, attention output
    everything = (2 * d + 2 * cq + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank + 2 * h * dqk
                  + 2 * h * dv)
    assert saved_bytes(attn, act_bytes=4, fp8=False, recompute=False) == 4 * everything + 4 * h
    # Recomputation keeps only the norm input, the latent, the attention output and its log-sum-exp.
    kept = d + cq + cfg.kv_lora_rank + cfg.qk_rope_head_dim + h * dv
    assert saved_bytes(attn, act_bytes=4, fp8=False, recompute=True) == 4 * kept + 4 * h
    # MoE rows: K x (input D, SwiGLU input 2I) in FP8 tiles, SwiGLU output dropped.
    k, i = 2, cfg.moe_inter_dim
    moe = ffn_saved(cfg, moe=True, top_k=k)
    routed = [s for s in moe if s.name.startswith("experts")]
    assert saved_bytes(routed, act_bytes=2, fp8=True, recompute=True) == pytest.approx(
        k * (d + 2 * i) * FP8_TILE_BYTES)
    with_outputs = ffn_saved(cfg, moe=True, top_k=k, gate_weight_in_expert=False)
    assert saved_bytes(with_outputs, act_bytes=2, fp8=True, recompute=True) - saved_bytes(
        moe, act_bytes=2, fp8=True, recompute=True) == k * d * 2


@pytest.mark.parametrize(("name", "pp", "mbs"), [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 10),
                                                 ("dualpipev", 2, 6), ("gpipe", 3, 5)])
def test_weighted_peak_matches_the_simulators_peak_live(name, pp, mbs):
    schedule = build_schedule(name, pp, mbs)
    for rank in range(pp):
        acts = schedule.compute_actions(rank)
        assert peak_live_bytes(acts, lambda s: 3.0) == 3.0 * peak_live(acts)


# -- communication -------------------------------------------------------------------------------------------


def test_all_to_all_bytes_by_hand():
    dev = DEVICES["h800"]
    dest = expected_destinations(num_experts=256, num_groups=8, groups_kept=4, top_k=8, ep=64, ranks_per_node=8)
    a2a = all_to_all(tokens=4096, dim=7168, dest=dest, device=dev, fp8=True, act_bytes=2)
    per_token = 7168 * (FP8_TILE_BYTES + 2)  # FP8 dispatch + BF16 combine
    assert a2a.ib_bytes == pytest.approx(4096 * dest.remote_nodes * per_token)
    assert a2a.nvlink_bytes == pytest.approx(4096 * dest.ranks * (7 / 8) * per_token)
    assert a2a.seconds == pytest.approx(max(a2a.ib_bytes / 50e9, a2a.nvlink_bytes / 160e9))
    one = expected_destinations(num_experts=8, num_groups=1, groups_kept=1, top_k=2, ep=1, ranks_per_node=8)
    assert all_to_all(tokens=10, dim=8, dest=one, device=dev, fp8=False, act_bytes=2).seconds == 0.0
    assert ring_seconds(8e9, 8, 50) == pytest.approx(8e9 * 7 / 8 / 50e9) and ring_seconds(1e9, 1, 50) == 0.0


# -- the step through the simulator --------------------------------------------------------------------------


def test_deepseek_v3_layout_fits_80gb_without_tensor_parallelism():
    plan = _plan("deepseek-v3")
    assert plan.device.memory_gb == 80 and plan.fits
    assert plan.peak_memory.total_bytes < 80e9
    # Without the paper's recomputation it would not.
    peak = plan.peak_memory
    assert peak.state_bytes + peak.activation_bytes_no_recompute > 80e9
    # DualPipe holds pp + 1 live stage micro-batches per rank, as its paper's table says.
    assert all(r.peak_live_microbatches == 17 for r in plan.rank_memory)


def test_breakdown_adds_up_and_dualpipe_hides_the_all_to_all():
    plan = _plan("deepseek-v3")
    b = plan.breakdown
    parts = ("compute", "a2a_exposed", "comm_sm_share", "bubble", "dp_reduction_exposed", "optimizer")
    assert sum(b[k] for k in parts) == pytest.approx(plan.step_s)
    assert plan.costs.per_chunk[("FB", 5)] == pytest.approx(
        max((plan.chunks[5].f + plan.chunks[10].b) / (1 - plan.assume.comm_sm_fraction),
            plan.chunks[5].a2a_f + plan.chunks[10].a2a_b))
    # Without the all-to-all hidden (every action exposed, as in 1F1B) the same costs take longer.
    no_overlap = _plan("deepseek-v3", comm_sm_fraction=0.0, overlap_shared_expert=False)
    assert no_overlap.breakdown["comm_sm_share"] == 0.0
    assert plan.tokens_per_step == 15360 * 4096 and plan.num_devices == 2048
    assert plan.gpu_hours(1e12) == pytest.approx(1e12 / plan.tokens_per_s * 2048 / 3600)
    assert 0 < plan.mfu < 1


def test_assumptions_change_the_answer_in_the_right_direction():
    base = _plan("deepseek-v3")
    assert _plan("deepseek-v3", recompute=False).step_s < base.step_s  # recomputation costs time
    assert _plan("deepseek-v3", hbm_efficiency=0.4).step_s > base.step_s
    faster = _plan("deepseek-v3", grouped_gemm_efficiency=1.0)
    assert faster.step_s < base.step_s
    assert not _plan("deepseek-v3", keep_logits=True).fits


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_runs_are_predicted_within_a_factor_of_two(name):
    # A sanity bound, not a fit: the README reports the actual ratios (V3 1.16x, V2 0.69x when written).
    plan = _plan(name)
    ratio = plan.gpu_hours(1e12) / PUBLISHED[name].gpu_hours_per_trillion
    assert 0.5 < ratio < 2.0, ratio


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown assumption 'hbm'"):
        Assumptions().with_overrides({"hbm": "1"})
    with pytest.raises(ValueError, match="hbm_efficiency must be in"):
        Assumptions().with_overrides({"hbm_efficiency": "2"})
    with pytest.raises(ValueError, match="expected true or false"):
        Assumptions().with_overrides({"recompute": "maybe"})
    with pytest.raises(ValueError, match="unknown device 'b200'"):
        device_spec("b200")
    with pytest.raises(ValueError, match="unknown device field"):
        DEVICES["h800"].with_overrides({"tflops": "1"})
    with pytest.raises(ValueError, match="no FP8"):
        DEVICES["a100"].gemm_tflops("fp8")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        split_overrides(["recompute"])
    cfg = load_config("671b")
    with pytest.raises(ValueError, match="divisible by dp x micro-batches"):
        plan_step(cfg, Layout(pp=16, ep=64, dp=128, schedule="dualpipe"), device=DEVICES["h800"],
                  assume=Assumptions(), num_microbatches=50)


@pytest.mark.parametrize(("schedule", "pp"), [("gpipe", 4), ("1f1b", 4), ("zb1p", 4), ("dualpipe", 4),
                                              ("dualpipev", 2)])
def test_every_schedule_prices_and_adds_up(schedule, pp):
    cfg = load_config("236b", ["data.batch_size=256"])
    plan = plan_step(cfg, Layout(pp=pp, ep=8, dp=16, schedule=schedule), device=device_spec("h100"),
                     assume=Assumptions(), num_microbatches=4 * pp if schedule != "gpipe" else pp)
    parts = ("compute", "a2a_exposed", "comm_sm_share", "bubble", "dp_reduction_exposed", "optimizer")
    assert sum(plan.breakdown[k] for k in parts) == pytest.approx(plan.step_s)
    has_pairs = any(kind == "FB" for kind, _ in plan.costs.per_chunk)
    assert has_pairs == schedule.startswith("dualpipe")
    assert plan.breakdown["comm_sm_share"] > 0 if has_pairs else plan.breakdown["comm_sm_share"] == 0
    assert len(plan.chunks) == (2 * pp if schedule == "dualpipev" else pp)
