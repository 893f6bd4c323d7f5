"""Stage plan: layer ranges per chunk, the module a rank keeps, and how replicated gradients combine."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import load_config
from raymoe.model import build_model
from raymoe.parallel.stage_plan import PipelineStage, grad_sync_plan, plan_stages


def test_even_split_keeps_the_last_chunk_light():
    assert plan_stages(6, 4).counts() == [2, 2, 1, 1]
    assert plan_stages(4, 4).counts() == [1, 1, 1, 1]
    assert plan_stages(7, 4).counts() == [2, 2, 2, 1]
    assert plan_stages(8, 4).counts() == [2, 2, 2, 2]
    assert plan_stages(5, 1).chunk_layers == ((0, 5),)
    assert list(plan_stages(6, 4).layers_of(1)) == [2, 3]


def test_explicit_split_and_its_errors():
    assert plan_stages(6, 4, [1, 2, 2, 1]).chunk_layers == ((0, 1), (1, 3), (3, 5), (5, 6))
    with pytest.raises(ValueError, match=r"stage_layers \[2, 2\] must list 4 positive layer counts"):
        plan_stages(4, 4, [2, 2])
    with pytest.raises(ValueError, match=r"summing to num_layers \(6\)"):
        plan_stages(6, 2, [2, 2])
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4 pipeline chunks"):
        plan_stages(3, 4)


@pytest.fixture(scope="module")
def config():
    return load_config("debug", ["data.seq_len=16"])


def test_stages_keep_the_reference_parameter_names(config):
    plan = plan_stages(4, 2)
    full = {n for n, _ in build_model(config).named_parameters()}
    first = PipelineStage(build_model(config), plan, [0])
    last = PipelineStage(build_model(config), plan, [1])
    first_names = {n for n, _ in first.named_parameters()}
    last_names = {n for n, _ in last.named_parameters()}
    assert first_names | last_names == full
    assert first_names & last_names == {"embed.weight"}  # the tied copy MTP reads
    assert any(n.startswith("mtp.") for n in last_names) and not any(n.startswith("mtp.") for n in first_names)
    # one rank holding the first and the last chunk shares one embedding
    both = PipelineStage(build_model(config), plan_stages(4, 4), [0, 3])
    assert sum(n == "embed.weight" for n, _ in both.named_parameters()) == 1


def test_chunks_compose_to_the_full_forward(config):
    torch.manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (2, config.data.seq_len + 2))
    reference = build_model(config)(tokens, mtp_weight=0.3)
    plan = plan_stages(4, 3)
    stage = PipelineStage(build_model(config), plan, [0, 1, 2])
    out0 = stage.forward_chunk(0, None, tokens, 0.3)
    out1 = stage.forward_chunk(1, out0.hidden_BTD, tokens, 0.3)
    out2 = stage.forward_chunk(2, out1.hidden_BTD, tokens, 0.3)
    total = out0.objective + out1.objective + out2.objective
    assert torch.allclose(total, reference.loss, rtol=1e-6)
    assert float(out2.main_ce) == float(reference.main_loss)
    assert torch.allclose(out0.balance + out1.balance + out2.balance, reference.balance_loss, rtol=1e-6)
    with pytest.raises(ValueError, match=r"chunk 3 is not held here \(this stage holds chunks \[0, 1, 2\]\)"):
        stage.forward_chunk(3, None, tokens, 0.3)


def test_grad_sync_counts_every_logical_parameter_once(config):
    plan = plan_stages(4, 2)
    first, last = (PipelineStage(build_model(config), plan, [c]) for c in (0, 1))
    s_first, s_last = (grad_sync_plan("one-per-rank", 2, r, s) for r, s in ((0, first), (1, last)))
    assert s_first.embedding == s_last.embedding == ("embed.weight",)
    assert s_first.not_in_norm == frozenset() and s_last.not_in_norm == {"embed.weight"}
    # DualPipe: ranks p and pp-1-p hold the same chunks; the upper half is the replica
    stage = PipelineStage(build_model(config), plan, [0, 1])
    low, high = grad_sync_plan("dualpipe", 2, 0, stage), grad_sync_plan("dualpipe", 2, 1, stage)
    assert low.mirror == high.mirror and len(low.mirror) == len(list(stage.parameters()))
    assert low.not_in_norm == frozenset() and high.not_in_norm == set(high.mirror)
    # DualPipeV and pp=1: one copy of everything, nothing to sync
    assert grad_sync_plan("v-shape", 2, 0, stage) == grad_sync_plan("one-per-rank", 1, 0, stage)
    # without MTP the last stage holds no embedding, so there is no tie on either side
    no_mtp = load_config("debug", ["mtp.depth=0"])
    f, l = (PipelineStage(build_model(no_mtp), plan, [c]) for c in (0, 1))
    assert grad_sync_plan("one-per-rank", 2, 0, f).embedding == grad_sync_plan("one-per-rank", 2, 1, l).embedding == ()
