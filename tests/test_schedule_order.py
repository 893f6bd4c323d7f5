"""The serial pipeline of ``raymoe.bench.schedule_order`` computes the real step: its ranks' gradients, summed
over the copies of each parameter (tied embedding, DualPipe mirrors), are the single-process reference's."""

from __future__ import annotations

import pytest
import torch

from raymoe.bench import chunk_costs, schedule_order
from raymoe.config import load_config
from raymoe.model import build_model
from raymoe.train import accumulate_gradients

MTP_WEIGHT = 0.3


def _config(schedule: str, microbatches: int = 4):
    return load_config("debug", ["model.num_layers=4", "parallel.pp=2", f"schedule.name={schedule}",
                                 f"schedule.num_microbatches={microbatches}", "data.seq_len=16",
                                 f"data.batch_size={microbatches}"])


def _tokens(config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    length = config.data.seq_len + 1 + config.mtp.depth
    return torch.randint(0, config.model.vocab_size, (config.data.batch_size, length), generator=generator)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_serial_pipeline_computes_the_reference_gradients(schedule):
    config, tokens = _config(schedule), _tokens(_config(schedule))
    pipeline = schedule_order.SerialPipeline(config)
    compute = pipeline.step(tokens, MTP_WEIGHT)
    assert len(compute) == 2 and all(c > 0 for c in compute)
    summed: dict[str, torch.Tensor] = {}
    for stage in pipeline.stages:
        for name, p in stage.named_parameters():
            summed[name] = p.grad.clone() if name not in summed else summed[name] + p.grad
    model = build_model(config)
    accumulate_gradients(model, tokens, config.schedule.num_microbatches, MTP_WEIGHT)
    reference = dict(model.named_parameters())
    assert set(summed) == set(reference)
    for name, grad in summed.items():
        ref = reference[name].grad
        assert float((grad - ref).norm() / ref.norm().clamp_min(1e-30)) < 1e-5, name


def test_ratios_come_one_per_round():
    config, tokens = _config("1f1b"), _tokens(_config("1f1b"))
    ratios = schedule_order.compute_over_whole(config, tokens, mtp_weight=MTP_WEIGHT, rounds=2)
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    warm = chunk_costs.in_turn_over_whole(config, 2, tokens, mtp_weight=MTP_WEIGHT, rounds=2)
    assert len(warm) == 2 and all(r > 0 for r in warm)
