"""``raymoe simulate``: check and time a pipeline schedule, print its bubbles, draw its timeline.

    python -m raymoe simulate --schedule dualpipe --pp 8 --microbatches 20 --cost F=1,B=2,W=1,FB=3
    python -m raymoe simulate --compare --pp 8 --microbatches 20
    python -m raymoe simulate --schedule zb1p --pp 4 --plot zb1p.png --json
    python -m raymoe simulate --csv my_schedule.csv --cost F=1,B=2,W=1
    python -m raymoe simulate --schedule dualpipev --pp 4 --a2a 1.0 --plot lanes.png
"""

from __future__ import annotations

import json

import click

DEFAULT_COST = "F=1,B=2,W=1,FB=3"


def _canonical(ctx, param, value):
    if value is None:
        return None
    from raymoe.schedule import canonical_name

    try:
        return canonical_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _costs(ctx, param, value):
    from raymoe.schedule import Costs

    try:
        return Costs.parse(value)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(f"{value!r}: {exc}", ctx=ctx, param=param) from exc


@click.command()
@click.option("--schedule", "name", default=None, callback=_canonical,
              help="gpipe, 1f1b, zb1p, dualpipe or dualpipev (aliases one_f_one_b, dualpipe_v).")
@click.option("--pp", type=click.IntRange(min=1), default=4, show_default=True, help="Pipeline ranks.")
@click.option("--microbatches", type=click.IntRange(min=1), default=None,
              help="Micro-batches per step (default 2*pp, the least DualPipe accepts).")
@click.option("--cost", "costs", default=DEFAULT_COST, show_default=True, callback=_costs,
              help="Per-kind costs KEY=VALUE,...: F, B (full backward), W (weight half of B), FB (overlapped "
                   "F&B chunk, default F+B), P2P (transfer latency once both ends are posted, default "
                   "0); KIND@CHUNK=VALUE (KIND F, B, I, W or FB) overrides one kind's cost on one model chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the timeline PNG here.")
@click.option("--compare", is_flag=True, help="Simulate every schedule with these pp, micro-batches and costs.")
@click.option("--csv", "csv_in", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Load action lists (one row per rank) instead of generating them; --schedule then only "
                   "names the stage placement (default: inferred).")
@click.option("--write-csv", "csv_out", type=click.Path(dir_okay=False), default=None,
              help="Save the schedule's action lists (with SEND/RECV) as CSV.")
@click.option("--a2a", "a2a_ratio", type=click.FloatRange(min=0), default=None,
              help="Expert all-to-all per chunk as this multiple of its compute (1.0: the paper's 1:1), cut into "
                   "--exchanges phases; the F&B pairs then run in turns (raymoe.schedule.phases) and --plot draws "
                   "the all-to-all lanes.")
@click.option("--exchanges", type=click.IntRange(min=1), default=4, show_default=True,
              help="All-to-alls per chunk with --a2a (two per MoE layer: dispatch and combine).")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="With --a2a: F&B pairs in turns (schedule.overlap_a2a) or one half after the other.")
def simulate(name, pp, microbatches, costs, as_json, plot, compare, csv_in, csv_out, a2a_ratio, exchanges,
             overlap) -> None:
    """Check a pipeline schedule (complete, ordered, paired, deadlock-free) and report its bubbles."""
    from raymoe.schedule import SCHEDULE_NAMES

    if compare:
        if csv_in:
            raise click.UsageError("--compare generates every schedule; it cannot be combined with --csv")
        n = microbatches or 2 * pp
        results = {}
        for each in SCHEDULE_NAMES:
            try:
                results[each] = _run_one(each, pp, n, costs)
            except ValueError as exc:
                results[each] = str(exc)
        _print_compare(results, pp, n, costs, as_json)
        return
    schedule = _load_csv(csv_in, name) if csv_in else _build(name, pp, microbatches)
    if a2a_ratio is not None:
        _simulate_a2a(schedule, costs, a2a_ratio, exchanges, overlap, plot, as_json)
        return
    result, formula = _simulate(schedule, costs)
    if csv_out:
        from raymoe.schedule import write_csv

        write_csv(schedule.actions, csv_out)
    if plot:
        from raymoe.schedule.timeline import plot_timeline

        plot_timeline(schedule, result, plot)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "readme": formula}, indent=2))
    else:
        _print_one(schedule, result, formula)
    if plot and not as_json:
        click.echo(f"timeline written to {plot}")


def _simulate_a2a(schedule, costs, ratio, exchanges, overlap, plot, as_json) -> None:
    """The step with each chunk's all-to-all ``ratio`` x its compute, without and with overlap."""
    from raymoe.schedule.phases import phased_costs, simulate_phased, uniform_programs

    programs = uniform_programs(f=costs.f, b=costs.b, w=costs.w, a2a_f=ratio * costs.f, a2a_b=ratio * costs.b,
                                exchanges=exchanges)
    steps, shown = {}, None
    for each in (False, True):
        phased = phased_costs(schedule, programs, overlap=each)
        result = simulate_phased(schedule, phased, p2p=costs.p2p)
        steps[each] = result.makespan
        if each == overlap:
            shown = (result, phased)
    if plot:
        from raymoe.schedule.timeline import plot_timeline

        plot_timeline(schedule, shown[0], plot, lanes=shown[1], title=(
            f"{schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches, F={costs.f:g}, "
            f"B={costs.b:g}, all-to-all {ratio:g}x compute in {exchanges} exchanges per chunk, overlap "
            f"{'on' if overlap else 'off'}  |  makespan {shown[0].makespan:g}"))
    if as_json:
        click.echo(json.dumps({"schedule": schedule.name, "pp": schedule.pp,
                               "num_microbatches": schedule.num_microbatches, "a2a_ratio": ratio,
                               "exchanges": exchanges, "step_off": steps[False], "step_on": steps[True]}, indent=2))
        return
    click.echo(f"{schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches, all-to-all "
               f"{ratio:g}x compute ({exchanges} exchanges per chunk)")
    click.echo(f"  step, F&B pairs one half after the other: {steps[False]:g}")
    click.echo(f"  step, F&B pairs in turns (overlap):        {steps[True]:g}  ({steps[True] / steps[False]:.2f}x)")
    if plot:
        click.echo(f"timeline written to {plot}")


