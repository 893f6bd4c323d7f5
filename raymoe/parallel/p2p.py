"""Point-to-point transfers between pipeline ranks: one posted batch per run of SEND/RECV actions.

The executor turns each maximal run of communication actions in a rank's list into one batch of
``Transfer`` values and posts it through a ``Transport``; it waits for a received tensor only right before the
compute that consumes it, and for its sends at the end of the step (the lazy executor the schedule contract
allows). ``TorchTransport`` posts a batch with ``torch.distributed.batch_isend_irecv`` (gloo on CPU, NCCL on GPU);
tests use an in-memory transport.

Tags. The schedule contract pairs the i-th send of a rank pair with the i-th receive, which is how NCCL matches
(it ignores tags). We also tag every transfer with the (edge, micro-batch, direction) it carries, so on gloo a
mis-ordered pair fails to match instead of silently swapping two same-shaped tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, kw_only=True)
class Transfer:
    send: bool
    tensor: torch.Tensor
    """The tensor to send, or the buffer a receive fills."""
    peer: int
    """Global rank of the other end."""
    tag: int


class Work(Protocol):
    def wait(self) -> object: ...


class Transport(Protocol):
    def post(self, transfers: Sequence[Transfer]) -> list[Work]:
        """Start every transfer of the batch; returns one waitable per transfer, in order."""
        ...


def transfer_tag(*, upstream_stage: int, microbatch: int, backward: bool, num_stages: int) -> int:
    """Unique tag of the activation (or its gradient) that ``upstream_stage`` hands to the next stage."""
    return ((microbatch * num_stages + upstream_stage) << 1) | int(backward)


class TorchTransport:
    """Posts batches with ``torch.distributed.batch_isend_irecv`` on the default (world) group."""

    def post(self, transfers: Sequence[Transfer]) -> list[Work]:
        import torch.distributed as dist

        if not transfers:
            return []
        ops = [
            dist.P2POp(dist.isend if t.send else dist.irecv, t.tensor, t.peer, tag=t.tag) for t in transfers
        ]
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # a backend that coalesces the batch into one work: wait on it for each
            works = [works[0]] * len(ops) if works else [_Done()] * len(ops)
        return works


class _Done:
    def wait(self) -> bool:
        return True


class Mailbox:
    """In-process message board for ``InMemoryTransport``: pipeline ranks as threads of one process."""

    def __init__(self) -> None:
        import threading

        self._cond = threading.Condition()
        self._messages: dict[tuple[int, int, int], list[torch.Tensor]] = {}

    def put(self, src: int, dst: int, tag: int, tensor: torch.Tensor) -> None:
        with self._cond:
            self._messages.setdefault((src, dst, tag), []).append(tensor.detach().clone())
            self._cond.notify_all()

    def take(self, src: int, dst: int, tag: int, timeout_s: float) -> torch.Tensor:
        with self._cond:
            if not self._cond.wait_for(lambda: self._messages.get((src, dst, tag)), timeout=timeout_s):
                raise TimeoutError(f"rank {dst}: nothing from rank {src} with tag {tag} after {timeout_s} s")
            return self._messages[(src, dst, tag)].pop(0)


def run_ranks_in_threads(work: Callable[[int], object], ranks: int) -> list:
    """``work(r)`` for every rank ``r`` in a thread of its own (pipeline ranks as threads of one process, talking
    through a ``Mailbox``); their results in rank order, or the first failure re-raised here once all have ended."""
    import threading

    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(r: int) -> None:
        try:
            results[r] = work(r)
        except BaseException as exc:  # surfaced in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[r] for r in range(ranks)]


class InMemoryTransport:
    """The local twin of ``TorchTransport``: sends complete at once, a receive's wait blocks until it arrives."""

    def __init__(self, mailbox: Mailbox, rank: int, *, timeout_s: float = 60.0) -> None:
        self.mailbox = mailbox
        self.rank = rank
        self.timeout_s = timeout_s

    def post(self, transfers: Sequence[Transfer]) -> list[Work]:
        works: list[Work] = []
        for t in transfers:
            if t.send:
                self.mailbox.put(self.rank, t.peer, t.tag, t.tensor)
                works.append(_Done())
            else:
                works.append(_MailboxReceive(self, t))
        return works


class _MailboxReceive:
    def __init__(self, transport: InMemoryTransport, transfer: Transfer) -> None:
        self.transport = transport
        self.transfer = transfer

    def wait(self) -> bool:
        t = self.transfer
        received = self.transport.mailbox.take(t.peer, self.transport.rank, t.tag, self.transport.timeout_s)
        t.tensor.copy_(received)
        return True
