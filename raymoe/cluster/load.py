"""Read a cluster description of either kind: a Ray launcher YAML or a KubeRay manifest."""

from __future__ import annotations

from pathlib import Path

from raymoe.cluster.kuberay import cluster_from_kuberay
from raymoe.cluster.launcher import ClusterSpec, cluster_from_launcher, load_yaml


def load_cluster(path: str | Path) -> ClusterSpec:
    """A launcher YAML (``ray up`` file) or a KubeRay ``RayCluster``/``RayJob`` manifest, as a ``ClusterSpec``."""
    data = load_yaml(path)
    if data.get("apiVersion", "").startswith("ray.io/"):
        return cluster_from_kuberay(data, source=str(path))
    return cluster_from_launcher(data, source=str(path))
