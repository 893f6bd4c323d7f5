"""Chunks as phases in the time model: compute segments cut by expert all-to-alls, and what overlap hides.

A chunk with expert parallelism is not one opaque block: its forward computes, issues an all-to-all (dispatch),
computes (experts), issues one (combine), ... and its backward the mirror image. A ``ChunkProgram`` is that
sequence, ``compute[0], a2a[0], compute[1], a2a[1], ..., compute[-1]``. Two ways to run programs on one rank,
the two ways the executor runs them (``raymoe.parallel.interleave``):

* ``run_alone``: compute, wait for the exchange, compute, ...: the exchanges add to the compute;
* ``run_in_turns(f, b)``: an overlapped F&B pair in strict turns, forward first. A chunk computes until it issues
  an exchange, then the other chunk computes; a chunk whose turn comes back waits for its own exchange first
  (the *exposed* communication) and computes on. Compute is one engine (one chunk at a time); exchanges run on
  a separate communication lane, one at a time, in issue order (GPU copy engines / DeepEP's SMs; the paper's
  setting). The pair therefore costs at least max(compute, communication) and at most their sum.

``phased_costs`` turns programs per (kind, chunk) into per-action durations (``simulate_phased`` times the
schedule with them) and keeps each action's lane segments, so the timeline picture can draw the all-to-all lanes
under the compute (``plot_timeline(..., lanes=)``, the paper's Figure 4/5 style). Fed with measured programs it
replays a measured step (``raymoe.bench.phase_fit``); fed with uniform ones (``ChunkProgram.uniform``) it predicts
what a compute:communication ratio gives with and without overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from raymoe.schedule.action import Action, Kind
from raymoe.schedule.simulator import Costs, SimResult, simulate

COMPUTE, A2A = "compute", "a2a"


@dataclass(frozen=True)
class ChunkProgram:
    """``compute[0], a2a[0], compute[1], ..., compute[-1]``: one more compute segment than exchanges."""

    compute: tuple[float, ...]
    a2a: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute", tuple(float(c) for c in self.compute))
        object.__setattr__(self, "a2a", tuple(float(a) for a in self.a2a))
        if len(self.compute) != len(self.a2a) + 1:
            raise ValueError(f"a chunk program has one more compute segment than exchanges, got "
                             f"{len(self.compute)} compute segments and {len(self.a2a)} exchanges")
        bad = [x for x in self.compute + self.a2a if x < 0]
        if bad:
            raise ValueError(f"phase costs must be >= 0, got {bad[0]}")

    @classmethod
    def uniform(cls, compute: float, a2a: float, exchanges: int) -> ChunkProgram:
        """``compute`` cut into ``exchanges + 1`` equal segments around ``exchanges`` equal exchanges."""
        if exchanges < 0:
            raise ValueError(f"exchanges must be >= 0, got {exchanges}")
        if exchanges == 0 and a2a:
            raise ValueError(f"an all-to-all cost of {a2a} needs at least one exchange")
        return cls(compute=(compute / (exchanges + 1),) * (exchanges + 1),
                   a2a=(a2a / exchanges,) * exchanges if exchanges else ())

    @property
    def total_compute(self) -> float:
        return sum(self.compute)

    @property
    def total_a2a(self) -> float:
        return sum(self.a2a)


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One stretch of a lane within an action: ``lane`` compute or a2a, ``part`` F or B (which chunk of the
    action), times relative to the action's start."""

    lane: str
    part: str
    start: float
    end: float


def run_alone(program: ChunkProgram, part: str = "F") -> tuple[float, list[Segment]]:
    """One chunk by itself: every exchange blocks. Returns its duration and its segments."""
    t, segments = 0.0, []
    for k, compute in enumerate(program.compute):
        segments.append(Segment(lane=COMPUTE, part=part, start=t, end=t + compute))
        t += compute
        if k < len(program.a2a):
            segments.append(Segment(lane=A2A, part=part, start=t, end=t + program.a2a[k]))
            t += program.a2a[k]
    return t, segments


