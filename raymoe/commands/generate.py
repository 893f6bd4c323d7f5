"""``raymoe generate SOURCE --prompt ...``: sample from a trained model with the MLA cache, streamed."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="A prompt; repeat for a batch (decoded together, rows padded on the left).")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0: greedy (argmax).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--speculative", type=click.Choice(["none", "mtp"]), default="none", show_default=True,
              help="mtp: the MTP module drafts the next token, one main forward verifies it.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print tokens as they come (one prompt); a batch prints each row at the end.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch CPU threads. A decode step is a few small GEMMs: on a busy 2-core box two threads made "
                   "it 20x slower (thread hand-offs), so 1 is the default.")
def generate(source, prompts, max_new_tokens, temperature, top_p, seed, speculative, stream, threads) -> None:
    """Continue prompts with a trained model.

    SOURCE: a run directory (newest checkpoint), a `checkpoint export` .safetensors file, or a Hugging Face
    model directory. Statistics (tokens/s, MTP acceptance, cache bytes per token) go to stderr."""
    import codecs

    import torch

    from raymoe.data.tokenizer import NUM_BYTES, ByteTokenizer
    from raymoe.generate import Generator, SamplingConfig, load_model
    from raymoe.generate.cache import mha_cache_bytes_per_token, mla_cache_bytes_per_token

    torch.set_num_threads(threads)
    try:
        loaded = load_model(source)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        generator = Generator(loaded.model, sampling=sampling, speculative=speculative == "mtp")
        tokenizer = ByteTokenizer()
        encoded = [tokenizer.encode(p, add_eos=False) for p in prompts]
        if len(prompts) == 1 and stream:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            click.echo(prompts[0], nl=False)
            for new in generator.stream(encoded, max_new_tokens):
                text = decoder.decode(bytes(t for t in new[0] if t < NUM_BYTES))
                click.echo(text, nl=False)
                sys.stdout.flush()
            click.echo(decoder.decode(b"", final=True))
        else:
            for i, (prompt, out) in enumerate(zip(prompts, generator.generate(encoded, max_new_tokens))):
                click.echo(f"--- [{i}]\n{prompt}{tokenizer.decode(out)}")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    s, cfg = generator.stats, loaded.config.model
    mla = mla_cache_bytes_per_token(cfg, num_layers=cfg.num_layers, element_bytes=4)
    mha = mha_cache_bytes_per_token(cfg, num_layers=cfg.num_layers, element_bytes=4)
    line = (f"{s.new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_s:.1f} tokens/s, {s.main_forwards} main "
            f"forwards); KV cache {mla} bytes/token (MLA latent + RoPE key, fp32) vs {mha} for multi-head "
            f"({mha / mla:.1f}x)")
    if speculative == "mtp":
        line += f"; MTP draft acceptance {s.acceptance:.1%} ({s.accepted}/{s.drafted})"
    click.echo(line, err=True)
