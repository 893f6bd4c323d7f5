"""Graceful stop: SIGTERM (what ``ray job stop`` sends) or Ctrl-C asks the training loop to stop at a step boundary.

Between steps every piece of state is consistent (workers' parameters and optimizer, the driver's routing biases
and data cursor), so that is where a checkpoint can be cut. The handler only sets a flag; the loop finishes the
step in flight, saves, and returns. A second Ctrl-C interrupts at once (``KeyboardInterrupt``), for a user who
does not want to wait. Ray's job supervisor sends SIGKILL ``RAY_JOB_STOP_WAIT_TIME_S`` after SIGTERM
(jobs/runtime_env.yaml sets 30 s): the last periodic checkpoint is what survives if the save does not fit in it.

Handlers can only be installed from the main thread; elsewhere this is a no-op that never requests a stop.
"""

from __future__ import annotations

import signal
import threading


class StopRequests:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
