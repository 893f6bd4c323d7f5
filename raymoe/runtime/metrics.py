"""Training metrics in the Ray dashboard (and any Prometheus/Grafana) through ``ray.util.metrics``.

The driver calls ``MetricsExporter.record`` once per step with the step's record (the ``StepMetrics`` dict that
also goes to metrics.jsonl) and the per-rank results the workers returned. Ray's metrics agent on each node
serves them at ``http://<node>:<metrics-export-port>/metrics`` with a ``ray_`` prefix (counters also get a
``_total`` suffix), so a Prometheus that scrapes the cluster (``ray metrics launch-prometheus``) and the Grafana
dashboard in ``cluster/grafana/raymoe.json`` show them. Every series carries a ``run`` tag; per-worker series a
``rank`` tag (the global rank, stage-major: rank = pp_rank * dp + dp_rank) and MaxVio a ``router`` tag.

    Prometheus name                          tags              what
    ray_raymoe_loss                          run               main next-token cross-entropy
    ray_raymoe_mtp_loss                      run               multi-token-prediction cross-entropy
    ray_raymoe_tokens_per_s                  run               training tokens per second, this step
    ray_raymoe_step_time_s                   run               seconds of this step
    ray_raymoe_learning_rate / _grad_norm    run
    ray_raymoe_max_vio                       run, router       MaxVio of one router's expert load, this step
    ray_raymoe_pipeline_bubble_fraction      run, rank         share of the step this rank was not computing
    ray_raymoe_compute_time_s                run, rank         time in compute actions (the bubble's complement)
    ray_raymoe_all_to_all_bytes              run, rank         MoE all-to-all bytes this rank sent this step
    ray_raymoe_all_to_all_seconds            run, rank         seconds this rank spent in MoE all-to-alls
    ray_raymoe_tokens_received               run, rank         token rows this rank's experts received
    ray_raymoe_all_to_all_step_bytes                run, kind         the step's all-to-all bytes over all workers:
                                                               kind = naive (one copy per token-expert pair),
                                                               dedup (one per token-rank pair), measured_same_node,
                                                               measured_cross_node
    ray_raymoe_all_to_all_tokens_received           run, stat         rows received per ep rank: max and mean
    ray_raymoe_zero_optimizer_bytes          run, rank         optimizer state (moments + fp32 master) held by the rank
    ray_raymoe_param_bytes                   run, rank         parameters held by the rank
    ray_raymoe_peak_memory_bytes             run, rank         peak worker memory (RSS on CPU, allocated on CUDA)
    ray_raymoe_steps_total / _tokens_total   run               counters
    ray_raymoe_checkpoint_seconds / _bytes   run               the last checkpoint: time to save, size on disk
    ray_raymoe_checkpoints_total             run               checkpoints committed
    ray_raymoe_recoveries_total              run               worker failures recovered from (run.max_failures)

The bubble comes from the workers' measured action timings, computed the same way as ``raymoe report`` does
(``raymoe/report/timings.py``), per pipeline (the ranks sharing a dp_rank).

What the exporter reads from each worker result (``raymoe.runtime.results.StepResult``; any object with these
attributes does, see ``RankStepResult``):

    rank, pp_rank, dp_rank    int    global rank / position in the pipeline / which data-parallel replica
    timings                   seq    this rank's compute actions of the step, each an object with kind, stage,
                                     microbatch, start_s, end_s (``raymoe.parallel.executor.ActionTiming``) or
                                     the tuple (kind, stage, microbatch, start_s, end_s); seconds since the
                                     rank's step start, on its own clock
    optimizer_state_bytes     int    Adam moments the rank holds (its ZeRO partition)
    optimizer_master_bytes    int    fp32 master weights the rank holds (its ZeRO partition; 0 for fp32 params)
    param_bytes               int    parameters the rank holds
    peak_memory_bytes         int    peak RSS (CPU) or peak allocated device memory (CUDA) of the worker
    dispatch                  dict   the step's expert all-to-all on this rank (``DispatchStats.as_dict``):
                                     measured_same_node_bytes, measured_cross_node_bytes, seconds,
                                     rows_received, ...; absent or empty without expert parallelism

If ``actions_path`` is given, the timings of the first pipeline (dp_rank 0) are appended to that file as
``actions.jsonl`` rows (step, rank = pp_rank, kind, stage, microbatch, start, end) for ``raymoe report``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from raymoe.report.timings import TimedAction, step_timings


class RankStepResult(Protocol):
    rank: int
    pp_rank: int
    dp_rank: int
    timings: Sequence
    optimizer_state_bytes: int
    optimizer_master_bytes: int
    param_bytes: int
    peak_memory_bytes: int
    dispatch: Mapping


_RUN_GAUGES = {
    "loss": "Main next-token cross-entropy (nats/token).",
    "mtp_loss": "Multi-token-prediction cross-entropy (nats/token).",
    "tokens_per_s": "Training tokens per second in the last step.",
    "step_time_s": "Seconds the last optimizer step took.",
    "learning_rate": "Learning rate of the last step.",
    "grad_norm": "Global gradient norm before clipping.",
    "eval_loss": "Held-out cross-entropy (nats/token) at the last run.eval_every step.",
    "eval_perplexity": "Held-out perplexity at the last run.eval_every step.",
    "eval_bits_per_byte": "Held-out bits per UTF-8 byte at the last run.eval_every step.",
}
_RECORD_KEYS = {"learning_rate": "lr"}  # metric name -> StepMetrics key, where they differ
_RANK_GAUGES = {
    "pipeline_bubble_fraction": "Share of the step this rank spent not computing (measured action timings).",
    "compute_time_s": "Seconds this rank spent in compute actions in the last step.",
    "all_to_all_bytes": "Bytes this rank sent through MoE all-to-all (dispatch + combine) in the last step.",
    "all_to_all_seconds": "Seconds this rank spent in MoE all-to-alls in the last step.",
    "tokens_received": "Token rows this rank's experts received through the all-to-all in the last step.",
    "zero_optimizer_bytes": "Bytes of optimizer state (Adam moments + fp32 master, ZeRO partition) on this rank.",
    "param_bytes": "Bytes of parameters this rank holds.",
    "peak_memory_bytes": "Peak memory of this worker (RSS on CPU, allocated device memory on CUDA).",
}


def prometheus_names() -> set[str]:
    """Every series name the exporter produces, as Prometheus shows it (``ray_`` prefix, counters ``_total``)."""
    gauges = [*_RUN_GAUGES, *_RANK_GAUGES, "max_vio", "checkpoint_seconds", "checkpoint_bytes", "all_to_all_step_bytes",
              "all_to_all_tokens_received"]
    counters = ["steps", "tokens", "checkpoints", "recoveries"]
    return {f"ray_raymoe_{n}" for n in gauges} | {f"ray_raymoe_{n}_total" for n in counters}


def all_to_all_bytes(result: RankStepResult) -> int:
    dispatch = getattr(result, "dispatch", None) or {}
    return int(dispatch.get("measured_same_node_bytes", 0) + dispatch.get("measured_cross_node_bytes", 0))


_A2A_KINDS = {"naive": "a2a_naive_bytes", "dedup": "a2a_dedup_bytes",
              "measured_same_node": "a2a_measured_same_node_bytes",
              "measured_cross_node": "a2a_measured_cross_node_bytes"}


def timed_actions(step: int, pp_rank: int, timings: Sequence) -> list[TimedAction]:
    """A worker's timings as ``TimedAction`` rows (tuples or objects with kind/stage/microbatch/start_s/end_s)."""
    rows = []
    for t in timings:
        if isinstance(t, (tuple, list)):
            kind, stage, microbatch, start, end = t
        else:
            kind, stage, microbatch, start, end = t.kind, t.stage, t.microbatch, t.start_s, t.end_s
        rows.append(TimedAction(step=step, rank=pp_rank, kind=str(kind), stage=int(stage),
                                microbatch=int(microbatch), start=float(start), end=float(end)))
    return rows


