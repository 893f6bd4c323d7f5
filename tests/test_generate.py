"""Generation: the cached (absorbed MLA) forward is the training forward, batching and MTP speculative decoding
change nothing under greedy sampling, sampling knobs behave, the command streams."""

from __future__ import annotations

import itertools

import pytest
import torch
from click.testing import CliRunner

from raymoe.config import load_config
from raymoe.data.tokenizer import EOS_ID
from raymoe.generate import Generator, SamplingConfig, load_model
from raymoe.generate.cache import mha_cache_bytes_per_token, mla_cache_bytes_per_token
from raymoe.generate.decode import main_step, new_cache
from raymoe.generate.forward import logits
from raymoe.generate.sampling import distribution, speculative_choice
from raymoe.model import build_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The debug preset trained briefly (its greedy output is still mostly spaces, but it has learned that)."""
    from raymoe.train.local import train_local

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gen") / "run"
    train_local(load_config("debug", ["run.steps=20", "run.checkpoint_every=20"]), out_dir=str(out), progress=False)
    return out


PROMPTS = [list(b"import os\n"), list(b"def f("), list(b"class Reader:\n    def __init__(self")]


@pytest.mark.parametrize("overrides", [[], ["model.q_lora_rank=0"]])
def test_cached_absorbed_forward_is_the_training_forward(overrides):
    model = build_model(load_config("debug", overrides)).eval()
    model.set_routing_biases(torch.randn(model.num_routers(), 8) * 0.01)
    tokens_BT = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = new_cache(model, num_layers=len(model.layers), batch=2, capacity=32)
    chunks = []
    with torch.no_grad():
        reference = logits(model, tokens_BT)
        for start, end in ((0, 10), (10, 11), (11, 13), (13, 24)):  # a prefill, then steps of 1 and 2 tokens
            positions_BT = torch.arange(start, end).expand(2, -1)
            chunks.append(main_step(model, tokens_BT[:, start:end], positions_BT,
                                    torch.ones(2, end - start, dtype=torch.bool), cache)[1])
    cached = torch.cat(chunks, dim=1)
    assert float((cached - reference).norm() / reference.norm()) < 1e-5


def test_a_batch_of_uneven_prompts_decodes_as_each_prompt_alone(trained_run):
    model = load_model(trained_run).model
    batch = Generator(model).generate(PROMPTS, 24)
    assert batch == [Generator(model).generate([p], 24)[0] for p in PROMPTS]


def _drafts_wrong_now_and_then(monkeypatch):
    """Make the MTP draft 'Q' in every third row of every MTP call (rows rotate): the trained model's drafts are
    otherwise all right, so accepted and rejected drafts now meet in one batch, deterministically."""
    from raymoe.generate import generator

    real, calls = generator.mtp_step, itertools.count()

    def sometimes_wrong(*args, **kwargs):
        logits_BTE = real(*args, **kwargs).clone()
        call = next(calls)
        rows = [b for b in range(len(logits_BTE)) if (b + call) % 3 == 0]
        logits_BTE[rows, :, ord("Q")] += 1e4
        return logits_BTE

    monkeypatch.setattr(generator, "mtp_step", sometimes_wrong)


@pytest.mark.parametrize("which", ["trained, some drafts wrong", "untrained"])
def test_mtp_speculative_greedy_output_is_plain_greedy_output(trained_run, which, monkeypatch):
    if which == "untrained":  # diverse text, drafts (almost) never right
        model = build_model(load_config("debug")).eval()
    else:
        model = load_model(trained_run).model
        _drafts_wrong_now_and_then(monkeypatch)
    plain = Generator(model)
    speculative = Generator(model, speculative=True)
    expected = plain.generate(PROMPTS, 40)
    assert speculative.generate(PROMPTS, 40) == expected
    s = speculative.stats
    assert s.new_tokens == plain.stats.new_tokens == sum(len(o) for o in expected)
    if which != "untrained":  # both branches ran, in rows of one batch: accepted drafts and rolled-back ones
        assert 0 < s.accepted < s.drafted
        assert s.main_forwards < plain.stats.main_forwards  # accepted drafts saved main-model forwards
        assert ord("Q") not in {t for row in expected for t in row}


def test_sampling_is_seeded_and_speculative_sampling_runs(trained_run):
    model = load_model(trained_run).model
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, seed=5)
    first = Generator(model, sampling=sampling).generate(PROMPTS, 16)
    assert first == Generator(model, sampling=sampling).generate(PROMPTS, 16)
    assert first != Generator(model, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=6)).generate(PROMPTS, 16)
    speculative = Generator(model, sampling=sampling, speculative=True)
    assert all(len(o) == 16 for o in speculative.generate(PROMPTS, 16))
    assert speculative.stats.drafted > 0


def test_top_p_and_temperature():
    logits_BE = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert distribution(logits_BE, SamplingConfig()).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    kept = distribution(logits_BE, SamplingConfig(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reach 0.8
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(distribution(logits_BE, SamplingConfig(temperature=1.0)), logits_BE.exp())
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_the_speculative_rule_accepts_and_resamples_as_it_should():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    accepted, token = speculative_choice(p, q, torch.tensor([0, 2]), g)
    assert accepted.tolist() == [False, True] and token.tolist() == [1, 2]  # p(d)=0: never; p == q: always


def test_stops_at_eos_and_at_the_budget(trained_run):
    model = load_model(trained_run).model
    eos_bias = torch.zeros(model.cfg.vocab_size)
    eos_bias[EOS_ID] = 1e4
    model.head.register_forward_hook(lambda module, args, out: out + eos_bias)  # EOS is the argmax everywhere
    assert Generator(model).generate(PROMPTS, 10) == [[EOS_ID]] * 3
    assert [len(o) for o in Generator(model, stop_at_eos=False, speculative=True).generate(PROMPTS, 7)] == [7] * 3


def test_cache_bytes_per_token_of_deepseek_v3():
    cfg = load_config("671b").model
    mla = mla_cache_bytes_per_token(cfg, num_layers=61, element_bytes=2)
    mha = mha_cache_bytes_per_token(cfg, num_layers=61, element_bytes=2)
    assert mla == 61 * (512 + 64) * 2 == 70_272  # 70 KB per token
    assert mha == 61 * 128 * (192 + 128) * 2 == 4_997_120  # 71x more


def test_refusals():
    model = build_model(load_config("debug", ["mtp.depth=0"]))
    with pytest.raises(ValueError, match="MTP module"):
        Generator(model, speculative=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        Generator(build_model(load_config("debug"))).generate([[1] * 120], 20)


def test_generate_command_streams_and_reports(trained_run):
    from raymoe.cli import main

    result = CliRunner().invoke(main, ["generate", str(trained_run), "--prompt", "def main(", "--max-new-tokens",
                                       "20", "--speculative", "mtp"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def main(")
    assert "MTP draft acceptance" in result.output and "bytes/token" in result.output
    batch = CliRunner().invoke(main, ["generate", str(trained_run), "--prompt", "a", "--prompt", "b",
                                      "--max-new-tokens", "5", "--temperature", "0.7"])
    assert batch.exit_code == 0 and "--- [1]" in batch.output
