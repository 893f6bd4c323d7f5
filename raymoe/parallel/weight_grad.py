"""Zero-bubble backward split: I computes input gradients now, W computes weight gradients later.

Legend: N = tokens (all leading dims flattened), K input features, O output features.

Zero-bubble schedules (ZB1P, and DualPipe's tail) split a stage's backward in two: ``I`` produces the gradient
w.r.t. the stage input, which the previous stage is waiting for, and ``W`` the weight gradients, which nobody is
waiting for and which therefore fill bubbles. Almost all of a transformer's weight-gradient work is the
``dW = dY^T X`` GEMM of its linear layers, so that is what we defer: ``defer_weight_grads`` swaps every
``nn.Linear`` of a stage for a ``DeferredLinear`` (same ``weight`` parameter, same name, same forward). Its
backward always returns the input gradient; while its ``WeightGradStore`` is *capturing* (during an I) it
queues ``(X, dY)`` under the current (stage, micro-batch) instead of computing ``dW``, and ``W`` later runs the
queued GEMMs. Outside a capture it computes ``dW`` at once, exactly like ``nn.Linear``. Small parameters
(norms, router gates, the embedding) get their gradients during I: negligible work.

The GEMMs are the ones PyTorch's own linear backward runs (``dX = dY W``, ``dW = (X^T dY)^T``), so I + W gives
bitwise the gradients of one full backward (tested). DualPipe's ``WeightGradStore`` does the same with a
class-level queue; here the queue is owned by the executor's store (no global state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """The executor's queue of deferred weight-gradient GEMMs, keyed by (stage, micro-batch)."""

    def __init__(self) -> None:
        self._queues: dict[tuple[int, int], list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}
        self._capturing: tuple[int, int] | None = None

    @property
    def capturing(self) -> tuple[int, int] | None:
        return self._capturing

    def capture(self, key: tuple[int, int]) -> _Capture:
        """Context in which deferred linears queue their dW under ``key`` (an I's backward runs inside it)."""
        return _Capture(self, key)

    def put(self, weight: nn.Parameter, x_NK: torch.Tensor, grad_NO: torch.Tensor) -> None:
        """Queue ``dW = (x^T dY)^T`` for ``weight``; the GEMM runs in the dtype of ``x`` and ``dY`` (bf16 under
        autocast) and its result is accumulated in the parameter's dtype."""
        assert self._capturing is not None, "put() outside a capture"
        self._queues[self._capturing].append((weight, x_NK, grad_NO))

    @torch.no_grad()
    def flush(self, key: tuple[int, int]) -> int:
        """Run the queued GEMMs of ``key`` (a W); returns how many ran.

        A weight used twice in one backward (the output head: main logits and MTP logits) gets its two
        contributions summed before they are added to ``.grad``, as autograd's accumulator does -- and, under
        autocast, summed in the GEMM dtype and cast once, as autograd does behind autocast's one cached cast of
        the weight.
        """
        if key not in self._queues:
            raise LookupError(f"no weight-gradient work captured for stage {key[0]}, micro-batch {key[1]}")
        work = self._queues.pop(key)
        totals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for weight, x_NK, grad_NO in work:
            grad_OK = x_NK.t().mm(grad_NO).t()
            previous = totals.get(id(weight))
            totals[id(weight)] = (weight, grad_OK if previous is None else previous[1] + grad_OK)
        for weight, grad_OK in totals.values():
            grad_OK = grad_OK.to(weight.dtype)
            if weight.grad is None:
                weight.grad = grad_OK.contiguous()
            else:
                weight.grad += grad_OK
        return len(work)

    def pending(self) -> list[tuple[int, int]]:
        """Keys captured by an I whose W has not run yet."""
        return sorted(self._queues)

    def clear(self) -> None:
        self._queues.clear()
        self._capturing = None


class _Capture:
    def __init__(self, store: WeightGradStore, key: tuple[int, int]) -> None:
        self.store, self.key = store, key

    def __enter__(self) -> WeightGradStore:
        if self.store._capturing is not None:
            raise RuntimeError(f"already capturing {self.store._capturing}; captures do not nest")
        self.store._capturing = self.key
        self.store._queues.setdefault(self.key, [])
        return self.store

    def __exit__(self, *exc) -> None:
        self.store._capturing = None


class _DeferredLinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward may queue dW. Under autocast it does what autocast does to ``nn.Linear``:
    the GEMMs run in the autocast dtype on cast copies of ``x`` and ``weight`` (those copies are what is saved),
    and the gradients go back in the dtypes of the originals (fp32 master weights get fp32 ``.grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, store: WeightGradStore) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x_c, weight_c = x.to(dtype), weight.to(dtype)
        else:
            x_c, weight_c = x, weight
        ctx.save_for_backward(x_c, weight_c)
        ctx.store = store
        ctx.param = weight  # the parameter whose .grad a deferred W accumulates (weight_c may be a cast copy)
        ctx.x_dtype = x.dtype
        with torch.autocast(device, enabled=False):
            return F.linear(x_c, weight_c)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_NO = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
        x_NK = x.reshape(-1, x.shape[-1])
        grad_x = grad_NO.mm(weight).view(x.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        if ctx.store.capturing is not None:
            ctx.store.put(ctx.param, x_NK, grad_NO)
            return grad_x, None, None
        return grad_x, x_NK.t().mm(grad_NO).t().to(ctx.param.dtype), None


class DeferredLinear(nn.Module):
    """``nn.Linear`` without bias whose weight gradient a ``WeightGradStore`` can defer."""

    def __init__(self, linear: nn.Linear, store: WeightGradStore) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DeferredLinear supports bias-free linears only (every raymoe projection is)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeferredLinearFunction.apply(x, self.weight, self.store)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deferred weight grad"


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Swap every bias-free ``nn.Linear`` under ``module`` for a ``DeferredLinear``; returns how many.

    Linears of another type (FP8 linears from ``raymoe.fp8``) are left alone: their weight gradients are then
    computed during I, which is still correct, only not deferred.
    """
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, DeferredLinear(child, store))
                swapped += 1
    return swapped
