"""The manifest: what one checkpoint holds, written by the driver *last*, so its presence means "complete".

It is plain JSON (never pickle): the config that produced the run, the layout the shards were cut for, the
driver's own state (steps done, tokens seen, data cursor, the aux-loss-free routing biases) and, per worker
shard, its file name, size and SHA-256. Loading checks every field's type and every shard's checksum before
any tensor is touched, and names the file and the field when something is off.

Legend: R = routers (MoE layers + MTP MoE layers), E = routed experts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "raymoe-checkpoint"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The parallel layout the shards were cut for; resuming needs the same one (unless resharded)."""

    pp: int
    ep: int
    dp: int
    schedule: str
    num_microbatches: int
    stage_layers: list[int]
    zero_stage: int

    @classmethod
    def of(cls, config) -> Layout:
        p, s = config.parallel, config.schedule
        return cls(pp=p.pp, ep=p.ep, dp=p.dp, schedule=s.name, num_microbatches=s.num_microbatches,
                   stage_layers=list(p.stage_layers), zero_stage=p.zero_stage)

    def describe(self) -> str:
        split = f" stage_layers={self.stage_layers}" if self.stage_layers else ""
        return (f"{self.schedule} pp={self.pp} ep={self.ep} dp={self.dp} microbatches={self.num_microbatches} "
                f"zero={self.zero_stage}{split}")


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    rank: int
    pp_rank: int
    dp_rank: int
    file: str
    bytes: int
    sha256: str
    expert_ids: list[int] = field(default_factory=list)
    """Global ids of the routed experts in this shard (expert parallelism; empty: all of the rank's stage)."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    step: int
    """Optimizer steps completed; a resumed run's next step has this index."""
    tokens_seen: int
    data_cursor: dict
    routing_bias_RE: list[list[float]]
    config_yaml: str
    layout: Layout
    shards: list[ShardEntry]
    created_unix: float
    versions: dict = field(default_factory=dict)
    expert_placement: list[int] = field(default_factory=list)
    """Expert parallelism: the ep rank of every routed expert (global id -> ep rank); empty without EP."""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data, *, source: str = "manifest") -> Manifest:
        """Validate ``data`` field by field; ValueError names ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a raymoe checkpoint manifest (format={data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{source}: manifest version {data.get('version')!r}, this raymoe reads {VERSION}")
        try:
            layout = Layout(**_typed(data, "layout", dict, source))
            shards = [ShardEntry(**entry) for entry in _typed(data, "shards", list, source)]
        except TypeError as exc:
            raise ValueError(f"{source}: malformed layout or shard entry ({exc})") from None
        for name, kind in (("pp", int), ("ep", int), ("dp", int), ("schedule", str), ("num_microbatches", int),
                           ("stage_layers", list), ("zero_stage", int)):
            _check_type(getattr(layout, name), kind, f"layout.{name}", source)
        for i, shard in enumerate(shards):
            for name, kind in (("rank", int), ("pp_rank", int), ("dp_rank", int), ("file", str), ("bytes", int),
                               ("sha256", str)):
                _check_type(getattr(shard, name), kind, f"shards[{i}].{name}", source)
            if "/" in shard.file or shard.file.startswith("."):  # a shard lives inside its checkpoint directory
                raise ValueError(f"{source}: shards[{i}].file {shard.file!r} must be a plain file name")
        if min(layout.pp, layout.ep, layout.dp) < 1:
            raise ValueError(f"{source}: layout {layout.describe()} needs pp, ep and dp >= 1")
        workers = layout.pp * layout.dp  # expert parallelism is carved out of dp: ep adds no workers
        ranks = sorted(s.rank for s in shards)
        if len(ranks) != workers or ranks != list(range(workers)):  # length first: never build a huge range
            raise ValueError(f"{source}: shard ranks {ranks[:8]} do not cover the {workers} workers of "
                             f"{layout.describe()}")
        bias = _typed(data, "routing_bias_RE", list, source)
        if not all(isinstance(row, list) and all(isinstance(v, (int, float)) for v in row) for row in bias):
            raise ValueError(f"{source}: routing_bias_RE must be a list of lists of numbers")
        step = _typed(data, "step", int, source)
        tokens = _typed(data, "tokens_seen", int, source)
        if step < 0 or tokens < 0:
            raise ValueError(f"{source}: step ({step}) and tokens_seen ({tokens}) must be >= 0")
        return cls(
            step=step, tokens_seen=tokens, data_cursor=_typed(data, "data_cursor", dict, source),
            routing_bias_RE=bias, config_yaml=_typed(data, "config_yaml", str, source), layout=layout,
            shards=shards, created_unix=float(_typed(data, "created_unix", (int, float), source)),
            versions=_typed(data, "versions", dict, source), expert_placement=_placement(data, layout, source),
        )

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(f"{str(path)!r} does not exist: {str(directory)!r} is not a complete checkpoint")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(path)!r} is not valid JSON (truncated or corrupt?): {exc}") from None
        return cls.from_dict(data, source=str(path))


def _placement(data: dict, layout: Layout, source: str) -> list[int]:
    placement = data.get("expert_placement", [])
    _check_type(placement, list, "expert_placement", source)
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < layout.ep for r in placement):
        raise ValueError(f"{source}: expert_placement must list an ep rank in 0..{layout.ep - 1} for every expert")
    return placement


def _typed(data: dict, key: str, kind, source: str):
    if key not in data:
        raise ValueError(f"{source}: missing field {key!r}")
    _check_type(data[key], kind, key, source)
    return data[key]


def _check_type(value, kind, name: str, source: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):  # bool is an int in Python; never a count here
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{source}: field {name!r} must be {expected}, got {value!r}")
