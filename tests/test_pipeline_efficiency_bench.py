"""The pipeline-efficiency benchmark: its cost model and stage-balance search (pure), the foreign-load gate, and a
quick run through Ray that checks the result's structure (slow; never its timings)."""

from __future__ import annotations

import json

import pytest

from raymoe.bench import chunk_costs
from raymoe.bench.load import foreign_load, wait_for_quiet
from raymoe.schedule import build_schedule, simulate


def _layer_costs(num_layers: int, last_extra: float) -> dict:
    """One cost unit per layer; the last layer also carries head + MTP (``last_extra``)."""
    costs = {}
    for i in range(num_layers):
        scale = 1.0 + (last_extra if i == num_layers - 1 else 0.0)
        costs.update({("F", i): scale, ("B", i): 2 * scale, ("I", i): 1.2 * scale, ("W", i): 0.8 * scale})
    return costs


def test_compositions_cut_every_way_with_one_layer_at_least():
    cuts = list(chunk_costs.compositions(5, 3))
    assert len(cuts) == 6 and all(sum(c) == 5 and min(c) >= 1 for c in cuts)


def test_chunk_costs_are_sums_of_layer_costs():
    out = chunk_costs.chunk_costs_from_layers(_layer_costs(4, 1.0), (1, 3))
    assert out["F", 0] == 1.0 and out["F", 1] == 1.0 + 1.0 + 2.0 and out["W", 1] == pytest.approx(0.8 * 4)


def test_fb_costs_its_forward_plus_its_backward_chunk():
    schedule = build_schedule("dualpipev", 2, 8)
    per_chunk = chunk_costs.chunk_costs_from_layers(_layer_costs(8, 0.0), (2, 2, 2, 2))
    costs = chunk_costs.schedule_costs(schedule, per_chunk)
    assert costs.per_chunk["FB", 0] == per_chunk["F", 0] + per_chunk["B", 3]  # DualPipeV pairs chunk 0 with 3
    assert chunk_costs.ideal_makespan(schedule, per_chunk) == simulate(schedule, costs).makespan


def test_balance_moves_layers_away_from_a_heavy_head():
    """1F1B at pp=2: with a head worth 3 layers on the last chunk, the simulator gives that chunk fewer layers."""
    choice = chunk_costs.best_stage_layers(build_schedule("1f1b", 2, 8), _layer_costs(8, 3.0), 8)
    assert choice["even_stage_layers"] == [4, 4]
    assert choice["best_stage_layers"][0] > choice["best_stage_layers"][1]
    assert choice["best_makespan_s"] < choice["even_makespan_s"] and choice["predicted_gain"] > 0
    even = chunk_costs.best_stage_layers(build_schedule("1f1b", 2, 8), _layer_costs(8, 0.0), 8)
    assert even["best_stage_layers"] == [4, 4] and even["predicted_gain"] == 0


def test_ideal_costs_add_up_to_the_reference_and_keep_their_proportions():
    from raymoe.bench.pipeline_efficiency import _on_reference_footing

    raw = {("F", 0): 1.0, ("B", 0): 2.0, ("I", 0): 1.5, ("W", 0): 0.5, ("F", 1): 3.0, ("B", 1): 6.0}
    scaled, scale = _on_reference_footing(raw, 6.0)
    assert scale == pytest.approx(0.5)
    assert sum(v for (k, _), v in scaled.items() if k in "FB") == pytest.approx(6.0)
    assert scaled["I", 0] == pytest.approx(0.75) and scaled["B", 1] / scaled["F", 1] == pytest.approx(2.0)


def test_actions_are_priced_at_their_chunks_run_apart():
    from raymoe.bench.pipeline_efficiency import _over_chunks_apart

    apart = {("F", 0): 1.0, ("B", 0): 2.0, ("FB", 0): 3.0}
    assert _over_chunks_apart({("F", 0): [2.0, 2], ("B", 0): [4.0, 2]}, apart) == pytest.approx(1.0)
    assert _over_chunks_apart({("FB", 0): [6.6, 2]}, apart) == pytest.approx(1.1)


def test_foreign_load_gate_reports_what_it_saw():
    assert foreign_load(0.05) >= 0.0
    seen = wait_for_quiet(float("inf"), window_s=0.05)
    assert seen["quiet"] and seen["foreign_cores"] >= 0 and seen["waited_s"] >= 0


@pytest.mark.slow
def test_quick_run_writes_every_part_of_the_measurement(tmp_path):
    from raymoe.bench import pipeline_efficiency as bench

    summary = bench.run(tmp_path, quick=True)
    data = json.loads((tmp_path / "pipeline_efficiency.json").read_text())
    assert (tmp_path / "pipeline_efficiency.md").read_text().startswith("| schedule |")
    (layout,) = data["layouts"]
    assert set(bench.SCHEDULES) <= set(layout["schedules"])
    order = data["order"]
    assert set(order["in_turn"]) == {"2 chunks", "4 chunks"} and set(order["serial"]) == set(bench.SCHEDULES)
    assert all(v["n"] == 1 and v["median"] > 0 for part in ("in_turn", "serial") for v in order[part].values())
    assert "one action at a time" in data["markdown"]
    for s in layout["schedules"].values():
        assert len(s["per_step_ratios"]) == bench.QUICK_STEPS
        assert set(s["step_s"]) == {"min", "median", "max", "n"} and s["ratio"] > 0 and s["ideal_ratio"] > 0
        assert set(s["gap_parts_s"]) == {"compute_excess", "optimizer_and_copy_sync", "waiting_on_receives",
                                         "driver_overhead"}
        assert s["compute_excess"] > 0 and s["foreign_cores"]["n"] == bench.QUICK_STEPS
        assert 0 <= s["worker_kernel_share"] < 1 and s["worker_minor_faults_per_step"] >= 0
        assert s["actions_over_chunks_apart"]["n"] == bench.QUICK_STEPS and s["actions_over_chunks_apart"]["min"] > 0
    assert layout["standalone"]["whole_micro_s"] > 0
    assert all(s["standalone_scale"] > 0 for s in layout["schedules"].values())
    one = layout["single_worker"]
    assert one["compute_excess"]["n"] == bench.QUICK_STEPS and one["compute_excess"]["median"] > 0
    cases = data["contention"]["cases"]
    assert set(cases) == {"here", "actor", "two_actors", "process", "two_processes"}
    assert cases["here"]["ratio"] == 1.0 and all(c["s"] > 0 and c["user_s"] > 0 for c in cases.values())
    assert set(layout["standalone"]["balance"]) == set(bench.SCHEDULES)
    assert set(layout["deferred_linear"]["seconds"]) == {"nn_linear", "unsplit", "split", "function_unsplit",
                                                         "function_split"}
    assert layout["deferred_linear"]["deferred_linears"] > 0
    assert "markdown" in summary and set(summary["layouts"][0]["ratios"]) == set(layout["schedules"])
