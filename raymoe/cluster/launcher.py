"""Ray cluster launcher YAMLs (``ray up cluster/aws.yaml``): load, validate, and read their node types.

A launcher YAML lists ``available_node_types``: each has the ``resources`` it advertises to the autoscaler
(``{CPU: 192, GPU: 8}``), a ``node_config`` for the cloud (instance type), and ``min_workers``/``max_workers``
bounds between which the autoscaler may scale it. ``head_node_type`` names the one type that runs the head.
Ray validates these files against a JSON schema shipped inside the ray package
(``ray/autoscaler/ray-schema.json``) plus a few cross-field rules; ``validate_cluster_config`` applies the same
schema and rules without importing ray (``import raymoe.cluster`` must stay light), so ``raymoe plan`` can
refuse a malformed file before anyone pays for instances.

Resources: the autoscaler can auto-detect CPU/GPU from an AWS instance type, but only when ``resources: {}``.
raymoe's fit check needs the numbers, so every node type in ``cluster/`` spells them out. A node type may also
carry the label ``raymoe/gpu-memory-gib`` (per GPU) so the fit check can compare it with ``raymoe plan``'s
per-device bytes.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GPU_MEMORY_LABEL = "raymoe/gpu-memory-gib"
"""Node label (launcher YAML ``labels``) with the memory of one GPU of that node type, in GiB."""

# Ray fills a missing global max_workers from its provider defaults (ray/autoscaler/*/defaults.yaml: 2).
_RAY_DEFAULT_MAX_WORKERS = 2


@dataclass(frozen=True, kw_only=True)
class NodeType:
    """One kind of node the autoscaler can run: what it offers and how many of it may exist."""

    name: str
    resources: Mapping[str, float]
    """Logical resources one node advertises, e.g. {"CPU": 192, "GPU": 8}."""
    min_workers: int = 0
    max_workers: int = 0
    is_head: bool = False
    """The head node exists exactly once; its min/max are not used."""
    gpu_memory_gib: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """The parts of a cluster definition that decide where workers can go."""

    name: str
    source: str
    """Where it came from: a file path, for messages."""
    node_types: tuple[NodeType, ...]
    max_workers: int
    """Global cap on worker nodes (the head excluded), as the launcher YAML's top-level ``max_workers``."""

    @property
    def head(self) -> NodeType:
        return next(t for t in self.node_types if t.is_head)

    @property
    def worker_types(self) -> tuple[NodeType, ...]:
        return tuple(t for t in self.node_types if not t.is_head)


def ray_schema_path() -> Path:
    """``ray/autoscaler/ray-schema.json`` of the installed ray, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("ray is not installed: cannot find ray/autoscaler/ray-schema.json to validate against")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        raise ValueError(f"the installed ray package has no autoscaler schema at {path}")
    return path


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"cluster file {str(path)!r} must hold a YAML mapping, got {type(data).__name__}")
    return data


def validate_cluster_config(config: Mapping, *, source: str = "cluster config") -> None:
    """Ray's own checks of a launcher config (the JSON schema, then its cross-field rules), plus ours.

    Raises ``ValueError`` listing every problem found, each with the path of the offending field.
    """
    import jsonschema

    schema = json.loads(ray_schema_path().read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '<top>'}: {err.message}"
        for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        raise ValueError(f"{source} does not match ray's cluster schema:\n  " + "\n  ".join(problems))
    problems = _cross_field_problems(config)
    if problems:
        raise ValueError(f"{source} is not a valid Ray cluster:\n  " + "\n  ".join(problems))


def _cross_field_problems(config: Mapping) -> list[str]:
    """What ray's ``validate_config`` checks after the schema, and what its autoscaler would trip over."""
    types = config.get("available_node_types")
    if not types:
        return ["available_node_types is missing: raymoe needs explicit node types to plan placement"]
    problems = []
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} must be one of available_node_types {sorted(types)}")
    global_max = config.get("max_workers", _RAY_DEFAULT_MAX_WORKERS)
    sum_min = sum(t.get("min_workers", 0) for t in types.values())
    if sum_min > global_max:
        problems.append(f"the min_workers of all node types add up to {sum_min} > max_workers ({global_max})")
    for name, node in types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", global_max)
        if lo < 0 or hi < lo:
            problems.append(f"available_node_types/{name}: needs 0 <= min_workers ({lo}) <= max_workers ({hi})")
        if not node["resources"] and name != head:
            problems.append(f"available_node_types/{name}: resources is empty; spell out CPU/GPU so placement "
                            f"can be planned")
        memory = (node.get("labels") or {}).get(GPU_MEMORY_LABEL)
        if memory is not None:
            try:
                float(memory)
            except ValueError:
                problems.append(f"available_node_types/{name}: label {GPU_MEMORY_LABEL}={memory!r} is not a number")
    return problems


def cluster_from_launcher(config: Mapping, *, source: str = "cluster config") -> ClusterSpec:
    """Validate a launcher config and read its node types."""
    validate_cluster_config(config, source=source)
    global_max = int(config.get("max_workers", _RAY_DEFAULT_MAX_WORKERS))
    head = config["head_node_type"]
    node_types = []
    for name, node in config["available_node_types"].items():
        labels = dict(node.get("labels") or {})
        memory = labels.get(GPU_MEMORY_LABEL)
        node_types.append(
            NodeType(
                name=name,
                resources=dict(node["resources"]),
                min_workers=int(node.get("min_workers", 0)),
                # A node type without its own cap is bounded only by the cluster-wide one.
                max_workers=int(node.get("max_workers", global_max)),
                is_head=name == head,
                gpu_memory_gib=float(memory) if memory is not None else None,
                labels=labels,
            )
        )
    return ClusterSpec(name=str(config["cluster_name"]), source=source, node_types=tuple(node_types),
                       max_workers=global_max)

