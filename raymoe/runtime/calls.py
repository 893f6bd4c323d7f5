"""Waiting on many Ray calls at once, failing fast: what the driver, the bootstrap and the worker group share."""

from __future__ import annotations

import time


def gather(refs: list, timeout_s: float | None = None) -> list:
    """``ray.get`` that raises the first failure as soon as it happens.

    A plain ``ray.get(refs)`` waits in order: when rank 3 fails while rank 0 waits for it inside a collective,
    it would block on rank 0 forever and never show rank 3's error.
    """
    import ray

    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise TimeoutError(f"{len(pending)} of {len(refs)} workers did not answer within {timeout_s} s")
        ray.get(done)  # raises the worker's exception, if it failed
    return ray.get(list(refs))