def _build(name, pp, microbatches):
    from raymoe.schedule import build_schedule

    if name is None:
        raise click.UsageError("give --schedule (or --compare, or --csv)")
    try:
        return build_schedule(name, pp, microbatches or 2 * pp)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--schedule/--pp/--microbatches") from exc


def _load_csv(path, name):
    from raymoe.schedule import SCHEDULE_NAMES, read_csv, schedule_from_actions, stage_placement

    try:
        actions = read_csv(path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--csv") from exc
    families = [name] if name else ["1f1b", "dualpipev", "dualpipe"]  # one of each placement family
    errors = []
    for family in families:
        try:
            return schedule_from_actions(actions, placement=stage_placement(family, len(actions)),
                                         name=f"{path} ({family} placement)")
        except ValueError as exc:
            errors.append(f"{family}: {exc}")
    hint = "" if name else f" (tried the placements of {families}; pick one of {list(SCHEDULE_NAMES)} with --schedule)"
    raise click.BadParameter(f"{path} is not a valid schedule{hint}: " + " | ".join(errors), param_hint="--csv")


def _simulate(schedule, costs):
    from raymoe.schedule import simulate as run
    from raymoe.schedule.formulas import formula_conditions, readme_activations, readme_bubble

    result = run(schedule, costs, check=False)  # build/load already checked it
    if schedule.name not in ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"):
        return result, None
    unmet = formula_conditions(schedule.name, costs)
    return result, {
        "bubble": readme_bubble(schedule.name, schedule.pp, costs),
        "peak_activations": readme_activations(schedule.name, schedule.pp, schedule.num_microbatches),
        "exact_for_these_costs": not unmet,
        "unmet_conditions": unmet,
    }


def _run_one(name, pp, n, costs):
    from raymoe.schedule import build_schedule

    return _simulate(build_schedule(name, pp, n), costs)


def _print_one(schedule, result, formula) -> None:
    click.echo(f"schedule {schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches, "
               f"{schedule.num_stages} stages, costs {result.costs}")
    click.echo("checked: complete, in dependency order, sends/receives paired, deadlock-free")
    click.echo(f"makespan {result.makespan:g}   bubble {result.bubble:g} (largest per-rank idle; mean "
               f"{result.mean_bubble:g})   peak activations {result.peak_activations}   "
               f"param copies {result.param_copies}")
    if formula:
        exact = "exact for these costs" if formula["exact_for_these_costs"] else \
            "not exact here: " + "; ".join(formula["unmet_conditions"])
        click.echo(f"README formula: bubble {formula['bubble']:g}, activations {formula['peak_activations']} "
                   f"({exact})")
    click.echo(f"with blocking sends the makespan would be {result.makespan_blocking_sends:g}")
    click.echo(f"{'rank':>4}  {'stages':<10} {'busy':>8} {'bubble':>8} {'end':>8} {'peak act':>8}")
    for s in result.per_rank:
        stages = ",".join(map(str, schedule.stages_of(s.rank)))
        click.echo(f"{s.rank:>4}  {stages:<10} {s.busy:>8g} {s.bubble:>8g} {s.end:>8g} {s.peak_activations:>8}")


def _print_compare(results, pp, n, costs, as_json) -> None:
    if as_json:
        out = {name: (r if isinstance(r, str) else {**r[0].to_dict(), "readme": r[1]})
               for name, r in results.items()}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"pp={pp}, {n} micro-batches, costs {costs}")
    click.echo(f"{'schedule':<10} {'makespan':>9} {'bubble':>8} {'README':>8} {'exact':>6} {'peak act':>9} "
               f"{'params':>7} {'blocking':>9}")
    for name, r in results.items():
        if isinstance(r, str):
            click.echo(f"{name:<10} skipped: {r}")
            continue
        res, formula = r
        click.echo(f"{name:<10} {res.makespan:>9g} {res.bubble:>8g} {formula['bubble']:>8g} "
                   f"{'yes' if formula['exact_for_these_costs'] else 'no':>6} {res.peak_activations:>9} "
                   f"{str(res.param_copies) + 'x':>7} {res.makespan_blocking_sends:>9g}")
    if not isinstance(results.get("dualpipev"), str):
        click.echo(f"note: dualpipev cuts the model into {2 * pp} stages (2 per rank), so at equal per-stage costs "
                   f"its model is twice as large; the README compares at equal stage counts (dualpipev on pp/2 "
                   f"ranks). 'blocking': makespan if every send waits for its receive.")
