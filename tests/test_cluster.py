"""Cluster definitions: the shipped YAMLs are valid for ray, and raymoe layouts are fitted to their node types."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from raymoe.cluster import (
    ClusterSpec,
    NodeType,
    check_manifest,
    cluster_from_launcher,
    fit_cluster,
    fit_report,
    format_fit_report,
    load_cluster,
    placement_bundles,
    validate_cluster_config,
)
from raymoe.cluster.kuberay import parse_cpu
from raymoe.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY_YAMLS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
GPU_JOB = REPO / "jobs" / "configs" / "gpu_pretrain.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_shipped_cluster_files_exist():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY_YAMLS} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import validate_config

    config = _load(path)
    validate_config(copy.deepcopy(config))  # the installed ray's schema and cross-field rules
    validate_cluster_config(config, source=path.name)  # ours: the same schema, found without importing ray
    cluster = load_cluster(path)
    kinds = {t.name: t for t in cluster.worker_types}
    assert cluster.head.resources == {"CPU": 0}, "training workers must not land on the head"
    assert any(t.num_gpus == 0 and t.resources.get("CPU") for t in kinds.values()), "a CPU worker type"
    assert any(t.num_gpus == 8 for t in kinds.values()), "an 8-GPU worker type"
    for t in kinds.values():
        assert t.min_workers == 0 < t.max_workers, f"{t.name} must autoscale from zero"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["available_node_types"]["gpu_h100"]["resources"].update(GPU="8"), "resources/GPU"),
        (lambda c: c["available_node_types"]["gpu_h100"].update(max_nodes=3), "max_nodes"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type 'nope'"),
        (lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=9, max_workers=2), "min_workers"),
        (lambda c: c.update(max_workers=1) or c["available_node_types"]["cpu_worker"].update(min_workers=2),
         r"add up to 2 > max_workers \(1\)"),
        (lambda c: c.pop("provider"), "'provider' is a required property"),
    ],
)
def test_a_malformed_launcher_config_is_refused_with_the_field(edit, message):
    config = _load(REPO / "cluster" / "aws.yaml")
    edit(config)
    with pytest.raises(ValueError, match=message):
        validate_cluster_config(config)


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifests_read_as_node_types(path):
    cluster = load_cluster(path)
    assert cluster.head.resources == {"CPU": 0}
    gpu = next(t for t in cluster.worker_types if t.num_gpus)
    assert gpu.resources == {"CPU": 180, "GPU": 8} and gpu.gpu_memory_gib == 80
    assert gpu.min_workers == 0 < gpu.max_workers


def test_kuberay_manifest_without_bounds_is_refused():
    manifest = _load(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    del manifest["spec"]["workerGroupSpecs"][1]["maxReplicas"]
    with pytest.raises(ValueError, match="gpu-h100: needs 0 <= minReplicas"):
        check_manifest(manifest)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_manifest({"apiVersion": "ray.io/v1", "kind": "RayService"})
    assert parse_cpu("500m") == 0.5 and parse_cpu(8) == 8.0


def test_bundles_are_one_per_worker_as_the_runtime_reserves_them():
    import inspect

    from raymoe.cluster import DEFAULT_CPUS_PER_WORKER
    from raymoe.runtime.worker_group import WorkerGroup

    runtime = inspect.signature(WorkerGroup.__init__).parameters
    assert runtime["num_cpus_per_worker"].default == DEFAULT_CPUS_PER_WORKER
    assert runtime["strategy"].default == "PACK"  # what fit.py replays
    cpu = load_config("debug", ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "schedule.num_microbatches=2"])
    assert placement_bundles(cpu) == [{"CPU": 1.0}] * 4
    gpu = load_config(None, config_file=GPU_JOB)
    assert placement_bundles(gpu) == [{"CPU": 1.0, "GPU": 1.0}] * 16
    assert placement_bundles(gpu, cpus_per_worker=0) == [{"GPU": 1.0}] * 16
    with pytest.raises(ValueError, match="cpus_per_worker must be > 0 on CPU"):
        placement_bundles(cpu, cpus_per_worker=0)


@pytest.mark.parametrize("cluster_file", ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_the_gpu_job_fits_every_shipped_cluster_on_two_nodes(cluster_file):
    report = fit_report(REPO / "cluster" / cluster_file, load_config(None, config_file=GPU_JOB))
    assert report["fits"], report["reasons"]
    assert report["num_nodes_to_launch"] == 2  # 16 GPUs = 2 nodes of 8
    assert sum(report["bundles_per_node_type"].values()) == 16
    assert report["memory"]["fits"] and report["memory"]["peak_device_gib"] < 80
    assert "FITS" in format_fit_report(report)


def test_deepseek_v3_layout_needs_256_h100_nodes():
    report = fit_report(REPO / "cluster" / "aws.yaml", load_config("671b"))
    assert report["fits"] and report["nodes_to_launch"] == {"gpu_h100": 256}
    assert report["demand"] == {"GPU": 2048.0, "CPU": 2048.0}


def test_a_layout_too_big_for_the_caps_is_reported():
    report = fit_report(REPO / "cluster" / "kuberay" / "rayjob.yaml", load_config("671b"))
    assert not report["fits"]
    assert report["unplaced_bundles"] == 2048 - 16
    assert "need 254 more gpu-h100 node(s)" in report["reasons"][0]
    assert "max_workers=2" in report["reasons"][0]
    assert "DOES NOT FIT" in format_fit_report(report)


def test_a_layout_whose_devices_overflow_gpu_memory_is_reported():
    report = fit_report(REPO / "cluster" / "aws.yaml", load_config("16b"))  # 16B on one GPU
    assert not report["fits"] and report["unplaced_bundles"] == 0
    assert "GiB for parameters, gradients and optimizer state" in report["reasons"][0]


def _cluster(*types: NodeType, max_workers: int = 10) -> ClusterSpec:
    head = NodeType(name="head", resources={"CPU": 0}, is_head=True)
    return ClusterSpec(name="t", source="test", node_types=(head, *types), max_workers=max_workers)


def test_cpu_work_stays_off_gpu_nodes_and_uses_running_nodes_first():
    cpu = NodeType(name="cpu", resources={"CPU": 4}, min_workers=1, max_workers=3)
    gpu = NodeType(name="gpu", resources={"CPU": 64, "GPU": 8}, max_workers=3)
    config = load_config("debug", ["parallel.pp=2", "parallel.dp=3", "schedule.num_microbatches=1",
                                    "data.batch_size=6"])  # 6 workers
    report = fit_cluster(_cluster(gpu, cpu), config)
    assert report["fits"]
    assert report["nodes_started"] == {"head": 1, "cpu": 1}
    assert report["nodes_to_launch"] == {"cpu": 1}  # 4 on the running node + 2 on one new CPU node, no GPU node
    assert report["bundles_per_node_type"] == {"cpu": 6}


def test_gpu_work_on_a_cpu_only_cluster_fits_no_node_type():
    cpu = NodeType(name="cpu", resources={"CPU": 32}, max_workers=3)
    report = fit_cluster(_cluster(cpu), load_config(None, config_file=GPU_JOB))
    assert not report["fits"] and report["unplaced_bundles"] == 16
    assert "fit no worker node type (offered: cpu {CPU: 32})" in report["reasons"][0]
    # with 24 CPUs per worker only 2 workers fit an 8-GPU node of 64 CPUs
    gpu = NodeType(name="gpu", resources={"CPU": 64, "GPU": 8}, max_workers=8)
    report = fit_cluster(_cluster(gpu), load_config(None, config_file=GPU_JOB), cpus_per_worker=24)
    assert report["fits"] and report["nodes_to_launch"] == {"gpu": 8}


def test_the_global_max_workers_caps_autoscaling():
    gpu = NodeType(name="gpu", resources={"CPU": 64, "GPU": 8}, max_workers=10)
    report = fit_cluster(_cluster(gpu, max_workers=1), load_config(None, config_file=GPU_JOB))
    assert not report["fits"] and report["nodes_to_launch"] == {"gpu": 1} and report["unplaced_bundles"] == 8


def test_launcher_defaults_follow_ray():
    config = _load(REPO / "cluster" / "aws.yaml")
    del config["available_node_types"]["cpu_worker"]["max_workers"]
    cluster = cluster_from_launcher(config)
    cpu = next(t for t in cluster.worker_types if t.name == "cpu_worker")
    assert cpu.max_workers == config["max_workers"]  # a type without its own cap has the cluster's


@pytest.mark.parametrize("name", ["cpu_smoke.yaml", "cpu_ep.yaml", "gpu_pretrain.yaml"])
def test_job_configs_are_layouts_the_runtime_accepts(name):
    from raymoe.runtime.driver import validate_layout

    config = load_config(None, config_file=REPO / "jobs" / "configs" / name)
    validate_layout(config)  # raises ValueError naming what the runtime refuses
    assert config.run.out_dir.startswith("/"), "a job's working dir is a temporary copy: use an absolute out_dir"
