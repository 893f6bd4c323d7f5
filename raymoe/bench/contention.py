"""What the same arithmetic costs in the processes a pipeline runs in, before any pipelining (issue 15).

A pipeline rank's forward and backward are slower than the same chunk timed alone in one process. Part of that
comes from where it runs, not from the schedule: a Ray worker process instead of a plain one, and two ranks
computing at once on a two-core machine. This measures those two factors alone, on one fixed piece of work: the
whole model's forward+backward of one micro-batch, one thread, in

* ``here``: this process (Ray running, idle);
* ``actor``: one Ray actor (``num_cpus=1``), the other core idle;
* ``two_actors``: two Ray actors at once;
* ``process``: one plain spawned process (``multiprocessing``), the other core idle;
* ``two_processes``: two plain processes at once.

The cases alternate round by round (each round times ``iterations`` repeats in every case), so a drift of the
machine's speed touches all of them alike. Reported per case: the median seconds over rounds, the ratio to
``here``, and what the computing thread used per repeat (``getrusage``: user and kernel seconds, involuntary
context switches). ``two_actors / here`` is the compute excess a two-rank pipeline on Ray starts from.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable

import torch

CASES = ("here", "actor", "two_actors", "process", "two_processes")


class ForwardBackward:
    """The fixed piece of work, rebuilt identically in every process (same config and tokens; ``build_model``
    seeds the weights from the config's run seed)."""

    def __init__(self, preset: str, overrides: list[str], tokens_BL: torch.Tensor, mtp_weight: float) -> None:
        from raymoe.config import load_config
        from raymoe.model import build_model

        torch.set_num_threads(1)  # like a pipeline worker
        self.model = build_model(load_config(preset, overrides))
        self.tokens_BL = tokens_BL
        self.mtp_weight = mtp_weight
        self.run(1)  # warm-up

    def run(self, iterations: int) -> dict[str, float]:
        """Median seconds of ``iterations`` forward+backward passes, and this thread's CPU use per pass."""
        before = resource.getrusage(resource.RUSAGE_THREAD)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.model.zero_grad(set_to_none=True)
            self.model(self.tokens_BL, mtp_weight=self.mtp_weight).loss.backward()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_THREAD)
        return {"s": statistics.median(times), "user_s": (after.ru_utime - before.ru_utime) / iterations,
                "sys_s": (after.ru_stime - before.ru_stime) / iterations,
                "involuntary_switches": (after.ru_nivcsw - before.ru_nivcsw) / iterations}


def _serve(conn, args) -> None:
    work = ForwardBackward(*args)
    conn.send("ready")
    while (iterations := conn.recv()) is not None:
        conn.send(work.run(iterations))


class _Processes:
    """Plain spawned processes, each holding a ``ForwardBackward``; ``run`` times them at once."""

    def __init__(self, count: int, args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.links = []
        for _ in range(count):
            here, there = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(there, args), daemon=True)
            process.start()
            self.links.append((here, process))
        for here, _ in self.links:
            here.recv()

    def run(self, iterations: int, count: int) -> list[dict]:
        for here, _ in self.links[:count]:
            here.send(iterations)
        return [here.recv() for here, _ in self.links[:count]]

    def close(self) -> None:
        for here, process in self.links:
            here.send(None)
            process.join(timeout=30)


def measure(preset: str, overrides: list[str], tokens_BL: torch.Tensor, *, mtp_weight: float, rounds: int,
            iterations: int, gate: Callable[[], object]) -> dict:
    """Run inside a Ray session with two free CPUs; see the module docstring."""
    from raymoe.runtime.actors import Actors

    args = (preset, overrides, tokens_BL, mtp_weight)
    here = ForwardBackward(*args)
    actors = Actors(ForwardBackward, 2, *args, num_cpus=1.0)
    processes = _Processes(2, args)
    samples: dict[str, list[dict]] = {case: [] for case in CASES}
    try:
        actors.call("run", 1)
        for _ in range(rounds):
            gate()
            samples["here"].append(here.run(iterations))
            samples["actor"] += actors.call("run", iterations, count=1)
            samples["two_actors"] += actors.call("run", iterations)
            samples["process"] += processes.run(iterations, 1)
            samples["two_processes"] += processes.run(iterations, 2)
    finally:
        processes.close()
        actors.close()
    base = statistics.median(x["s"] for x in samples["here"])
    cases = {}
    for case, values in samples.items():
        median = {key: statistics.median(v[key] for v in values) for key in values[0]}
        cases[case] = {**median, "ratio": median["s"] / base}
    return {"rounds": rounds, "iterations": iterations, "cases": cases}


def table(result: dict) -> list[str]:
    lines = ["| where the same forward+backward runs (1 x 128 tokens, one thread) | s (median) | / here | user s | "
             "kernel s | involuntary switches |", "|---|---|---|---|---|---|"]
    for case, c in result["cases"].items():
        lines.append(f"| {case.replace('_', ' ')} | {c['s']:.4f} | {c['ratio']:.3f} | {c['user_s']:.4f} | "
                     f"{c['sys_s']:.4f} | {c['involuntary_switches']:.1f} |")
    return lines
