"""``raymoe eval SOURCE --data DIR``: loss, perplexity and bits per byte of a trained model on a dataset."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.argument("source", type=click.Path(exists=True))
@click.option("--data", "data", default="", show_default=False,
              help="Dataset directory (`prepare-data`, e.g. its held-out split); default: the embedded corpus.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Window length (default: the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=0), default=131072, show_default=True,
              help="Labels evaluated, consecutive from the dataset's start; 0 = all.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(source, data, seq_len, batch_size, max_tokens, threads, as_json) -> None:
    """Evaluate SOURCE (a run directory, a `checkpoint export` file or a Hugging Face directory) on --data."""
    import torch

    from raymoe.evaluate.heldout import evaluate, load_stream
    from raymoe.generate import load_model

    if threads:
        torch.set_num_threads(threads)
    try:
        loaded = load_model(source)
        seq_len = seq_len or loaded.config.data.seq_len
        result = evaluate(loaded.model, load_stream(data), seq_len=seq_len, batch_size=batch_size,
                          max_tokens=max_tokens)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"source": source, "data": data or "embedded corpus", "step": loaded.step,
                               "seq_len": seq_len, **result.to_dict()}))
        return
    click.echo(f"model       {source} (step {loaded.step})")
    click.echo(f"data        {data or 'the embedded corpus (the default training data: not held out)'}")
    click.echo(f"tokens      {result.tokens:,} labels ({result.bytes:,} bytes), windows of {seq_len}")
    click.echo(f"loss        {result.loss:.4f} nats/token")
    click.echo(f"perplexity  {result.perplexity:.3f}")
    click.echo(f"bits/byte   {result.bits_per_byte:.4f}")