def pipeline_bubbles(step: int, worker_results: Sequence[RankStepResult]) -> dict[int, tuple[float, float]]:
    """Global rank -> (bubble fraction, compute seconds), each pipeline (dp replica) measured on its own."""
    by_replica: dict[int, list[RankStepResult]] = {}
    for result in worker_results:
        by_replica.setdefault(result.dp_rank, []).append(result)
    out = {}
    for members in by_replica.values():
        actions = [a for r in members for a in timed_actions(step, r.pp_rank, r.timings)]
        timings = step_timings(actions, ranks=[r.pp_rank for r in members])
        for r in members:
            out[r.rank] = (timings.bubble_fraction[r.pp_rank], timings.busy[r.pp_rank])
    return out


class MetricsExporter:
    """Owns the run's ``ray.util.metrics`` objects; create it in the driver after ``ray.init``."""

    def __init__(self, run_name: str, *, router_labels: Sequence[str] = (),
                 actions_path: str | Path | None = None) -> None:
        from ray.util.metrics import Counter, Gauge

        if not run_name:
            raise ValueError("run_name must be a non-empty string (it tags every series)")
        self.run_name = run_name
        self.router_labels = list(router_labels)
        self._tags = {"run": run_name}
        self._run = {n: Gauge(f"raymoe_{n}", description=d, tag_keys=("run",)) for n, d in _RUN_GAUGES.items()}
        self._rank = {n: Gauge(f"raymoe_{n}", description=d, tag_keys=("run", "rank"))
                      for n, d in _RANK_GAUGES.items()}
        self._max_vio = Gauge("raymoe_max_vio", description="MaxVio of one router: (max - mean) / mean expert "
                              "load in the last step.", tag_keys=("run", "router"))
        self._a2a_bytes = Gauge("raymoe_all_to_all_step_bytes", description="Expert all-to-all bytes of the last "
                                "step over all workers: naive (one copy per token-expert pair), dedup (one per "
                                "token and destination rank), measured same-node / cross-node.",
                                tag_keys=("run", "kind"))
        self._a2a_received = Gauge("raymoe_all_to_all_tokens_received", description="Token rows the ep ranks' experts "
                                   "received in the last step: max and mean over ranks.", tag_keys=("run", "stat"))
        self._steps = Counter("raymoe_steps", description="Optimizer steps completed.", tag_keys=("run",))
        self._tokens = Counter("raymoe_tokens", description="Training tokens consumed.", tag_keys=("run",))
        self._checkpoint_s = Gauge("raymoe_checkpoint_seconds", description="Seconds the last checkpoint took to "
                                   "save (all shards + manifest).", tag_keys=("run",))
        self._checkpoint_bytes = Gauge("raymoe_checkpoint_bytes", description="Bytes of the last checkpoint on "
                                       "disk.", tag_keys=("run",))
        self._checkpoints = Counter("raymoe_checkpoints", description="Checkpoints committed.", tag_keys=("run",))
        self._recoveries = Counter("raymoe_recoveries", description="Worker failures recovered from (new workers, "
                                   "last checkpoint).", tag_keys=("run",))
        self._actions = open(actions_path, "w") if actions_path is not None else None  # noqa: SIM115

    @classmethod
    def for_run(cls, config, run_dir: str | Path) -> MetricsExporter:
        """The exporter of a training run: tagged ``run.name``, routers labelled from the model, and the
        measured action timings appended to ``RUN_DIR/actions.jsonl`` for ``raymoe report``."""
        from raymoe.report.records import ACTIONS_FILE, router_names

        num_routers = config.model.num_moe_layers + config.mtp.depth
        return cls(config.run.name, router_labels=router_names(config, num_routers),
                   actions_path=Path(run_dir) / ACTIONS_FILE)

    def record(self, record: Mapping, worker_results: Sequence[RankStepResult]) -> dict[str, float]:
        """Export one step; returns the derived numbers (mean bubble fraction, total all-to-all bytes)."""
        step = int(record["step"])
        for name, gauge in self._run.items():
            value = record.get(_RECORD_KEYS.get(name, name))
            if value is not None:
                gauge.set(float(value), tags=self._tags)
        for i, vio in enumerate(record.get("max_vio_per_layer") or ()):
            label = self.router_labels[i] if i < len(self.router_labels) else f"router {i}"
            self._max_vio.set(float(vio), tags={**self._tags, "router": label})
        self._steps.inc(1.0, tags=self._tags)
        if record.get("tokens"):
            self._tokens.inc(float(record["tokens"]), tags=self._tags)
        bubbles = pipeline_bubbles(step, worker_results)
        for result in worker_results:
            tags = {**self._tags, "rank": str(result.rank)}
            bubble, busy = bubbles[result.rank]
            self._rank["pipeline_bubble_fraction"].set(bubble, tags=tags)
            self._rank["compute_time_s"].set(busy, tags=tags)
            self._rank["all_to_all_bytes"].set(float(all_to_all_bytes(result)), tags=tags)
            dispatch = getattr(result, "dispatch", None) or {}
            self._rank["all_to_all_seconds"].set(float(dispatch.get("seconds", 0.0)), tags=tags)
            self._rank["tokens_received"].set(float(dispatch.get("rows_received", 0)), tags=tags)
            self._rank["zero_optimizer_bytes"].set(
                float(result.optimizer_state_bytes + result.optimizer_master_bytes), tags=tags)
            self._rank["param_bytes"].set(float(result.param_bytes), tags=tags)
            self._rank["peak_memory_bytes"].set(float(result.peak_memory_bytes), tags=tags)
        for kind, key in _A2A_KINDS.items():
            if key in record:
                self._a2a_bytes.set(float(record[key]), tags={**self._tags, "kind": kind})
        for stat in ("max", "mean"):
            if f"a2a_rows_received_{stat}" in record:
                self._a2a_received.set(float(record[f"a2a_rows_received_{stat}"]), tags={**self._tags, "stat": stat})
        self._log_actions(step, worker_results)
        return {
            "pipeline_bubble_fraction": sum(b for b, _ in bubbles.values()) / max(len(bubbles), 1),
            "all_to_all_bytes": float(sum(all_to_all_bytes(r) for r in worker_results)),
        }

    def checkpoint(self, seconds: float, num_bytes: int) -> None:
        self._checkpoint_s.set(float(seconds), tags=self._tags)
        self._checkpoint_bytes.set(float(num_bytes), tags=self._tags)
        self._checkpoints.inc(1.0, tags=self._tags)

    def recovery(self) -> None:
        self._recoveries.inc(1.0, tags=self._tags)

    def _log_actions(self, step: int, worker_results: Sequence[RankStepResult]) -> None:
        if self._actions is None:
            return
        for result in sorted(worker_results, key=lambda r: r.pp_rank):
            if result.dp_rank == 0:  # one pipeline is enough for the timeline; the others look alike
                for action in timed_actions(step, result.pp_rank, result.timings):
                    self._actions.write(json.dumps(action.to_dict()) + "\n")
        self._actions.flush()  # like metrics.jsonl: a stopped job keeps every completed step

    def close(self) -> None:
        if self._actions is not None and not self._actions.closed:
            self._actions.close()
