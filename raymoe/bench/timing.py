"""Timing for the GPU benchmark: CUDA events on a GPU, ``perf_counter`` elsewhere; min / median / max per call."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from raymoe.bench.load import spread


class Timer:
    """``timer(fn)``: ``warmup`` untimed calls, then ``repeats`` timings of ``iters`` back-to-back calls each."""

    def __init__(self, device: torch.device, *, warmup: int, iters: int, repeats: int) -> None:
        if warmup < 0 or iters < 1 or repeats < 1:
            raise ValueError(f"need warmup >= 0, iters >= 1, repeats >= 1; got {warmup}, {iters}, {repeats}")
        self.device, self.warmup, self.iters, self.repeats = device, warmup, iters, repeats

    def __call__(self, fn: Callable[[], object]) -> dict:
        for _ in range(self.warmup):
            fn()
        return spread([self._once(fn) for _ in range(self.repeats)])

    def _once(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(self.iters):
                fn()
            return (time.perf_counter() - start) / self.iters
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.iters):
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1e3 / self.iters


def tflops(flops: float, seconds: dict) -> dict:
    """TFLOP/s spread from a seconds spread (the fastest call gives the max)."""
    return {
        "min": flops / seconds["max"] / 1e12,
        "median": flops / seconds["median"] / 1e12,
        "max": flops / seconds["min"] / 1e12,
    }


def paired_ratios(measured: Callable[[], float], reference: Callable[[], float], *, rounds: int,
                  before: Callable[[], object] | None = None) -> list[float]:
    """Per round: ``measured() / reference()``, the two run next to each other, which first alternating by round
    (a drift of the machine's speed touches both alike). Each callable returns the seconds it wants counted;
    ``before`` runs at the start of every round (a load gate)."""
    ratios = []
    for r in range(rounds):
        if before is not None:
            before()
        if r % 2 == 0:
            reference_s, measured_s = reference(), measured()
        else:
            measured_s, reference_s = measured(), reference()
        ratios.append(measured_s / reference_s)
    return ratios
