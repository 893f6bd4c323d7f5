"""Interpret one pipeline rank's action list for one training step.

Legend: B micro-batch size, T positions, D model dim, R routers, E routed experts, M micro-batches.

The schedule (``raymoe.schedule``) decides *what* runs *when*; this module only does what each action says
(schedules are data, the executor has no schedule logic):

    F   forward of a stage's chunk on a micro-batch; the activations it saved stay alive until its backward
    B   full backward: gradient w.r.t. the stage input and the weights
    I   backward for the input only; the weight half is queued in this executor's weight-gradient queue ...
    W   ... and computed when the W of the same (stage, micro-batch) comes
    FB  DualPipe's overlapped pair: its forward, then its backward; with ``overlap`` (``schedule.overlap_a2a``)
        the two chunks in strict turns (``interleave.py``): each chunk's phases are cut at its expert
        all-to-alls, and each exchange is in flight while the other chunk computes its next phase. The turn
        order is fixed by the chunks' structure, identical on every rank of an ep group; forward exchanges go
        over the ep group, backward ones over its twin (``ProcessGroups.ep_backward``): no race picks the order
        of any collective. The arithmetic of each micro-batch is the same, so the result is bitwise the
        sequential one (tested).
    SEND_* / RECV_*   a maximal run of them is one posted batch (``p2p.py``)

A receive is waited for right before the compute that consumes it, sends at the end of the step. Where two
neighbouring stages live on this rank (DualPipeV's turn at rank pp-1, pp = 1) the activation or gradient is
handed over in memory, as the schedule has no SEND/RECV for it.

Loss scaling: every micro-batch backpropagates its objective with weight 1/M (the last stage's loss, and on
every stage the MoE balance losses computed there), so after the step the accumulated gradients are those of
the mean over micro-batches, exactly like the single-process reference's ``loss / M``.

The I/W split (``weight_grad.py``): the first time a list contains an I, the stage's linears become
``DeferredLinear``; an I runs the backward while the executor's ``WeightGradStore`` captures, so the linears
queue their weight-gradient GEMMs under (stage, micro-batch) instead of running them, and the W of that
(stage, micro-batch) runs them. I + W computes bitwise what one B computes.

``after_backward`` (optional) is called after every backward pass (B, I, W, an FB's backward): the seam through
which ZeRO-2 reduces and partitions each pass's gradients (``raymoe.zero``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from raymoe.parallel.interleave import Interleaver, PhaseTiming
from raymoe.parallel.p2p import Transfer, Transport, Work, transfer_tag
from raymoe.parallel.stage_plan import PipelineStage
from raymoe.parallel.weight_grad import WeightGradStore, defer_weight_grads
from raymoe.schedule import Action, Kind, Placement, peer_rank


@dataclass(frozen=True, kw_only=True)
class ActionTiming:
    kind: str
    """F, B, I, W or FB."""
    stage: int
    microbatch: int
    start_s: float
    """Seconds since the start of the step (this rank's clock)."""
    end_s: float
    forward_end_s: float | None = None
    """An F&B pair run one half after the other: when its forward half ended (None otherwise)."""


@dataclass(kw_only=True)
class StepOutcome:
    """What one rank computed in one step. Loss terms are sums over its micro-batches, already divided by M."""

    main_ce: float
    mtp_ce: float
    balance: float
    num_loss_microbatches: int
    """Micro-batches whose loss this rank computed (its last stages'); 0 on ranks without a last stage."""
    counts_RE: torch.Tensor
    timings: list[ActionTiming] = field(default_factory=list)
    origin_s: float = 0.0
    """``time.perf_counter()`` when the step started: the origin of ``timings``. On Linux it reads
    CLOCK_MONOTONIC, so origins of processes on one host are comparable (start skew between ranks); across hosts
    they are not."""
    recv_wait_s: float = 0.0
    """Time spent waiting for received tensors (outside the compute timings)."""
    send_wait_s: float = 0.0
    peak_live_activations: int = 0
    phases: list[PhaseTiming] = field(default_factory=list)
    """The turns of the overlapped F&B pairs (``interleave.py``), seconds since the start of the step; empty
    without overlap."""


@dataclass
class LossTally:
    """The loss terms and expert counts of one step on one rank: bookkeeping beside the interpreter, not in it.
    Accumulated on the device: reading a scalar back per micro-batch would synchronise a GPU each time."""

    num_microbatches: int
    counts_RE: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    loss_microbatches: int = 0

    @classmethod
    def zeros(cls, num_microbatches: int, num_routers: int, num_experts: int, device: torch.device) -> LossTally:
        def zero() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float64, device=device)

        counts = torch.zeros(num_routers, num_experts, dtype=torch.int64, device=device)
        return cls(num_microbatches=num_microbatches, counts_RE=counts, main=zero(), mtp=zero(), balance=zero())

    def add(self, out) -> None:
        """One chunk's forward (``raymoe.parallel.stage_plan.ChunkOutput``), weighted 1/M like its backward."""
        scale = 1.0 / self.num_microbatches
        for stats in out.router_stats:
            self.counts_RE[stats.slot] += stats.counts_E
        self.balance += out.balance.double() * scale
        if out.hidden_BTD is None:
            self.main += out.main_ce.double() * scale
            self.mtp += out.mtp_ce.double() * scale
            self.loss_microbatches += 1


