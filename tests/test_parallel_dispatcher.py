"""Expert-parallel dispatch: index math by hand, the local twin, and the gloo all-to-all == one device.

The distributed cases run P processes in one gloo world (``_gloo.run_gloo``, no Ray): each rank routes its own
tokens through the MoE layer of its expert shard, and every output and every gradient (gate, shared expert,
each routed expert by global id) must match one process holding all experts and all ranks' tokens.
"""

from __future__ import annotations

import pytest
import torch
from _gloo import run_gloo

from raymoe.config import load_config
from raymoe.model.build import materialize
from raymoe.model.dispatch import LocalDispatcher, plan_rows, routing_rows, run_local_experts
from raymoe.model.moe import MoE


def test_plan_rows_sends_each_token_once_per_destination_rank():
    placement = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # 8 experts on 4 ranks, rank 3 gets nothing below
    topk = torch.tensor([[0, 1], [0, 2], [1, 0], [5, 4]])
    token, dest, counts = plan_rows(topk, placement, 4)
    # rank 0: tokens 0, 1, 2 (token 0 once although both its experts live there); rank 1: token 1; rank 2: 3
    assert counts == [3, 1, 1, 0]
    assert token.tolist() == [0, 1, 2, 1, 3]
    assert dest.tolist() == [0, 0, 0, 1, 2]
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    ids, w = routing_rows(topk, weights, placement, token, dest)
    assert ids.tolist() == [[0, 1], [0, -1], [1, 0], [-1, 2], [5, 4]]
    assert torch.equal(w, torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.5, 0.5], [0.0, 0.3], [0.9, 0.1]]))


def test_plan_rows_with_every_token_on_one_rank():
    placement = torch.tensor([0, 0, 1, 1])
    topk = torch.tensor([[1, 0]] * 5)
    token, dest, counts = plan_rows(topk, placement, 2)
    assert counts == [5, 0] and token.tolist() == [0, 1, 2, 3, 4] and dest.tolist() == [0] * 5


def _moe(cfg, expert_ids=None, seed=0):
    with torch.device("meta"):
        moe = MoE(cfg.model, cfg.routing, slot=0, expert_ids=expert_ids)
    return materialize(moe, device="cpu", std=0.1, run_seed=seed)


def test_sharded_experts_are_the_reference_experts_by_global_id():
    cfg = load_config("debug")
    full, shard = _moe(cfg), _moe(cfg, expert_ids=[4, 5, 6, 7])
    assert sorted(shard.experts, key=int) == ["4", "5", "6", "7"]
    for name, p in shard.named_parameters():
        assert torch.equal(p, dict(full.named_parameters())[name]), name


def test_local_experts_skip_other_ranks_slots_and_give_zero_grads_to_idle_experts():
    cfg = load_config("debug")
    moe = _moe(cfg, expert_ids=[2, 3])
    x = torch.randn(3, cfg.model.dim)
    ids = torch.tensor([[2, -1], [-1, -1], [2, 2]])
    w = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.25, 0.25]])
    y = run_local_experts(moe.experts, x, ids, w)
    expected = torch.stack([0.5 * moe.experts["2"](x[0]), torch.zeros(cfg.model.dim),
                            0.25 * moe.experts["2"](x[2]) + 0.25 * moe.experts["2"](x[2])])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in moe.experts["3"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in moe.experts["2"].parameters())


def test_identity_round_trip_through_the_local_twin_is_exact():
    x = torch.randn(6, 16)
    ids = torch.tensor([[0, 1]] * 6)
    w = torch.tensor([[1.0, 0.0]] * 6)
    d = LocalDispatcher()
    x_r, ids_r, w_r, plan = d.dispatch(x, ids, w, layer=0)
    experts = torch.nn.ModuleDict({"0": torch.nn.Identity(), "1": torch.nn.Identity()})
    assert torch.equal(d.combine(run_local_experts(experts, x_r, ids_r, w_r), plan, layer=0, out_dtype=x.dtype), x)


