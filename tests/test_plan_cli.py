"""``raymoe plan --gpu/--tokens/--assume/--published/--cluster``: the step model through the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from raymoe.cli import main
from raymoe.plan.assumptions import Assumptions


def _json(args: list[str]) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_issue_command_prints_gpu_hours_and_every_assumption():
    args = ["--preset", "671b", "--pp", "16", "--ep", "64", "--dp", "128", "--gpu", "h800", "--tokens", "14.8e12"]
    text = CliRunner().invoke(main, ["plan", *args])
    assert text.exit_code == 0, text.output
    for name in Assumptions().as_dict():
        assert f"  {name} = " in text.output
    assert "GPU-hours per trillion tokens" in text.output and "1.48e+13 tokens:" in text.output
    assert "source: compute: H100 measured" in text.output
    report = _json(args)
    step = report["step"]
    assert step["num_devices"] == 2048 and step["tokens"] == 14.8e12
    assert step["gpu_hours"] == pytest.approx(14.8e12 / step["tokens_per_s"] * 2048 / 3600)
    assert set(step["assumptions"]) == set(Assumptions().as_dict())
    assert all(v["source"] for v in step["assumptions"].values())
    assert step["device"]["name"] == "h800" and 0 < step["mfu"] < 1
    assert step["destinations_per_token"]["nodes"] <= 4
    assert "hidden inside F&B pairs" in step["a2a_overlap"]
    # The preset's 40 micro-batches of 3 sequences hold 3x the activations of the published layout: no fit.
    assert not step["memory"]["fits"]


def test_assume_overrides_are_applied_and_printed():
    base = _json(["--published", "deepseek-v3"])
    slower = _json(["--published", "deepseek-v3", "--assume", "device.fp8_tflops=630",
                    "--assume", "grouped_gemm_efficiency=0.5"])
    assert slower["step"]["device"]["fp8_tflops"] == 630
    assert slower["step"]["assumptions"]["grouped_gemm_efficiency"]["value"] == 0.5
    assert slower["step"]["step_s"] > base["step"]["step_s"]
    bad = CliRunner().invoke(main, ["plan", "--preset", "671b", "--gpu", "h800", "--assume", "speed=2"])
    assert bad.exit_code != 0 and "unknown assumption 'speed'" in bad.output
    bad = CliRunner().invoke(main, ["plan", "--preset", "671b", "--gpu", "tpu"])
    assert bad.exit_code != 0 and "unknown device 'tpu'" in bad.output


def test_published_runs_compare_with_the_report():
    v3 = _json(["--published", "deepseek-v3"])
    c = v3["published"]
    assert c["published_gpu_hours_per_trillion"] == 180e3
    assert c["predicted_over_published"] == pytest.approx(c["predicted_gpu_hours_per_trillion"] / 180e3)
    assert v3["step"]["memory"]["fits"] and v3["memory"]["layout"]["schedule"] == "dualpipe"
    v2 = _json(["--published", "deepseek-v2"])
    assert v2["published"]["published_gpu_hours_per_trillion"] == 172.8e3
    assert v2["memory"]["layout"]["schedule"] == "zb1p" and v2["mtp_params"] == 0
    text = CliRunner().invoke(main, ["plan", "--published", "deepseek-v3"]).output
    assert "published (deepseek-v3): 180.0K GPU-hours" in text and "chosen by us:" in text
    assert CliRunner().invoke(main, ["plan", "--published", "gpt-4"]).exit_code != 0


def test_cluster_file_says_nodes_and_hours():
    report = _json(["--published", "deepseek-v3", "--gpu", "h100", "--cluster", "cluster/aws.yaml"])
    run = report["cluster"]["run"]
    assert run["nodes"] == 256 and run["nodes_by_type"] == {"gpu_h100": 256}
    assert run["wall_hours"] == pytest.approx(report["step"]["wall_hours"])
    assert run["node_hours"] == pytest.approx(256 * run["wall_hours"])
    text = CliRunner().invoke(main, ["plan", "--published", "deepseek-v3", "--gpu", "h100",
                                     "--cluster", "cluster/aws.yaml"]).output
    assert "run: 256 worker node(s)" in text and "hours for 1.48e+13 tokens" in text


def test_fp32_grads_flag_and_assumption_agree():
    flag = _json(["--preset", "671b", "--gpu", "h800", "--fp32-grads", "--microbatches", "120"])
    assumed = _json(["--preset", "671b", "--gpu", "h800", "--assume", "fp32_grads=true", "--microbatches", "120"])
    assert flag["memory"]["peak"] == assumed["memory"]["peak"]
    assert flag["step"]["memory"]["peak"]["state_bytes"] == flag["memory"]["peak"]["total_bytes"]
