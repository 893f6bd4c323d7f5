"""Resharding: continue a checkpoint in another layout, AdamW state included.

A shard holds its rank's optimizer state in the rank's own shape: torch AdamW's per-tensor state (the local twin,
the single-process trainer), or for DeepSpeed ZeRO one *flat* fp32 partition per parameter group with AdamW's
moments over it. Neither means anything to another layout. So every optimizer also saves an *index* beside its
state, plain names and integers:

* ``names`` (AdamW): the full-model name of each optimizer position (torch's ``state_dict`` counts parameters
  0, 1, ... across its groups);
* ``slices`` (ZeRO): per group, ``[name, partition_start, param_start, numel]`` for each parameter that overlaps
  this rank's partition -- DeepSpeed's own bookkeeping (``param._hp_mapping``), recorded at save time.

``consolidate_training_state`` reads every shard of a checkpoint once and assembles, per parameter name, the full
fp32 weight and the full AdamW state ``{"step", "exp_avg", "exp_avg_sq"}``: slices are placed by offset, every
element must be covered, and copies of the same element (dp replicas, DualPipe's mirror, the tied embedding)
must be bitwise equal. The new layout's optimizers then cut what they own out of these full states
(``adamw_state_dict``, ``flat_state``). The arithmetic of AdamW is element-wise, so a moment moved this way is the
moment the old layout would have used: only the order of the gradient sums differs between layouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.checkpoint.manifest import Manifest

MOMENTS = ("exp_avg", "exp_avg_sq")
ParamState = dict[str, torch.Tensor]
"""One parameter's AdamW state: ``step`` (a scalar tensor) and the two moments in the parameter's shape."""


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    weights: dict[str, torch.Tensor]
    """Every parameter of the model, by full-model name (fp32 master weights)."""
    states: dict[str, ParamState]
    """AdamW state by parameter name; empty when the checkpoint was saved before the first step."""
    manifest: Manifest


# -- what an optimizer saves beside its state -------------------------------------------------------------------
def position_names(optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list:
    """The name of each parameter in the order torch's ``state_dict`` numbers them."""
    name_of = {id(p): n for n, p in named_params}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def adamw_shard_state(optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """What a shard holds for a torch AdamW (the local twin, the single-process trainer): its ``state_dict`` and
    the name of each of its positions (``position_names``)."""
    return {"kind": "adamw", "adamw": optimizer.state_dict(), "names": list(names)}


def check_kind(state, kind: str, *, source: str = "") -> None:
    """ValueError unless ``state`` is a shard's optimizer state of ``kind`` (``adamw``, ``deepspeed-zero``)."""
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        prefix = f"{source}: " if source else ""
        raise ValueError(f"{prefix}optimizer state of kind {found!r} cannot be loaded into a {kind!r} optimizer")


def load_adamw_shard_state(optimizer: torch.optim.Optimizer, state, *, source: str = "") -> None:
    """The inverse of ``adamw_shard_state``, same layout (positions as saved)."""
    check_kind(state, "adamw", source=source)
    optimizer.load_state_dict(state["adamw"])


def load_adamw_param_states(optimizer: torch.optim.Optimizer, names: list[str],
                            states: Mapping[str, ParamState]) -> None:
    """Resharding into a torch AdamW whose positions are ``names``: the full states of the parameters it holds."""
    by_position = {i: states[n] for i, n in enumerate(names) if n in states}
    optimizer.load_state_dict(adamw_state_dict(optimizer, by_position))


# -- shards -> full per-parameter states -------------------------------------------------------------------------
def state_slices(optimizer: dict, source: str) -> Iterator[tuple[str, int, int, ParamState]]:
    """(name, param_start, numel, {step, flat moment slices}) for every piece of AdamW state in one shard
    (with expert parallelism, the expert shard's own state sits under ``experts``, named by global expert id)."""
    if isinstance(optimizer, dict) and "experts" in optimizer:
        yield from state_slices(optimizer["experts"], source)
    kind = optimizer.get("kind") if isinstance(optimizer, dict) else None
    adamw = optimizer.get("adamw", {}) if kind else {}
    state = adamw.get("state", {})
    if kind == "adamw" and "names" in optimizer:
        for position, name in enumerate(optimizer["names"]):
            if position in state:  # a parameter that never had a gradient has no state yet
                entry = state[position]
                yield name, 0, entry["exp_avg"].numel(), {
                    "step": entry["step"], **{k: entry[k].reshape(-1) for k in MOMENTS}}
    elif kind == "deepspeed-zero" and "slices" in optimizer:
        for group, pieces in enumerate(optimizer["slices"]):
            if group not in state:
                continue
            entry = state[group]
            for name, part_start, param_start, numel in pieces:
                yield name, param_start, numel, {
                    "step": entry["step"], **{k: entry[k].narrow(0, part_start, numel) for k in MOMENTS}}
    else:
        raise ValueError(f"{source}: its optimizer state (kind {kind!r}) has no parameter index; it was saved before "
                         f"resharding was supported and can only resume in its own layout")


def assemble_states(pieces: Iterable[tuple[str, int, int, ParamState]], shapes: Mapping[str, torch.Size], *,
                    source: str) -> dict[str, ParamState]:
    """Full per-parameter states from slices; ValueError if a parameter is partly covered or copies disagree."""
    states: dict[str, ParamState] = {}
    covered: dict[str, torch.Tensor] = {}
    for name, start, numel, piece in pieces:
        if name not in shapes:
            raise ValueError(f"{source}: optimizer state for {name!r}, which is not a parameter of the model")
        if name not in states:
            size = shapes[name].numel()
            states[name] = {"step": piece["step"].clone(),
                            **{k: torch.zeros(size, dtype=piece[k].dtype) for k in MOMENTS}}
            covered[name] = torch.zeros(size, dtype=torch.bool)
        full, seen = states[name], covered[name].narrow(0, start, numel)
        if not torch.equal(full["step"], piece["step"]):
            raise ValueError(f"{source}: copies of {name}'s AdamW state are at steps {float(full['step'])} and "
                             f"{float(piece['step'])}")
        for key in MOMENTS:
            target = full[key].narrow(0, start, numel)
            if seen.any() and not torch.equal(target[seen], piece[key][seen]):
                raise ValueError(f"{source}: copies of {name}'s {key} differ; replicas must be identical")
            target.copy_(piece[key])
        seen.fill_(True)
    for name, seen in covered.items():
        if not bool(seen.all()):
            raise ValueError(f"{source}: the AdamW state of {name} covers {int(seen.sum())} of {seen.numel()} "
                             f"elements; the shards do not add up")
    return {n: {"step": s["step"], **{k: s[k].view(shapes[n]) for k in MOMENTS}} for n, s in states.items()}


def consolidate_training_state(checkpoint: Path) -> TrainingState:
    """Weights and full AdamW states of every parameter, from all shards of ``checkpoint`` (checksums verified)."""
    from raymoe.checkpoint.compat import config_of
    from raymoe.checkpoint.export import union_weights
    from raymoe.checkpoint.shard import load_shard
    from raymoe.model import build_model

    checkpoint = Path(checkpoint)
    manifest = Manifest.read(checkpoint)
    shapes = {n: p.shape for n, p in build_model(config_of(manifest), device="meta").named_parameters()}
    payloads = [(s, load_shard(checkpoint / s.file, rank=s.rank, sha256=s.sha256))
                for s in sorted(manifest.shards, key=lambda s: s.rank)]
    weights = union_weights(((s.rank, p["model"]) for s, p in payloads), shapes, source=str(checkpoint))
    pieces = (piece for s, p in payloads for piece in state_slices(p["optimizer"], str(checkpoint / s.file)))
    states = assemble_states(pieces, shapes, source=str(checkpoint))
    if states and set(states) != set(shapes):  # after the first step every parameter has taken one
        missing = sorted(set(shapes) - set(states))
        raise ValueError(f"{checkpoint}: no AdamW state for {missing[:4]} ({len(missing)} parameters)")
    return TrainingState(weights=weights, states=states, manifest=manifest)


# -- full per-parameter states -> what one optimizer of the new layout owns ---------------------------------------
def adamw_state_dict(optimizer: torch.optim.Optimizer, by_position: Mapping[int, ParamState]) -> dict:
    """A torch ``state_dict`` for ``optimizer`` holding ``by_position`` (its parameters numbered across groups);
    its ``load_state_dict`` then casts the moments as the optimizer keeps them (e.g. BF16 moments)."""
    own = optimizer.state_dict()
    ids = [i for group in own["param_groups"] for i in group["params"]]
    return {"state": {ids[pos]: {"step": s["step"].clone(), **{k: s[k].clone() for k in MOMENTS}}
                      for pos, s in by_position.items()},
            "param_groups": own["param_groups"]}


def flat_state(size: int, pieces: list, states: Mapping[str, ParamState], *, source: str) -> ParamState | None:
    """AdamW state over one flat ZeRO partition of ``size`` elements made of ``pieces``
    (``[name, partition_start, param_start, numel]``); None when no parameter has a state yet. Padding stays 0."""
    have = [name in states for name, *_ in pieces]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{source}: a ZeRO partition mixes parameters with and without AdamW state")
    steps = {float(states[name]["step"]) for name, *_ in pieces}
    if len(steps) != 1:
        raise ValueError(f"{source}: parameters of one ZeRO partition are at different AdamW steps {sorted(steps)}")
    first = states[pieces[0][0]]
    flat = {"step": first["step"].clone(),
            **{k: torch.zeros(size, dtype=torch.float32) for k in MOMENTS}}
    for name, part_start, param_start, numel in pieces:
        for key in MOMENTS:
            flat[key].narrow(0, part_start, numel).copy_(states[name][key].reshape(-1).narrow(0, param_start, numel))
    return flat
