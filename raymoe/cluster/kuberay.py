"""KubeRay ``RayCluster`` / ``RayJob`` manifests read as node types, so the same fit check covers Kubernetes.

KubeRay turns each group into Ray nodes (pods): the head group into one head, every ``workerGroupSpecs`` entry
into ``minReplicas .. maxReplicas`` workers when in-tree autoscaling is on. A pod advertises the resources
KubeRay derives from its Ray container: CPUs from the container's ``cpu`` limit (rounded up), GPUs from its
``nvidia.com/gpu`` limit; ``rayStartParams`` ``num-cpus`` / ``num-gpus`` override both (``num-cpus: "0"`` on
the head keeps work off it). We read them the same way. There is no JSON schema for these CRDs inside the ray
package, so ``check_manifest`` enforces the structure KubeRay needs and we rely on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from raymoe.cluster.launcher import GPU_MEMORY_LABEL, ClusterSpec, NodeType

KINDS = ("RayCluster", "RayJob")


def parse_cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 4) in cores."""
    text = str(quantity).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def check_manifest(manifest: Mapping, *, source: str = "manifest") -> Mapping:
    """Return the RayCluster spec of a RayCluster or RayJob manifest; ValueError names what is missing."""
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{source}: kind must be one of {list(KINDS)}, got {kind!r}")
    if not str(manifest.get("apiVersion", "")).startswith("ray.io/"):
        raise ValueError(f"{source}: apiVersion must be ray.io/v1, got {manifest.get('apiVersion')!r}")
    spec = manifest.get("spec") or {}
    if kind == "RayJob":
        if not spec.get("entrypoint"):
            raise ValueError(f"{source}: a RayJob needs spec.entrypoint")
        spec = spec.get("rayClusterSpec") or {}
    problems = []
    if "headGroupSpec" not in spec:
        problems.append("headGroupSpec is missing")
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        name = group.get("groupName", f"#{i}")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        if hi is None or not 0 <= lo <= hi:
            problems.append(f"workerGroupSpecs/{name}: needs 0 <= minReplicas ({lo}) <= maxReplicas ({hi})")
        if not _ray_container(group):
            problems.append(f"workerGroupSpecs/{name}: template.spec.containers is empty")
    if not _ray_container(spec.get("headGroupSpec") or {}):
        problems.append("headGroupSpec: template.spec.containers is empty")
    if problems:
        raise ValueError(f"{source} is not a usable KubeRay manifest:\n  " + "\n  ".join(problems))
    return spec


def _ray_container(group: Mapping) -> Mapping | None:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    return containers[0] if containers else None  # KubeRay runs Ray in the first container


def _resources(group: Mapping) -> dict[str, float]:
    limits = (_ray_container(group).get("resources") or {}).get("limits") or {}
    params = group.get("rayStartParams") or {}
    resources: dict[str, float] = {}
    cpus = params.get("num-cpus", limits.get("cpu"))
    if cpus is not None:
        resources["CPU"] = float(math.ceil(parse_cpu(cpus)))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpus is not None and float(gpus) > 0:
        resources["GPU"] = float(gpus)
    return resources


def _node_type(name: str, group: Mapping, *, is_head: bool) -> NodeType:
    # The GPU memory hint rides on the pod template's labels (same key as in the launcher YAMLs).
    labels = dict(((group.get("template") or {}).get("metadata") or {}).get("labels") or {})
    memory = labels.get(GPU_MEMORY_LABEL)
    return NodeType(
        name=name,
        resources=_resources(group),
        min_workers=0 if is_head else int(group.get("minReplicas", 0)),
        max_workers=0 if is_head else int(group["maxReplicas"]),
        is_head=is_head,
        gpu_memory_gib=float(memory) if memory is not None else None,
        labels=labels,
    )


def cluster_from_kuberay(manifest: Mapping, *, source: str = "manifest") -> ClusterSpec:
    spec = check_manifest(manifest, source=source)
    types = [_node_type("head", spec["headGroupSpec"], is_head=True)]
    types += [_node_type(g.get("groupName", f"group{i}"), g, is_head=False)
              for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    # KubeRay has no cluster-wide cap: the sum of the groups' maxReplicas is the bound.
    total_max = sum(t.max_workers for t in types if not t.is_head)
    name = (manifest.get("metadata") or {}).get("name", "raycluster")
    return ClusterSpec(name=str(name), source=source, node_types=tuple(types), max_workers=total_max)
