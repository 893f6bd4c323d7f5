"""The placement-group bundles a raymoe config asks Ray for: one bundle per worker actor.

A job with ``pp x dp`` workers reserves ``pp * dp`` bundles in one placement group before any actor starts, so
either the whole layout gets its slots or nothing starts (no half-built pipeline holding GPUs). On CPU a worker
is one CPU slot, ``{"CPU": 1}``; on CUDA it is one GPU plus its CPU slot, ``{"CPU": 1, "GPU": 1}``. These are
the bundles ``raymoe.runtime.worker_group.WorkerGroup`` reserves (``num_cpus_per_worker=1``, PACK strategy);
pass ``cpus_per_worker`` to plan for a runtime configured with more.
"""

from __future__ import annotations

from raymoe.config import Config

DEFAULT_CPUS_PER_WORKER = 1.0
"""CPUs each worker reserves (WorkerGroup's default). Up to node CPUs / node GPUs still packs a full GPU node."""


def placement_bundles(config: Config, *, cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER) -> list[dict]:
    """One resource dict per worker rank (rank order = the topology's stage-major order)."""
    if cpus_per_worker < 0 or (cpus_per_worker == 0 and config.parallel.device == "cpu"):
        raise ValueError(f"cpus_per_worker must be > 0 on CPU and >= 0 on CUDA, got {cpus_per_worker} "
                         f"with parallel.device={config.parallel.device}")
    bundle = {"CPU": float(cpus_per_worker)} if cpus_per_worker else {}
    if config.parallel.device == "cuda":
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(config.parallel.world_size)]


def total_demand(bundles: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    return total
