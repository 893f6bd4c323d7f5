"""``raymoe checkpoint inspect PATH``: what a checkpoint holds, and whether its files are intact."""

from __future__ import annotations

import click


@click.group()
def checkpoint() -> None:
    """Look into saved checkpoints."""


@checkpoint.command()
@click.argument("path", type=click.Path())
@click.option("--verify/--no-verify", default=True, show_default=True, help="Recompute every shard's SHA-256.")
def inspect(path, verify) -> None:
    """Show what a checkpoint holds and verify its shards.

    PATH: a run directory, its checkpoints/ directory, or one step-*/ checkpoint."""
    import datetime
    from pathlib import Path

    from raymoe.checkpoint import CheckpointStore, Manifest, resolve_checkpoint
    from raymoe.checkpoint.files import sha256_file

    try:
        chosen = resolve_checkpoint(path)
        manifest = Manifest.read(chosen)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    others = [s for s, _ in CheckpointStore(chosen.parent).complete()]
    when = datetime.datetime.fromtimestamp(manifest.created_unix).isoformat(timespec="seconds")
    click.echo(f"checkpoint  {chosen}")
    click.echo(f"step        {manifest.step} (tokens seen {manifest.tokens_seen:,}); saved {when}")
    click.echo(f"layout      {manifest.layout.describe()}")
    click.echo(f"data cursor {manifest.data_cursor}")
    bias = [v for row in manifest.routing_bias_RE for v in row]
    click.echo(f"routing     {len(manifest.routing_bias_RE)} routers x {len(manifest.routing_bias_RE[0])} experts, "
               f"bias range [{min(bias):+.4f}, {max(bias):+.4f}]")
    click.echo(f"versions    {manifest.versions}")
    click.echo(f"all steps   {others}")
    bad = 0
    for shard in manifest.shards:
        file = Path(chosen) / shard.file
        status = "missing"
        if file.is_file():
            status = "size differs" if file.stat().st_size != shard.bytes else "ok"
            if status == "ok" and verify and sha256_file(file) != shard.sha256:
                status = "CORRUPT (sha256 differs)"
        bad += status != "ok"
        click.echo(f"  rank {shard.rank:>3} pp={shard.pp_rank} dp={shard.dp_rank}  {shard.file}  "
                   f"{shard.bytes / 2**20:8.2f} MiB  {status}")
    if bad:
        raise click.ClickException(f"{bad} of {len(manifest.shards)} shards are missing or damaged")


@checkpoint.command()
@click.argument("path", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(),
              help="The .safetensors file (--format raymoe) or the model directory (--format hf) to write.")
@click.option("--format", "fmt", type=click.Choice(["raymoe", "hf"]), default="raymoe", show_default=True,
              help="raymoe: one safetensors file, our names; hf: a Hugging Face DeepSeek-V3 directory.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fp32: the master weights as trained; bf16: half the size, for inference.")
def export(path, out, fmt, dtype) -> None:
    """Write a checkpoint's whole model (PATH: run dir, checkpoints/ or step-*/).

    --format raymoe: one safetensors file; start a run of any layout from it with `raymoe train --init-from FILE`.
    --format hf: a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads (config.json,
    model.safetensors under transformers' names, tokenizer files); `--init-from DIR` reads it back."""
    from raymoe.checkpoint import resolve_checkpoint
    from raymoe.checkpoint.export import export_safetensors
    from raymoe.interop.hf_export import export_hf

    try:
        chosen = resolve_checkpoint(path)
        written = (export_hf if fmt == "hf" else export_safetensors)(chosen, out, dtype=dtype)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    size = sum(f.stat().st_size for f in written.iterdir()) if written.is_dir() else written.stat().st_size
    click.echo(f"exported {chosen} -> {written} ({size / 2**20:.1f} MiB, {dtype}, {fmt})")
