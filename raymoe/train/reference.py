"""The single-process reference trainer: the parity oracle for every distributed layout.

One step = forward/backward over ``schedule.num_microbatches`` equal micro-batches of the global batch (gradient
accumulation; each micro-batch loss is scaled by 1/M so the gradient is that of the global-batch mean), global
gradient-norm clipping (``raymoe.train.clip``, the definition the layouts share), AdamW with warmup + cosine LR,
then the auxiliary-loss-free bias update from the step's expert loads. The distributed runtime performs the same
arithmetic split over ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.model import build_model
from raymoe.model.build import compute_context
from raymoe.train.clip import clip_gradients
from raymoe.train.metrics import StepMetrics, load_statistics
from raymoe.train.optim import make_adamw, set_lr
from raymoe.train.progress import RunProgress, TracksProgress


class ReferenceTrainer(TracksProgress):
    def __init__(self, config: Config, *, batches=None, device: str = "cpu", reduction_tree=None) -> None:
        """``reduction_tree``: the order in which micro-batch gradients are added (see ``accumulate_gradients``)."""
        self.config = config
        self.reduction_tree = reduction_tree
        self.device = torch.device(device)
        torch.manual_seed(config.run.seed)
        self.model = build_model(config, device=self.device)
        self.optimizer = make_adamw(
            self.model.named_parameters(), config.optim, bf16_moments=config.precision.bf16_optimizer_states
        )
        self.progress = RunProgress(routing_bias_RE=self.model.routing_biases())
        if config.run.init_from:  # the weights and routing biases of a model export (any layout wrote it)
            from raymoe.checkpoint import copy_parameters
            from raymoe.checkpoint.export import BIAS, check_export, read_tensors

            check_export(config.run.init_from, config)
            params = dict(self.model.named_parameters())
            copy_parameters(params, read_tensors(config.run.init_from, params), source=config.run.init_from)
            self.routing_bias_RE = read_tensors(config.run.init_from, [BIAS])[BIAS].float()
        self._batches = batches

    # -- checkpoints (the single-process twin of Driver.save_checkpoint / restore) ---------------------------------
    def save_checkpoint(self, store) -> Path:
        """One shard (rank 0: the whole model, AdamW, RNG) and the manifest, committed atomically."""
        from raymoe.checkpoint import save_shard
        from raymoe.checkpoint.reshard import adamw_shard_state
        from raymoe.checkpoint.run_state import RunState, build_manifest, local_layout

        staging = store.begin(self.step_index)
        entry = save_shard(staging, 0, model=dict(self.model.named_parameters()),
                           optimizer=adamw_shard_state(self.optimizer, self._optimizer_names()))
        state = RunState(step=self.step_index, tokens_seen=self.tokens_seen, cursor=self.batches.cursor.to_dict(),
                         bias_RE=self.routing_bias_RE)
        shard = {"rank": 0, "pp_rank": 0, "dp_rank": 0, **entry}
        return store.commit(staging, build_manifest(self.config, state, local_layout(self.config), [shard]))

    def restore(self, checkpoint: Path, *, reshard: bool = False) -> None:
        """Continue a checkpoint of the single-process trainer exactly (weights, AdamW, RNG, step, data, biases);
        with ``reshard``, a checkpoint of any layout (weights and per-parameter AdamW state; not the RNG)."""
        from raymoe.checkpoint import copy_parameters, load_shard, set_rng_state
        from raymoe.checkpoint.reshard import load_adamw_shard_state
        from raymoe.checkpoint.run_state import local_layout, read_run_state
        from raymoe.data import Cursor
        from raymoe.train.batches import open_batches

        checkpoint = Path(checkpoint)
        manifest, state = read_run_state(checkpoint, self.config, local_layout(self.config),
                                         num_routers=self.routing_bias_RE.shape[0], reshard=reshard)
        if reshard:
            self._load_resharded(checkpoint)
        else:
            shard = manifest.shards[0]
            payload = load_shard(checkpoint / shard.file, rank=0, sha256=shard.sha256)
            copy_parameters(dict(self.model.named_parameters()), payload["model"],
                            source=str(checkpoint / shard.file))
            load_adamw_shard_state(self.optimizer, payload["optimizer"], source=str(checkpoint))
            set_rng_state(payload["rng"])
        self.step_index, self.tokens_seen, self.routing_bias_RE = state.step, state.tokens_seen, state.bias_RE
        self._batches = open_batches(self.config, cursor=Cursor.from_dict(state.cursor))

    def _load_resharded(self, checkpoint: Path) -> None:
        from raymoe.checkpoint import copy_parameters
        from raymoe.checkpoint.reshard import consolidate_training_state, load_adamw_param_states

        consolidated = consolidate_training_state(checkpoint)
        copy_parameters(dict(self.model.named_parameters()), consolidated.weights, source=str(checkpoint))
        load_adamw_param_states(self.optimizer, self._optimizer_names(), consolidated.states)

    def _optimizer_names(self) -> list[str]:
        from raymoe.checkpoint.reshard import position_names

        return position_names(self.optimizer, self.model.named_parameters())

    @property
    def batches(self):
        if self._batches is None:
            from raymoe.train.batches import open_batches

            self._batches = open_batches(self.config)
        return self._batches

    def step(self, tokens_BL: torch.Tensor | None = None) -> dict:
        """Run one optimizer step on ``tokens_BL`` (the global batch) or the next batch of the data."""
        cfg = self.config
        if tokens_BL is None:
            tokens_BL = self.batches.next_batch()
        start = time.perf_counter()
        knobs = self.progress.knobs(cfg)
        lr, mtp_weight, gamma = knobs.lr, knobs.mtp_weight, knobs.gamma
        set_lr(self.optimizer, lr)

        self.model.set_routing_biases(self.routing_bias_RE)
        self.optimizer.zero_grad(set_to_none=True)
        with compute_context(cfg, self.device):
            sums = accumulate_gradients(
                self.model,
                tokens_BL.to(self.device),
                cfg.schedule.num_microbatches,
                mtp_weight,
                reduction_tree=self.reduction_tree,
            )
        grad_norm = clip_gradients(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        step, num_tokens = self.progress.advance(cfg, tokens_BL, sums["counts_RE"], knobs)

        elapsed = time.perf_counter() - start
        max_vio, per_layer = load_statistics(sums["counts_RE"])
        record = StepMetrics(
            step=step,
            loss=sums["main"],
            mtp_loss=sums["mtp"],
            balance_loss=sums["balance"],
            total_loss=sums["total"],
            max_vio=max_vio,
            lr=lr,
            grad_norm=grad_norm,
            tokens=num_tokens,
            tokens_per_s=num_tokens / elapsed,
            step_time_s=elapsed,
            mtp_weight=mtp_weight,
            bias_gamma=gamma,
            max_vio_per_layer=per_layer,
            expert_load=sums["counts_RE"].tolist(),
        )
        return record.to_dict()


ReductionTree = list  # list[int] (micro-batch indices, summed in order) or list[ReductionTree] (sums of sums)


def accumulate_gradients(
    model, tokens_BL: torch.Tensor, num_microbatches: int, mtp_weight: float, *, reduction_tree=None
) -> dict:
    """Forward/backward each micro-batch with loss / M; returns mean losses and summed expert counts (R, E).

    ``reduction_tree`` fixes the order in which micro-batch gradients are added (default: 0, 1, ..., M-1 into one
    buffer). A distributed layout adds them in its own order -- each dp rank (and each DualPipe copy) accumulates
    its own micro-batches, then the partial sums are all-reduced -- and fp32 addition is not associative, so a
    parity check that wants bitwise-equal gradients gives the layout's tree, e.g. ``[[0, 1], [2, 3]]``.
    """
    counts_RE = torch.zeros(model.num_routers(), model.cfg.num_routed_experts, dtype=torch.int64)
    sums = {"main": 0.0, "mtp": 0.0, "balance": 0.0, "total": 0.0, "counts_RE": counts_RE}
    micro_batches = tokens_BL.chunk(num_microbatches)
    tree = list(range(num_microbatches)) if reduction_tree is None else reduction_tree
    _accumulate_tree(model, micro_batches, tree, num_microbatches, mtp_weight, sums)
    return sums


def _accumulate_tree(model, micro_batches, tree, num_microbatches: int, mtp_weight: float, sums: dict) -> None:
    if all(isinstance(node, int) for node in tree):
        for index in tree:
            _accumulate_one(model, micro_batches[index], num_microbatches, mtp_weight, sums)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    outer = [p.grad for p in params]
    partials = []
    for child in tree:
        for p in params:
            p.grad = None
        _accumulate_tree(model, micro_batches, child, num_microbatches, mtp_weight, sums)
        partials.append([p.grad for p in params])
    for p, before, parts in zip(params, outer, zip(*partials)):
        total = before
        for part in parts:
            if part is not None:
                total = part.clone() if total is None else total + part
        p.grad = total


def _accumulate_one(model, micro_BL: torch.Tensor, num_microbatches: int, mtp_weight: float, sums: dict) -> None:
    out = model(micro_BL, mtp_weight=mtp_weight)
    (out.loss / num_microbatches).backward()
    for key, value in (("main", out.main_loss), ("mtp", out.mtp_loss), ("balance", out.balance_loss)):
        sums[key] += float(value) / num_microbatches
    sums["total"] += float(out.loss.detach()) / num_microbatches
    for stats in out.router_stats:
        sums["counts_RE"][stats.slot] += stats.counts_E.cpu()
