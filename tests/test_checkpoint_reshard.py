"""Resharding without Ray: full per-parameter AdamW states from slices, and back into other optimizers.

The local twin (``LocalAdamW``) cut in two "pipeline stages" continues a whole-model optimizer bitwise; ZeRO-style
flat partitions (slices at offsets, padding at the end) are cut and re-assembled exactly; gaps and disagreeing
copies are named.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raymoe.checkpoint.reshard import assemble_states, flat_state
from raymoe.config import OptimConfig


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(3, 2), "norm": nn.LayerNorm(2)})


def _loss(modules: dict[str, nn.Module], x_BD: torch.Tensor) -> torch.Tensor:
    return modules["norm"](modules["b"](torch.tanh(modules["a"](x_BD)))).square().sum()


def _step(optimizers, modules, x_BD) -> None:
    _loss(modules, x_BD).backward()
    for opt in optimizers:
        opt.step(lr=1e-2)


def test_local_adamw_states_move_to_a_two_stage_cut_and_continue_bitwise():
    from raymoe.checkpoint.reshard import state_slices
    from raymoe.zero import LocalAdamW

    optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0)  # clipping would need the pipeline's norm
    whole = _model()
    opt = LocalAdamW(whole, optim, dp_group=None, pp_group=None)
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for x in xs[:3]:
        _step([opt], whole, x)
    saved = opt.state_dict()
    shapes = {n: p.shape for n, p in whole.named_parameters()}
    states = assemble_states(state_slices(saved, "shard"), shapes, source="ckpt")
    assert sorted(states) == sorted(shapes) and all(float(s["step"]) == 3 for s in states.values())

    # the new layout: two stages holding their parameters under the whole model's names
    cut = _model()
    with torch.no_grad():
        for name, p in cut.named_parameters():
            p.copy_(dict(whole.named_parameters())[name])
    first, second = nn.ModuleDict({"a": cut["a"]}), nn.ModuleDict({"b": cut["b"], "norm": cut["norm"]})
    stages = [LocalAdamW(m, optim, dp_group=None, pp_group=None) for m in (first, second)]
    for stage in stages:
        stage.load_param_states(states)
    for x in xs[3:]:
        _step([opt], whole, x)
        _step(stages, cut, x)
    for (name, p), q in zip(whole.named_parameters(), cut.parameters()):
        assert torch.equal(p, q), name


def _zero_pieces(shapes: dict[str, torch.Size], dp: int):
    """DeepSpeed's cut: parameters flattened in order, padded to a multiple of dp, split into dp partitions."""
    total = sum(s.numel() for s in shapes.values())
    size = -(-total // dp)
    partitions = [[] for _ in range(dp)]
    offset = 0
    for name, shape in shapes.items():
        for rank in range(dp):
            lo, hi = max(offset, rank * size), min(offset + shape.numel(), (rank + 1) * size)
            if lo < hi:
                partitions[rank].append([name, lo - rank * size, lo - offset, hi - lo])
        offset += shape.numel()
    return size, partitions


def test_zero_partitions_are_cut_and_reassembled_exactly():
    from raymoe.checkpoint.reshard import state_slices

    shapes = {"w": torch.Size([3, 4]), "v": torch.Size([5])}  # 17 elements: 2 partitions of 9, one padded
    gen = torch.Generator().manual_seed(1)
    full = {n: {"step": torch.tensor(7.0), "exp_avg": torch.randn(s, generator=gen),
                "exp_avg_sq": torch.rand(s, generator=gen)} for n, s in shapes.items()}
    size, partitions = _zero_pieces(shapes, dp=2)
    assert partitions == [[["w", 0, 0, 9]], [["w", 0, 9, 3], ["v", 3, 0, 5]]]
    flats = [flat_state(size, pieces, full, source="test") for pieces in partitions]
    assert flats[1]["exp_avg"][-1] == 0  # padding
    shards = [{"kind": "deepspeed-zero", "adamw": {"state": {0: flat}}, "slices": [pieces]}
              for flat, pieces in zip(flats, partitions)]
    pieces = [piece for shard in shards for piece in state_slices(shard, "shard")]
    again = assemble_states(pieces, shapes, source="ckpt")
    for name in shapes:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(again[name][key], full[name][key]), (name, key)

    # the same tensors in 3 partitions (another dp) hold the same values
    size3, partitions3 = _zero_pieces(shapes, dp=3)
    flats3 = [flat_state(size3, p, again, source="test") for p in partitions3]
    assert torch.equal(torch.cat([f["exp_avg"] for f in flats3])[:17],
                       torch.cat([full["w"]["exp_avg"].reshape(-1), full["v"]["exp_avg"]]))

    with pytest.raises(ValueError, match=r"the AdamW state of w covers 9 of 12 elements"):
        assemble_states(state_slices(shards[0], "shard"), shapes, source="ckpt")
    other = {k: (v + 1 if k == "exp_avg" else v) for k, v in flats[0].items()}
    replica = {"kind": "deepspeed-zero", "adamw": {"state": {0: other}}, "slices": [partitions[0]]}
    with pytest.raises(ValueError, match=r"copies of w's exp_avg differ"):
        assemble_states([*pieces, *state_slices(replica, "r")], shapes, source="ckpt")
    with pytest.raises(ValueError, match=r"no parameter index; it was saved before resharding"):
        list(state_slices({"kind": "deepspeed-zero", "adamw": {}}, "old"))


def test_reshard_needs_resume_and_the_local_trainer_reshards_its_own_checkpoint(tmp_path):
    from click.testing import CliRunner

    from raymoe.checkpoint import CheckpointStore
    from raymoe.commands.train import train
    from raymoe.config import load_config
    from raymoe.train import ReferenceTrainer

    result = CliRunner().invoke(train, ["--reshard", "--preset", "debug"])
    assert result.exit_code != 0 and "--reshard continues a saved run in another layout" in result.output

    config = load_config("debug", ["run.steps=3"])
    trainer = ReferenceTrainer(config)
    trainer.step()
    path = trainer.save_checkpoint(CheckpointStore(tmp_path))
    straight = trainer.step()
    again = ReferenceTrainer(config)
    again.restore(path, reshard=True)  # through the per-parameter states: the same layout gives the same bits
    assert again.step()["loss"] == straight["loss"]
