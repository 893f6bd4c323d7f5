"""Does a raymoe layout fit a cluster definition, and how many nodes must the autoscaler bring up?

The question ``raymoe plan --cluster cluster/aws.yaml`` answers before anyone pays for instances. We replay,
on paper, what Ray does with the job's placement group:

1. The nodes that exist from the start are the head and every node type's ``min_workers``.
2. Bundles are packed onto nodes that already exist, first fit (Ray's PACK strategy keeps a pipeline's ranks
   on as few nodes as possible, which keeps expert all-to-all traffic inside a node where it can).
3. A bundle that fits nowhere makes the autoscaler launch a node. Like Ray's autoscaler we never launch a GPU
   node for a bundle that wants no GPU when a CPU type can hold it, and otherwise pick the type that holds the
   most such bundles per node (fewest nodes), within each type's ``max_workers`` and the cluster's.
4. A bundle that no node type can hold, or that needs nodes beyond the caps, makes the layout not fit; the
   reasons say which resource or which cap is short.

Memory is a separate, optional check: if a GPU node type declares ``raymoe/gpu-memory-gib``, we compare it with
the planner's parameters + gradients + optimizer bytes of the most loaded device (activations excluded, so a
pass is necessary, not sufficient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.cluster.bundles import DEFAULT_CPUS_PER_WORKER, placement_bundles, total_demand
from raymoe.cluster.launcher import ClusterSpec, NodeType
from raymoe.cluster.load import load_cluster
from raymoe.config import Config

_EPS = 1e-9


@dataclass
class _Node:
    node_type: NodeType
    free: dict[str, float]
    launched: bool
    """True if the autoscaler had to start it for this job (not the head, not a min_workers node)."""
    num_bundles: int = 0


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The outcome of packing the bundles onto the cluster."""

    fits: bool
    nodes_started: dict[str, int]
    """Node type -> nodes that exist before the job (head + min_workers)."""
    nodes_to_launch: dict[str, int]
    """Node type -> nodes the autoscaler must add for this job."""
    bundles_per_node_type: dict[str, int]
    unplaced: int
    reasons: tuple[str, ...] = field(default_factory=tuple)


