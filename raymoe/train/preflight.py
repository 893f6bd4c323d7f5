"""Everything a run can check before it writes anything, so that a refused run leaves nothing behind.

Order matters: what needs nothing but the config comes first (the device, whether the model fits in memory),
then the file system (the run and checkpoint directories can be created; a fresh run does not land on an
earlier run's files), then the data (its manifest and every shard's checksum). Both trainers call ``preflight``
before they build a model, start Ray or open the run directory; the Ray launcher then checks the cluster
address and the cluster's CPUs/GPUs (``raymoe.runtime.launch``), still before the run directory is touched.

The memory check uses the planner (``raymoe.plan``): parameters, gradients and optimizer state per worker for
the run's layout, plus a rough lower bound of one micro-batch's activations (the logits dominate when the
vocabulary is huge). It exists so that ``model.vocab_size=10**15`` is refused with numbers instead of a C++
frame dump from ``torch.empty`` (or the kernel's OOM killer) after the workers started.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raymoe.config import Config
from raymoe.train.run_dir import check_fresh_run_dir
from raymoe.train.saving import checkpoint_root


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes one worker needs at least (``per_worker_bytes``) and how many workers share this machine."""

    per_worker_bytes: int
    state_bytes: int
    """Parameters + gradients + optimizer state of the most loaded worker (the planner's ``peak``)."""
    activation_bytes: int
    num_workers: int


def preflight(config: Config, out_dir: str | Path, *, engine: str, fresh: bool, overwrite: bool = False,
              workers_on_this_machine: bool = True) -> None:
    """ValueError naming the setting unless the run can start. ``fresh``: a new run (not ``--resume``), which
    must not land on an earlier run's directory unless ``overwrite``. ``workers_on_this_machine``: the local
    engine, or a Ray instance started here (not a joined cluster), so all workers share this machine's memory."""
    check_device(config, engine=engine)
    check_memory(config, engine=engine, workers_on_this_machine=workers_on_this_machine)
    out = Path(out_dir)
    check_writable(out, "run.out_dir")
    check_writable(checkpoint_root(config, out), "run.checkpoint_dir")
    if fresh:
        check_fresh_run_dir(out, overwrite=overwrite)
    check_data(config)


def check_device(config: Config, *, engine: str) -> None:
    """``parallel.device=cuda`` needs CUDA here for the local engine (the Ray engine asks the cluster for GPUs)."""
    if config.parallel.device != "cuda" or engine != "local":
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"parallel.device=cuda with --engine local, but this machine has no usable CUDA device "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); use "
                         f"parallel.device=cpu, or the Ray engine on a cluster with GPUs")


def estimate_memory(config: Config, *, engine: str) -> MemoryEstimate:
    from raymoe.plan import BytesPerElement, Layout, count_params, plan_memory

    p = config.parallel
    if engine == "local":  # the reference trainer: the whole model and a plain AdamW in one process
        layout, num_workers = Layout(pp=1, dp=1, zero_stage=0, schedule="1f1b"), 1
    else:
        layout = Layout(pp=p.pp, ep=p.ep, dp=p.dp, zero_stage=p.zero_stage, schedule=config.schedule.name,
                        stage_layers=tuple(p.stage_layers))
        num_workers = p.pp * p.dp
    params = count_params(config.model, top_k=config.routing.top_k, mtp_depth=config.mtp.depth)
    peak = plan_memory(params, layout, BytesPerElement.from_precision(config.precision),
                       num_routed_experts=config.model.num_routed_experts).peak
    m, depth = config.model, config.mtp.depth
    tokens = config.micro_batch_size * config.data.seq_len
    # A lower bound: fp32 logits and their gradient for the main head and every MTP depth, plus one hidden
    # state per layer; the global batch of int64 token ids (the driver holds all of it).
    activations = tokens * 4 * (2 * m.vocab_size * (1 + depth) + m.num_layers * m.dim)
    batch = config.data.batch_size * (config.data.seq_len + 1 + depth) * 8
    return MemoryEstimate(per_worker_bytes=peak.total_bytes + activations + batch,
                          state_bytes=peak.total_bytes,
                          activation_bytes=activations, num_workers=num_workers)


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config: Config, *, engine: str, workers_on_this_machine: bool = True,
                 available_bytes: int | None = None) -> MemoryEstimate:
    """Refuse a run whose workers cannot fit: all of them in this machine's memory (when they all run here), and
    each in one GPU's memory (``parallel.device=cuda`` where CUDA is visible here)."""
    estimate = estimate_memory(config, engine=engine)
    workers = estimate.num_workers if workers_on_this_machine else 1
    need = estimate.per_worker_bytes * workers
    have = machine_memory_bytes() if available_bytes is None else available_bytes
    what = _sizes(config)
    if need > have:
        raise ValueError(
            f"the model does not fit: {what} need at least {_gib(estimate.per_worker_bytes)} per worker "
            f"({_gib(estimate.state_bytes)} parameters + gradients + optimizer state, planner estimate, + "
            f"{_gib(estimate.activation_bytes)} activations) x {workers} worker(s) = {_gib(need)}, but this machine "
            f"has {_gib(have)}; `raymoe plan` shows the breakdown")
    if config.parallel.device == "cuda":
        import torch

        if torch.cuda.is_available():
            gpu = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            if estimate.per_worker_bytes > gpu:
                raise ValueError(f"the model does not fit one GPU: {what} need at least "
                                 f"{_gib(estimate.per_worker_bytes)} per worker, each GPU has {_gib(gpu)}")
    return estimate


def _sizes(config: Config) -> str:
    """Every setting the estimate grows with, so that whichever one is too large is named."""
    import dataclasses

    m = config.model
    sizes = [f"model.{f.name}={getattr(m, f.name)}" for f in dataclasses.fields(m) if f.type == "int"]
    return ", ".join([*sizes, f"data.batch_size={config.data.batch_size}", f"data.seq_len={config.data.seq_len}"])


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.3g} GiB"


def check_writable(path: Path, key: str) -> None:
    """``path`` is a directory we can write, or one we can create: probed by creating (and removing at once) a
    hidden directory in its nearest existing ancestor, so a refused run leaves nothing behind."""
    path = Path(path)
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key} {str(path)!r} is a file, not a directory")
    if not ancestor.is_dir():
        raise ValueError(f"{key} {str(path)!r} cannot be created: {str(ancestor)!r} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".raymoe-probe-", dir=ancestor))
    except OSError as exc:
        raise ValueError(f"{key} {str(path)!r} is not usable: nothing can be created in {str(ancestor)!r} "
                         f"({exc.strerror or exc})") from None


def check_data(config: Config) -> None:
    """Open the training data as the trainers will: the manifest, every shard's checksum, the vocabulary."""
    from raymoe.train.batches import open_batches

    try:
        open_batches(config)
    except (ValueError, OSError) as exc:  # OSError: e.g. a shard we may not read
        where = f"data.path={config.data.path!r}" if config.data.path else "the embedded corpus"
        raise ValueError(f"{where}: {exc}") from exc
