"""The driver's checkpoints: save (every worker writes its shard, the manifest commits them), the storage check,
restore in the same layout (each worker its own shard) or resharded (the driver consolidates, each worker takes its
part). A mixin of ``Driver``: it reads and sets the driver's run state (step, tokens, routing biases, placement)
and goes through the driver's state machine (CHECKPOINTING, the failure guard)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from raymoe.checkpoint import CheckpointStore, Layout, Manifest
from raymoe.checkpoint.run_state import RunState, build_manifest, read_run_state
from raymoe.runtime.driver_state import DriverState, Transition
from raymoe.runtime.worker import Worker


class DriverCheckpoints:
    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, store: CheckpointStore) -> Path:
        """RUNNING -> CHECKPOINTING -> RUNNING: every worker writes its shard, then the manifest commits them."""
        if self.state is not DriverState.RUNNING:
            raise RuntimeError(f"save_checkpoint() in state {self.state.value}")
        self._transition(DriverState.CHECKPOINTING, f"step {self.step_index}")
        with self._guard():
            staging = store.begin(self.step_index)
            entries = self.worker_group.execute(Worker.save_checkpoint_shard, self.key, str(staging))
            state = RunState(step=self.step_index, tokens_seen=self.tokens_seen,
                             cursor=self.batches.cursor.to_dict(), bias_RE=self.routing_bias_RE,
                             expert_placement=tuple(self.expert_placement.tolist()) if self.topology.ep > 1 else ())
            manifest = build_manifest(self.config, state, Layout.of(self.config), entries)
            path = store.commit(staging, manifest)
        self._transition(DriverState.RUNNING, f"saved {path}")
        return path

    def check_checkpoint_storage(self, store: CheckpointStore) -> None:
        """Every worker writes its shard into ``store.root``: refuse a directory some workers cannot see (node-local
        storage on a multi-node cluster) now, instead of at the first save hours later."""
        import socket

        store.root.mkdir(parents=True, exist_ok=True)
        probe = store.root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_text(socket.gethostname())
        try:
            seen = self.worker_group.execute(Worker.sees_file, str(probe))
        finally:
            probe.unlink(missing_ok=True)
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            raise ValueError(
                f"run.checkpoint_dir {str(store.root)!r} is not visible to workers {blind}: on a multi-node cluster "
                f"checkpoints need storage every node mounts (set run.checkpoint_dir to such a path)"
            )

    def restore(self, checkpoint: Path, *, reshard: bool = False, consolidated=None) -> Manifest:
        """Load a checkpoint into the started workers and this driver; returns its manifest. Without ``reshard``
        the checkpoint must be this layout's (each worker loads its own shard); with it, any layout's: the driver
        assembles full per-parameter weights and AdamW states (``consolidated``, if already read:
        ``raymoe.checkpoint.reshard.consolidate_training_state``) and every worker takes its own parameters'."""
        from raymoe.data import Cursor
        from raymoe.train.batches import open_batches

        if self.state is not DriverState.RUNNING or self.step_index:
            raise RuntimeError(f"restore() needs a freshly started driver (state {self.state.value}, "
                               f"step {self.step_index})")
        manifest, state = read_run_state(checkpoint, self.config, Layout.of(self.config),
                                         num_routers=self.routing_bias_RE.shape[0], reshard=reshard)
        if not reshard and state.expert_placement and list(state.expert_placement) != self.expert_placement.tolist():
            raise ValueError(f"{checkpoint}: saved with expert placement {list(state.expert_placement)}, the workers "
                             f"hold {self.expert_placement.tolist()}")
        with self._guard():
            if reshard:
                self._load_resharded(checkpoint, consolidated)
            else:
                shards = sorted(manifest.shards, key=lambda e: e.rank)
                self.worker_group.execute_each(
                    Worker.load_checkpoint_shard, [(self.key, str(checkpoint), e.file, e.sha256) for e in shards]
                )
        self.step_index, self.tokens_seen, self.routing_bias_RE = state.step, state.tokens_seen, state.bias_RE
        self._batches = open_batches(self.config, cursor=Cursor.from_dict(state.cursor))
        self.history.append(Transition(self.state, time.time(), f"restored {checkpoint}"
                                        + (" (resharded)" if reshard else "")))
        return manifest

    def _load_resharded(self, checkpoint: Path, consolidated) -> None:
        import ray

        from raymoe.checkpoint.reshard import consolidate_training_state

        if consolidated is None:
            consolidated = consolidate_training_state(checkpoint)
        # One copy in the object store; each worker deserializes it and keeps only its own parameters' part.
        ref = ray.put({"weights": consolidated.weights, "states": consolidated.states})
        try:
            self.worker_group.execute(Worker.load_resharded, self.key, ref)
        finally:
            del ref
