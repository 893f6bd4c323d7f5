"""Where a benchmark's results go: ``out_dir/<name>.json`` (everything measured) and ``out_dir/<name>.md`` (the
table the README quotes), written the same way by every benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: Path | str, name: str, results: dict) -> Path:
    """Write ``results`` (with its ``markdown`` entry) as ``<name>.json`` and ``<name>.md``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(results["markdown"] + "\n")
    return out_dir
