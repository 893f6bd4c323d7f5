"""Record how busy the machine is: on 2 shared cores, other processes change timings more than our code does."""

from __future__ import annotations

import os


def machine_load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpus": os.cpu_count()}


def spread(values: list[float]) -> dict:
    """min / median / max of a list of measurements."""
    ordered = sorted(values)
    if not ordered:
        return {"min": None, "median": None, "max": None, "n": 0}
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return {"min": ordered[0], "median": median, "max": ordered[-1], "n": len(ordered)}
