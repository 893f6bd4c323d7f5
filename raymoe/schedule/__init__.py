"""Pipeline schedules as data: generators, a checker, a simulator and timeline pictures.

    from raymoe.schedule import build_schedule, simulate, Costs
    schedule = build_schedule("dualpipe", pp=8, num_microbatches=20)
    schedule.actions[3]          # rank 3's actions, in execution order, SEND/RECV batches included
    simulate(schedule, Costs.parse("F=1,B=2,W=1,FB=3")).bubble

Pure Python (standard library only). The executor in ``raymoe.parallel`` interprets the same lists; the
contract it relies on is in ``action.py`` and docs/schedules.md.
"""

from raymoe.schedule.action import (
    Action,
    Kind,
    act,
    batches_and_computes,
    format_actions,
    overlapped,
    parse_action,
    parse_actions,
    read_csv,
    write_csv,
)
from raymoe.schedule.build import Schedule, build_schedule, schedule_from_actions, validate_inputs
from raymoe.schedule.checks import ScheduleError, check_schedule, find_deadlock
from raymoe.schedule.comms import add_communication, matching, needed_receives, peer_rank, produced_sends
from raymoe.schedule.placement import SCHEDULE_NAMES, Placement, StageInfo, canonical_name, stage_placement
from raymoe.schedule.simulator import Costs, RankStats, SimResult, simulate

__all__ = [
    "SCHEDULE_NAMES", "Action", "Costs", "Kind", "Placement", "RankStats", "Schedule", "ScheduleError",
    "SimResult", "StageInfo", "act", "add_communication", "batches_and_computes", "build_schedule",
    "canonical_name", "check_schedule", "find_deadlock", "format_actions", "matching", "needed_receives",
    "overlapped", "parse_action", "parse_actions", "peer_rank", "produced_sends", "read_csv",
    "schedule_from_actions", "simulate", "stage_placement", "validate_inputs", "write_csv",
]
