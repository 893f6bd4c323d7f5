"""``raymoe bench --only a2a_overlap --quick`` end to end (slow: four Ray workers): it writes its tables and
pictures, and what it reports is made of real measurements (structure only, never timing)."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_quick_run_writes_measured_results(tmp_path):
    from raymoe.bench import a2a_overlap

    summary = a2a_overlap.run(tmp_path, quick=True)
    results = json.loads((tmp_path / "a2a_overlap.json").read_text())
    (layout,) = results["layouts"]
    assert layout["schedule"] == "dualpipev" and layout["cpus_per_worker"] == a2a_overlap.CPUS_PER_WORKER
    for side in ("off", "on"):
        assert layout[side]["step_s"]["n"] == a2a_overlap.QUICK_STEPS - a2a_overlap.WARMUP
        assert layout[side]["a2a_s_max_rank"]["median"] > 0
    assert layout["blocking_a2a_s"] == pytest.approx(layout["off"]["a2a_s_max_rank"]["median"])  # off: all blocks
    assert 0 < layout["exposed_a2a_s"] <= layout["on"]["a2a_s_max_rank"]["median"]
    assert summary["hidden_fraction"]["dualpipev"] == pytest.approx(layout["hidden_fraction"])
    assert {"F@0", "B@1"} <= set(layout["mean_programs"])
    assert layout["predicted_1to1_on"] < layout["predicted_1to1_off"]
    for picture in ("measured", "1to1"):
        assert (tmp_path / f"a2a_overlap_dualpipev_{picture}.png").stat().st_size > 10_000
    assert "hidden" in summary["markdown"] and (tmp_path / "a2a_overlap.md").read_text().startswith("| schedule")
