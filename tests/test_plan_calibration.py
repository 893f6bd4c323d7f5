"""The CPU calibration: a probed device entry, and predicted vs measured per-action costs of a run directory."""

from __future__ import annotations

import json

import pytest

from raymoe.bench.plan_calibration import calibrate, probe_cpu_device, probe_op_seconds
from raymoe.config import load_config
from raymoe.config.loader import to_yaml
from raymoe.schedule import Costs, build_schedule, simulate


def test_probe_makes_a_measured_cpu_entry():
    dev = probe_cpu_device()
    assert dev.name == "cpu" and dev.bf16_tflops > 1e-4 and dev.attention_tflops > 1e-4 and dev.hbm_gbps > 0.1
    assert "measured here" in dev.source
    assert 0 < probe_op_seconds() < 1e-3


def test_calibration_sets_predictions_beside_the_runs_action_timings(tmp_path):
    cfg = load_config("debug", ["parallel.pp=2", "schedule.name=dualpipev", "schedule.num_microbatches=4"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    schedule = build_schedule("dualpipev", 2, 4)
    # A fake "measured" run: every action of a kind on chunk c lasts (c + 1) ms x its kind's factor.
    factor = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "FB": 3.0}
    durations = {a: factor[a.kind.value] * (schedule.placement.info(a.stage).chunk + 1) * 1e-3
                 for r in range(2) for a in schedule.compute_actions(r)}
    sim = simulate(schedule, Costs(), durations=durations)
    with open(tmp_path / "actions.jsonl", "w") as fh:
        for step in range(3):
            for e in sim.events:
                fh.write(json.dumps({"step": step, "rank": e.rank, "kind": e.action.kind.value,
                                     "stage": e.action.stage, "microbatch": e.action.microbatch,
                                     "start": e.start, "end": e.end}) + "\n")
    result = calibrate(tmp_path)
    rows = {(r["kind"], r["chunk"]): r for r in result["actions"]}
    assert rows, result
    for (kind, chunk), row in rows.items():
        assert row["measured_median_s"] == pytest.approx(factor[kind] * (chunk + 1) * 1e-3)
        assert row["samples"] % 2 == 0  # steps 1 and 2: the first step is left out
        assert row["predicted_s"] > 0
        if kind in ("F", "B", "FB"):
            assert row["isolated_s"] > 0 and row["aten_ops"] > 10
            assert row["predicted_plus_dispatch_s"] > row["predicted_s"]
    assert result["device"]["name"] == "cpu"
    assert result["measured_makespan_s"]["median"] == pytest.approx(sim.makespan)
    assert result["measured_over_predicted"]["min"] <= result["measured_over_predicted"]["max"]
