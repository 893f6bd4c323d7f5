"""The driver's states and the transitions between them (``raymoe.runtime.driver``):

    INITIALIZING --start()--> RUNNING --finish()--> FINISHED
         |                     |   ^
         |                     |   +-- CHECKPOINTING (save_checkpoint) / RECOVERING (recover: new workers)
         +------ error --------+--> ERRORED   (or RECOVERING, if the failure policy says so)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DriverState(enum.Enum):
    INITIALIZING = "initializing"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    FINISHED = "finished"
    ERRORED = "errored"


TRANSITIONS: dict[DriverState, frozenset[DriverState]] = {
    DriverState.INITIALIZING: frozenset({DriverState.RUNNING, DriverState.ERRORED}),
    DriverState.RUNNING: frozenset(
        {DriverState.CHECKPOINTING, DriverState.RECOVERING, DriverState.FINISHED, DriverState.ERRORED}
    ),
    DriverState.CHECKPOINTING: frozenset({DriverState.RUNNING, DriverState.RECOVERING, DriverState.ERRORED}),
    DriverState.RECOVERING: frozenset({DriverState.RUNNING, DriverState.ERRORED}),
    DriverState.FINISHED: frozenset(),
    DriverState.ERRORED: frozenset(),
}


@dataclass
class Transition:
    state: DriverState
    at: float
    reason: str = ""
