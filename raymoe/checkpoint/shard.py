"""One worker's shard: its stage's parameters, its optimizer partition and its RNG state, in one ``.pt`` file.

Saved with ``torch.save`` of plain containers and tensors only, and loaded with ``weights_only=True``: loading a
checkpoint can never run code hidden in a pickle. The optimizer part is whatever the worker's optimizer returns
from ``state_dict()`` (``raymoe.zero``: torch AdamW's state for the local twin; for DeepSpeed ZeRO the rank's flat
fp32 master partition and the AdamW state over it), restricted to the same safe types.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raymoe.checkpoint.files import sha256_file, write_atomic

SHARD_FORMAT = 1


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_shard(directory: Path, rank: int, *, model: dict[str, torch.Tensor], optimizer: dict) -> dict:
    """Write ``rank``'s shard into ``directory`` atomically; returns its manifest entry fields."""
    path = Path(directory) / shard_name(rank)
    payload = {
        "format": SHARD_FORMAT,
        "rank": rank,
        "model": {name: t.detach().cpu() for name, t in model.items()},
        "optimizer": optimizer,
        "rng": rng_state(),
    }
    write_atomic(path, lambda f: torch.save(payload, f))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_shard(path: Path, *, rank: int, sha256: str | None = None) -> dict:
    """Read a shard after checking its checksum; ValueError names the file when it is corrupt or not ``rank``'s."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint shard {str(path)!r} is missing")
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        raise ValueError(f"checkpoint shard {str(path)!r} is corrupt: sha256 {actual[:16]}... but the manifest "
                         f"says {sha256[:16]}...")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, or a pickle that asks for anything but tensors and containers
        raise ValueError(f"checkpoint shard {str(path)!r} cannot be read safely: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != SHARD_FORMAT or payload.get("rank") != rank:
        got = payload.get("rank") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint shard {str(path)!r} is not rank {rank}'s shard (found {got!r})")
    return payload


def check_names_and_shapes(expected: dict[str, tuple], found: dict[str, tuple], *, source: str, mismatch: str,
                           hint: str = "") -> None:
    """ValueError unless ``found`` has exactly the names of ``expected`` with the same shapes; ``mismatch`` says
    what a name mismatch means, ``hint`` what may have caused it."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: {mismatch} (missing {missing[:4]}, unexpected {extra[:4]}){hint}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(found[name])}, the model's is {tuple(shape)}")


def copy_parameters(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy saved tensors into live parameters, in place, after checking the names and shapes all agree."""
    check_names_and_shapes({n: p.shape for n, p in params.items()}, {n: t.shape for n, t in saved.items()},
                           source=source, mismatch="parameters do not match this stage",
                           hint="; was the checkpoint saved with another model or layout?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
