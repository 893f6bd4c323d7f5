"""``raymoe bench --only gpu``: runs at tiny shapes on CPU, writes gpu.json naming the device, and neither it nor
``import raymoe`` nor the CLI imports ray or deepspeed (the accelerator machine has neither)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from raymoe.bench.gpu import TINY, skewed_counts
from raymoe.bench.gpu_step import model_flops_per_token, routed_experts
from raymoe.bench.timing import Timer, tflops
from raymoe.commands.bench import bench

REPO = Path(__file__).resolve().parents[1]
# A meta-path finder that refuses ray and deepspeed, installed before anything else is imported.
BLOCKER = """
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("ray", "deepspeed"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Blocker())
"""


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # Keep any PYTHONPATH of the caller (on the accelerator machine, omegaconf's carried wheel lives there).
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_and_cli_loading_import_neither_ray_nor_deepspeed(tmp_path):
    code = (
        "import raymoe, raymoe.cli, raymoe.model, raymoe.fp8, raymoe.bench.gpu\n"
        "sys.argv = ['raymoe', '--help']\n"
        "try:\n    runpy.run_module('raymoe', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('ray', 'deepspeed')))\n"
    )
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_gpu_bench_runs_tiny_without_ray_or_deepspeed(tmp_path):
    out = tmp_path / "results"
    code = f"sys.argv = ['raymoe', 'bench', '--only', 'gpu', '--tiny', '--out', {str(out)!r}]\n"
    code += (
        "try:\n    runpy.run_module('raymoe', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
    )
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    expected_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert result["device"].startswith(expected_device) and result["tiny"] is True
    assert [row["size"] for row in result["gemm"]] == list(TINY.gemm_sizes)
    for row in result["gemm"]:
        assert row["dense_tflops"]["median"] > 0 and row["fp8_blockwise_tflops"]["median"] > 0
        assert row["fp8_rel_err_vs_dequantized"] < 4e-3
    assert set(result["fp8_linear"]["seconds"]) == {"dense", "fp8_fused_quant", "fp8_eager_quant"}
    grouped = result["grouped"]
    assert grouped["mlp_grouped_mm_s"]["n"] == TINY.repeats and grouped["grouped_skew_3to1_tflops"]["median"] > 0
    arms = result["step"]["arms"]
    assert set(arms) == {"bf16", "fp8", "bf16_expert_loop"} and arms["fp8"]["fp8"] is True
    for arm in arms.values():
        assert arm["steps_run"] == TINY.step_warmup + TINY.step_iters * TINY.step_repeats
        assert arm["last_loss"] < arm["first_loss"]  # the steps really train
        assert 0 < arm["fraction_of_ceiling"] and arm["tokens_per_s"] > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "## gpu" in summary and "Device: **" in summary and "| fp8 |" in summary


def test_tiny_is_refused_for_other_benchmarks(tmp_path):
    result = CliRunner().invoke(bench, ["--only", "fp8_training", "--tiny", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--tiny applies only to ['gpu']" in result.output


def test_skewed_counts_sum_and_ratio():
    counts = skewed_counts(98304, 64, 3.0)
    assert int(counts.sum()) == 98304 and len(counts) == 64
    assert counts[0] / counts[40] == pytest.approx(3.0, rel=1e-2)


def test_model_flops_per_token_is_six_times_active_plus_attention():
    from raymoe.config import load_config
    from raymoe.plan import count_params

    cfg = load_config("16b", ["model.num_layers=4", "mtp.depth=0"]).model
    active = count_params(cfg, top_k=6).active - cfg.dim
    flops = model_flops_per_token(cfg, 6, 4096)
    assert flops == 6 * active + 3 * 4 * 16 * (192 + 128) * 4096
    assert 3.0e9 < flops < 4.0e9  # ~3.5 GFLOP per token for this slice


def test_routed_experts_switches_the_moe_backend_and_restores_it():
    from raymoe.config import load_config
    from raymoe.model import build_model
    from raymoe.model.moe import MoE

    model = build_model(load_config("debug"), device="meta")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    with routed_experts("loop", model):
        assert {m.expert_backend for m in layers} == {"loop"}
    assert {m.expert_backend for m in layers} == {"auto"}
    with pytest.raises(ValueError, match="'grouped' or 'loop'"), routed_experts("cutlass", model):
        pass


def test_timer_and_tflops():
    timer = Timer(torch.device("cpu"), warmup=1, iters=2, repeats=3)
    calls = []
    seconds = timer(lambda: calls.append(1))
    assert len(calls) == 7 and seconds["n"] == 3 and seconds["min"] <= seconds["median"] <= seconds["max"]
    assert tflops(2e12, {"min": 1.0, "median": 2.0, "max": 4.0}) == {"min": 0.5, "median": 1.0, "max": 2.0}
    with pytest.raises(ValueError, match="iters >= 1"):
        Timer(torch.device("cpu"), warmup=0, iters=0, repeats=1)
