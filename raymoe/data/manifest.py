"""``manifest.json``: what a token dataset directory holds, checked before any shard is opened.

Format ``raymoe.tokens`` version 2 (version 1, written before subword tokenizers, is still read)::

    {"format": "raymoe.tokens", "version": 2,
     "tokenizer": {"name", "vocab_size", "bos_id", "eos_id", "pad_id", "file", "sha256"},
     "token_dtype": "uint16", "num_documents", "num_tokens",
     "holdout": {"dir": "holdout", "fraction": 0.01} | null,        # only in a dataset written with --holdout
     "shards": [{"file", "num_documents", "num_tokens", "num_bytes", "sha256", "row_group_tokens": [...]}]}

``row_group_tokens`` (new in v2) lets the lazy reader find the row group holding any token position without
opening a shard; for v1 shards it is computed once at open from the files. ``tokenizer.file`` names the
tokenizer copied next to the shards (``tokenizer.json``; null for the byte tokenizer), ``sha256`` its hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from raymoe.data.tokenizer import TokenizerInfo, token_dtype

MANIFEST = "manifest.json"
FORMAT = "raymoe.tokens"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    file: str
    num_documents: int
    num_tokens: int
    num_bytes: int
    sha256: str
    row_group_tokens: tuple[int, ...] | None = None
    """Tokens in each Parquet row group, in order; None in v1 manifests."""


@dataclass(frozen=True, kw_only=True)
class HoldoutInfo:
    dir: str
    """Sub-directory holding the held-out split, itself an ordinary dataset directory."""
    fraction: float


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """What ``manifest.json`` says about a dataset; ``path`` is where it was found (not stored in it)."""

    path: Path
    tokenizer: TokenizerInfo
    token_dtype: str
    num_documents: int
    num_tokens: int
    shards: tuple[ShardInfo, ...]
    holdout: HoldoutInfo | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def to_manifest(self) -> dict:
        shards = []
        for s in self.shards:
            entry = asdict(s)
            entry["row_group_tokens"] = None if s.row_group_tokens is None else list(s.row_group_tokens)
            shards.append(entry)
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": self.tokenizer.to_dict(),
            "token_dtype": self.token_dtype,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "holdout": None if self.holdout is None else asdict(self.holdout),
            "shards": shards,
        }

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict) -> DatasetInfo:
        where = path / MANIFEST
        if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{where}: expected format {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}, "
                f"got {manifest.get('format')!r} version {manifest.get('version')!r}"
            )
        _check_fields(where, manifest)
        try:
            holdout = manifest.get("holdout")
            info = cls(
                path=path,
                tokenizer=TokenizerInfo.from_dict(manifest["tokenizer"]),
                token_dtype=str(manifest["token_dtype"]),
                num_documents=int(manifest["num_documents"]),
                num_tokens=int(manifest["num_tokens"]),
                shards=tuple(_shard(s) for s in manifest["shards"]),
                holdout=None if holdout is None else HoldoutInfo(dir=str(holdout["dir"]),
                                                                 fraction=float(holdout["fraction"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where} is malformed: {exc!r}") from exc
        _check_totals(info, where)
        return info


def _field(where: Path, record: dict, key: str, kind: type, prefix: str = "", *, optional: bool = False):
    """``record[key]`` if it is there and of type ``kind`` (an int must be a non-negative JSON integer), else a
    ValueError naming the field (``int("lots")`` or ``sum`` over a string would name nothing)."""
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise ValueError(f"{where} is malformed: field '{prefix}{key}' is missing")
    value = record[key]
    ok = isinstance(value, kind) and not (kind is int and (isinstance(value, bool) or value < 0))
    if not ok:
        expected = "a non-negative integer" if kind is int else f"a JSON {kind.__name__}".replace("dict", "object")
        raise ValueError(f"{where} is malformed: field '{prefix}{key}' must be {expected}, got {value!r}")
    return value


def _check_fields(where: Path, manifest: dict) -> None:
    """Every field the manifest needs, of the right JSON type, before anything is computed from it."""
    tok = _field(where, manifest, "tokenizer", dict)
    for key in ("vocab_size", "bos_id", "eos_id"):
        _field(where, tok, key, int, "tokenizer.")
    _field(where, tok, "name", str, "tokenizer.")
    _field(where, tok, "pad_id", int, "tokenizer.", optional=True)
    for key in ("file", "sha256"):
        _field(where, tok, key, str, "tokenizer.", optional=True)
    _field(where, manifest, "token_dtype", str)
    _field(where, manifest, "num_documents", int)
    _field(where, manifest, "num_tokens", int)
    for index, shard in enumerate(_field(where, manifest, "shards", list)):
        prefix = f"shards[{index}]."
        if not isinstance(shard, dict):
            raise ValueError(f"{where} is malformed: shards[{index}] must be a JSON object, got {shard!r}")
        for key in ("num_documents", "num_tokens", "num_bytes"):
            _field(where, shard, key, int, prefix)
        for key in ("file", "sha256"):
            _field(where, shard, key, str, prefix)
        groups = _field(where, shard, "row_group_tokens", list, prefix, optional=True)
        if groups is not None and not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                          for g in groups):
            raise ValueError(f"{where} is malformed: field '{prefix}row_group_tokens' must list non-negative "
                             f"integers, got {groups!r}")
    holdout = _field(where, manifest, "holdout", dict, optional=True)
    if holdout is not None:
        _field(where, holdout, "dir", str, "holdout.")
        fraction = holdout.get("fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"{where} is malformed: field 'holdout.fraction' must be a number, got {fraction!r}")


def read_manifest(path: str | Path) -> DatasetInfo:
    """Parse and check ``path/manifest.json`` (cheap: no shard is opened)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset directory {path} does not exist")
    where = path / MANIFEST
    if not where.is_file():
        raise ValueError(
            f"{path} is not a raymoe dataset: {MANIFEST} is missing (write one with `raymoe prepare-data`)"
        )
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(manifest).__name__}")
    return DatasetInfo.from_manifest(path, manifest)


def _shard(entry: dict) -> ShardInfo:
    groups = entry.get("row_group_tokens")
    return ShardInfo(
        file=str(entry["file"]),
        num_documents=int(entry["num_documents"]),
        num_tokens=int(entry["num_tokens"]),
        num_bytes=int(entry["num_bytes"]),
        sha256=str(entry["sha256"]),
        row_group_tokens=None if groups is None else tuple(int(g) for g in groups),
    )


def _check_totals(info: DatasetInfo, where: Path) -> None:
    if not info.shards:
        raise ValueError(f"{where} lists no shards")
    if sum(s.num_tokens for s in info.shards) != info.num_tokens:
        raise ValueError(f"{where}: shard token counts do not add up to num_tokens={info.num_tokens}")
    if sum(s.num_documents for s in info.shards) != info.num_documents:
        raise ValueError(f"{where}: shard document counts do not add up to num_documents={info.num_documents}")
    for s in info.shards:
        if s.row_group_tokens is not None and sum(s.row_group_tokens) != s.num_tokens:
            raise ValueError(f"{where}: {s.file}'s row_group_tokens do not add up to its {s.num_tokens} tokens")
        if "/" in s.file or s.file.startswith("."):  # a manifest must never point outside its directory
            raise ValueError(f"{where}: shard file name {s.file!r} is not a plain file name")
    if info.token_dtype != str(token_dtype(info.vocab_size)):
        raise ValueError(f"{where}: token_dtype {info.token_dtype} does not match vocab_size {info.vocab_size}")
