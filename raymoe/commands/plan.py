"""``raymoe plan``: parameter counts and per-device memory of a preset/config under a parallel layout.

python -m raymoe plan --preset 671b                       # readable tables
python -m raymoe plan --preset 671b --json                # one JSON object
python -m raymoe plan --preset 671b --pp 8 --dp 256 --zero 2 --schedule 1f1b
python -m raymoe plan --preset small model.num_layers=12  # same key=value overrides as ``train``
python -m raymoe plan --preset 671b --pp 16 --ep 64 --dp 128 --gpu h800 --tokens 14.8e12   # step time, GPU-hours
python -m raymoe plan --published deepseek-v3             # a published run: predicted vs published GPU-hours
python -m raymoe plan --preset small --gpu cpu            # a CPU entry measured by a GEMM probe first
"""

from __future__ import annotations

import json

import click

from raymoe.plan import (
    BytesPerElement,
    LayerParams,
    Layout,
    MemoryPlan,
    ModelParams,
    count_params,
    plan_memory,
)


@click.command("plan")
@click.option("--preset", default="small", show_default=True, help="debug, small, 16b, 236b or 671b.")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="YAML config merged over the preset."
)
@click.option("--pp", type=int, help="Pipeline-parallel ranks [default: parallel.pp].")
@click.option("--ep", type=int, help="Expert-parallel ranks [default: parallel.ep].")
@click.option("--dp", type=int, help="Data-parallel ranks, ep included [default: parallel.dp].")
@click.option(
    "--zero", "zero_stage", type=click.IntRange(0, 2), help="ZeRO stage [default: parallel.zero_stage]."
)
@click.option(
    "--schedule", help="Pipeline schedule; DualPipe(V) puts two stages on a rank [default: schedule.name]."
)
@click.option(
    "--fp32-grads", is_flag=True, help="Accumulate gradients in fp32 (the paper) instead of the param dtype."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--gpu", help="Device of the step-time model: h800, h100, h200, a100, or cpu (probed here).")
@click.option("--tokens", type=float, help="Token budget for GPU-hours (e.g. 14.8e12).")
@click.option("--microbatches", type=int, help="Micro-batches per step [default: schedule.num_microbatches].")
@click.option("--assume", "assumptions", multiple=True, metavar="NAME=VALUE",
              help="Override a step-model assumption, or device.FIELD=VALUE a device-table field (repeatable).")
@click.option("--published", help="Plan a published run (deepseek-v3, deepseek-v2) with its published layout.")
@click.option(
    "--cluster",
    "cluster_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Ray cluster launcher YAML or KubeRay manifest: does the layout fit, how many nodes must autoscaling add?",
)
@click.argument("overrides", nargs=-1)
def plan(
    preset: str,
    config_file: str | None,
    pp: int | None,
    ep: int | None,
    dp: int | None,
    zero_stage: int | None,
    schedule: str | None,
    fp32_grads: bool,
    as_json: bool,
    gpu: str | None,
    tokens: float | None,
    microbatches: int | None,
    assumptions: tuple[str, ...],
    published: str | None,
    cluster_file: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Count parameters and bytes per device for a parallel layout; with --gpu also activations, step time,
    tokens/s, MFU and GPU-hours from the schedule simulator."""
    from raymoe.config import load_config

    run = None
    if published is not None:
        from raymoe.plan.published import published_run

        try:
            run = published_run(published)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        preset, overrides = run.preset, (*run.overrides, *overrides)
        pp, ep, dp, zero_stage, schedule = (pp or run.pp, ep or run.ep, dp or run.dp,
                                            run.zero_stage if zero_stage is None else zero_stage,
                                            schedule or run.schedule)
        gpu, tokens, microbatches = gpu or run.gpu, tokens or run.tokens, microbatches or run.num_microbatches
        assumptions = (*(f"{k}={v}" for k, v in run.assume.items()), *assumptions)
    try:
        cfg = load_config(preset, list(overrides), config_file)
        par = cfg.parallel
        layout_pp = par.pp if pp is None else pp
        layout = Layout(
            pp=layout_pp,
            ep=par.ep if ep is None else ep,
            dp=par.dp if dp is None else dp,
            zero_stage=par.zero_stage if zero_stage is None else zero_stage,
            schedule=cfg.schedule.name if schedule is None else schedule,
            # The config's uneven split only fits the stage count it was written for.
            stage_layers=tuple(par.stage_layers) if layout_pp == par.pp and schedule is None else (),
        )
        params = count_params(cfg.model, top_k=cfg.routing.top_k, mtp_depth=cfg.mtp.depth)
        if fp32_grads:  # one switch for the memory table and the step model
            assumptions = (*assumptions, "fp32_grads=true")
        step_assume = _assumptions(assumptions)
        bytes_per = BytesPerElement.from_precision(cfg.precision, fp32_grads=step_assume.fp32_grads)
        memory = plan_memory(params, layout, bytes_per, num_routed_experts=cfg.model.num_routed_experts)
        fit = None if cluster_file is None else _cluster_fit(cluster_file, cfg, layout)
        step = None if gpu is None else _plan_step(cfg, layout, gpu, microbatches, assumptions)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    report = plan_report(params, memory)
    if step is not None:
        from raymoe.plan.step_report import step_report

        report["step"] = step_report(step, tokens=tokens)
        if run is not None:
            report["published"] = _published_comparison(run, step)
    if fit is not None:
        report["cluster"] = fit
        if step is not None:
            report["cluster"]["run"] = _cluster_run(fit, step, tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(params, memory, title=published or config_file or preset))
        if step is not None:
            from raymoe.plan.step_report import format_step

            click.echo("")
            click.echo(format_step(step, tokens=tokens))
            if run is not None:
                c = report["published"]
                click.echo(f"published ({run.name}): {c['published_gpu_hours_per_trillion'] / 1e3:,.1f}K GPU-hours "
                           f"per trillion tokens; predicted {c['predicted_gpu_hours_per_trillion'] / 1e3:,.1f}K "
                           f"({c['predicted_over_published']:.3f}x)")
                click.echo(f"  as published: {run.published}")
                click.echo(f"  chosen by us: {run.chosen}")
        if fit is not None:
            from raymoe.cluster import format_fit_report

            click.echo("")
            click.echo(format_fit_report(fit))
            if step is not None:
                r = report["cluster"]["run"]
                hours = "" if r["wall_hours"] is None else (
                    f", {r['wall_hours']:,.1f} hours for {tokens:.4g} tokens ({r['node_hours']:,.0f} node-hours)")
                click.echo(f"run: {r['nodes']} worker node(s) ({r['nodes_by_type']}){hours}")
    if fit is not None and not fit["fits"]:
        raise SystemExit(1)


def _assumptions(assumptions: tuple[str, ...]):
    from raymoe.plan.assumptions import Assumptions, split_overrides

    return Assumptions().with_overrides(split_overrides(assumptions)[0])


def _plan_step(cfg, layout: Layout, gpu: str, microbatches: int | None, assumptions: tuple[str, ...]):
    from raymoe.plan.assumptions import split_overrides
    from raymoe.plan.devices import device_spec
    from raymoe.plan.step import plan_step

    device_overrides = split_overrides(assumptions)[1]
    if gpu.strip().lower() == "cpu":
        from raymoe.bench.plan_calibration import probe_cpu_device

        device = probe_cpu_device()
    else:
        device = device_spec(gpu)
    device = device.with_overrides(device_overrides)
    return plan_step(cfg, layout, device=device, assume=_assumptions(assumptions), num_microbatches=microbatches)


def _published_comparison(run, step) -> dict:
    predicted = step.gpu_hours(1e12)
    return {"name": run.name, "published_gpu_hours_per_trillion": run.gpu_hours_per_trillion,
            "predicted_gpu_hours_per_trillion": predicted,
            "predicted_over_published": predicted / run.gpu_hours_per_trillion,
            "published_total_gpu_hours": run.gpu_hours_per_trillion * run.tokens / 1e12,
            "predicted_total_gpu_hours": step.gpu_hours(run.tokens),
            "as_published": run.published, "chosen": run.chosen}


def _cluster_run(fit: dict, step, tokens: float | None) -> dict:
    """Worker nodes the placement occupies, and hours (and node-hours) for the token budget."""
    import math

    by_type = {}
    for t in fit["node_types"]:
        bundles = fit["bundles_per_node_type"].get(t["name"], 0)
        if bundles:
            per_node = min(math.floor(t["resources"].get(k, 0.0) / v + 1e-9)
                           for k, v in fit["bundle"].items() if v > 0)
            by_type[t["name"]] = math.ceil(bundles / per_node)
    nodes = sum(by_type.values())
    wall = None if tokens is None else step.wall_hours(tokens)
    return {"nodes": nodes, "nodes_by_type": by_type, "wall_hours": wall,
            "node_hours": None if wall is None else wall * nodes}


def _cluster_fit(cluster_file: str, cfg, layout: Layout) -> dict:
    """Check the planned layout (not just the config's) against the cluster's node types."""
    from dataclasses import replace

    from raymoe.cluster import fit_report

    parallel = replace(
        cfg.parallel,
        pp=layout.pp,
        ep=layout.ep,
        dp=layout.dp,
        zero_stage=layout.zero_stage,
        stage_layers=list(layout.stage_layers),
    )
    schedule = replace(cfg.schedule, name=layout.schedule)
    return fit_report(cluster_file, replace(cfg, parallel=parallel, schedule=schedule))


def plan_report(params: ModelParams, memory: MemoryPlan) -> dict[str, object]:
    """Everything ``plan --json`` prints, as plain JSON-able values."""
    layout, b = memory.layout, memory.bytes_per
    return {
        "total_params": params.total,
        "active_params": params.active,
        "active_params_with_embedding": params.active_with_embedding,
        "mtp_params": params.mtp_total,
        "mtp_active_params": params.mtp_active,
        "embedding_params": params.embedding,
        "head_params": params.head,
        "final_norm_params": params.final_norm,
        "routing_bias_elems": params.routing_bias_elems,
        "layers": [layer.as_dict() for layer in params.layers],
        "mtp": [module.as_dict() for module in params.mtp],
        "memory": {
            "layout": {
                "pp": layout.pp,
                "ep": layout.ep,
                "dp": layout.dp,
                "expert_dp": layout.expert_dp,
                "zero_stage": layout.zero_stage,
                "schedule": layout.schedule,
                "num_stages": layout.num_stages,
            },
            "bytes_per_element": {"param": b.param, "grad": b.grad, "master": b.master, "moments": b.moments},
            "devices": [device.as_dict() for device in memory.devices],
            "peak": memory.peak.as_dict(),
        },
    }


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ranges(ids: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 57, 58) -> "0-3+57-58"."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "+".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def _layer_groups(layers: tuple[LayerParams, ...]) -> list[tuple[int, int, LayerParams]]:
    """Runs of consecutive identical layers as (first id, last id, layer): 61 rows become 2."""
    groups: list[tuple[int, int, LayerParams]] = []
    for layer in layers:
        if groups and (groups[-1][2].kind, groups[-1][2].total) == (layer.kind, layer.total):
            groups[-1] = (groups[-1][0], layer.index, groups[-1][2])
        else:
            groups.append((layer.index, layer.index, layer))
    return groups


def format_report(params: ModelParams, memory: MemoryPlan, *, title: str) -> str:
    rows = [f"raymoe plan: {title}", "", f"{'parameters':<34}{'each':>12}{'total':>12}{'active/token':>14}"]
    rows.append(f"{'  embedding':<34}{'':>12}{_count(params.embedding):>12}{_count(params.dim):>14}")
    for first, last, layer in _layer_groups(params.layers):
        n = last - first + 1
        name = f"  layers {first}-{last} {layer.kind} x{n}" if n > 1 else f"  layer {first} {layer.kind}"
        rows.append(
            f"{name:<34}{_count(layer.total):>12}{_count(n * layer.total):>12}{_count(n * layer.active):>14}"
        )
    rows.append(
        f"{'  final norm + output head':<34}{'':>12}{_count(params.final_norm + params.head):>12}"
        f"{_count(params.final_norm + params.head):>14}"
    )
    rows.append(f"{'main model':<34}{'':>12}{_count(params.total):>12}{_count(params.active):>14}")
    rows.append(
        f"{f'MTP x{len(params.mtp)} (unique; shares emb/head)':<34}{'':>12}"
        f"{_count(params.mtp_total):>12}{_count(params.mtp_active):>14}"
    )
    rows.append(f"routing-bias buffers (not parameters): {params.routing_bias_elems}")

    layout, b = memory.layout, memory.bytes_per
    rows += [
        "",
        f"memory per device: pp={layout.pp} ep={layout.ep} dp={layout.dp} "
        f"(expert dp {layout.expert_dp}) "
        f"zero={layout.zero_stage} schedule={layout.schedule}",
        f"bytes/element: param {b.param}, grad {b.grad}, fp32 master {b.master}, Adam moments {b.moments}; "
        "activations not included",
        f"{'pp rank':>7}  {'stages':<8}{'layers':<12}{'params':>12}{'grads':>12}{'optimizer':>12}"
        f"{'total':>12}",
    ]
    peak = memory.peak
    for d in memory.devices:
        stages = ",".join(str(s) for s in d.stages)
        layers = _ranges(d.layers)
        mark = "  <- peak" if d is peak else ""
        rows.append(
            f"{d.pp_rank:>7}  {stages:<8}{layers:<12}{_size(d.param_bytes):>12}{_size(d.grad_bytes):>12}"
            f"{_size(d.optimizer_bytes):>12}{_size(d.total_bytes):>12}{mark}"
        )
    return "\n".join(rows)
