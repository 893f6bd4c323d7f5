"""Where each pipeline stage lives: the stage -> rank map of every schedule family.

A *stage* is one contiguous chunk of the model's layers on one rank. Stages have global indices
``0 .. num_stages-1``; a micro-batch flows through a *chain* of stages in increasing index order, and the
stage with no next stage computes the loss. Three layouts:

    family        schedules            num_stages  stage s computes            stage s lives on rank
    one-per-rank  gpipe, 1f1b, zb1p    pp          chunk s of pp (copy 0)      s
    dualpipe      dualpipe             2*pp        s < pp:  chunk s of copy 0   s
                                                   s >= pp: chunk s-pp of copy 1    pp-1-(s-pp)
    v-shape       dualpipev            2*pp        chunk s of 2*pp (copy 0)    s if s < pp else 2*pp-1-s

DualPipe keeps two copies of the model, each cut into ``pp`` chunks. Copy 0 runs in the *forward direction*
(it enters at rank 0 and leaves at rank pp-1), copy 1 in the *reverse direction* (enters at rank pp-1, leaves at
rank 0); so rank r holds chunk r of copy 0 (stage r) and chunk pp-1-r of copy 1 (stage 2*pp-1-r). Copy 0 processes
micro-batches ``0 .. n/2-1`` and copy 1 ``n/2 .. n-1``. The two copies hold the same parameters: after each step
the gradient of chunk c must be summed between rank c (copy 0) and rank pp-1-c (copy 1) before the optimizer
step (or the copies drift apart).

DualPipeV cuts one model into 2*pp chunks and folds the chain into a V: down the ranks for chunks 0..pp-1, back up
for chunks pp..2*pp-1, so rank 0 holds the first and the last chunk (embedding and head) and rank pp-1 hands
stage pp-1's output to its own stage pp in memory.

For the executor: ``StageInfo.copy`` and ``StageInfo.chunk`` say which layers a stage computes
(chunk ``chunk`` of ``num_chunks`` equal cuts, of model copy ``copy``), ``prev_stage``/``next_stage`` and
``Placement.rank_of`` say where activations come from and go to (gradients travel the other way).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_NAMES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
_ALIASES = {"one_f_one_b": "1f1b", "dualpipe_v": "dualpipev", "zb_1p": "zb1p", "zb-1p": "zb1p"}
_FAMILY = {"gpipe": "one-per-rank", "1f1b": "one-per-rank", "zb1p": "one-per-rank",
           "dualpipe": "dualpipe", "dualpipev": "v-shape"}


def canonical_name(name: str) -> str:
    """``one_f_one_b`` -> ``1f1b``, ``dualpipe_v`` -> ``dualpipev``; ValueError for unknown names."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULE_NAMES)} "
                         f"(aliases: {sorted(_ALIASES)})")
    return key


@dataclass(frozen=True, kw_only=True)
class StageInfo:
    stage: int
    rank: int
    copy: int
    """Which model copy (0, or 1 for DualPipe's reverse direction)."""
    chunk: int
    """Position of the stage's layers in its copy: chunk ``chunk`` of ``Placement.num_chunks`` equal cuts."""
    prev_stage: int | None
    """The stage this one receives activations from (and sends input gradients to); None for a first stage."""
    next_stage: int | None
    """The stage this one sends activations to; None for a last stage, which computes the loss."""
    direction: int
    """1 for stages whose chain runs from higher to lower ranks (DualPipe's reverse copy, the way back up
    DualPipeV's V: stages >= pp), else 0. The timeline picture shades direction 1."""

    @property
    def is_first(self) -> bool:
        return self.prev_stage is None

    @property
    def is_last(self) -> bool:
        return self.next_stage is None


@dataclass(frozen=True, kw_only=True)
class Placement:
    family: str
    pp: int
    num_copies: int
    num_chunks: int
    """Chunks per model copy: the model is cut into this many equal stages."""
    stages: tuple[StageInfo, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def rank_of(self, stage: int) -> int:
        return self.info(stage).rank

    def info(self, stage: int) -> StageInfo:
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"stage {stage} out of range: this placement has stages 0..{len(self.stages) - 1}")
        return self.stages[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stages held by ``rank``, in increasing stage index."""
        return tuple(s.stage for s in self.stages if s.rank == rank)

    def rank_stages(self) -> dict[int, tuple[int, ...]]:
        return {r: self.stages_of(r) for r in range(self.pp)}

    def microbatches_of(self, stage: int, num_microbatches: int) -> range:
        """Micro-batches that flow through ``stage``: all of them, or one half per DualPipe copy."""
        copy = self.info(stage).copy
        per_copy = num_microbatches // self.num_copies
        return range(copy * per_copy, (copy + 1) * per_copy)

    @property
    def param_units_per_rank(self) -> int:
        """Stages per rank, i.e. parameters per rank in units of one stage (the README's "Parameter Per Device")."""
        return self.num_stages // self.pp


def stage_placement(schedule: str, pp: int) -> Placement:
    """The placement that schedule ``schedule`` uses on ``pp`` pipeline ranks."""
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    family = _FAMILY[canonical_name(schedule)]
    if family == "one-per-rank":
        return _chain(family, pp, num_copies=1, num_chunks=pp, rank_of=lambda s: s)
    if family == "dualpipe":
        return _chain(family, pp, num_copies=2, num_chunks=pp, rank_of=lambda s: s if s < pp else 2 * pp - 1 - s)
    return _chain(family, pp, num_copies=1, num_chunks=2 * pp, rank_of=lambda s: s if s < pp else 2 * pp - 1 - s)


def _chain(family: str, pp: int, *, num_copies: int, num_chunks: int, rank_of) -> Placement:
    # Copy k owns stages k*num_chunks .. (k+1)*num_chunks-1, chained in index order.
    stages = []
    for s in range(num_copies * num_chunks):
        copy, chunk = divmod(s, num_chunks)
        stages.append(StageInfo(
            stage=s, rank=rank_of(s), copy=copy, chunk=chunk,
            prev_stage=s - 1 if chunk > 0 else None,
            next_stage=s + 1 if chunk < num_chunks - 1 else None,
            direction=int(s >= pp) if family != "one-per-rank" else 0,
        ))
    return Placement(family=family, pp=pp, num_copies=num_copies, num_chunks=num_chunks, stages=tuple(stages))
