"""``raymoe report``: plots and a summary from a synthetic run directory, and the timing arithmetic behind them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from raymoe.cli import main
from raymoe.config import load_config, to_yaml
from raymoe.report import TimedAction, simulated_costs, step_timings, write_report
from raymoe.schedule import Costs, build_schedule, simulate
from raymoe.train.metrics import StepMetrics

PNG = b"\x89PNG\r\n\x1a\n"


def _config(name: str = "1f1b", pp: int = 2, m: int = 4):
    return load_config("debug", [f"parallel.pp={pp}", f"schedule.name={name}", f"schedule.num_microbatches={m}"])


def _records(config, steps: int = 6) -> list[dict]:
    """StepMetrics rows like a trainer writes: a falling loss, one expert-load row per router."""
    rng = random.Random(0)
    num_routers = config.model.num_layers - config.model.num_dense_layers + config.mtp.depth
    rows = []
    for step in range(steps):
        load = [[rng.randint(10, 60) for _ in range(config.model.num_routed_experts)] for _ in range(num_routers)]
        rows.append(StepMetrics(
            step=step, loss=5.5 - 0.1 * step, mtp_loss=5.6 - 0.1 * step, balance_loss=1e-3, total_loss=7.2,
            max_vio=0.5, lr=1e-3, grad_norm=1.0, tokens=248, tokens_per_s=900.0 + step, step_time_s=0.3,
            mtp_weight=0.3, bias_gamma=1e-3, max_vio_per_layer=[0.5] * num_routers, expert_load=load,
            extra={"engine": "ray"},
        ).to_dict())
    return rows


def _simulated_actions(config, costs: Costs, steps: int = 2) -> list[dict]:
    """Action rows as the exporter writes them, timed exactly like the simulator would."""
    schedule = build_schedule(config.schedule.name, config.parallel.pp, config.schedule.num_microbatches)
    sim = simulate(schedule, costs)
    return [{"step": step, "rank": e.rank, "kind": e.action.kind.value, "stage": e.action.stage,
             "microbatch": e.action.microbatch, "start": e.start, "end": e.end}
            for step in range(steps) for e in sim.events]


def _run_dir(tmp_path: Path, config, *, actions: list[dict] | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(config)))
    if actions is not None:
        (run / "actions.jsonl").write_text("".join(json.dumps(a) + "\n" for a in actions))
    return run


@pytest.mark.parametrize("name, pp, m", [("1f1b", 2, 4), ("zb1p", 2, 4), ("dualpipev", 2, 4)])
def test_report_writes_every_figure_and_a_summary(tmp_path, name, pp, m):
    config = _config(name, pp, m)
    costs = Costs(f=0.010, b=0.020, w=0.008)
    run = _run_dir(tmp_path, config, actions=_simulated_actions(config, costs))
    report = write_report(run)
    names = {p.name for p in report.figures.values()}
    assert names == {"loss.png", "throughput.png", "expert_balance.png", "timeline.png"}
    for path in report.figures.values():
        assert path.parent == run / "report" and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    text = report.summary_path.read_text()
    assert report.notes == [] and "## Notes" not in text
    for figure in names:
        assert f"]({figure})" in text
    assert "| loss | 5.5000 | 5.0000 | min 5.0000 |" in text
    assert "| tokens/s | 900 | 905 | median 903 |" in text
    # Actions timed exactly like the simulator: measured and simulated makespan and bubble agree.
    sim = simulate(build_schedule(name, pp, m), costs)
    expected_bubble = sim.mean_bubble / sim.makespan
    assert f"| measured | {sim.makespan:.4f} | {expected_bubble:.1%} |" in text
    assert f"{sim.makespan:.4f} | {expected_bubble:.1%} |" in text.split("| simulated")[1]


def test_without_actions_the_timeline_is_skipped_with_a_note(tmp_path):
    run = _run_dir(tmp_path, _config(), actions=None)
    report = write_report(run, out_dir=tmp_path / "elsewhere")
    assert "timeline.png" not in {p.name for p in report.figures.values()}
    assert report.summary_path == tmp_path / "elsewhere" / "report.md"
    text = report.summary_path.read_text()
    assert "No actions.jsonl" in text and "## Pipeline" not in text


def test_a_stopped_run_with_a_torn_last_line_still_reports(tmp_path):
    run = _run_dir(tmp_path, _config(), actions=None)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "loss": 4.')  # what SIGKILL mid-write leaves
    text = write_report(run).summary_path.read_text()
    assert "6 steps (steps 0..5); 1 torn line(s) skipped" in text


def test_report_command(tmp_path):
    config = _config()
    run = _run_dir(tmp_path, config, actions=_simulated_actions(config, Costs()))
    result = CliRunner().invoke(main, ["report", str(run), "--step", "0"])
    assert result.exit_code == 0, result.output
    assert f"summary: {run / 'report' / 'report.md'}" in result.output
    assert "step 0" in (run / "report" / "report.md").read_text()
    result = CliRunner().invoke(main, ["report", str(run), "--step", "9"])
    assert result.exit_code != 0 and "step 9 is not in actions.jsonl" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code != 0 and "has no metrics.jsonl" in result.output


def _act(rank, kind, start, end, step=0):
    return TimedAction(step=step, rank=rank, kind=kind, stage=rank, microbatch=0, start=start, end=end)


def test_bubble_fraction_by_hand():
    # rank 0 computes 1 + 1 of a 4 s step, rank 1 computes 2 s; rank 2 ran nothing.
    timings = step_timings([_act(0, "F", 0, 1), _act(1, "F", 1, 2), _act(1, "B", 2, 3), _act(0, "B", 3, 4)],
                           ranks=[0, 1, 2])
    assert timings.makespan == 4
    assert timings.bubble_fraction == {0: 0.5, 1: 0.5, 2: 1.0}
    assert timings.mean_bubble_fraction == pytest.approx(2 / 3)
    # Overlapping actions (two GPU streams) count once; communication rows are not compute.
    overlapped = step_timings([_act(0, "F", 0, 2), _act(0, "B", 1, 3), _act(0, "SEND_F", 3, 4)])
    assert overlapped.busy == {0: 3} and overlapped.makespan == 3
    with pytest.raises(ValueError, match="one step"):
        step_timings([_act(0, "F", 0, 1), _act(0, "F", 0, 1, step=1)])
    with pytest.raises(ValueError, match="ends .* before it starts"):
        _act(0, "F", 2, 1)


def test_simulated_costs_from_measured_means():
    assert simulated_costs({"F": 1.0, "B": 2.0}) == {"f": 1.0, "b": 2.0, "w": 1.0}
    # zero-bubble schedules measure I and W: the full backward is their sum
    assert simulated_costs({"F": 1.0, "I": 1.5, "W": 0.5}) == {"f": 1.0, "b": 2.0, "w": 0.5}
    assert simulated_costs({"F": 1.0, "B": 2.0, "FB": 2.5})["fb"] == 2.5
