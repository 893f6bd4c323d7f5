"""A worker builds only what it owns: its stage(s) and its expert shard, counted on ``meta``, equal the planner's
per-device parameter count, for presets far too large to build whole (671B at pp=16 x ep=64, 16B at pp=4 x ep=4);
and a materialised shard is bit-identical to the same tensors of the full model."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import load_config
from raymoe.model import build_model
from raymoe.parallel.dispatcher import contiguous_placement, experts_of
from raymoe.parallel.stage_plan import build_stage, plan_stages
from raymoe.plan.memory import BytesPerElement, Layout, plan_memory
from raymoe.plan.params import count_params
from raymoe.schedule import stage_placement


@pytest.mark.parametrize("preset,pp,ep,schedule", [("671b", 16, 64, "dualpipe"), ("16b", 4, 4, "1f1b"),
                                                   ("small", 2, 4, "dualpipev")])
def test_meta_stage_holds_what_the_planner_counts(preset, pp, ep, schedule):
    cfg = load_config(preset, [f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.dp={ep}",
                               f"schedule.name={schedule}", "parallel.device=cpu"])
    placement = stage_placement(schedule, pp)
    plan = plan_stages(cfg.model.num_layers, placement.num_chunks, cfg.parallel.stage_layers)
    experts = contiguous_placement(cfg.model.num_routed_experts, ep)
    params = count_params(cfg.model, top_k=cfg.routing.top_k, mtp_depth=cfg.mtp.depth)
    planned = plan_memory(params, Layout(pp=pp, ep=ep, dp=ep, schedule=schedule),
                          BytesPerElement.from_precision(cfg.precision),
                          num_routed_experts=cfg.model.num_routed_experts)
    for pp_rank in range(pp):
        chunks = [placement.info(s).chunk for s in placement.stages_of(pp_rank)]
        for ep_rank in (0, ep - 1):
            stage = build_stage(cfg, plan, chunks, device="meta", expert_ids=experts_of(experts, ep_rank))
            held = sum(p.numel() for p in stage.parameters())
            device = planned.devices[pp_rank]
            assert held == device.dense_params + device.expert_params, (pp_rank, ep_rank)
            moe_layers = stage.moe_layers()
            expected_ids = {str(e) for e in experts_of(experts, ep_rank)}
            assert all(set(m.experts) == expected_ids for m in moe_layers)


def test_a_materialised_shard_is_the_reference_slice_bit_for_bit():
    cfg = load_config("debug", ["parallel.pp=2", "parallel.ep=2", "parallel.dp=2"])
    reference = dict(build_model(cfg).named_parameters())
    plan = plan_stages(cfg.model.num_layers, 2)
    for chunk in (0, 1):
        stage = build_stage(cfg, plan, [chunk], expert_ids=[4, 5, 6, 7])
        for name, p in stage.named_parameters():
            assert torch.equal(p, reference[name]), name
        assert all(set(m.experts) == {"4", "5", "6", "7"} for m in stage.moe_layers())