def run_in_turns(forward: ChunkProgram, backward: ChunkProgram) -> tuple[float, list[Segment]]:
    """An overlapped F&B pair in strict turns, forward first (module docstring). Returns the pair's duration
    (until both chunks are done) and the segments of both lanes."""
    programs = {"F": forward, "B": backward}
    index = {"F": 0, "B": 0}
    ready = {"F": 0.0, "B": 0.0}  # when the chunk's last exchange completes
    done: set[str] = set()
    t = comm_free = 0.0
    turn = "F"
    segments: list[Segment] = []
    while len(done) < 2:
        if turn in done:
            turn = _other(turn)
        program, k = programs[turn], index[turn]
        start = max(t, ready[turn])
        end = start + program.compute[k]
        segments.append(Segment(lane=COMPUTE, part=turn, start=start, end=end))
        t = end
        if k < len(program.a2a):
            issue = max(end, comm_free)
            comm_free = ready[turn] = issue + program.a2a[k]
            segments.append(Segment(lane=A2A, part=turn, start=issue, end=comm_free))
            index[turn] = k + 1
            turn = _other(turn)
        else:
            done.add(turn)
            turn = _other(turn)
    return max(s.end for s in segments), segments


def _other(part: str) -> str:
    return "B" if part == "F" else "F"


@dataclass(frozen=True, kw_only=True)
class PhasedCosts:
    """Per-action durations for ``simulate(..., durations=)`` and each action's lane segments."""

    durations: dict[Action, float]
    segments: dict[Action, list[Segment]]

    def exposed_a2a(self, action: Action) -> float:
        """Time the action spent waiting on its exchanges (its duration minus its compute)."""
        compute = sum(s.end - s.start for s in self.segments[action] if s.lane == COMPUTE)
        return self.durations[action] - compute


def phased_costs(schedule, program_of: Callable[[Action], ChunkProgram], *, overlap: bool,
                 pair_programs: Mapping[Action, tuple[ChunkProgram, ChunkProgram]] | None = None) -> PhasedCosts:
    """Durations and segments of every compute action of ``schedule``.

    ``program_of(part)`` gives the program of a single-kind action (F, B, I, W; typically by kind and
    ``placement.info(stage).chunk``). An FB pair runs its two programs ``run_in_turns`` with ``overlap``, one
    after the other without; ``pair_programs[fb]`` (measured turns) replaces the programs of a pair."""
    durations: dict[Action, float] = {}
    segments: dict[Action, list[Segment]] = {}
    for rank in range(schedule.pp):
        for action in schedule.compute_actions(rank):
            if action.kind is Kind.FB:
                f_part, b_part = action.parts()
                f_prog, b_prog = (pair_programs or {}).get(action) or (program_of(f_part), program_of(b_part))
                if overlap:
                    duration, segs = run_in_turns(f_prog, b_prog)
                else:
                    f_time, f_segs = run_alone(f_prog, "F")
                    b_time, b_segs = run_alone(b_prog, "B")
                    duration = f_time + b_time
                    segs = f_segs + [Segment(lane=s.lane, part=s.part, start=s.start + f_time, end=s.end + f_time)
                                     for s in b_segs]
            else:
                part = "F" if action.kind is Kind.F else "B"
                duration, segs = run_alone(program_of(action), part)
            durations[action], segments[action] = duration, segs
    return PhasedCosts(durations=durations, segments=segments)


def simulate_phased(schedule, phased: PhasedCosts, *, p2p: float = 0.0) -> SimResult:
    """``schedule`` (already checked) timed with the durations of ``phased`` and P2P latency ``p2p``."""
    return simulate(schedule, Costs(p2p=p2p), check=False, durations=phased.durations)


def uniform_programs(*, f: float, b: float, w: float, a2a_f: float, a2a_b: float,
                     exchanges: int) -> Callable[[Action], ChunkProgram]:
    """Every chunk alike: F computes ``f`` around ``exchanges`` exchanges totalling ``a2a_f``; B computes ``b``
    around as many totalling ``a2a_b``; I is B without its weight half ``w``; W computes ``w`` alone."""
    programs = {
        Kind.F: ChunkProgram.uniform(f, a2a_f, exchanges),
        Kind.B: ChunkProgram.uniform(b, a2a_b, exchanges),
        Kind.I: ChunkProgram.uniform(b - w, a2a_b, exchanges),
        Kind.W: ChunkProgram(compute=(w,)),
    }
    return lambda action: programs[action.kind]
