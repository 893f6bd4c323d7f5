"""``python -m raymoe``: the command line. Each command lives in ``raymoe/commands/<name>.py``.

Commands import their heavy dependencies (torch, ray, matplotlib) inside the function body so that
``raymoe --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

# (command name, module under raymoe.commands, attribute)
_COMMANDS = (
    ("train", "train", "train"),
    ("plan", "plan", "plan"),
    ("simulate", "simulate", "simulate"),
    ("prepare-data", "prepare_data", "prepare_data"),
    ("train-tokenizer", "train_tokenizer", "train_tokenizer"),
    ("parity", "parity", "parity"),
    ("bench", "bench", "bench"),
    ("report", "report", "report"),
    ("checkpoint", "checkpoint", "checkpoint"),
    ("generate", "generate", "generate"),
    ("eval", "eval", "eval_command"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raymoe")
def main() -> None:
    """Train DeepSeek-V3-style MoE models on Ray."""


for _name, _module, _attr in _COMMANDS:
    try:
        _mod = importlib.import_module(f"raymoe.commands.{_module}")
    except ModuleNotFoundError as _exc:  # a command whose module has not landed yet
        if _exc.name != f"raymoe.commands.{_module}":
            raise
        continue
    main.add_command(getattr(_mod, _attr), name=_name)
