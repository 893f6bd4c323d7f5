"""The single-process reference trainer and the `train --engine local` command."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from raymoe.cli import main
from raymoe.config import load_config
from raymoe.train import ReferenceTrainer, lr_at


class RepeatingBatches:
    """A learnable stream: the same few sequences over and over."""

    def __init__(self, batch, length, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, 260, (batch, length), generator=gen)

    def next_batch(self):
        return self.tokens.clone()


def test_loss_falls_and_metrics_are_complete():
    cfg = load_config("debug", ["run.steps=30", "optim.warmup_steps=3", "schedule.num_microbatches=2"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    records = [trainer.step() for _ in range(cfg.run.steps)]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert records[-1]["mtp_loss"] < records[0]["mtp_loss"]
    for key in ("step", "loss", "mtp_loss", "max_vio", "tokens_per_s", "grad_norm", "lr"):
        assert key in records[0]
    assert len(records[0]["max_vio_per_layer"]) == trainer.model.num_routers()
    assert trainer.tokens_seen == 30 * cfg.data.batch_size * cfg.data.seq_len


def test_bias_update_follows_global_loads():
    cfg = load_config("debug", ["routing.bias_update_speed=0.01"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    record = trainer.step()
    counts = torch.tensor(record["expert_load"], dtype=torch.float64)
    expected = 0.01 * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
    assert torch.allclose(trainer.routing_bias_RE.double(), expected)
    assert torch.equal(trainer.model.routing_biases(), torch.zeros_like(trainer.routing_bias_RE))  # applied next step
    trainer.step()
    assert torch.allclose(trainer.model.routing_biases().double(), expected)


def test_bias_stops_after_token_budget():
    cfg = load_config("debug", ["routing.bias_update_stop_tokens=0"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    assert trainer.step()["bias_gamma"] == 0.0
    assert trainer.routing_bias_RE.abs().sum() == 0


def test_gradient_clipping_bounds_the_update_norm():
    cfg = load_config("debug", ["optim.grad_clip=1e-3", "optim.warmup_steps=0"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    record = trainer.step()
    assert record["grad_norm"] > 1e-3  # the reported norm is the pre-clip norm
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_lr_schedule_warmup_then_cosine():
    optim = load_config("debug", ["optim.warmup_steps=4", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]).optim
    assert [lr_at(s, optim, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, optim, 20) == pytest.approx(1.0)
    assert lr_at(12, optim, 20) == pytest.approx(0.55)
    assert lr_at(20, optim, 20) == pytest.approx(0.1)
    assert lr_at(100, optim, 20) == pytest.approx(0.1)


def test_train_command_local_writes_run_directory(tmp_path):
    from raymoe.data import prepare_data

    src = tmp_path / "text.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 400)
    prepare_data([src], tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--preset",
            "debug",
            "--engine",
            "local",
            "--steps",
            "3",
            "--out",
            str(out),
            f"data.path={tmp_path / 'data'}",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all({"loss", "mtp_loss", "max_vio", "tokens_per_s"} <= r.keys() for r in lines)
    assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.parquet").exists()
    assert "steps: 3" in (out / "config.yaml").read_text()


def test_train_command_rejects_bad_config():
    result = CliRunner().invoke(main, ["train", "--preset", "debug", "--engine", "local", "model.dim=-1"])
    assert result.exit_code != 0
    assert "model.dim must be > 0, got -1" in result.output


def test_bf16_optimizer_states_keep_fp32_master_weights():
    cfg = load_config("debug", ["precision.bf16_optimizer_states=true"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    trainer.step()
    state = next(iter(trainer.optimizer.state.values()))
    moments = [v for v in state.values() if torch.is_tensor(v) and v.ndim > 0]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_fp8_training_step_runs_and_converts_the_paper_linears():
    from raymoe.fp8 import Fp8Linear

    cfg = load_config("debug", ["precision.fp8=true"])
    trainer = ReferenceTrainer(cfg, batches=RepeatingBatches(cfg.data.batch_size, cfg.data.seq_len + 2))
    record = trainer.step()
    assert torch.isfinite(torch.tensor(record["loss"]))
    fp8 = {n for n, m in trainer.model.named_modules() if isinstance(m, Fp8Linear)}
    assert "layers.0.attn.wo" in fp8 and "layers.1.ffn.experts.0.w1" in fp8
    assert "head" not in fp8 and "mtp.0.proj" not in fp8


def test_a_diverging_run_stops_with_the_step_named():
    from click.testing import CliRunner

    from raymoe.cli import main

    result = CliRunner().invoke(main, ["train", "--preset", "debug", "--engine", "local", "--steps", "10",
                                       "optim.lr=1e4", "optim.grad_clip=0", "run.out_dir=/tmp/raymoe-test-nan"])
    assert result.exit_code == 1, result.output
    assert re.search(r"step \d+: grad_norm=nan", result.output), result.output
    assert "training stopped before saving this state" in result.output
