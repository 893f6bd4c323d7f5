"""The executor against the single-process reference, without Ray or torch.distributed.

Each pipeline rank runs in a thread of this process with the in-memory transport, so every schedule's action
lists are executed for real (sends, receives, local hand-overs, I/W split, FB pairs), and the gradients,
after the embedding/mirror sums the runtime performs, are compared with ``accumulate_gradients``.
"""

from __future__ import annotations

import pytest
import torch

from raymoe.config import load_config
from raymoe.model import build_model
from raymoe.parallel.executor import Executor
from raymoe.parallel.p2p import InMemoryTransport, Mailbox, run_ranks_in_threads, transfer_tag
from raymoe.parallel.stage_plan import PipelineStage, grad_sync_plan, plan_stages
from raymoe.parallel.weight_grad import DeferredLinear
from raymoe.schedule import Kind, build_schedule
from raymoe.train import accumulate_gradients

MTP_WEIGHT = 0.3


@pytest.fixture(autouse=True)
def _one_thread_per_rank():
    """Pipeline ranks run as threads: intra-op threads on top would oversubscribe the cores ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(pp: int, schedule: str, microbatches: int, layers: int = 4):
    return load_config(
        "debug",
        [f"model.num_layers={layers}", f"parallel.pp={pp}", f"schedule.name={schedule}",
         f"schedule.num_microbatches={microbatches}", "data.seq_len=16"],
    )


def _tokens(config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    length = config.data.seq_len + 1 + config.mtp.depth
    return torch.randint(0, config.model.vocab_size, (config.data.batch_size, length), generator=generator)


def run_pipeline(config, tokens_BL: torch.Tensor):
    """Run one step's forward/backward of every pipeline rank in threads; returns (stages, outcomes, schedule)."""
    pp, m = config.parallel.pp, config.schedule.num_microbatches
    schedule = build_schedule(config.schedule.name, pp, m)
    placement = schedule.placement
    plan = plan_stages(config.model.num_layers, placement.num_chunks, config.parallel.stage_layers)
    micro = dict(enumerate(tokens_BL.chunk(m)))
    mailbox = Mailbox()
    stages = {}
    for r in range(pp):
        chunks = [placement.info(s).chunk for s in placement.stages_of(r)]
        stages[r] = PipelineStage(build_model(config), plan, chunks)

    def work(r: int):
        model = build_model(config, device="meta")
        executor = Executor(
            stage=stages[r], placement=placement, pipeline_rank=r, global_rank_of=range(pp),
            transport=InMemoryTransport(mailbox, r, timeout_s=30), num_microbatches=m,
            activation_shape=(tokens_BL.shape[0] // m, config.data.seq_len, config.model.dim),
            num_routers=model.num_routers(), num_experts=config.model.num_routed_experts,
        )
        return executor.run(schedule.actions[r], micro, MTP_WEIGHT)

    outcomes = dict(enumerate(run_ranks_in_threads(work, pp)))
    _sync_gradients(config, schedule, stages)
    return stages, outcomes, schedule


def _sync_gradients(config, schedule, stages) -> None:
    """What the runtime does with process groups: sum tied embeddings and DualPipe mirrors."""
    pp = config.parallel.pp
    plans = {r: grad_sync_plan(schedule.placement.family, pp, r, stages[r]) for r in stages}
    pairs = [(0, pp - 1, "embedding")] + [(p, pp - 1 - p, "mirror") for p in range(pp // 2)]
    for a, b, kind in pairs:
        names = getattr(plans[a], kind)
        if a == b or not names:
            continue
        assert names == getattr(plans[b], kind)
        pa, pb = dict(stages[a].named_parameters()), dict(stages[b].named_parameters())
        for name in names:
            total = pa[name].grad + pb[name].grad
            pa[name].grad, pb[name].grad = total.clone(), total.clone()


def _reference(config, tokens_BL):
    model = build_model(config)
    sums = accumulate_gradients(model, tokens_BL, config.schedule.num_microbatches, MTP_WEIGHT)
    return model, sums


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


CASES = [
    ("gpipe", 2, 4), ("1f1b", 2, 4), ("zb1p", 2, 4), ("dualpipe", 2, 4), ("dualpipev", 2, 4),
    ("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8), ("gpipe", 1, 2), ("zb1p", 1, 2),
    ("dualpipev", 1, 2),
]


@pytest.mark.parametrize(("schedule", "pp", "microbatches"), CASES)
def test_executor_matches_reference(schedule, pp, microbatches):
    layers = 8 if schedule == "dualpipev" and pp == 4 else 4
    config = _config(pp, schedule, microbatches, layers)
    tokens = _tokens(config)
    stages, outcomes, _ = run_pipeline(config, tokens)
    model, sums = _reference(config, tokens)

    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    seen = set()
    for stage in stages.values():
        for name, p in stage.named_parameters():
            assert p.grad is not None, name
            assert _rel(p.grad, ref_grads[name]) < 1e-5, (name, _rel(p.grad, ref_grads[name]))
            seen.add(name)
    assert seen == set(ref_grads)

    main = sum(o.main_ce for o in outcomes.values())
    balance = sum(o.balance for o in outcomes.values())
    counts = sum(o.counts_RE for o in outcomes.values())
    assert abs(main - sums["main"]) < 1e-6 * abs(sums["main"])
    assert abs(balance - sums["balance"]) < 1e-5 * abs(sums["balance"])
    assert torch.equal(counts, sums["counts_RE"])
    assert sum(o.num_loss_microbatches for o in outcomes.values()) == microbatches


def test_timings_and_peak_activations_follow_the_schedule():
    config = _config(2, "1f1b", 4)
    _, outcomes, schedule = run_pipeline(config, _tokens(config))
    for r, outcome in outcomes.items():
        compute = schedule.compute_actions(r)
        assert [(t.kind, t.stage, t.microbatch) for t in outcome.timings] == [
            (a.kind.value, a.stage, a.microbatch) for a in compute
        ]
        assert all(t.end_s >= t.start_s for t in outcome.timings)
    # 1F1B keeps at most pp - r micro-batches alive on rank r.
    assert outcomes[0].peak_live_activations == 2 and outcomes[1].peak_live_activations == 1


def test_input_backward_leaves_weight_gradients_to_w():
    """ZB1P's I produces the input gradient; the linears' weight gradients wait for the W."""
    config = _config(2, "zb1p", 4)
    schedule = build_schedule("zb1p", 2, 4)
    actions = list(schedule.actions[1])
    first_w = next(i for i, a in enumerate(actions) if a.kind is Kind.W)
    stage = PipelineStage(build_model(config), plan_stages(4, 2), [1])
    mailbox = Mailbox()
    executor = Executor(
        stage=stage, placement=schedule.placement, pipeline_rank=1, global_rank_of=[0, 1],
        transport=InMemoryTransport(mailbox, 1, timeout_s=5), num_microbatches=4,
        activation_shape=(2, 16, config.model.dim), num_routers=4, num_experts=8,
    )
    for a in actions[:first_w]:  # play rank 0: deliver the activations rank 1 receives
        if a.kind is Kind.RECV_F:
            tag = transfer_tag(upstream_stage=0, microbatch=a.microbatch, backward=False, num_stages=2)
            mailbox.put(0, 1, tag, torch.randn(2, 16, config.model.dim))
    tokens = dict(enumerate(_tokens(config).chunk(4)))
    with pytest.raises(RuntimeError, match="queued weight gradients"):
        executor.run(actions[:first_w], tokens, MTP_WEIGHT)
    deferred = [m for m in stage.modules() if isinstance(m, DeferredLinear)]
    assert deferred and all(m.weight.grad is None for m in deferred)  # their dW waits in the store
    assert stage.layers["2"].attn_norm.weight.grad is not None  # small parameters get theirs during I
    assert mailbox.take(1, 0, transfer_tag(upstream_stage=0, microbatch=0, backward=True, num_stages=2), 1).shape \
        == (2, 16, config.model.dim)


def test_split_backward_is_bitwise_the_full_backward():
    """ZB1P (I + W) and 1F1B (B) run the same micro-batches in the same order: identical gradients."""
    grads = {}
    for schedule in ("1f1b", "zb1p"):
        config = _config(2, schedule, 4)
        stages, _, _ = run_pipeline(config, _tokens(config))
        grads[schedule] = {n: p.grad for s in stages.values() for n, p in s.named_parameters()}
    assert all(torch.equal(grads["1f1b"][n], grads["zb1p"][n]) for n in grads["1f1b"])


@pytest.mark.parametrize("capture", [False, True])
def test_deferred_linear_under_bf16_autocast_is_autocast_linear(capture):
    """Under autocast a DeferredLinear computes in bf16 like nn.Linear does, and hands fp32 master weights an
    fp32 gradient, whether its dW runs at once or later from the store (the zero-bubble W)."""
    from raymoe.parallel.weight_grad import WeightGradStore

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    store = WeightGradStore()
    deferred = DeferredLinear(torch.nn.Linear(64, 32, bias=False), store)
    deferred.weight.data.copy_(linear.weight.data)
    x = torch.randn(4, 8, 64)
    grad_out = torch.randn(4, 8, 32)
    outs, grads_x = [], []
    for module in (linear, deferred):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        if module is deferred and capture:
            with store.capture((0, 0)):
                out.backward(grad_out.to(out.dtype))
            assert deferred.weight.grad is None
            store.flush((0, 0))
        else:
            out.backward(grad_out.to(out.dtype))
        outs.append(out)
        grads_x.append(xi.grad)
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert grads_x[1].dtype == torch.float32 and torch.equal(grads_x[0], grads_x[1])
    assert deferred.weight.grad.dtype == torch.float32 and torch.equal(linear.weight.grad, deferred.weight.grad)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipev"])
def test_after_backward_sees_every_backward_pass(schedule):
    """ZeRO-2's seam: ``after_backward`` runs after each B, I, W and FB, and what it takes from ``.grad`` each
    time adds up to the step's gradient (here the hook moves the gradients out, as ZeRO-2 reduces and frees them)."""
    config = _config(1, schedule, 4)
    built = build_schedule(schedule, 1, 4)
    placement = built.placement
    chunks = [placement.info(s).chunk for s in placement.stages_of(0)]
    stage = PipelineStage(build_model(config), plan_stages(4, placement.num_chunks), chunks)
    named = dict(stage.named_parameters())
    taken: dict[str, torch.Tensor] = {}
    passes: list[set[str]] = []

    def take() -> None:
        passes.append({n for n, p in named.items() if p.grad is not None})
        for n in passes[-1]:
            taken[n] = named[n].grad if n not in taken else taken[n] + named[n].grad
            named[n].grad = None

    model = build_model(config, device="meta")
    executor = Executor(
        stage=stage, placement=placement, pipeline_rank=0, global_rank_of=[0],
        transport=InMemoryTransport(Mailbox(), 0, timeout_s=5), num_microbatches=4,
        activation_shape=(2, 16, config.model.dim), num_routers=model.num_routers(),
        num_experts=config.model.num_routed_experts, after_backward=take,
    )
    tokens = _tokens(config)
    executor.run(built.actions[0], dict(enumerate(tokens.chunk(4))), MTP_WEIGHT)

    backward_kinds = (Kind.B, Kind.I, Kind.W, Kind.FB)
    assert len(passes) == sum(a.kind in backward_kinds for a in built.compute_actions(0))
    assert all(p.grad is None for p in named.values())  # nothing was left for the step to find
    deferred = {n + ".weight" for n, m in stage.named_modules() if isinstance(m, DeferredLinear)}
    kinds = [a.kind for a in built.compute_actions(0) if a.kind in backward_kinds]
    for kind, produced in zip(kinds, passes):
        if kind is Kind.I:
            assert not produced & deferred  # their weight gradients come with the W
        if kind is Kind.W:
            assert produced and produced <= deferred
    reference, _ = _reference(config, tokens)
    for name, p in reference.named_parameters():
        assert _rel(taken[name], p.grad) < 1e-5, name
