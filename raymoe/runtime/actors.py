"""A few plain Ray actors of one class, called together: for measurements that compare a Ray actor with a plain
process (``raymoe.bench.contention``); only ``raymoe.runtime`` imports Ray."""

from __future__ import annotations

from raymoe.runtime.calls import gather


class Actors:
    """``count`` actors of ``cls`` built with ``args``, ``num_cpus`` each (the local Ray must have room)."""

    def __init__(self, cls: type, count: int, *args, num_cpus: float = 1.0) -> None:
        import ray

        remote = ray.remote(num_cpus=num_cpus)(cls)
        self.handles = [remote.remote(*args) for _ in range(count)]

    def call(self, method: str, *args, count: int | None = None) -> list:
        """``method(*args)`` on the first ``count`` actors (all by default) at once; their results in order (the
        first failure raised as soon as it happens, ``calls.gather``)."""
        handles = self.handles if count is None else self.handles[:count]
        return gather([getattr(h, method).remote(*args) for h in handles])

    def close(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle)
        self.handles = []
