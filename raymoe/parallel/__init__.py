"""Parallelism applied from outside the model: topology, stage plan, process groups, P2P and the executor.

Nothing here imports Ray; ``raymoe.runtime`` runs these pieces inside actors.
"""

from raymoe.parallel.executor import ActionTiming, Executor, StepOutcome
from raymoe.parallel.stage_plan import GradSync, PipelineStage, StagePlan, grad_sync_plan, plan_stages
from raymoe.parallel.topology import Coord, Topology

__all__ = [
    "ActionTiming",
    "Coord",
    "Executor",
    "GradSync",
    "PipelineStage",
    "StagePlan",
    "StepOutcome",
    "Topology",
    "grad_sync_plan",
    "plan_stages",
]
