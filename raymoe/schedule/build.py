"""``build_schedule(name, pp, n)``: a named schedule as a checked ``Schedule`` value.

A ``Schedule`` is everything an executor, the simulator and the timeline need: the placement (which stages
each rank holds, and their neighbours) and, per rank, the ordered action list with communication included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raymoe.schedule.action import Action
from raymoe.schedule.comms import add_communication, peer_rank
from raymoe.schedule.dualpipe import dualpipe, dualpipe_v
from raymoe.schedule.one_f_one_b import gpipe, one_f_one_b, zb1p
from raymoe.schedule.placement import Placement, canonical_name, stage_placement

_GENERATORS = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipe_v}


@dataclass(frozen=True, kw_only=True)
class Schedule:
    name: str
    pp: int
    num_microbatches: int
    placement: Placement
    actions: Mapping[int, tuple[Action, ...]]
    """rank -> that rank's actions in execution order, SEND/RECV batches included."""

    @property
    def num_stages(self) -> int:
        return self.placement.num_stages

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return self.placement.stages_of(rank)

    def compute_actions(self, rank: int) -> tuple[Action, ...]:
        return tuple(a for a in self.actions[rank] if a.is_compute)

    def peer(self, action: Action) -> int:
        """The other rank of a SEND/RECV action."""
        return peer_rank(action, self.placement)


def validate_inputs(name: str, pp: int, num_microbatches: int) -> str:
    """Refuse shapes a schedule cannot run; returns the canonical name."""
    name = canonical_name(name)
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got pp={pp}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if name == "dualpipe":
        if pp % 2:
            raise ValueError(f"dualpipe needs an even pp (two mirrored halves), got pp={pp}; "
                             f"use dualpipev or 1f1b for pp={pp}")
        if num_microbatches % 2 or num_microbatches < 2 * pp:
            raise ValueError(f"dualpipe needs an even num_microbatches >= 2*pp = {2 * pp} (half enter at each "
                             f"end), got num_microbatches={num_microbatches} with pp={pp}")
    if name == "dualpipev" and num_microbatches < 2 * pp:
        raise ValueError(f"dualpipev needs num_microbatches >= 2*pp = {2 * pp}, got "
                         f"num_microbatches={num_microbatches} with pp={pp}")
    return name


def build_schedule(name: str, pp: int, num_microbatches: int) -> Schedule:
    """Generate, add communication and check the named schedule (gpipe, 1f1b, zb1p, dualpipe, dualpipev)."""
    name = validate_inputs(name, pp, num_microbatches)
    compute = _GENERATORS[name](pp, num_microbatches)
    return schedule_from_actions(compute, placement=stage_placement(name, pp), name=name,
                                 num_microbatches=num_microbatches)


def schedule_from_actions(
    actions: Mapping[int, Sequence[Action]],
    *,
    placement: Placement,
    name: str = "custom",
    num_microbatches: int | None = None,
) -> Schedule:
    """Wrap user action lists (e.g. from ``read_csv``) into a checked ``Schedule``.

    Compute-only lists get their SEND/RECV batches from ``add_communication``; lists that already contain
    communication are taken as they are. Raises ``ScheduleError`` (a ValueError) when the result is
    incomplete, out of dependency order, mispaired or deadlocks.
    """
    from raymoe.schedule.checks import check_completeness, check_placement, check_schedule

    if sorted(actions) != list(range(placement.pp)):
        raise ValueError(f"expected action lists for ranks 0..{placement.pp - 1}, got ranks {sorted(actions)}")
    if num_microbatches is None:
        num_microbatches = 1 + max((max(p.microbatch for p in a.parts()) for acts in actions.values()
                                    for a in acts), default=-1)
    if not any(a.is_comm for acts in actions.values() for a in acts):
        # Name a missing or misplaced computation before deriving the communication for it.
        check_placement(actions, placement, num_microbatches)
        check_completeness(actions, placement, num_microbatches)
        actions = add_communication(actions, placement)
    schedule = Schedule(name=name, pp=placement.pp, num_microbatches=num_microbatches, placement=placement,
                        actions={r: tuple(actions[r]) for r in sorted(actions)})
    check_schedule(schedule)
    return schedule
