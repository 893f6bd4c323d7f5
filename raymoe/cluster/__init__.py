"""A Ray cluster definition, seen from a raymoe config: will this layout fit, and what must autoscaling add?

    from raymoe.cluster import fit_report, format_fit_report
    report = fit_report("cluster/aws.yaml", load_config("671b"))
    report["fits"], report["nodes_to_launch"]      # True, {"gpu_h100": 256}
    print(format_fit_report(report))

``launcher.py`` loads ``ray up`` YAMLs and validates them against the schema inside the installed ray package;
``kuberay.py`` reads KubeRay ``RayCluster``/``RayJob`` manifests into the same node types; ``bundles.py`` says
what each worker reserves; ``fit.py`` packs the bundles onto the node types like Ray's placement group and
autoscaler would. Pure Python and PyYAML: nothing here imports ray.
"""

from raymoe.cluster.bundles import DEFAULT_CPUS_PER_WORKER, placement_bundles, total_demand
from raymoe.cluster.fit import Placement, fit_cluster, fit_report, format_fit_report, place_bundles
from raymoe.cluster.kuberay import check_manifest, cluster_from_kuberay
from raymoe.cluster.launcher import (
    GPU_MEMORY_LABEL,
    ClusterSpec,
    NodeType,
    cluster_from_launcher,
    load_yaml,
    ray_schema_path,
    validate_cluster_config,
)
from raymoe.cluster.load import load_cluster

__all__ = [
    "DEFAULT_CPUS_PER_WORKER",
    "GPU_MEMORY_LABEL",
    "ClusterSpec",
    "NodeType",
    "Placement",
    "check_manifest",
    "cluster_from_kuberay",
    "cluster_from_launcher",
    "fit_cluster",
    "fit_report",
    "format_fit_report",
    "load_cluster",
    "load_yaml",
    "place_bundles",
    "placement_bundles",
    "ray_schema_path",
    "total_demand",
    "validate_cluster_config",
]
