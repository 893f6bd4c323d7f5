"""The tokenizer travels with the model: what checkpoints and exports record about the data's tokenizer.

A checkpoint directory gets, next to its shards, ``tokenizer_info.json`` (the dataset manifest's tokenizer
record: name, vocab size, special ids, file hash) and, for a subword tokenizer, ``tokenizer.json`` itself, so a
trained model can be used later without guessing how its ids were made. A safetensors export carries both in
its header (``raymoe_tokenizer_info``, ``raymoe_tokenizer``). The checkpoint code calls ``write_tokenizer_files``
and ``export_metadata`` once each; everything else about tokenizers stays in ``raymoe.data``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raymoe.data.bpe import TOKENIZER_FILE, tokenizer_from_bytes
from raymoe.data.dataset import dataset_tokenizer
from raymoe.data.tokenizer import Tokenizer, TokenizerInfo

INFO_FILE = "tokenizer_info.json"


def data_tokenizer(config_yaml: str) -> tuple[TokenizerInfo, bytes | None]:
    """The tokenizer record and file of the dataset that ``config_yaml`` (a run's resolved config) trains on."""
    config = yaml.safe_load(config_yaml) or {}
    path = str((config.get("data") or {}).get("path") or "")
    info = dataset_tokenizer(path)
    if info.file is None:
        return info, None
    file = Path(path) / info.file
    if not file.is_file():
        raise ValueError(f"dataset {path!r} records tokenizer file {info.file} but {file} is missing")
    data = file.read_bytes()
    tokenizer_from_bytes(data, info, source=str(file))  # checks the hash (and that it parses)
    return info, data


def write_tokenizer_files(directory: Path, config_yaml: str) -> None:
    """Into a checkpoint being staged: ``tokenizer_info.json`` and, if the tokenizer has one, its file."""
    info, data = data_tokenizer(config_yaml)
    if data is not None:
        (directory / TOKENIZER_FILE).write_bytes(data)
    (directory / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")


def read_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint (or a dataset directory) was made with, rebuilt from the files it carries."""
    directory = Path(directory)
    record = directory / INFO_FILE
    if not record.is_file():
        raise ValueError(f"{directory} carries no {INFO_FILE} (checkpoints saved before tokenizers were recorded)")
    info = TokenizerInfo.from_dict(json.loads(record.read_text()))
    data = (directory / info.file).read_bytes() if info.file else None
    return tokenizer_from_bytes(data or b"", info, source=str(directory / (info.file or INFO_FILE)))


def export_metadata(checkpoint: Path) -> dict[str, str]:
    """safetensors header entries for an export of ``checkpoint`` (nothing for checkpoints without a record)."""
    record = Path(checkpoint) / INFO_FILE
    if not record.is_file():
        return {}
    info = json.loads(record.read_text())
    out = {"raymoe_tokenizer_info": json.dumps(info)}
    if info.get("file"):
        out["raymoe_tokenizer"] = (Path(checkpoint) / info["file"]).read_text(encoding="utf-8")
    return out
