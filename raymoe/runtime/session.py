"""A Ray session for commands and benchmarks that are not training runs: they stay free of ``import ray``
(which lives under ``raymoe/runtime`` only) and still start or join Ray and shut down what they started."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str = "", *, num_cpus: int | None = None) -> Iterator[None]:
    """Join Ray at ``address`` (or ``RAY_ADDRESS``) or start a local instance with ``num_cpus`` logical CPUs;
    on exit shut down only a Ray this call started."""
    import ray

    from raymoe.runtime.launch import init_ray

    started = init_ray(address, num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_cpus() -> float:
    """Logical CPUs of the Ray cluster this process is connected to."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