@dataclass
class _StepState:
    """Everything one ``Executor.run`` creates and drops: hand-overs, pending transfers, timings."""

    tokens: Mapping[int, torch.Tensor]
    mtp_weight: float
    tally: LossTally
    t0: float = field(default_factory=time.perf_counter)
    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """Local hand-over of activations (stage, micro-batch) -> tensor."""
    grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """Local hand-over of output gradients."""
    saved: dict[tuple[int, int], _Saved] = field(default_factory=dict)
    to_send: dict[tuple[Kind, int, int], torch.Tensor] = field(default_factory=dict)
    received: dict[tuple[Kind, int, int], tuple[Work, torch.Tensor]] = field(default_factory=dict)
    sends: list[tuple[Work, torch.Tensor]] = field(default_factory=list)
    timings: list[ActionTiming] = field(default_factory=list)
    recv_wait: float = 0.0
    send_wait: float = 0.0
    peak_live: int = 0


@dataclass
class _Saved:
    """A forward waiting for its backward: the input leaf and the tensors to backpropagate from."""

    x_BTD: torch.Tensor | None
    tensors: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    """Gradient of each tensor; None = the output gradient, known only when the backward runs."""


class Executor:
    """Runs one pipeline rank's actions; owns the per-step buffers and the weight-gradient queue."""

    def __init__(
        self,
        *,
        stage: PipelineStage,
        placement: Placement,
        pipeline_rank: int,
        global_rank_of: Sequence[int],
        transport: Transport,
        num_microbatches: int,
        activation_shape: tuple[int, int, int],
        num_routers: int,
        num_experts: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        after_backward: Callable[[], None] | None = None,
        overlap: bool = False,
        compute_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        """``compute_context``: what the step runs under (bf16 autocast), entered again by the overlap thread
        (autocast state is per thread)."""
        self.stage = stage
        self.placement = placement
        self.pipeline_rank = pipeline_rank
        self.global_rank_of = list(global_rank_of)
        self.transport = transport
        self.num_microbatches = num_microbatches
        self.activation_shape = activation_shape
        self.num_routers = num_routers
        self.num_experts = num_experts
        self.dtype = dtype
        self.device = torch.device(device)
        mine = placement.stages_of(pipeline_rank)
        if not mine:
            raise ValueError(f"pipeline rank {pipeline_rank} holds no stage of placement {placement.family}")
        missing = sorted({placement.info(s).chunk for s in mine} - set(stage.chunks))
        if missing:
            raise ValueError(f"placement puts chunks {missing} on rank {pipeline_rank}, the stage holds {stage.chunks}")
        self.weight_grads = WeightGradStore()
        self._deferring = False
        self._step: _StepState | None = None
        self._after_backward = after_backward or (lambda: None)
        self.overlap = overlap
        self._compute_context = compute_context
        self._interleaver = Interleaver() if overlap else None
        if overlap:  # the all-to-all dispatchers of this stage take turns through it (local twins have no turns)
            for moe in stage.moe_layers():
                if hasattr(type(moe.dispatcher), "interleaver"):
                    moe.dispatcher.interleaver = self._interleaver

    # -- one step ------------------------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], tokens: Mapping[int, torch.Tensor], mtp_weight: float) -> StepOutcome:
        """Execute ``actions`` in order; ``tokens[m]`` is micro-batch m for this rank's first and last stages."""
        tally = LossTally.zeros(self.num_microbatches, self.num_routers, self.num_experts, self.device)
        self._step = _StepState(tokens=tokens, mtp_weight=mtp_weight, tally=tally)
        if not self._deferring and any(a.kind is Kind.I for a in actions):
            defer_weight_grads(self.stage, self.weight_grads)
            self._deferring = True
        if self._deferring:  # only the forwards an I splits take the deferring path
            self.weight_grads.plan(actions, self.placement)
        batch: list[Action] = []
        for action in actions:
            if action.is_comm:
                batch.append(action)
                continue
            self._post(batch)
            batch = []
            self._compute(action)
        self._post(batch)
        self._finish_sends()
        self._check_drained()
        return self._outcome()

    # -- communication -------------------------------------------------------------------------------------------
    def _post(self, batch: list[Action]) -> None:
        if not batch:
            return
        transfers = [self._transfer(a) for a in batch]
        works = self.transport.post(transfers)
        for action, transfer, work in zip(batch, transfers, works):
            if transfer.send:
                self._step.sends.append((work, transfer.tensor))
            else:
                self._step.received[action.kind, action.stage, action.microbatch] = (work, transfer.tensor)

    def _transfer(self, action: Action) -> Transfer:
        info = self.placement.info(action.stage)
        forward = action.kind in (Kind.SEND_F, Kind.RECV_F)
        upstream = action.stage if action.kind in (Kind.SEND_F, Kind.RECV_B) else info.prev_stage
        tag = transfer_tag(upstream_stage=upstream, microbatch=action.microbatch, backward=not forward,
                           num_stages=self.placement.num_stages)
        peer = self.global_rank_of[peer_rank(action, self.placement)]  # the schedule's own pairing rule
        if action.kind.is_send:
            tensor = self._step.to_send.pop((action.kind, action.stage, action.microbatch), None)
            if tensor is None:
                raise RuntimeError(f"rank {self.pipeline_rank}: {action} before the compute that produces it")
            return Transfer(send=True, tensor=tensor, peer=peer, tag=tag)
        buffer = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        return Transfer(send=False, tensor=buffer, peer=peer, tag=tag)

    def _take_received(self, kind: Kind, stage: int, microbatch: int) -> torch.Tensor:
        entry = self._step.received.pop((kind, stage, microbatch), None)
        if entry is None:
            raise RuntimeError(f"rank {self.pipeline_rank}: no {kind.value} of stage {stage}, micro-batch "
                               f"{microbatch} was posted before the compute that needs it")
        work, buffer = entry
        start = time.perf_counter()
        work.wait()
        self._step.recv_wait += time.perf_counter() - start
        return buffer

    def _finish_sends(self) -> None:
        start = time.perf_counter()
        for work, _ in self._step.sends:
            work.wait()
        self._step.sends.clear()
        self._step.send_wait += time.perf_counter() - start

    # -- compute -------------------------------------------------------------------------------------------------
    def _compute(self, action: Action) -> None:
        if action.kind is Kind.FB:
            forward, backward = action.parts()
            run = self._overlapped if self.overlap else self._in_turn
            self._timed(action, lambda: run(forward, backward), inputs=[forward, backward])
        elif action.kind is Kind.F:
            self._timed(action, lambda: self._forward(action), inputs=[action])
        elif action.kind is Kind.B:
            self._timed(action, lambda: self._backward(action, split=False), inputs=[action])
        elif action.kind is Kind.I:
            self._timed(action, lambda: self._backward(action, split=True), inputs=[action])
        elif action.kind is Kind.W:
            self._timed(action, lambda: self._weight_grad(action), inputs=[])
        else:  # pragma: no cover - Kind is closed
            raise AssertionError(f"unknown action kind {action.kind}")

    def _timed(self, action: Action, run: Callable[[], float | None], *, inputs: list[Action]) -> None:
        """Run ``run`` and time it; ``run`` may return the ``perf_counter`` time its forward half ended."""
        for part in inputs:  # wait for received inputs first, so that timings are compute only
            self._fetch_input(part)
        t0 = self._step.t0
        start = time.perf_counter() - t0
        forward_end = run()
        self._step.timings.append(ActionTiming(
            kind=action.kind.value, stage=action.stage, microbatch=action.microbatch, start_s=start,
            end_s=time.perf_counter() - t0, forward_end_s=None if forward_end is None else forward_end - t0))

    def _fetch_input(self, part: Action) -> None:
        """Move a received activation / output gradient into the local hand-over maps."""
        info = self.placement.info(part.stage)
        key = (part.stage, part.microbatch)
        if part.kind is Kind.F and info.prev_stage is not None and key not in self._step.inputs:
            self._step.inputs[key] = self._take_received(Kind.RECV_F, *key)
        if part.kind in (Kind.B, Kind.I) and info.next_stage is not None and key not in self._step.grads:
            self._step.grads[key] = self._take_received(Kind.RECV_B, *key)

    def _local(self, stage: int | None) -> bool:
        return stage is not None and self.placement.rank_of(stage) == self.pipeline_rank

    def _in_turn(self, forward: Action, backward: Action) -> float:
        self._forward(forward)
        forward_end = time.perf_counter()
        self._backward(backward, split=False)
        return forward_end

    def _overlapped(self, forward: Action, backward: Action) -> None:
        """The F&B pair's two chunks in turns (``interleave.py``). They touch different micro-batches; the
        backward alone writes gradients, so every sum runs in its usual order."""
        self._interleaver.run_pair(lambda: self._forward(forward), lambda: self._backward(backward, split=False),
                                   label=f"{forward}&{backward}", context=self._compute_context)

    def _forward(self, action: Action) -> None:
        info = self.placement.info(action.stage)
        key = (action.stage, action.microbatch)
        x_BTD = None
        if info.prev_stage is not None:
            x_BTD = self._step.inputs.pop(key).requires_grad_()
        needs_tokens = info.prev_stage is None or info.next_stage is None
        tokens_BL = self._step.tokens[action.microbatch] if needs_tokens else None
        out = self.stage.forward_chunk(info.chunk, x_BTD, tokens_BL, self._step.mtp_weight)

        self._step.tally.add(out)
        scale = 1.0 / self.num_microbatches
        if out.hidden_BTD is None:
            tensors, grads = [out.objective], [torch.tensor(scale, device=out.objective.device)]
        else:
            tensors = [out.hidden_BTD, out.objective]
            grads = [None, torch.tensor(scale, device=out.objective.device)]
            if self._local(info.next_stage):
                self._step.inputs[(info.next_stage, action.microbatch)] = out.hidden_BTD.detach()
            else:
                self._step.to_send[(Kind.SEND_F, *key)] = out.hidden_BTD.detach().contiguous()
        keep = [i for i, t in enumerate(tensors) if t.requires_grad]
        self._step.saved[key] = _Saved(x_BTD, [tensors[i] for i in keep], [grads[i] for i in keep])
        self._step.peak_live = max(self._step.peak_live, len(self._step.saved))

    def _backward(self, action: Action, *, split: bool) -> None:
        info = self.placement.info(action.stage)
        key = (action.stage, action.microbatch)
        saved = self._step.saved.pop(key)
        grads = [self._step.grads.pop(key) if g is None else g for g in saved.grads]
        if split:
            with self.weight_grads.capture(key):
                torch.autograd.backward(saved.tensors, grads)
        else:
            torch.autograd.backward(saved.tensors, grads)
        self._after_backward()
        if saved.x_BTD is None:  # a first stage: no input gradient to hand on
            return
        dx_BTD = saved.x_BTD.grad
        if self._local(info.prev_stage):
            self._step.grads[(info.prev_stage, action.microbatch)] = dx_BTD
        else:
            self._step.to_send[(Kind.SEND_B, *key)] = dx_BTD.contiguous()

    def _weight_grad(self, action: Action) -> None:
        try:
            self.weight_grads.flush((action.stage, action.microbatch))
        except LookupError:
            raise RuntimeError(f"rank {self.pipeline_rank}: {action} without an earlier I of the same stage and "
                               f"micro-batch") from None
        self._after_backward()

    # -- end of step ---------------------------------------------------------------------------------------------
    def _check_drained(self) -> None:
        leftovers = {
            "forwards without backward": sorted(self._step.saved),
            "queued weight gradients": self.weight_grads.pending(),
            "unsent tensors": sorted((k.value, s, m) for k, s, m in self._step.to_send),
            "unused receives": sorted((k.value, s, m) for k, s, m in self._step.received),
            "unused hand-overs": sorted(self._step.inputs) + sorted(self._step.grads),
        }
        leftovers = {k: v for k, v in leftovers.items() if v}
        if leftovers:
            self.weight_grads.clear()
            raise RuntimeError(f"rank {self.pipeline_rank}: the action list left work undone: {leftovers}")

    def _outcome(self) -> StepOutcome:
        step, tally = self._step, self._step.tally
        return StepOutcome(
            main_ce=float(tally.main),
            mtp_ce=float(tally.mtp),
            balance=float(tally.balance),
            num_loss_microbatches=tally.loss_microbatches,
            counts_RE=tally.counts_RE.cpu(),
            timings=step.timings,
            origin_s=step.t0,
            recv_wait_s=step.recv_wait,
            send_wait_s=step.send_wait,
            peak_live_activations=step.peak_live,
            phases=[replace(p, start_s=p.start_s - step.t0, end_s=p.end_s - step.t0)
                    for p in (self._interleaver.take() if self._interleaver is not None else [])],
        )
