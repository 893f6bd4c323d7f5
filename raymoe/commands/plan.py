"""``raymoe plan``: parameter counts and per-device memory of a preset/config under a parallel layout.

python -m raymoe plan --preset 671b                       # readable tables
python -m raymoe plan --preset 671b --json                # one JSON object
python -m raymoe plan --preset 671b --pp 8 --dp 256 --zero 2 --schedule 1f1b
python -m raymoe plan --preset small model.num_layers=12  # same key=value overrides as ``train``
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
    cluster_file: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Count parameters (total, active per token, MTP) and bytes per device for a parallel layout."""
    from raymoe.config import load_config

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
        bytes_per = BytesPerElement.from_precision(cfg.precision, fp32_grads=fp32_grads)
        memory = plan_memory(params, layout, bytes_per, num_routed_experts=cfg.model.num_routed_experts)
        fit = None if cluster_file is None else _cluster_fit(cluster_file, cfg, layout)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    report = plan_report(params, memory)
    if fit is not None:
        report["cluster"] = fit
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(params, memory, title=config_file or preset))
        if fit is not None:
            from raymoe.cluster import format_fit_report

            click.echo("")
            click.echo(format_fit_report(fit))
    if fit is not None and not fit["fits"]:
        raise SystemExit(1)


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
