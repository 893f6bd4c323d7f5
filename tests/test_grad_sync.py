"""DualPipe's overlapped mirror-gradient sums (raymoe.parallel.grad_sync): which parameters form a unit, when each
unit is final, and -- on two gloo processes running a real DualPipe step -- bitwise the old sum after the step."""

from __future__ import annotations

import torch

from raymoe.config import load_config
from raymoe.model import build_model
from raymoe.parallel.grad_sync import _buckets, final_passes, parameter_chunks
from raymoe.parallel.stage_plan import PipelineStage, plan_stages
from raymoe.schedule import build_schedule
from tests._gloo import run_gloo

MTP_WEIGHT = 0.3


def _config(layers: int = 4):
    return load_config("debug", [f"model.num_layers={layers}", "parallel.pp=2", "schedule.name=dualpipe",
                                 "schedule.num_microbatches=4", "data.seq_len=16"])


def test_units_follow_the_chunks_that_use_each_parameter():
    config = _config()
    stage = PipelineStage(build_model(config), plan_stages(4, 2), [0, 1])
    chunks = parameter_chunks(stage)
    assert chunks["embed.weight"] == {0, 1}  # chunk 0's embedding, read again by the last chunk's MTP
    assert chunks["layers.0.attn_norm.weight"] == {0} and chunks["layers.3.attn_norm.weight"] == {1}
    assert chunks["head.weight"] == {1} and all(chunks[n] == {1} for n in chunks if n.startswith("mtp."))


def test_final_passes_come_from_the_action_list():
    schedule = build_schedule("dualpipe", 2, 8)
    # rank 0: F0.0 F3.4 F0.1 B3.4 FB3.5 FB0.2 FB3.6 FB0.3 FB3.7 B3.7 I0.3 W0.3: chunk 1 (stage 3) is final after
    # B3.7, the 7th backward pass, two passes before chunk 0 (after W0.3).
    assert final_passes(schedule.actions[0], schedule.placement) == (9, {1: 6, 0: 8})


def test_buckets_keep_order_and_size():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 30, 5)]
    assert [[p.numel() for p in b] for b in _buckets(params, bucket_bytes=80)] == [[10, 10], [30], [5]]


def _dualpipe_rank(rank: int, world_size: int, overlapped: bool):
    """One DualPipe pp=2 step on this rank (real gloo P2P), mirror sums overlapped or after the step."""
    import torch.distributed as dist

    from raymoe.parallel.executor import Executor
    from raymoe.parallel.grad_sync import MirrorGradSync, build_mirror_lanes
    from raymoe.parallel.groups import all_reduce_sum
    from raymoe.parallel.p2p import TorchTransport
    from raymoe.parallel.stage_plan import grad_sync_plan

    config = _config()
    schedule = build_schedule("dualpipe", 2, 4)
    placement = schedule.placement
    stage = PipelineStage(build_model(config), plan_stages(4, 2), [0, 1])
    sync = grad_sync_plan("dualpipe", 2, rank, stage)
    lanes = build_mirror_lanes([(0, 1)], rank)
    mirror = MirrorGradSync(stage=stage, names=sync.mirror, actions=schedule.actions[rank], placement=placement,
                            lanes=lanes, bucket_bytes=64 << 10)  # small buckets: several per unit
    model = build_model(config, device="meta")
    executor = Executor(
        stage=stage, placement=placement, pipeline_rank=rank, global_rank_of=[0, 1], transport=TorchTransport(),
        num_microbatches=4, activation_shape=(config.data.batch_size // 4, 16, config.model.dim),
        num_routers=model.num_routers(), num_experts=config.model.num_routed_experts,
        after_backward=mirror.after_backward if overlapped else None,
    )
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, config.model.vocab_size, (config.data.batch_size, 16 + 1 + config.mtp.depth),
                           generator=generator)
    mirror.begin_step()
    executor.run(schedule.actions[rank], dict(enumerate(tokens.chunk(4))), MTP_WEIGHT)
    named = dict(stage.named_parameters())
    if overlapped:
        mirror.finish()
    else:  # the sum as the worker did it before: one flat all-reduce after the step
        for p in named.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_sum([named[n].grad for n in sorted(sync.mirror)], dist.group.WORLD)
    return {"grads": {n: p.grad for n, p in named.items()}, "issued_after": list(mirror.issued_after)}


def test_overlapped_mirror_sums_are_bitwise_the_sum_after_the_step():
    overlapped = run_gloo(2, _dualpipe_rank, True)
    after = run_gloo(2, _dualpipe_rank, False)
    for rank in (0, 1):
        got, want = overlapped[rank]["grads"], after[rank]["grads"]
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]
    assert all(torch.equal(overlapped[0]["grads"][n], overlapped[1]["grads"][n]) for n in want)  # both copies
    # Chunk 1 is final before the last backward pass on both ranks: its sums started while work remained.
    for rank in (0, 1):
        issued = dict(overlapped[rank]["issued_after"])
        assert issued[(1,)] < issued[(0,)] == issued[(0, 1)] == 5
