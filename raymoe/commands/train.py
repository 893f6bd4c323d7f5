"""``raymoe train``: the main job."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--preset", default=None, help="Config preset: debug, small, 16b, 236b, 671b (default: small).")
@click.option("--config", "config_file", default=None, type=click.Path(), help="YAML config file (may name a preset).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (run.steps).")
@click.option("--out", "out_dir", default=None, help="Run directory (run.out_dir).")
@click.option("--address", default=None, help="Ray cluster address ('auto' joins a running cluster).")
@click.option(
    "--engine",
    type=click.Choice(["ray", "local"]),
    default="ray",
    show_default=True,
    help="ray: workers are Ray actors; local: the single-process reference trainer in this process.",
)
@click.argument("overrides", nargs=-1)
def train(preset, config_file, steps, out_dir, address, engine, overrides) -> None:
    """Train a model. OVERRIDES are key=value pairs, e.g. model.num_layers=6 optim.lr=3e-4."""
    from raymoe.config import load_config

    extra = list(overrides)
    if steps is not None:
        extra.append(f"run.steps={steps}")
    if out_dir is not None:
        extra.append(f"run.out_dir={out_dir}")
    if address is not None:
        extra.append(f"run.ray_address={address}")
    if preset is None and config_file is None:
        preset = "small"
    try:
        config = load_config(preset, extra, config_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if engine == "local":
        from raymoe.train import train_local

        records = train_local(config)
    else:
        from raymoe.runtime.launch import train_ray

        records = train_ray(config)
    if records:
        last = records[-1]
        click.echo(
            f"done: {len(records)} steps, loss {records[0]['loss']:.3f} -> {last['loss']:.3f}, "
            f"run directory {config.run.out_dir}"
        )
