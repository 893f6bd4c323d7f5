"""A pipeline step's compute in its schedule's order, one action at a time, in this process (issue 15).

Between the whole model run in one piece and the same work on two Ray workers lie three things: the model cut
into chunks, the schedule's order (a micro-batch's backward runs long after its forward, other chunks and
micro-batches in between) and the runtime (two ranks computing at once, gloo transfers, waiting). This measures
the first two without the third: every pipeline rank's ``Executor`` runs its real action list in a thread of this
process, with the in-memory transport, and a baton lets one rank compute at a time. A rank keeps the baton until
it waits for a receive; then the other runs. So the actions run in an order the schedule allows, on real
activations, with one core busy and no communication cost. The DualPipe copies' gradients are not summed (that
is communication, not compute).

``compute_over_whole`` pairs, round by round, the ranks' compute (the executor's own action timings, summed
over ranks, as the benchmark sums the pipeline's) with the whole model's forward+backward on the same
micro-batches in this process, the order alternating by round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from raymoe.bench.timing import paired_ratios
from raymoe.parallel.p2p import InMemoryTransport, Mailbox, Transfer, run_ranks_in_threads


class _BatonTransport(InMemoryTransport):
    """The in-memory transport whose receives put the baton (a lock: whoever holds it computes) down while they
    wait."""

    def __init__(self, mailbox: Mailbox, rank: int, baton: threading.Lock) -> None:
        super().__init__(mailbox, rank, timeout_s=30.0)  # only a broken action list waits this long
        self.baton = baton

    def post(self, transfers: Sequence[Transfer]):
        return [_PutDown(work, self.baton) if not t.send else work
                for t, work in zip(transfers, super().post(transfers))]


class _PutDown:
    def __init__(self, work, baton: threading.Lock) -> None:
        self.work = work
        self.baton = baton

    def wait(self) -> bool:
        self.baton.release()
        try:
            return self.work.wait()
        finally:
            self.baton.acquire()


class SerialPipeline:
    """Every rank's stage and executor for ``config``'s pipeline, built as the workers build theirs."""

    def __init__(self, config) -> None:
        from raymoe.model import build_model
        from raymoe.parallel.executor import Executor
        from raymoe.parallel.stage_plan import build_stage, plan_stages
        from raymoe.schedule import build_schedule

        pp, m = config.parallel.pp, config.schedule.num_microbatches
        self.schedule = build_schedule(config.schedule.name, pp, m)
        placement = self.schedule.placement
        plan = plan_stages(config.model.num_layers, placement.num_chunks, config.parallel.stage_layers)
        num_routers = build_model(config, device="meta").num_routers()
        self.baton, self.mailbox = threading.Lock(), Mailbox()
        self.stages, self.executors = [], []
        for r in range(pp):
            stage = build_stage(config, plan, [placement.info(s).chunk for s in placement.stages_of(r)])
            self.stages.append(stage)
            self.executors.append(Executor(
                stage=stage, placement=placement, pipeline_rank=r, global_rank_of=range(pp),
                transport=_BatonTransport(self.mailbox, r, self.baton), num_microbatches=m,
                activation_shape=(config.micro_batch_size, config.data.seq_len, config.model.dim),
                num_routers=num_routers, num_experts=config.model.num_routed_experts))

    def step(self, tokens_BL: torch.Tensor, mtp_weight: float) -> list[float]:
        """Forward+backward of the global batch ``tokens_BL``; each rank's compute seconds (its action timings)."""
        micro = dict(enumerate(tokens_BL.chunk(self.schedule.num_microbatches)))
        for stage in self.stages:
            stage.zero_grad(set_to_none=True)

        def work(r: int) -> float:
            with self.baton:
                outcome = self.executors[r].run(self.schedule.actions[r], micro, mtp_weight)
                return sum(t.end_s - t.start_s for t in outcome.timings)

        return run_ranks_in_threads(work, len(self.executors))


def compute_over_whole(config, tokens_BL: torch.Tensor, *, mtp_weight: float, rounds: int,
                       before: Callable[[], object] | None = None) -> list[float]:
    """Per round: the serial pipeline's compute summed over ranks / the whole model's forward+backward on the same
    micro-batches (``chunk_costs.whole_model_pass``, as the single-process trainer runs it), timed next to each
    other."""
    from raymoe.bench.chunk_costs import whole_model_pass
    from raymoe.model import build_model

    pipeline = SerialPipeline(config)
    model = build_model(config)

    def whole() -> float:
        return whole_model_pass(model, tokens_BL, config.schedule.num_microbatches, mtp_weight)

    def serial() -> float:
        return sum(pipeline.step(tokens_BL, mtp_weight))

    whole()
    serial()  # warm-up
    return paired_ratios(serial, whole, rounds=rounds, before=before)
