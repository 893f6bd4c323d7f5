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

What it costs. A MoE stage has hundreds of linears (every routed expert's three), so per-call Python overhead
adds up: with every linear a Python ``autograd.Function`` a whole forward+backward was ~28% slower than with
``nn.Linear``, and ~40% with the split. Two things keep that off the step:

* Only the forwards an I will split defer at all. The store is told the step's action list (``plan``) and knows,
  per chunk, which of the chunk's forwards (in action-list order) an I splits; the stage announces each chunk
  forward (``PipelineStage.forward_listener``), and a ``DeferredLinear`` runs plain ``F.linear`` (the op
  ``nn.Linear`` runs, C++ autograd) for every other forward: a full B then costs what it costs with
  ``nn.Linear``.
* A forward that will be split runs ``F.linear(x, weight.detach())``: C++ autograd computes the input gradient
  and no weight gradient, and a hook on the output hands ``dY`` to the store (one Python call per linear instead
  of an autograd function's forward and backward). The W then runs the GEMM autograd would have run.

Without a plan (a store used outside the executor) every forward takes the autograd-function path, which also
computes ``dW`` at once outside a capture.

The GEMMs are the ones PyTorch's own linear backward runs (``dX = dY W``, ``dW = dY^T X``), so I + W gives
bitwise the gradients of one full backward (tested). DualPipe's ``WeightGradStore`` does the same with a
class-level queue; here the queue is owned by the executor's store (no global state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.schedule import Action, Kind, Placement


class WeightGradStore:
    """The executor's queue of deferred weight-gradient GEMMs, keyed by (stage, micro-batch)."""

    def __init__(self) -> None:
        self._queues: dict[tuple[int, int], list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}
        self._capturing: tuple[int, int] | None = None
        self._split_forwards: dict[int, tuple[bool, ...]] | None = None  # None: no plan, every forward defers
        self._forwards_seen: dict[int, int] = {}
        self._forced: bool | None = None
        self.defers_forward = True
        """Whether the chunk forward running now will be split by an I (read by ``DeferredLinear.forward``)."""

    def plan(self, actions: Sequence[Action], placement: Placement) -> None:
        """Start a step that runs ``actions``: from now on only the forwards an I will split take the deferring
        path (see the module docstring)."""
        self._split_forwards = split_forwards(actions, placement)
        self._forwards_seen = {}
        self._forced = None
        self.defers_forward = False

    def force(self, split: bool) -> None:
        """For tests and benchmarks: from now on every forward takes the split (hooked) path, or the plain one,
        whatever forwards are announced, until the next ``plan``."""
        self._split_forwards = {}
        self._forced = split
        self.defers_forward = split

    def begin_forward(self, chunk: int) -> None:
        """A forward of ``chunk`` starts (the stage's ``forward_listener``); forwards of a chunk come in the
        order of the planned action list."""
        if self._split_forwards is None or self._forced is not None:
            return
        index = self._forwards_seen.get(chunk, 0)
        self._forwards_seen[chunk] = index + 1
        flags = self._split_forwards.get(chunk, ())
        self.defers_forward = index < len(flags) and flags[index]

    @property
    def planned(self) -> bool:
        return self._split_forwards is not None

    def output_grad_hook(self, weight: nn.Parameter, x: torch.Tensor, dtype: torch.dtype | None):
        """The hook a split forward's linear puts on its output: queue ``(x, dY)`` for the W (``x`` cast to the
        autocast ``dtype`` the forward ran in, as autocast cast it)."""

        def hook(grad_out: torch.Tensor) -> None:
            x_c = x if dtype is None else x.to(dtype)
            x_NK, grad_NO = x_c.reshape(-1, x_c.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
            if grad_NO.dtype != x_NK.dtype:
                grad_NO = grad_NO.to(x_NK.dtype)
            if self._capturing is None:  # the plan said an I would split this; computing now is still correct
                grad_OK = grad_NO.t().mm(x_NK).to(weight.dtype)
                weight.grad = grad_OK if weight.grad is None else weight.grad + grad_OK
                return
            self.put(weight, x_NK, grad_NO)

        return hook

    @property
    def capturing(self) -> tuple[int, int] | None:
        return self._capturing

    def capture(self, key: tuple[int, int]) -> _Capture:
        """Context in which deferred linears queue their dW under ``key`` (an I's backward runs inside it)."""
        return _Capture(self, key)

    def put(self, weight: nn.Parameter, x_NK: torch.Tensor, grad_NO: torch.Tensor) -> None:
        """Queue ``dW = dY^T x`` for ``weight``; the GEMM runs in the dtype of ``x`` and ``dY`` (bf16 under
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
        totals: dict[int, list] = {}
        for weight, x_NK, grad_NO in work:
            grad_OK = grad_NO.t().mm(x_NK)  # autograd's own dW GEMM for a linear (row-major result, no copy)
            entry = totals.get(id(weight))
            if entry is None:
                totals[id(weight)] = [weight, grad_OK]
            else:
                entry[1] = entry[1] + grad_OK
        for weight, grad_OK in totals.values():
            if grad_OK.dtype != weight.dtype:
                grad_OK = grad_OK.to(weight.dtype)
            if weight.grad is None:
                weight.grad = grad_OK
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
        ctx.store = store
        ctx.param = weight  # the parameter whose .grad a deferred W accumulates (the saved weight may be a cast copy)
        ctx.x_dtype = x.dtype
        device = x.device.type
        if not torch.is_autocast_enabled(device):  # the common case, kept short: this runs once per linear call
            ctx.save_for_backward(x, weight)
            return F.linear(x, weight)
        dtype = torch.get_autocast_dtype(device)
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, weight_c)
        with torch.autocast(device, enabled=False):
            return F.linear(x_c, weight_c)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_NO = grad_out.reshape(-1, grad_out.shape[-1])
        if grad_NO.dtype != x.dtype:
            grad_NO = grad_NO.to(x.dtype)
        x_NK = x.reshape(-1, x.shape[-1])
        needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = None
        if needs_x:
            grad_x = grad_NO.mm(weight).view(x.shape)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        if not needs_weight:
            return grad_x, None, None
        if ctx.store._capturing is not None:
            ctx.store.put(ctx.param, x_NK, grad_NO)
            return grad_x, None, None
        return grad_x, grad_NO.t().mm(x_NK).to(ctx.param.dtype), None


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
        store = self.store
        if not store.defers_forward:
            return F.linear(x, self.weight)  # what nn.Linear runs: this forward's backward is a full one
        if store.planned and x.requires_grad and torch.is_grad_enabled():
            out = F.linear(x, self.weight.detach())  # autograd computes dX only; dW comes from the hook's dY
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            out.register_hook(store.output_grad_hook(self.weight, x, dtype))
            return out
        return _DeferredLinearFunction.apply(x, self.weight, store)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deferred weight grad"


def split_forwards(actions: Sequence[Action], placement: Placement) -> dict[int, tuple[bool, ...]]:
    """chunk -> for each forward of that chunk in ``actions`` (an F, or an FB's forward half), in order, whether
    an I of the same (stage, micro-batch) will split its backward."""
    split = {(a.stage, a.microbatch) for a in actions if a.kind is Kind.I}
    flags: dict[int, list[bool]] = {}
    for action in actions:
        if action.kind in (Kind.F, Kind.FB):
            forward = action.parts()[0]
            chunk = placement.info(forward.stage).chunk
            flags.setdefault(chunk, []).append((forward.stage, forward.microbatch) in split)
    return {chunk: tuple(f) for chunk, f in flags.items()}


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Swap every bias-free ``nn.Linear`` under ``module`` for a ``DeferredLinear``; returns how many.

    A ``PipelineStage`` also gets the store as its ``forward_listener``, so that ``WeightGradStore.plan`` can
    send the forwards no I splits down the plain path. Linears of another type (FP8 linears from ``raymoe.fp8``)
    are left alone: their weight gradients are then computed during I, which is still correct, only not deferred.
    """
    from raymoe.parallel.stage_plan import PipelineStage

    if isinstance(module, PipelineStage):
        module.forward_listener = store.begin_forward
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, DeferredLinear(child, store))
                swapped += 1
    return swapped
