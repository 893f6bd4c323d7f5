"""One checkpoint, many shards -> one ``.safetensors`` file of the whole model, for inference or a new layout.

Shards are cut by pipeline stage and repeated across replicas (dp ranks, DualPipe's mirrored copies, the tied
embedding), and a stage's parameters keep the full model's names. Consolidating is therefore a union by name;
every repeated tensor must be bitwise equal to its other copies (they take the same step), which is checked, and
the result must be exactly the parameter set of the model the manifest's config builds (checked on the ``meta``
device, nothing allocated), plus the routing biases. The optimizer state is not exported: a run started from an
export (``run.init_from``, any layout) starts its optimizer fresh.

safetensors stores raw tensors and a string-to-string header, so nothing in an export can execute on load. The
header carries the config (YAML) and the step, so an export is self-describing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raymoe.checkpoint.files import write_atomic
from raymoe.checkpoint.manifest import Manifest
from raymoe.checkpoint.shard import check_names_and_shapes, load_shard
from raymoe.data.provenance import export_metadata

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BIAS = "routing_bias_RE"
"""The aux-loss-free balancing biases (routers x experts): not parameters, but routing needs them at inference."""


def consolidate(checkpoint: Path) -> tuple[dict[str, torch.Tensor], Manifest]:
    """The full model's parameters from all shards of ``checkpoint`` (checksums verified, copies compared)."""
    from raymoe.checkpoint.compat import config_of
    from raymoe.model import build_model

    checkpoint = Path(checkpoint)
    manifest = Manifest.read(checkpoint)
    shapes = {n: p.shape for n, p in build_model(config_of(manifest), device="meta").named_parameters()}
    shards = ((s.rank, load_shard(checkpoint / s.file, rank=s.rank, sha256=s.sha256)["model"])
              for s in sorted(manifest.shards, key=lambda s: s.rank))
    return union_weights(shards, shapes, source=str(checkpoint)), manifest


def union_weights(shards, shapes: dict[str, torch.Size], *, source: str) -> dict[str, torch.Tensor]:
    """The union by name of ``(rank, {name: tensor})`` shards, every copy compared; exactly the names ``shapes``."""
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for rank, model in shards:
        for name, tensor in model.items():
            if name not in tensors:
                tensors[name], owner[name] = tensor, rank
            elif not torch.equal(tensors[name], tensor):
                raise ValueError(f"{source}: the copies of {name} on ranks {owner[name]} and {rank} "
                                 f"differ; replicas must be identical")
    check_names_and_shapes(shapes, {n: t.shape for n, t in tensors.items()}, source=source,
                           mismatch="shards do not add up to the model")
    return {name: tensors[name] for name in shapes}


def export_safetensors(checkpoint: Path, out: Path, *, dtype: str = "fp32") -> Path:
    """Write the consolidated model to ``out`` (atomically); ``dtype`` fp32 (the master weights) or bf16."""
    from safetensors.torch import save

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    tensors, manifest = consolidate(checkpoint)
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    tensors[BIAS] = torch.tensor(manifest.routing_bias_RE, dtype=torch.float32)  # fp32 always: a selection input
    metadata = {"format": "pt", "raymoe_step": str(manifest.step), "raymoe_config": manifest.config_yaml,
                **export_metadata(checkpoint)}  # the tokenizer, when the checkpoint carries one
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata=metadata)
    write_atomic(out, lambda f: f.write(blob))
    return out


def check_export(path: Path, config) -> None:
    """Before any worker starts: ``path`` is an export whose tensors are exactly ``config``'s model parameters
    (names and shapes, read from the header only) plus the routing biases; or a Hugging Face DeepSeek-V3
    directory of that model (``raymoe.interop.hf_import``)."""
    from raymoe.interop.hf_import import check_hf_dir, is_hf_dir
    from raymoe.model import build_model

    if is_hf_dir(path):
        return check_hf_dir(path, config)

    header = _header(path)
    model = build_model(config, device="meta")
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected[BIAS] = (model.num_routers(), config.model.num_routed_experts)
    check_names_and_shapes(expected, header, source=f"model export {str(path)!r}", mismatch="does not fit this model",
                           hint="; was it exported from another config?")


def read_tensors(path: Path, names) -> dict[str, torch.Tensor]:
    """Only the tensors ``names`` (a pipeline stage reads its own chunk's, not the whole model)."""
    from safetensors import safe_open

    from raymoe.interop.hf_import import is_hf_dir, read_hf_tensors

    if is_hf_dir(path):
        return read_hf_tensors(path, names)

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in names}


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model export {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


def load_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor, the header's metadata) of an export; ValueError naming the file if it is not one."""
    from safetensors import safe_open

    names = _header(path)  # checks that it exists and parses
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in names}, dict(f.metadata() or {})