# -- the gloo all-to-all against one device -----------------------------------------------------------------------
def _ep_vs_reference(rank: int, world: int, imbalance: bool, identity: bool, fp8: bool = False):
    import torch.distributed as dist

    from raymoe.parallel.dispatcher import AllToAllDispatcher, contiguous_placement, experts_of, install_dispatcher

    cfg = load_config("debug")
    num_experts = cfg.model.num_routed_experts
    placement = contiguous_placement(num_experts, world)
    reference, shard = _moe(cfg), _moe(cfg, expert_ids=experts_of(placement, rank))
    dispatcher = AllToAllDispatcher(group=dist.group.WORLD, rank_of_expert_E=placement, fp8=fp8)
    install_dispatcher(shard, dispatcher)
    reference.dispatcher = LocalDispatcher(fp8=fp8)
    if imbalance:  # every token of every rank picks the same top-k experts, all on rank 0
        for m in (reference, shard):
            m.gate.bias[: cfg.routing.top_k] = 100.0
    xs = [torch.randn(2, 5 if r % 2 else 3, cfg.model.dim, generator=torch.Generator().manual_seed(r))
          for r in range(world)]  # uneven token counts per rank
    cotangents = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + r)) for r, x in enumerate(xs)]
    if identity:
        for m in (reference, shard):
            for e in m.experts.values():
                e.forward = lambda t: t  # noqa: B023 - an identity expert
    y_ref = [reference(x)[0] for x in xs]
    sum((y * g).sum() for y, g in zip(y_ref, cotangents)).backward()
    x_mine = xs[rank].clone().requires_grad_()
    y, stats = shard(x_mine)
    (y * cotangents[rank]).sum().backward()
    grads = {n: p.grad for n, p in shard.named_parameters()}
    dense = [n for n in grads if ".experts." not in f".{n}"]
    for n in dense:  # dense parameters: each rank has its own tokens' share; the reference has all of them
        dist.all_reduce(grads[n])
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    return {
        "y": (y.detach(), y_ref[rank].detach()),
        "grads": {n: (g, ref_grads[n]) for n, g in grads.items()},
        "stats": dispatcher.stats.as_dict(),
        "counts": stats.counts_E,
        "x": xs[rank],
    }


@pytest.mark.parametrize("world,imbalance", [(2, False), (4, False), (2, True)])
def test_all_to_all_matches_one_device_on_outputs_and_every_gradient(world, imbalance):
    results = run_gloo(world, _ep_vs_reference, imbalance, False)
    for rank, r in enumerate(results):
        y, y_ref = r["y"]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        names = set(r["grads"])
        assert any(n.startswith("gate.") for n in names) and any(n.startswith("shared.") for n in names)
        for name, (g, g_ref) in r["grads"].items():
            assert g is not None, name
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    if imbalance:  # all tokens of all ranks land on rank 0: nothing dropped, the peak reported
        total_tokens = sum(r["x"].shape[0] * r["x"].shape[1] for r in results)
        assert results[0]["stats"]["peak_rows_received"] == total_tokens
        assert all(r["stats"]["peak_rows_received"] == 0 for r in results[1:])


def test_fp8_dispatch_matches_its_local_twin():
    """precision.fp8_dispatch: E4M3 + 1x128 scales on the wire; the one-rank twin rounds each token the same way,
    so the distributed layer still matches it on outputs and every gradient (and differs from fp32 dispatch)."""
    fp8 = run_gloo(2, _ep_vs_reference, False, False, True)
    for rank, r in enumerate(fp8):
        y, y_ref = r["y"]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for name, (g, g_ref) in r["grads"].items():
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    plain = run_gloo(2, _ep_vs_reference, False, False, False)
    assert not torch.equal(fp8[0]["y"][0], plain[0]["y"][0])  # the rounding is real


def test_identity_experts_return_the_input_exactly_through_the_all_to_all():
    # experts are identities and the weights are normalised (sigmoid gate, top-k): y = sum_k w_k x = x up to the
    # rounding of the weights' sum; the round trip itself adds nothing, so it matches the one-device result bitwise
    for r in run_gloo(2, _ep_vs_reference, False, True):
        y, y_ref = r["y"]
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def _mismatched_layers(rank: int, world: int):
    import torch.distributed as dist

    from raymoe.parallel.dispatcher import AllToAllDispatcher, contiguous_placement

    dispatcher = AllToAllDispatcher(group=dist.group.WORLD, rank_of_expert_E=contiguous_placement(8, world))
    x = torch.randn(4, 16)
    ids = torch.tensor([[0, 5]] * 4)
    try:  # rank 1 thinks it is at another MoE layer: the header exchange catches it before any data moves
        dispatcher.dispatch(x, ids, torch.full((4, 2), 0.5), layer=3 if rank == 0 else 4)
    except ValueError as exc:
        return str(exc)
    return None


def test_ranks_at_different_layers_get_an_error_naming_both_not_a_hang():
    messages = run_gloo(2, _mismatched_layers, timeout_s=60)
    assert "MoE layer (router slot) 3" in messages[0] and "peer rank 1 is at router slot 4" in messages[0]
    assert "MoE layer (router slot) 4" in messages[1] and "peer rank 0 is at router slot 3" in messages[1]
