"""Subword tokenizers: Hugging Face ``tokenizers`` byte-level BPE, trained here or brought as a ``tokenizer.json``.

Why byte-level BPE: it is what GPT-2, Llama 3 and DeepSeek-V3 use. Its base alphabet is the 256 bytes, so any
text encodes with no unknown token and decodes back exactly, and the merges learned on a corpus shorten
sequences 3-4x against raw bytes on code and English (measured: ``benchmarks/results/data_tokenizers.md``).

``train_bpe(texts, vocab_size)`` learns one (``raymoe train-tokenizer``); ``load_tokenizer(path)`` opens any
standard ``tokenizer.json`` (ours, or a published model's) and finds its BOS/EOS/PAD among the added special
tokens. Our own tokenizers put the specials first::

    0  <|bos|>    1  <|eos|>    2  <|pad|>    3..258  the 256 byte symbols    259..  learned merges

Two choices keep data preparation honest:
- special tokens are never produced from text: a corpus that happens to contain ``<|eos|>`` literally gets
  it as ordinary bytes (``encode_special_tokens``), and BOS/EOS are added per document by us, not by the
  tokenizer's post-processor;
- the tokenizer is identified by the SHA-256 of its file, which the dataset manifest and checkpoints record.

Legend: L = tokens of one document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from raymoe.data.tokenizer import ByteTokenizer, Tokenizer, TokenizerInfo, token_dtype

TOKENIZER_FILE = "tokenizer.json"
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
# Names published tokenizers use, most specific first (Llama 3, Mistral/Llama 2, GPT-2, BERT-likes).
BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>", "<｜begin▁of▁sentence｜>")
EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<｜end▁of▁sentence｜>")
PAD_NAMES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind raymoe's ``Tokenizer`` Protocol; build with ``load_tokenizer``."""

    def __init__(self, data: bytes, *, source: str, bos_id: int, eos_id: int, pad_id: int) -> None:
        from tokenizers import Tokenizer as _HF

        try:
            self._tok = _HF.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"tokenizer file {source} does not parse as a Hugging Face tokenizer.json: {exc}") from exc
        self._tok.encode_special_tokens = True  # text never turns into BOS/EOS/PAD, see the module docstring
        self._data = data
        self.source = source
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.dtype = token_dtype(self.vocab_size)
        model = json.loads(data).get("model", {}).get("type", "model") or "model"
        self.name = f"hf-{str(model).lower()}-{self.vocab_size}"
        self.sha256 = hashlib.sha256(data).hexdigest()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self.encode_array(text, add_bos=add_bos, add_eos=add_eos).tolist()

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        body = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(body, add_bos, add_eos)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, True, True) for e in encodings]

    def _wrap(self, body: list[int], add_bos: bool, add_eos: bool) -> np.ndarray:
        ids_L = np.empty(len(body) + int(add_bos) + int(add_eos), dtype=self.dtype)
        ids_L[int(add_bos) : len(ids_L) - int(add_eos)] = body
        if add_bos:
            ids_L[0] = self.bos_id
        if add_eos:
            ids_L[-1] = self.eos_id
        return ids_L

    def decode(self, ids) -> str:
        """Ids back to text; special ids are dropped."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
            bad = ids_N[(ids_N < 0) | (ids_N >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside {self.name}'s vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids_N.tolist(), skip_special_tokens=True)

    @property
    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            name=self.name, vocab_size=self.vocab_size, bos_id=self.bos_id, eos_id=self.eos_id,
            pad_id=self.pad_id, file=TOKENIZER_FILE, sha256=self.sha256,
        )

    def file_bytes(self) -> bytes | None:
        return self._data

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, name={self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path | None = None, *, bos: str | None = None, eos: str | None = None) -> Tokenizer:
    """The byte tokenizer for ``None``/``""``/``"byte"``; else the ``tokenizer.json`` at ``path`` (a file, or a
    directory holding one). ``bos``/``eos`` name the special tokens when the file's names are not the usual ones."""
    if path is None or str(path) in ("", "byte"):
        return ByteTokenizer()
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"directory {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ValueError(f"tokenizer not found: {where} (train one with `raymoe train-tokenizer`)")
    data = file.read_bytes()
    try:
        spec = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"tokenizer file {file} is not valid JSON: {exc}") from exc
    specials = _special_tokens(spec, file)
    bos_id = _pick(specials, bos, BOS_NAMES, "BOS", file)
    eos_id = _pick(specials, eos, EOS_NAMES, "EOS", file)
    pad_id = next((specials[n] for n in PAD_NAMES if n in specials), eos_id)
    return HFTokenizer(data, source=str(file), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def tokenizer_from_bytes(data: bytes, info: TokenizerInfo, *, source: str) -> Tokenizer:
    """Rebuild the tokenizer a manifest describes from its shipped file (ids taken from the record)."""
    if info.file is None:
        return ByteTokenizer()
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ValueError(f"tokenizer file {source} does not match the sha256 its manifest records ({info.sha256})")
    return HFTokenizer(data, source=source, bos_id=info.bos_id, eos_id=info.eos_id, pad_id=info.pad_id)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, progress: bool = True) -> HFTokenizer:
    """Learn a byte-level BPE with ``vocab_size`` ids (specials and the 256 byte symbols included)."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = len(SPECIALS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs >= {base} "
                         f"({len(SPECIALS)} special tokens + 256 bytes)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = _HF(models.BPE())
    # add_prefix_space=False: text is encoded exactly as written, so decoding gives it back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )
    seen = [0]

    def counted() -> Iterable[str]:
        for text in texts:
            seen[0] += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("train_bpe got no text: the corpus is empty")
    data = tok.to_str(pretty=True).encode("utf-8")
    return HFTokenizer(data, source="<trained>", bos_id=0, eos_id=1, pad_id=2)


def save_tokenizer(tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write ``tokenizer.json`` into directory ``out`` (created); returns the file."""
    data = tokenizer.file_bytes()
    if data is None:
        raise ValueError(f"{tokenizer!r} has no file to save: the byte tokenizer is selected by name")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    file = out / TOKENIZER_FILE
    tmp = out / f".{TOKENIZER_FILE}.tmp"
    tmp.write_bytes(data)
    tmp.replace(file)
    return file


def _special_tokens(spec: dict, file: Path) -> dict[str, int]:
    added = spec.get("added_tokens") if isinstance(spec, dict) else None
    if not isinstance(added, list):
        raise ValueError(f"tokenizer file {file} has no added_tokens list: not a Hugging Face tokenizer.json")
    return {t["content"]: int(t["id"]) for t in added if isinstance(t, dict) and t.get("special") and "content" in t}


def _pick(specials: dict[str, int], wanted: str | None, names: Sequence[str], what: str, file: Path) -> int:
    if wanted is not None:
        if wanted not in specials:
            raise ValueError(f"tokenizer file {file} has no special token {wanted!r} for {what}; "
                             f"its special tokens are {sorted(specials)}")
        return specials[wanted]
    for name in names:
        if name in specials:
            return specials[name]
    raise ValueError(f"tokenizer file {file}: cannot tell its {what} token (none of {list(names)}); its special "
                     f"tokens are {sorted(specials)}: name one with --{what.lower()}-token")
