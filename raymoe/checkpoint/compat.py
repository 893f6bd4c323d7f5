"""Can a checkpoint continue under a given config? Decided from the manifest alone, before any actor starts.

The sections that define what the shards contain and how the data is cut must match the saving run exactly:
model shape, MTP depth, precision (FP8 layers, BF16 moments), the parallel layout and schedule (the shards are
per rank; ``--reshard`` lifts these two, ``raymoe.checkpoint.reshard``), and the data (path, sequence length,
batch size, seed: the cursor indexes that sample order). Optimizer hyper-parameters, routing's bias speed and everything
under ``run`` (steps, output and checkpoint settings, cluster address) may change: that is a user's deliberate
choice, e.g. continuing a run for more steps.
"""

from __future__ import annotations

from raymoe.checkpoint.manifest import Manifest

FIXED_SECTIONS = ("model", "mtp", "precision", "parallel", "schedule", "data")
LAYOUT_SECTIONS = ("parallel", "schedule")
"""What a resharded resume may change."""


def config_of(manifest: Manifest, overrides=()):
    """The saving run's config (plus ``overrides``), rebuilt through the ordinary loader so it is validated."""
    from raymoe.config import config_from_yaml

    return config_from_yaml(manifest.config_yaml, overrides)


def check_compatible(saved, config, *, source: str = "checkpoint", reshard: bool = False) -> None:
    """ValueError naming the first field where ``config`` differs from the saving run's ``saved`` config in a
    section that must not change (with ``reshard``, the layout sections may)."""
    from dataclasses import asdict

    for section in FIXED_SECTIONS:
        if reshard and section in LAYOUT_SECTIONS:
            continue
        old, new = asdict(getattr(saved, section)), asdict(getattr(config, section))
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise ValueError(
                    f"{source} was saved with {section}.{key}={old.get(key)!r}, this run has {section}.{key}="
                    f"{new.get(key)!r}; a checkpoint continues only with the same {section} settings"
                    + (" (or pass --reshard to continue it in another layout)" if section in LAYOUT_SECTIONS
                       else "")
                )


def check_steps(manifest: Manifest, steps: int, *, source: str = "checkpoint") -> None:
    if steps <= manifest.step:
        raise ValueError(f"{source} is at step {manifest.step}; run.steps={steps} leaves nothing to train "
                         f"(pass --steps greater than {manifest.step})")
