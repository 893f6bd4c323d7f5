"""A directory of checkpoints, ``step-00000040/`` and so on, with an all-or-nothing commit.

Saving step N: the workers write their shards into a hidden staging directory ``.step-00000040.tmp-<id>/``, the
driver writes the manifest into it last and renames the directory to ``step-00000040/``. A checkpoint directory
therefore exists only once it is complete; a save killed half-way leaves a staging directory that is never read
(and is swept at the next commit), and the previous checkpoints stay loadable. Only after the commit are old
checkpoints beyond ``keep`` deleted, oldest first.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from raymoe.checkpoint.files import fsync_dir, write_text_atomic
from raymoe.checkpoint.manifest import MANIFEST_NAME, Manifest
from raymoe.data.provenance import write_tokenizer_files

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest checkpoint is never deleted), got {keep}")
        self.root = Path(root)
        self.keep = keep

    def set_aside(self) -> Path | None:
        """A fresh run in a directory that holds another run's checkpoints: move them to ``<root>.earlier-N``
        (kept, never deleted) so that neither ``--resume`` nor recovery can mistake them for this run's."""
        if not self.complete():
            return None
        n = 1
        while (aside := self.root.with_name(f"{self.root.name}.earlier-{n}")).exists():
            n += 1
        os.replace(self.root, aside)
        return aside

    def begin(self, step: int) -> Path:
        """A fresh staging directory for step ``step``'s shards."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{step_dir_name(step)}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return staging

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest into ``staging`` and publish it as ``step-NNNNNNNN``; then prune."""
        for shard in manifest.shards:
            if not (staging / shard.file).is_file():
                raise RuntimeError(f"cannot commit {staging}: shard {shard.file} was not written")
        write_tokenizer_files(staging, manifest.config_yaml)  # the data's tokenizer travels with the weights
        write_text_atomic(staging / MANIFEST_NAME, manifest.to_json())
        final = self.root / step_dir_name(manifest.step)
        if final.exists():  # the same step saved again (e.g. stopped right after resuming): replace it whole
            retired = self.root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(self.root)
        self.prune()
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / MANIFEST_NAME).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def prune(self) -> None:
        """Delete complete checkpoints beyond ``keep`` (oldest first) and staging leftovers of dead saves."""
        for _, path in self.complete()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():
            if path.name.startswith(".step-") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user may point at: the checkpoint itself, a directory of checkpoints
    (its latest), or a run directory (the latest under ``checkpoints/``)."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = CheckpointStore(root).latest()
        if latest is not None:
            return latest
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    raise ValueError(f"no complete checkpoint in {str(path)!r} (looked for {MANIFEST_NAME} in it, in its "
                     f"step-*/ directories and in checkpoints/step-*/)")
