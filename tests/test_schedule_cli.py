"""``raymoe simulate`` through click's CliRunner."""

import json

from click.testing import CliRunner

from raymoe.commands.simulate import simulate
from raymoe.schedule import build_schedule, write_csv


def _run(*args):
    return CliRunner().invoke(simulate, list(args), catch_exceptions=False)


def test_table_output():
    out = _run("--schedule", "dualpipe", "--pp", "8", "--microbatches", "20", "--cost", "F=1,B=2,W=1,FB=3")
    assert out.exit_code == 0, out.output
    assert "makespan 66   bubble 6" in out.output
    assert "README formula: bubble 6, activations 9 (exact for these costs)" in out.output
    assert "   7  7,8" in out.output  # rank 7 holds stage 7 and stage 8


def test_json_output_and_plot(tmp_path):
    png = tmp_path / "timeline.png"
    out = _run("--schedule", "dualpipe_v", "--pp", "4", "--microbatches", "10", "--json", "--plot", str(png))
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert {"bubble", "makespan", "peak_activations", "param_copies", "per_rank"} <= set(data)
    assert (data["bubble"], data["makespan"], data["peak_activations"], data["param_copies"]) == (6, 66, 9, 2)
    assert len(data["per_rank"]) == 4 and data["readme"]["exact_for_these_costs"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare():
    out = _run("--compare", "--pp", "4", "--microbatches", "8")
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line.split() for line in out.output.splitlines()[2:] if not line.startswith("note")}
    assert set(lines) == {"gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"}
    assert lines["1f1b"][2] == "9" and lines["zb1p"][2] == "3" and lines["dualpipe"][2] == "2"


def test_compare_skips_what_cannot_run():
    out = _run("--compare", "--pp", "3", "--microbatches", "6", "--json")
    data = json.loads(out.output)
    assert "even pp" in data["dualpipe"] and data["1f1b"]["bubble"] == 6


def test_csv_round_trip(tmp_path):
    path = tmp_path / "s.csv"
    write_csv(build_schedule("zb1p", 2, 4).actions, path)
    out = _run("--csv", str(path), "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["bubble"] == 1  # (PP-1)(F+B-2W) with the default costs


def test_bad_inputs_are_named():
    out = _run("--schedule", "pipedream")
    assert out.exit_code == 2 and "unknown schedule 'pipedream'" in out.output
    out = _run("--schedule", "1f1b", "--cost", "F=1,Q=2")
    assert out.exit_code == 2 and "bad cost item 'Q=2'" in out.output
    out = _run("--schedule", "1f1b", "--cost", "F=one")
    assert out.exit_code == 2 and "'one' is not a number" in out.output
    out = _run("--schedule", "1f1b", "--cost", "B=1,W=2")
    assert out.exit_code == 2 and "W=2.0 must be <= B=1.0" in out.output
    out = _run("--schedule", "dualpipe", "--pp", "4", "--microbatches", "6")
    assert out.exit_code == 2 and "num_microbatches=6" in out.output
    out = _run("--pp", "4")
    assert out.exit_code == 2 and "give --schedule" in out.output


def test_registered_in_the_main_cli():
    from raymoe.cli import main

    out = CliRunner().invoke(main, ["simulate", "--schedule", "1f1b", "--pp", "2"])
    assert out.exit_code == 0 and "bubble 3" in out.output


def test_a2a_option_prints_both_steps_and_draws_lanes(tmp_path):
    out = _run("--schedule", "dualpipev", "--pp", "2", "--a2a", "1.0", "--plot", str(tmp_path / "t.png"))
    assert out.exit_code == 0, out.output
    assert "in turns (overlap)" in out.output and (tmp_path / "t.png").stat().st_size > 10_000
    data = json.loads(_run("--schedule", "dualpipev", "--pp", "2", "--a2a", "1.0", "--json").output)
    assert data["step_on"] < data["step_off"]
    one = json.loads(_run("--schedule", "1f1b", "--pp", "2", "--a2a", "1.0", "--json").output)
    assert one["step_on"] == one["step_off"]
