"""The weight-gradient store's cost seams (raymoe.parallel.weight_grad): which forwards defer, and that every
path -- plain F.linear, the output-hook split, the autograd-function split -- gives bitwise nn.Linear's gradients."""

from __future__ import annotations

import pytest
import torch

from raymoe.parallel.weight_grad import DeferredLinear, WeightGradStore, split_forwards
from raymoe.schedule import build_schedule


def test_split_forwards_marks_the_forwards_an_i_splits():
    schedule = build_schedule("dualpipe", 2, 8)
    # rank 0: F0.0 F3.4 F0.1 B3.4 FB3.5 FB0.2 FB3.6 FB0.3 FB3.7 B3.7 I0.3 W0.3 -- only (stage 0, mb 3) is split,
    # and its forward is the fourth forward of chunk 0 (the forward half of FB0.3).
    flags = split_forwards(schedule.actions[0], schedule.placement)
    assert flags == {0: (False, False, False, True), 1: (False, False, False, False)}


def test_store_follows_its_plan_forward_by_forward():
    schedule = build_schedule("dualpipe", 2, 8)
    store = WeightGradStore()
    assert store.defers_forward and not store.planned  # no plan: every forward defers, as before
    store.plan(schedule.actions[0], schedule.placement)
    seen = []
    for chunk in (0, 1, 0, 1, 0, 0):
        store.begin_forward(chunk)
        seen.append(store.defers_forward)
    assert seen == [False, False, False, False, False, True]
    store.plan(schedule.actions[0], schedule.placement)  # a new step starts counting again
    store.begin_forward(0)
    assert not store.defers_forward


def _linear_pair(store):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    deferred = DeferredLinear(torch.nn.Linear(64, 32, bias=False), store)
    deferred.weight.data.copy_(linear.weight.data)
    return linear, deferred


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("path", ["plain", "hook", "function"])
def test_every_path_is_bitwise_nn_linear(path, autocast):
    """The plain path, the hooked split (planned store) and the autograd-function split (no plan); the head's
    two uses of one weight (main + MTP logits) are summed before they reach .grad, as autograd sums them."""
    store = WeightGradStore()
    if path != "function":
        store.force(path == "hook")
    linear, deferred = _linear_pair(store)
    x = torch.randn(4, 8, 64)
    grad_a, grad_b = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    grads_x = []
    for module in (linear, deferred):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_a, out_b = module(xi), module(xi * 2)
        loss = (out_a.float() * grad_a).sum() + (out_b.float() * grad_b).sum()
        if module is deferred and path != "plain":
            with store.capture((0, 0)):
                loss.backward()
            assert deferred.weight.grad is None
            assert store.flush((0, 0)) == 2
        else:
            loss.backward()
        grads_x.append(xi.grad)
    assert torch.equal(grads_x[0], grads_x[1])
    assert deferred.weight.grad.dtype == torch.float32 and torch.equal(linear.weight.grad, deferred.weight.grad)


def test_hooked_split_outside_a_capture_still_computes_the_weight_gradient():
    store = WeightGradStore()
    store.force(True)
    linear, deferred = _linear_pair(store)
    x = torch.randn(3, 64, requires_grad=True)
    linear(x).sum().backward()
    deferred(x).sum().backward()
    assert torch.equal(linear.weight.grad, deferred.weight.grad)


def test_executor_defers_exactly_the_forwards_an_i_splits(monkeypatch):
    """Through a real DualPipe step: the stage announces every chunk forward in action-list order and the store
    defers just the ones an I splits (all other forwards ran plain F.linear); the gradients stay the reference's."""
    from tests.test_parallel_executor import _config, _tokens, run_pipeline

    seen: list[tuple[int, bool]] = []
    begin = WeightGradStore.begin_forward

    def record(self, chunk):
        begin(self, chunk)
        seen.append((chunk, self.defers_forward))

    monkeypatch.setattr(WeightGradStore, "begin_forward", record)
    config = _config(2, "dualpipe", 4)
    _, _, schedule = run_pipeline(config, _tokens(config))
    expected = []
    for r in range(2):
        flags = split_forwards(schedule.actions[r], schedule.placement)
        expected += [(c, f) for c, fs in flags.items() for f in fs]
    assert sorted(seen) == sorted(expected)
    assert sum(f for _, f in seen) == sum(a.kind.value == "I" for acts in schedule.actions.values() for a in acts) > 0
