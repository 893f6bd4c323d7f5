"""Atomic, sharded checkpoints: each worker writes its own shard, the driver writes the manifest last.

``store.py`` publishes a checkpoint all at once, ``manifest.py`` says what it holds, ``shard.py`` reads and writes
one worker's part with ``weights_only`` safety, ``files.py`` makes single files crash-safe, ``reshard.py``
assembles full per-parameter weights and AdamW states so that a run continues in another layout. Torch only: the Ray
side lives in ``raymoe.runtime`` (``Driver.save_checkpoint`` / ``Driver.restore``).
"""

from raymoe.checkpoint.manifest import Layout, Manifest, ShardEntry
from raymoe.checkpoint.shard import copy_parameters, load_shard, save_shard, set_rng_state
from raymoe.checkpoint.store import CheckpointStore, resolve_checkpoint, step_dir_name

__all__ = [
    "CheckpointStore",
    "Layout",
    "Manifest",
    "ShardEntry",
    "copy_parameters",
    "load_shard",
    "resolve_checkpoint",
    "save_shard",
    "set_rng_state",
    "step_dir_name",
]
