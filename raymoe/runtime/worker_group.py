"""A placement group of worker actors, one per rank, bootstrapped into one torch.distributed world.

Resources are reserved before any actor starts: one bundle per worker (``num_cpus_per_worker`` CPUs, plus one
GPU with ``device='cuda'``), PACKed onto as few nodes as possible so pipeline neighbours share a node when they
can. Actors are named ``raymoe/pp{p}-ep{e}-dp{d}`` so the dashboard reads like the topology. ``check_resources``
refuses a layout the cluster cannot hold, naming the numbers, instead of waiting forever for a placement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from raymoe.parallel.topology import Topology
from raymoe.runtime.bootstrap import backend_for, bootstrap
from raymoe.runtime.calls import gather


def check_resources(topology: Topology, *, device: str, num_cpus_per_worker: float, cluster: dict) -> None:
    """ValueError unless ``cluster`` (``ray.cluster_resources()``) can hold one bundle per worker."""
    workers = topology.world_size
    need_cpus = workers * num_cpus_per_worker
    have_cpus = cluster.get("CPU", 0)
    layout = f"pp={topology.pp} x dp={topology.dp} = {workers} workers"
    if need_cpus > have_cpus:
        raise ValueError(
            f"{layout} need {need_cpus:g} CPUs ({num_cpus_per_worker:g} per worker) but the Ray cluster has "
            f"{have_cpus:g}; lower parallel.pp/parallel.dp or add nodes"
        )
    if device == "cuda" and workers > cluster.get("GPU", 0):
        raise ValueError(f"{layout} need {workers} GPUs but the Ray cluster has {cluster.get('GPU', 0):g}")


class WorkerGroup:
    def __init__(
        self,
        topology: Topology,
        *,
        device: str = "cpu",
        num_cpus_per_worker: float = 1,
        strategy: str = "PACK",
        timeout_s: float = 300.0,
        name_suffix: str = "",
    ) -> None:
        """``name_suffix`` tells apart the actors of groups of one job that live side by side (benchmarks)."""
        self.topology = topology
        self.name_suffix = name_suffix
        self.device = device
        self.num_cpus_per_worker = num_cpus_per_worker
        self.strategy = strategy
        self.timeout_s = timeout_s
        self.actors: list[Any] = []
        self.placement_group = None
        self.startup_s: dict[str, float] = {}

    def start(self) -> WorkerGroup:
        """Reserve the bundles, start the actors, bring up torch.distributed; on any failure, undo it all."""
        import ray

        t0 = time.perf_counter()
        check_resources(self.topology, device=self.device, num_cpus_per_worker=self.num_cpus_per_worker,
                        cluster=ray.cluster_resources())
        try:
            self._start(t0)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start(self, t0: float) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raymoe.runtime.worker import Worker

        bundle = {"CPU": self.num_cpus_per_worker} | ({"GPU": 1} if self.device == "cuda" else {})
        self.placement_group = placement_group([dict(bundle)] * self.topology.world_size, strategy=self.strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ValueError(
                f"could not reserve {self.topology.world_size} bundles of {bundle} within {self.timeout_s:g} s; "
                f"available now: {ray.available_resources()}"
            ) from None
        remote_worker = ray.remote(Worker)
        t1 = time.perf_counter()
        for rank in range(self.topology.world_size):
            self._wait_name_free(self._name(rank))
            self.actors.append(
                remote_worker.options(
                    name=self._name(rank),
                    num_cpus=self.num_cpus_per_worker,
                    num_gpus=1 if self.device == "cuda" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=rank
                    ),
                ).remote(rank, self.topology, device=self.device)
            )
        t2 = time.perf_counter()
        bootstrap(self.actors, backend=backend_for(self.device), timeout_s=self.timeout_s)
        t3 = time.perf_counter()
        self.startup_s = {"placement_group": t1 - t0, "actors": t2 - t1, "torch_distributed": t3 - t2}

    def execute(self, method: Callable, *args, timeout_s: float | None = None) -> list:
        """Call ``method`` (a ``Worker`` method: ``Worker.run_step``) on every worker with the same arguments;
        results in rank order."""
        name = _worker_method(method)
        return gather([getattr(a, name).remote(*args) for a in self.actors], timeout_s)

    def execute_each(self, method: Callable, args_per_rank: Sequence[tuple], timeout_s: float | None = None) -> list:
        """Call ``method`` on worker r with ``args_per_rank[r]``; results in rank order (TimeoutError after
        ``timeout_s``)."""
        name = _worker_method(method)
        refs = [getattr(a, name).remote(*args) for a, args in zip(self.actors, args_per_rank)]
        return gather(refs, timeout_s)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.actors:
            try:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
            except Exception:  # a dead or hung worker: killing it below is all that is left to do
                pass
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for rank in range(len(self.actors)):
            self._wait_name_free(self._name(rank))
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def _name(self, rank: int) -> str:
        return self.topology.actor_name(rank) + self.name_suffix

    @staticmethod
    def _wait_name_free(name: str, timeout_s: float = 30.0) -> None:
        """Actor names are released asynchronously after a kill; a new group must not collide with the last."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"a Ray actor named {name!r} is still alive; is another raymoe job running?")


def _worker_method(method: Callable) -> str:
    """The name of a ``Worker`` method, checked: a typo or a stale name fails here, in the driver, not as an
    attribute error inside an actor."""
    from raymoe.runtime.worker import Worker

    name = getattr(method, "__name__", None)
    if name is None or getattr(Worker, name, None) is not method:
        raise TypeError(f"{method!r} is not a method of raymoe.runtime.worker.Worker")
    return name
