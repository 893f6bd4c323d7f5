"""Two chunks in turns: the phase order of an overlapped F&B pair, fixed by the model, not by the OS scheduler.

An F&B pair runs one micro-batch's forward chunk and another's backward chunk together. Each chunk is a
sequence of *phases* cut at its expert all-to-alls: a forward chunk with L MoE layers is

    pre-dispatch (attention, gate)  | dispatch | experts | combine | post-combine + next layer's attention ... |

and its backward the mirror image (post-combine backward | combine-backward exchange | experts backward, weight
gradients included | dispatch-backward exchange | attention backward ...). ``Interleaver.run_pair`` runs the two
chunks on two threads that take turns, strictly: the forward computes until it *issues* an all-to-all, then
hands the turn to the backward, which computes until it issues one, hands back, and so on; a chunk that gets
the turn back first waits for its own exchange (that wait is the *exposed* communication), then computes on. So
each exchange is in flight while the other chunk computes:

    turn:  F pre-dispatch | B post-combine bwd | F experts | B experts bwd + W | F post-combine + attn | ...
    wire:     F dispatch ->  B combine-bwd -> F combine  -> B dispatch-bwd  -> F dispatch (next layer) ...

This is Megatron-Core's combined 1F1B order up to a phase shift (its combine-backward runs beside the
pre-dispatch forward; here the forward leads and the backward's first exchange runs beside the forward's
experts), and the same pairing the DeepSeek-V3 report draws in its Figure 4. When one chunk is done the other
runs on alone and waits for its exchanges in place.

Why strict turns and not free-running threads: the turn order is a pure function of the two chunks' structure,
identical on every rank of an ep group, so every rank issues every collective at the same position of one
global order; a rank never blocks in a collective that a peer can reach only after the turn passes, whatever
the timing (with free-running threads a blocking exchange on one group can wait for a peer whose other thread
waits on another group: the deadlock other implementations hit at scale). Only one thread computes at a time,
as on a GPU where the two chunks share the SMs and the exchange has its own engine.

The participant is named by the exchange (forward exchanges run on the ep group, backward ones on its twin),
not by the thread, so an autograd engine that runs the backward on another thread still takes its turns.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True, kw_only=True)
class PhaseTiming:
    """One turn of one chunk: it computed from ``start_s`` to ``end_s`` (seconds on ``time.perf_counter``'s
    clock, or since the step's start once the executor has shifted them), then issued an all-to-all
    (``ends_in_exchange``) or finished its chunk."""

    pair: str
    """The F&B action (its text form, ``0F5&7B1``)."""
    part: str
    """``F`` or ``B``: which chunk of the pair."""
    index: int
    """The phase's position in its chunk (0, 1, ...)."""
    start_s: float
    end_s: float
    ends_in_exchange: bool


@dataclass(frozen=True, kw_only=True)
class ExchangeTiming:
    """One all-to-all of a chunk: issued at ``issued_s``; the chunk asked for its result at ``wait_s`` (when the
    turn came back) and had it at ``done_s``. ``done_s - wait_s`` is the exposed time; if the exchange finished
    while the other chunk computed, it is ~0 and ``done_s`` is only an upper bound of its end."""

    part: str
    """``F`` (an exchange on the ep group: a forward's) or ``B`` (on its twin: a backward's)."""
    issued_s: float
    wait_s: float
    done_s: float

    @property
    def exposed_s(self) -> float:
        return self.done_s - self.wait_s


class Interleaver:
    """Runs an F&B pair in strict turns (module docstring) and records its phases and exchanges."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = False
        self._turn = FORWARD
        self._done: set[str] = set()
        self._phase_start: dict[str, float] = {}
        self._phase_index: dict[str, int] = {}
        self._label = ""
        self.phases: list[PhaseTiming] = []

    @property
    def active(self) -> bool:
        """Whether a pair is running (exchanges then take turns; outside a pair they simply block)."""
        return self._active

    def take(self) -> list[PhaseTiming]:
        """The phases since the last call (the executor collects them once per step)."""
        phases, self.phases = self.phases, []
        return phases

    # -- the pair ----------------------------------------------------------------------------------------------
    def run_pair(self, forward: Callable[[], None], backward: Callable[[], None], *, label: str = "",
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """Run ``forward`` on a second thread (under ``context``: autocast state is per thread) and ``backward``
        here, in strict turns starting with the forward; re-raise the first failure. ``label`` names the pair
        in the phase records."""
        with self._cond:
            if self._active:
                raise RuntimeError("an F&B pair is already running on this interleaver; pairs do not nest")
            self._active, self._turn, self._done, self._label = True, FORWARD, set(), label
            self._phase_index = {FORWARD: 0, BACKWARD: 0}
        failures: list[BaseException] = []

        def run_forward() -> None:
            with context():
                self._participate(FORWARD, forward, failures)

        thread = threading.Thread(target=run_forward, name="fb-pair-forward")
        thread.start()
        try:
            self._participate(BACKWARD, backward, failures)
        finally:
            thread.join()
            with self._cond:
                self._active = False
        if failures:
            raise failures[0]

    def _participate(self, part: str, body: Callable[[], None], failures: list[BaseException]) -> None:
        self._wait_for_turn(part)
        self._phase_start[part] = time.perf_counter()
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - re-raised by run_pair in the caller's thread
            failures.append(exc)
        finally:
            self._end_phase(part, ends_in_exchange=False)
            with self._cond:
                self._done.add(part)
                self._turn = _other(part)
                self._cond.notify_all()

    # -- called by the exchange --------------------------------------------------------------------------------
    def in_flight(self, part: str, wait: Callable[[], None]) -> tuple[float, float]:
        """An exchange of ``part`` was just issued: end this phase, let the other chunk compute, and once the
        turn is back wait (``wait()``) for the exchange's result. Returns when the wait began and ended."""
        self._end_phase(part, ends_in_exchange=True)
        with self._cond:
            other = _other(part)
            if other not in self._done:
                self._turn = other
                self._cond.notify_all()
        self._wait_for_turn(part)
        wait_s = time.perf_counter()
        wait()
        done_s = time.perf_counter()
        self._phase_start[part] = done_s
        return wait_s, done_s

    def _wait_for_turn(self, part: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == part or _other(part) in self._done)
            self._turn = part

    def _end_phase(self, part: str, *, ends_in_exchange: bool) -> None:
        index = self._phase_index[part]
        self._phase_index[part] = index + 1
        self.phases.append(PhaseTiming(pair=self._label, part=part, index=index, start_s=self._phase_start[part],
                                       end_s=time.perf_counter(), ends_in_exchange=ends_in_exchange))


def _other(part: str) -> str:
    return BACKWARD if part == FORWARD else FORWARD
