"""A run directory: resolved config, per-step metrics (JSONL as they happen, Parquet at the end), a loss plot.

JSONL is appended and flushed every step so a crashed or stopped run keeps everything it measured.

A fresh run never destroys an earlier run's history: a directory that already holds a run (its config, metrics,
events or checkpoints) is refused unless ``overwrite`` is given, and then the earlier run's files move, whole,
to ``earlier-N/`` inside it (nothing is deleted). ``--resume`` continues the run that is there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from raymoe.checkpoint.files import write_text_atomic
from raymoe.config import Config, to_yaml

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.superseded.jsonl", "metrics.parquet", "loss.png",
             "actions.jsonl", "events.jsonl", "checkpoints", "report")
"""What a run writes into its directory (``raymoe report`` adds ``report/``); ``checkpoints.earlier-N`` too."""


def earlier_run(path: str | Path) -> list[str]:
    """The names of an earlier run's files in ``path`` (empty when there are none)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.name in RUN_FILES or p.name.startswith("checkpoints.earlier-"))


def check_fresh_run_dir(path: str | Path, *, overwrite: bool) -> None:
    """A fresh run may not start in a directory that holds another run, unless told to (``overwrite``)."""
    found = earlier_run(path)
    if found and not overwrite:
        raise ValueError(
            f"run.out_dir {str(path)!r} already holds a run ({', '.join(found)}); continue it with "
            f"`--resume {path}`, pick another --out, or pass --overwrite to start afresh there (the earlier run "
            f"moves to {path}/earlier-N/, nothing is deleted)"
        )


def set_aside_run(path: str | Path) -> Path | None:
    """Move an earlier run's files from ``path`` into ``path/earlier-N/`` (N = the first free number)."""
    path = Path(path)
    found = earlier_run(path)
    if not found:
        return None
    n = 1
    while (aside := path / f"earlier-{n}").exists():
        n += 1
    aside.mkdir()
    for name in found:
        os.replace(path / name, aside / name)
    return aside


class RunDir:
    def __init__(self, path: str | Path, config: Config, *, resume_step: int | None = None,
                 overwrite: bool = False) -> None:
        """A new run directory, or with ``resume_step`` the continuation of the run saved there: its metrics of
        steps before ``resume_step`` are kept and new ones appended; records of later steps (logged after that
        checkpoint was saved, and about to be trained again) move to ``metrics.superseded.jsonl``. A new run
        refuses a directory that holds another run unless ``overwrite`` (which sets the earlier run aside)."""
        self.path = Path(path)
        if resume_step is None:
            check_fresh_run_dir(self.path, overwrite=overwrite)
            if (aside := set_aside_run(self.path)) is not None:
                print(f"{self.path} held an earlier run: moved it to {aside}")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(to_yaml(config))
        self.metrics_path = self.path / "metrics.jsonl"
        self._records: list[dict] = []
        if resume_step is None:
            self._file = self.metrics_path.open("w")
        else:
            self._records = self._keep_before(resume_step)
            self._file = self.metrics_path.open("a")

    def rewind(self, step: int) -> None:
        """Training went back to ``step`` (recovery from a checkpoint): records of steps >= ``step`` move to
        ``metrics.superseded.jsonl``, and the steps are logged again as they are redone."""
        self._file.close()
        self._records = self._keep_before(step)
        self._file = self.metrics_path.open("a")

    def _keep_before(self, step: int) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        kept: list[dict] = []
        later: list[str] = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was killed
                later.append(line)
                continue
            if record.get("step", step) < step:
                kept.append(record)
            else:
                later.append(line)
        if later:
            with (self.path / "metrics.superseded.jsonl").open("a") as f:
                f.write("\n".join(later) + "\n")
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_text_atomic(self.metrics_path, text)
        return kept

    def log(self, record: dict) -> None:
        self._records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def event(self, kind: str, **fields) -> None:
        """One line in ``events.jsonl``: checkpoints saved, stops, resumes (what happened besides steps)."""
        with (self.path / "events.jsonl").open("a") as f:
            f.write(json.dumps({"event": kind, "unix": time.time(), **fields}) + "\n")

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._records:
            write_parquet(self._records, self.path / "metrics.parquet")
            plot_losses(self._records, self.path / "loss.png")


def write_parquet(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], label="main loss")
    if any(r.get("mtp_loss") for r in records):
        ax_loss.plot(steps, [r["mtp_loss"] for r in records], label="MTP loss", alpha=0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_vio.plot(steps, [r.get("max_vio", 0.0) for r in records], color="tab:red")
    ax_vio.set_xlabel("step")
    ax_vio.set_ylabel("MaxVio (mean over MoE layers)")
    ax_vio.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
