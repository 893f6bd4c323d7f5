"""The FP8 training benchmark: its metric, its CPU skip of the GEMM micro-benchmark, and a smoke run (slow)."""

import json

import pytest
import torch

from raymoe.bench.fp8_training import gemm_throughput, relative_loss_difference, run


def test_relative_loss_difference_uses_the_last_window():
    base = [9.0, 9.0, 2.0, 2.0]
    fp8 = [1.0, 1.0, 2.0, 2.1]
    out = relative_loss_difference(base, fp8, window=2)
    assert out["base"] == 2.0 and out["fp8"] == pytest.approx(2.05)
    assert out["rel_diff"] == pytest.approx(0.025)
    assert out["per_step_rel_diff_mean"] == pytest.approx(0.025)  # (0 + 0.05) / 2
    assert out["per_step_rel_diff_sem"] == pytest.approx(0.025)  # sd 0.0354 / sqrt(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip")
def test_gemm_micro_benchmark_is_skipped_without_cuda():
    assert gemm_throughput() == {"skipped": "no CUDA device"}


@pytest.mark.slow
def test_quick_run_writes_json_and_plot(tmp_path):
    summary = run(tmp_path, quick=True)
    data = json.loads((tmp_path / "fp8_training.json").read_text())
    assert (tmp_path / "fp8_loss.png").stat().st_size > 10_000
    assert len(data["curves"]["base"]) == len(data["curves"]["fp8"]) == data["steps"]
    # Same seed and data: the first step's loss differs only by FP8 rounding.
    first_base, first_fp8 = data["curves"]["base"][0]["loss"], data["curves"]["fp8"][0]["loss"]
    assert abs(first_fp8 - first_base) / first_base < 5e-3
    assert summary["loss"]["rel_diff"] < 0.02 and "markdown" in summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemm_micro_benchmark_on_cuda():
    out = gemm_throughput(size=2048, iters=5)
    assert out["fp8_blockwise_tflops"] > 0 and out["rel_err_vs_dequantized"] < 4e-3
