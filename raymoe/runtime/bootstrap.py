"""Bring up torch.distributed across the worker actors, through Ray.

Rank 0 opens a ``TCPStore`` on port 0 (the OS picks a free port, so two jobs on one node cannot race for it)
and returns its address through Ray; every rank then joins the store and calls ``init_process_group`` with it.
gloo on CPU, NCCL on GPU. This is Ray Train's recipe (``ray/train/torch/config.py``) without its dependency.

The functions named ``worker_*`` run inside the actors; ``bootstrap`` runs in the driver.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def worker_open_store(world_size: int, timeout_s: float):
    """On rank 0: listen on a free port; returns (store, host, port)."""
    import ray

    store = dist.TCPStore(
        "0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    return store, ray.util.get_node_ip_address(), store.port


def worker_init_process_group(
    *, store, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> None:
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def bootstrap(actors: list, *, backend: str, timeout_s: float) -> tuple[str, int]:
    """Driver side: rank 0 opens the store, then every actor joins (in parallel); returns (host, port)."""
    import ray

    from raymoe.runtime.calls import gather

    host, port = ray.get(actors[0].open_store.remote(len(actors), timeout_s))
    gather([a.init_distributed.remote(host, port, backend, timeout_s) for a in actors])
    return host, port
