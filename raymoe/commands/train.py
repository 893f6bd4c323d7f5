"""``raymoe train``: the main job (and ``--resume`` to continue a saved run)."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--preset", default=None, help="Config preset: debug, small, 16b, 236b, 671b (default: small).")
@click.option("--config", "config_file", default=None, type=click.Path(), help="YAML config file (may name a preset).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (run.steps); with --resume, the step to reach.")
@click.option("--out", "out_dir", default=None, help="Run directory (run.out_dir).")
@click.option("--address", default=None, help="Ray cluster address ('auto' joins a running cluster).")
@click.option("--checkpoint-every", type=int, default=None,
              help="Save a checkpoint every K steps and at the end (run.checkpoint_every; 0: only when stopped).")
@click.option("--init-from", "init_from", default=None, type=click.Path(),
              help="Start from a model export's weights (`raymoe checkpoint export`), in any layout (run.init_from).")
@click.option("--resume", "resume", default=None, type=click.Path(),
              help="Continue a saved run: a run directory, its checkpoints/ directory or one step-*/ checkpoint. "
                   "The run's own config is used; OVERRIDES may change only optim/routing/run settings "
                   "(and parallel/schedule settings with --reshard).")
@click.option("--reshard", is_flag=True, default=False,
              help="With --resume: continue the run in another layout (parallel.*, schedule.*, --engine), with "
                   "its weights, exact AdamW state, step, tokens, data cursor and routing biases.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Start a fresh run in a directory that holds an earlier run; the earlier run's files move to "
                   "OUT/earlier-N/ (nothing is deleted). Without it such a directory is refused.")
@click.option(
    "--engine",
    type=click.Choice(["ray", "local"]),
    default="ray",
    show_default=True,
    help="ray: workers are Ray actors; local: the single-process reference trainer in this process.",
)
@click.argument("overrides", nargs=-1)
def train(preset, config_file, steps, out_dir, address, checkpoint_every, init_from, resume, reshard, overwrite,
          engine, overrides) -> None:
    """Train a model. OVERRIDES are key=value pairs, e.g. model.num_layers=6 optim.lr=3e-4.

    Every refusal (a bad value, a layout, memory, a directory, the data, the cluster) is one line naming the
    setting, and comes before anything is written."""
    from raymoe.config import load_config

    extra = list(overrides)
    for key, value in (("run.steps", steps), ("run.out_dir", out_dir), ("run.ray_address", address),
                       ("run.checkpoint_every", checkpoint_every), ("run.init_from", init_from)):
        if value is not None:
            extra.append(f"{key}={value}")
    checkpoint = None
    if resume is not None and init_from is not None:
        raise click.ClickException("--resume continues a run exactly; --init-from starts a new one from "
                                   "weights: pick one")
    if reshard and resume is None:
        raise click.ClickException("--reshard continues a saved run in another layout: it needs --resume RUN_DIR")
    try:
        if resume is not None:
            checkpoint, config = _resumed_config(resume, preset, config_file, extra)
        else:
            config = load_config(preset or ("small" if config_file is None else None), extra, config_file)
    except ValueError as exc:  # one line (click's BadParameter would add the usage text around it)
        raise click.ClickException(str(exc)) from exc
    from raymoe.train.metrics import NonFiniteLoss

    if engine == "local":
        from raymoe.train import train_local as run
    else:
        from raymoe.runtime.launch import train_ray as run
    try:
        records = run(config, resume=checkpoint, reshard=reshard, overwrite=overwrite)
    except (ValueError, NonFiniteLoss) as exc:  # refused before any step ran (layout, cluster, checkpoint, ...)
        raise click.ClickException(str(exc)) from exc  # or a diverged run, stopped before saving NaNs
    if records:
        last = records[-1]
        ended = "done" if last["step"] + 1 >= config.run.steps else "stopped"
        click.echo(
            f"{ended}: {last['step'] + 1} steps, loss {records[0]['loss']:.3f} -> {last['loss']:.3f}, "
            f"run directory {config.run.out_dir}"
        )


def _resumed_config(resume, preset, config_file, overrides):
    """(checkpoint directory, config): the saved run's config with ``overrides``; the run directory stays the
    saved one unless --out moves it."""
    from raymoe.checkpoint import Manifest, resolve_checkpoint
    from raymoe.checkpoint.compat import config_of

    if preset is not None or config_file is not None:
        raise ValueError("--resume continues a run with its own saved config; drop --preset/--config "
                         "(key=value overrides still apply)")
    checkpoint = resolve_checkpoint(resume)
    # The checkpoint holds the weights: a run that was started from an export does not read it again.
    return checkpoint, config_of(Manifest.read(checkpoint), [*overrides, "run.init_from=''"])
