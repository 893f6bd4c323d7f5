"""Field checks shared by every config section (``raymoe/config/schema.py``): finite numbers within int64,
bounded counts, path shapes, the Ray address, and the small positive / non-negative / one-of helpers. Each
raises ``ValueError`` naming the key and the offending value."""

from __future__ import annotations

import math
from dataclasses import fields

MAX_INT = 2**63 - 1
"""Every integer field fits int64: torch and numpy index, seed and count with it, and a larger value would fail
deep inside them (``torch.empty`` overflows) instead of here."""
MAX_LAYERS = 10_000
"""Transformer layers (DeepSeek-V3: 61). The planner, the stage plan and the router slots loop over layers, so a
count like 10**12 would hang the checks that should refuse it; anything that large could never be built anyway."""
MAX_MTP_DEPTH = 64
MAX_MICROBATCHES = 16_384
"""Schedules are generated as explicit action lists (about 2 x pp x microbatches actions)."""
MAX_TIMEOUT_S = 2.0**31
"""Timeouts beyond ~68 years overflow the timers Ray and threading use; 0 already means "no limit"."""


def _check_numbers(section: object, owner: str) -> None:
    """Non-finite floats (nan, inf, 1e400) and integers beyond int64 are refused in every section, whatever the
    field: nan slips through every ``<``/``>`` comparison below (``nan <= 0`` is False), so it would otherwise
    train silently (``optim.grad_clip=nan``) or fail only at step 0 inside the workers."""
    for f in fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{owner}.{f.name} must be a finite number, got {v}")
            if isinstance(v, int) and abs(v) > MAX_INT:
                raise ValueError(f"{owner}.{f.name} must fit in int64 (|value| <= 2**63-1), got {v}")


NAME_MAX = 255
"""Longest file name (one path component) Linux file systems accept."""


def check_path_shape(key: str, path: str) -> None:
    """What can be said about a path without touching the file system: no NUL byte, no component longer than
    the file system allows (``OSError: File name too long`` otherwise comes only when the first file is written)."""
    if "\0" in path:
        raise ValueError(f"{key} must not contain a NUL byte, got {path!r}")
    for part in path.split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ValueError(f"{key}: the name {part[:40]!r}... is {len(part.encode())} bytes long; file systems "
                             f"allow at most {NAME_MAX} per path component")


def check_ray_address(address: str) -> None:
    """``run.ray_address``: empty (a local Ray, or RAY_ADDRESS), ``auto``, ``HOST:PORT`` (a head's GCS) or
    ``ray://HOST:PORT`` (Ray Client). Whether something answers there is checked before ``ray.init``."""
    if address in ("", "auto"):
        return
    rest = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "://" in rest:
        raise ValueError(f"run.ray_address must be '', 'auto', HOST:PORT or ray://HOST:PORT with a port in "
                         f"1-65535, got {address!r}")


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def _non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


def _at_most(owner: str, **values: tuple[int, int]) -> None:
    for name, (value, limit) in values.items():
        if value > limit:
            raise ValueError(f"{owner}.{name} must be <= {limit:,}, got {value:,}")


def _one_of(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")
