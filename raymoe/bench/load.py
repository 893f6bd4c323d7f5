"""Record how busy the machine is: on 2 shared cores, other processes change timings more than our code does."""

from __future__ import annotations

import os
import time


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


# -- foreign load: what other processes take from the cores this benchmark times on ------------------------------
# The load average counts our own workers too and lags by a minute; what spoils a timing is CPU that *other*
# processes use while we measure. So: the busy time of all cores (/proc/stat) minus the CPU time of this process
# and its descendants (a local Ray's GCS, raylet and worker actors are all below the driver), over a short window.


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _tree_ticks(root: int) -> int:
    """utime + stime of ``root`` and every live descendant (clock ticks)."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        parent[int(entry)], ticks[int(entry)] = int(rest[1]), int(rest[11]) + int(rest[12])
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += t
    return total


def foreign_load(window_s: float = 0.5) -> float:
    """Cores used by processes outside this process tree, averaged over ``window_s`` (Linux /proc)."""
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    busy0, ours0, t0 = _busy_ticks(), _tree_ticks(me), time.perf_counter()
    time.sleep(window_s)
    busy1, ours1, t1 = _busy_ticks(), _tree_ticks(me), time.perf_counter()
    return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / hz / (t1 - t0))


def wait_for_quiet(threshold: float = 0.15, *, window_s: float = 0.5, timeout_s: float = 120.0) -> dict:
    """Wait until the foreign load is below ``threshold`` cores (at most ``timeout_s``); returns what was seen:
    ``foreign_cores`` (the last window), ``waited_s`` and ``quiet`` (False: gave up and measured anyway)."""
    start = time.perf_counter()
    while True:
        load = foreign_load(window_s)
        waited = time.perf_counter() - start
        if load < threshold or waited >= timeout_s:
            return {"foreign_cores": load, "waited_s": waited, "quiet": load < threshold}
