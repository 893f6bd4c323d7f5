"""Reading a run directory: ``metrics.jsonl``, ``actions.jsonl`` and ``config.yaml``, robust to a stopped run.

Trainers append one JSON line per step and flush, so a run that was stopped (``ray job stop``, Ctrl-C, a lost
node) leaves every completed step on disk; at worst the line being written is cut short. We keep every
complete line and count the torn ones instead of failing, so a report can always be written.

Router names: ``expert_load`` and ``max_vio_per_layer`` hold one entry per router, the MoE layers in order and
then one per MTP module; ``router_names`` labels them ``layer 3`` ... ``mtp 0`` from the config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raymoe.report.timings import TimedAction

METRICS_FILE = "metrics.jsonl"
ACTIONS_FILE = "actions.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True, kw_only=True)
class JsonLines:
    rows: list[dict]
    torn: int
    """Lines that were not valid JSON objects (a write cut short by a stop) and were skipped."""


def read_jsonl(path: str | Path) -> JsonLines:
    rows, torn = [], 0
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn += 1
    return JsonLines(rows=rows, torn=torn)


def iter_actions(rows: list[dict]) -> Iterator[TimedAction]:
    for i, row in enumerate(rows):
        try:
            yield TimedAction.from_dict(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{ACTIONS_FILE} row {i + 1} is not an action (needs step, rank, kind, stage, "
                             f"microbatch, start, end): {exc}") from exc


def read_config(run_dir: Path):
    """The run's ``Config`` from its ``config.yaml``, or None if absent or no longer valid."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    from raymoe.config import load_config

    try:
        return load_config(None, config_file=path)
    except ValueError:
        return None


def router_names(config, num_routers: int) -> list[str]:
    """Labels of the ``num_routers`` routers of a run, from its config (generic labels without one)."""
    if config is None:
        return [f"router {i}" for i in range(num_routers)]
    m = config.model
    names = [f"layer {i}" for i in range(m.num_dense_layers, m.num_layers)]
    names += [f"mtp {d}" for d in range(config.mtp.depth)]
    if len(names) != num_routers:  # the record disagrees with the config: do not guess
        return [f"router {i}" for i in range(num_routers)]
    return names
