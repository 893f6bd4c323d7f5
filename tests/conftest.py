"""Shared fixtures. ``ray_session``: one local Ray instance for the whole pytest session (``ray.init`` ~6 s).

8 logical CPUs on any machine, so 8-worker layouts schedule on a 2-core box (oversubscribed: fine for
correctness, meaningless for speed). ``worker_groups`` hands out started worker groups by topology and keeps
the last one alive for the next test of the same shape (starting actors + torch.distributed is ~5-10 s).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


class _WorkerGroups:
    def __init__(self) -> None:
        self.current = None

    def get(self, topology):
        from raymoe.runtime.worker_group import WorkerGroup

        if self.current is not None and self.current.topology == topology:
            return self.current
        self.close()
        self.current = WorkerGroup(topology, timeout_s=120).start()
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.shutdown()
            self.current = None


@pytest.fixture(scope="session")
def worker_groups(ray_session):
    groups = _WorkerGroups()
    yield groups
    groups.close()