def _holds(resources: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def _per_node(node_type: NodeType, bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` one empty node of ``node_type`` holds."""
    counts = [math.floor(node_type.resources.get(k, 0.0) / v + _EPS) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _choose_type(cluster: ClusterSpec, bundle: Mapping[str, float], launched: dict[str, int],
                 started: dict[str, int]) -> NodeType | None:
    num_workers = sum(launched.values()) + sum(n for t, n in started.items() if t != cluster.head.name)
    if num_workers >= cluster.max_workers:
        return None
    candidates = [t for t in cluster.worker_types
                  if _per_node(t, bundle) > 0 and started.get(t.name, 0) + launched.get(t.name, 0) < t.max_workers]
    if not bundle.get("GPU"):
        # Ray's autoscaler keeps CPU-only work off GPU nodes when it can (GPUs idle otherwise).
        candidates = [t for t in candidates if not t.num_gpus] or candidates
    # Most bundles per node first; among equals the node that wastes the least.
    return max(candidates, key=lambda t: (_per_node(t, bundle), -sum(t.resources.values())), default=None)


def place_bundles(cluster: ClusterSpec, bundles: list[dict]) -> Placement:
    started = {t.name: (1 if t.is_head else t.min_workers) for t in cluster.node_types}
    nodes = [_Node(node_type=t, free=dict(t.resources), launched=False)
             for t in cluster.node_types for _ in range(started[t.name])]
    launched: dict[str, int] = {}
    unplaced: list[dict] = []
    # Biggest bundles first (GPU, then CPU), as a packer would.
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
        node = next((n for n in nodes if _holds(n.free, bundle)), None)
        if node is None:
            chosen = _choose_type(cluster, bundle, launched, started)
            if chosen is None:
                unplaced.append(bundle)
                continue
            launched[chosen.name] = launched.get(chosen.name, 0) + 1
            node = _Node(node_type=chosen, free=dict(chosen.resources), launched=True)
            nodes.append(node)
        for key, amount in bundle.items():
            node.free[key] = node.free.get(key, 0.0) - amount
        node.num_bundles += 1
    per_type: dict[str, int] = {}
    for n in nodes:
        if n.num_bundles:
            per_type[n.node_type.name] = per_type.get(n.node_type.name, 0) + n.num_bundles
    return Placement(
        fits=not unplaced,
        nodes_started={k: v for k, v in started.items() if v},
        nodes_to_launch=launched,
        bundles_per_node_type=per_type,
        unplaced=len(unplaced),
        reasons=tuple(_why_unplaced(cluster, unplaced, launched, started)),
    )


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _why_unplaced(cluster: ClusterSpec, unplaced: list[dict], launched: dict[str, int],
                  started: dict[str, int]) -> list[str]:
    reasons = []
    shapes: dict[str, tuple[dict, int]] = {}
    for b in unplaced:
        shapes[_fmt(b)] = (b, shapes.get(_fmt(b), (b, 0))[1] + 1)
    for text, (bundle, count) in shapes.items():
        holders = [t for t in cluster.worker_types if _per_node(t, bundle) > 0]
        if not holders:
            offers = ", ".join(f"{t.name} {_fmt(t.resources)}" for t in cluster.worker_types) or "none"
            reasons.append(f"{count} worker bundle(s) {text} fit no worker node type (offered: {offers})")
            continue
        best = max(holders, key=lambda t: _per_node(t, bundle))
        more = math.ceil(count / _per_node(best, bundle))
        have = started.get(best.name, 0) + launched.get(best.name, 0)
        reasons.append(
            f"{count} worker bundle(s) {text} left over: they need {more} more {best.name} node(s) "
            f"({_per_node(best, bundle)} per node), i.e. {have + more} in all, but {best.name} allows "
            f"max_workers={best.max_workers} and the cluster max_workers={cluster.max_workers}"
        )
    return reasons


def _memory_check(config: Config, cluster: ClusterSpec, placement: Placement) -> dict | None:
    """Per-device bytes from the planner against the GPU memory of the node types the workers land on."""
    if config.parallel.device != "cuda":
        return None
    used = [t for t in cluster.node_types if t.name in placement.bundles_per_node_type and t.gpu_memory_gib]
    if not used:
        return None
    from raymoe.plan import BytesPerElement, Layout, count_params, plan_memory

    p = config.parallel
    layout = Layout(pp=p.pp, ep=p.ep, dp=p.dp, zero_stage=p.zero_stage, schedule=config.schedule.name,
                    stage_layers=tuple(p.stage_layers))
    params = count_params(config.model, top_k=config.routing.top_k, mtp_depth=config.mtp.depth)
    memory = plan_memory(params, layout, BytesPerElement.from_precision(config.precision),
                         num_routed_experts=config.model.num_routed_experts)
    peak_gib = memory.peak.total_bytes / 2**30
    smallest = min(t.gpu_memory_gib for t in used)
    return {"peak_device_gib": round(peak_gib, 2), "gpu_memory_gib": smallest, "fits": peak_gib <= smallest,
            "note": "parameters + gradients + optimizer state of the most loaded device; activations excluded"}


def fit_cluster(cluster: ClusterSpec, config: Config, *,
                cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER) -> dict:
    bundles = placement_bundles(config, cpus_per_worker=cpus_per_worker)
    placement = place_bundles(cluster, bundles)
    memory = _memory_check(config, cluster, placement) if placement.fits else None
    reasons = list(placement.reasons)
    if memory is not None and not memory["fits"]:
        reasons.append(f"the most loaded device needs {memory['peak_device_gib']} GiB for parameters, gradients "
                       f"and optimizer state, more than the {memory['gpu_memory_gib']} GiB of a GPU")
    p = config.parallel
    return {
        "cluster": cluster.name,
        "source": cluster.source,
        "layout": {"pp": p.pp, "ep": p.ep, "dp": p.dp, "device": p.device, "world_size": p.world_size},
        "bundle": bundles[0],
        "num_bundles": len(bundles),
        "demand": total_demand(bundles),
        "fits": placement.fits and (memory is None or memory["fits"]),
        "nodes_started": placement.nodes_started,
        "nodes_to_launch": placement.nodes_to_launch,
        "num_nodes_to_launch": sum(placement.nodes_to_launch.values()),
        "bundles_per_node_type": placement.bundles_per_node_type,
        "unplaced_bundles": placement.unplaced,
        "memory": memory,
        "reasons": reasons,
        "node_types": [{"name": t.name, "resources": dict(t.resources), "min_workers": t.min_workers,
                        "max_workers": t.max_workers, "head": t.is_head} for t in cluster.node_types],
    }


def fit_report(cluster_yaml_path: str | Path, config: Config, *,
               cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER) -> dict:
    """Load and validate a cluster file (launcher YAML or KubeRay manifest) and fit ``config``'s workers to it.

    Returns plain JSON-able values: ``fits``, ``nodes_to_launch`` (type -> count), ``num_nodes_to_launch``,
    ``reasons`` (empty when it fits) and the details ``format_fit_report`` prints.
    """
    return fit_cluster(load_cluster(cluster_yaml_path), config, cpus_per_worker=cpus_per_worker)


def format_fit_report(report: Mapping) -> str:
    lay = report["layout"]
    lines = [
        f"cluster {report['cluster']} ({report['source']}): pp={lay['pp']} ep={lay['ep']} dp={lay['dp']} on "
        f"{lay['device']} -> {report['num_bundles']} worker bundles of {_fmt(report['bundle'])} "
        f"(total {_fmt(report['demand'])})",
        "node types: " + "; ".join(
            f"{t['name']} {_fmt(t['resources'])}" + (" head" if t["head"] else
                                                     f" workers {t['min_workers']}..{t['max_workers']}")
            for t in report["node_types"]),
        "already up: " + (", ".join(f"{k} x{v}" for k, v in report["nodes_started"].items()) or "none"),
        "autoscaler must launch: " + (", ".join(f"{k} x{v}" for k, v in report["nodes_to_launch"].items())
                                      or "nothing") + f" ({report['num_nodes_to_launch']} node(s))",
        "workers per node type: " + (", ".join(f"{k}: {v}" for k, v in report["bundles_per_node_type"].items())
                                     or "none"),
    ]
    if report["memory"]:
        m = report["memory"]
        lines.append(f"memory: {m['peak_device_gib']} GiB on the most loaded device vs {m['gpu_memory_gib']} GiB "
                     f"per GPU ({m['note']})")
    lines.append("FITS" if report["fits"] else "DOES NOT FIT")
    lines += [f"  - {r}" for r in report["reasons"]]
    return "\n".join(lines)
