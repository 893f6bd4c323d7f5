"""``raymoe parity``: train a layout on Ray next to the single-process reference and print how far apart they are."""

from __future__ import annotations

import json
import os

import click


@click.command()
@click.option("--preset", default="debug", show_default=True, help="Config preset.")
@click.option("--pp", type=int, default=2, show_default=True, help="Pipeline ranks.")
@click.option("--dp", type=int, default=None, help="Data-parallel replicas (ZeRO over them; default: ep).")
@click.option("--ep", type=int, default=1, show_default=True,
              help="Expert-parallel ranks, carved out of dp (dp must be a multiple of ep).")
@click.option("--schedule", "schedule_name", default="1f1b", show_default=True,
              help="gpipe, 1f1b, zb1p, dualpipe or dualpipev.")
@click.option("--microbatches", type=int, default=None, help="Micro-batches per step (default: 2 * pp).")
@click.option("--zero-stage", type=click.IntRange(0, 2), default=None,
              help="parallel.zero_stage: 1 partitions Adam state over dp, 2 also gradients (default: the preset's, 1).")
@click.option("--steps", type=int, default=1, show_default=True, help="Steps to compare (losses and final weights).")
@click.option("--address", default=None, help="Ray address ('auto' joins a running cluster; default: local).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("overrides", nargs=-1)
def parity(preset, pp, dp, ep, schedule_name, microbatches, zero_stage, steps, address, as_json, overrides) -> None:
    """Check that a parallel layout computes what the single-process reference computes.

    Prints the loss difference and, over all parameter tensors, the largest relative difference
    ||x - x_ref|| / ||x_ref|| of the gradients and of the first step's parameter updates.
    """
    from raymoe.config import load_config

    microbatches = microbatches or 2 * pp
    dp = dp or ep
    extra = [f"parallel.pp={pp}", f"parallel.dp={dp}", f"parallel.ep={ep}", f"schedule.name={schedule_name}",
             f"schedule.num_microbatches={microbatches}"]
    if zero_stage is not None:
        extra.append(f"parallel.zero_stage={zero_stage}")
    try:
        config = load_config(preset, extra + list(overrides))
        from raymoe.runtime.driver import validate_layout

        validate_layout(config)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc

    from raymoe.runtime.parity import run_parity
    from raymoe.runtime.session import ray_session

    # A local Ray gets a logical CPU per worker: parity checks arithmetic, not speed, so oversubscribing is fine.
    workers = config.parallel.pp * config.parallel.dp
    try:
        with ray_session(address or config.run.ray_address, num_cpus=max(os.cpu_count() or 1, workers)):
            report = run_parity(config, steps=steps)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    data = report.to_dict()
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"layout: {report.schedule} pp={report.pp} ep={report.ep} dp={report.dp} zero={report.zero_stage} "
               f"microbatches={report.num_microbatches} steps={report.steps}")
    rows = [
        ("loss (ray / reference)", f"{report.loss:.8f} / {report.loss_ref:.8f}"),
        ("loss_abs_diff", f"{report.loss_abs_diff:.3e}"),
        ("loss_rel_diff", f"{report.loss_rel_diff:.3e}"),
        ("max_rel_grad_diff", f"{report.max_rel_grad_diff:.3e}  ({report.worst_grad})"),
        ("max_rel_update_diff", f"{report.max_rel_update_diff:.3e}  ({report.worst_update})"),
        ("max_rel_update_diff_same_grads", f"{report.max_rel_update_diff_same_grads:.3e}"),
        ("grad_norm_rel_diff", f"{report.grad_norm_rel_diff:.3e}"),
        ("max_loss_rel_diff_trajectory", f"{report.max_loss_rel_diff_trajectory:.3e}"),
        ("max_rel_param_diff_final", f"{report.max_rel_param_diff_final:.3e}"),
        ("optimizer_state_bytes_per_rank", " ".join(map(str, report.optimizer_state_bytes_per_rank))),
        ("gradient_bytes_per_rank", " ".join(map(str, report.gradient_bytes_per_rank))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")
