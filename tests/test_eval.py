"""``raymoe eval`` and evaluation every K steps: the numbers are what they claim, on any dataset directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raymoe.config import load_config
from raymoe.evaluate.heldout import evaluate, windows
from raymoe.model import build_model


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A small prepared dataset (the role of a `prepare-data --holdout` split)."""
    from raymoe.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("heldout")
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"def held_out_{i}(x):\n    return x * {i} + 1  # é\n" * 20)
    prepare_data([root], root / "data", patterns=["*.txt"], progress=False)
    return root / "data"


def test_windows_predict_every_label_once():
    stream = np.arange(23, dtype=np.uint16)
    w = windows(stream, seq_len=5, max_tokens=0)
    assert w.shape == (4, 6) and w[:, 1:].flatten().tolist() == list(range(1, 21))
    assert windows(stream, seq_len=5, max_tokens=10).shape == (2, 6)


def test_a_uniform_model_scores_log_vocab_and_bits_per_byte_counts_bytes_only():
    model = build_model(load_config("debug")).eval()
    with torch.no_grad():
        model.head.weight.zero_()  # every logit 0: cross-entropy ln(260) on every label
    stream = np.array([256, 104, 105, 257, 256, 33, 257, 256, 120], dtype=np.uint16)  # 8 labels, 4 of them bytes
    result = evaluate(model, stream, seq_len=4, max_tokens=0)
    assert result.tokens == 8 and result.bytes == 4
    assert result.loss == pytest.approx(math.log(260)) and result.perplexity == pytest.approx(260)
    assert result.bits_per_byte == pytest.approx(8 * math.log(260) / math.log(2) / 4)


def test_evaluating_every_k_steps_logs_it_and_leaves_training_bitwise_unchanged(tmp_path, heldout):
    from raymoe.evaluate.heldout import load_stream
    from raymoe.generate import load_model
    from raymoe.train.local import train_local

    base = ["run.steps=4", "run.checkpoint_every=4", "run.eval_tokens=512"]
    plain = train_local(load_config("debug", base), out_dir=str(tmp_path / "plain"), progress=False)
    with_eval = train_local(load_config("debug", [*base, "run.eval_every=2", f"run.eval_data={heldout}"]),
                            out_dir=str(tmp_path / "eval"), progress=False)
    assert [r["loss"] for r in plain] == [r["loss"] for r in with_eval]
    assert [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in with_eval]
    logged = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [1, 3]  # after steps 2 and 4
    assert logged[3]["eval_loss"] < logged[1]["eval_loss"]
    # the same number as evaluating the run's last checkpoint afterwards
    after = evaluate(load_model(tmp_path / "eval").model, load_stream(str(heldout)), seq_len=32, max_tokens=512)
    assert logged[3]["eval_loss"] == pytest.approx(after.loss, rel=1e-6)
    assert logged[3]["eval_bits_per_byte"] == pytest.approx(after.bits_per_byte, rel=1e-6)


def test_eval_command_on_a_dataset_and_on_the_embedded_default(tmp_path, heldout):
    from raymoe.cli import main
    from raymoe.train.local import train_local

    train_local(load_config("debug", ["run.steps=2", "run.checkpoint_every=2"]), out_dir=str(tmp_path / "run"),
                progress=False)
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", str(heldout), "--json"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.output)
    assert numbers["step"] == 2 and numbers["tokens"] > 1000
    assert numbers["perplexity"] == pytest.approx(math.exp(numbers["loss"]))
    default = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--max-tokens", "256"])
    assert default.exit_code == 0 and "embedded corpus" in default.output and "bits/byte" in default.output
    missing = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "nope" in missing.output
