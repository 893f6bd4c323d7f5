"""The dashboard metrics reach Prometheus: a real head's metrics endpoint serves every raymoe series.

A driver process joins a private local head (tests/_local_ray.py), records two steps through
``MetricsExporter`` and stays alive while we scrape ``http://127.0.0.1:<metrics-export-port>/metrics``; Ray's
metrics agent exports on an interval (set to 1 s here), so we poll with a deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from _local_ray import REPO, LocalHead

from raymoe.runtime.metrics import pipeline_bubbles, prometheus_names, timed_actions

DRIVER = r"""
import sys, time
import ray
import torch
from raymoe.parallel.executor import ActionTiming
from raymoe.runtime.metrics import MetricsExporter
from raymoe.runtime.results import StepResult

def result(rank, timings, state, master=0, dispatch=None):
    return StepResult(rank=rank, pp_rank=rank, dp_rank=0, step=0, main_ce=0.0, mtp_ce=0.0, balance=0.0,
                      num_loss_microbatches=1, counts_RE=torch.zeros(2, 4, dtype=torch.int64), grad_norm=1.0,
                      timings=tuple(ActionTiming(kind=k, stage=s, microbatch=m, start_s=a, end_s=b)
                                    for k, s, m, a, b in timings),
                      timings_origin_s=0.0, step_s=0.5, compute_s=0.3, optimizer_s=0.01, recv_wait_s=0.0,
                      send_wait_s=0.0,
                      peak_live_activations=1, param_bytes=1024, optimizer_state_bytes=state,
                      optimizer_master_bytes=master, peak_memory_bytes=1 << 20, dispatch=dispatch or {})

ray.init(address=sys.argv[1], log_to_driver=False)
exporter = MetricsExporter("metrics-test", router_labels=["layer 1", "mtp 0"], actions_path=sys.argv[2])
for step in range(2):
    record = {"step": step, "loss": 5.0 - step, "mtp_loss": 5.5 - step, "tokens_per_s": 1000.0 + step,
              "step_time_s": 0.25, "lr": 1e-3, "grad_norm": 1.5, "tokens": 256, "max_vio_per_layer": [0.5, 0.25]}
    results = [result(0, [("F", 0, 0, 0.0, 0.1), ("B", 0, 0, 0.3, 0.5)], 4096, 1024),
               result(1, [("F", 1, 0, 0.1, 0.2), ("B", 1, 0, 0.2, 0.3)], 2048,
                      dispatch={"measured_same_node_bytes": 384, "measured_cross_node_bytes": 128, "seconds": 0.05,
                                "rows_received": 96})]
    record.update({"a2a_naive_bytes": 2048, "a2a_dedup_bytes": 1024, "a2a_measured_same_node_bytes": 384,
                   "a2a_measured_cross_node_bytes": 128, "a2a_rows_received_max": 96, "a2a_rows_received_mean": 48})
    exporter.record(record, results)
exporter.checkpoint(1.25, 4 << 20)
exporter.recovery()
exporter.close()
print("recorded", flush=True)
time.sleep(120)  # keep the core worker (the metrics' source) alive while the test scrapes
"""

EXPECTED = {
    "ray_raymoe_loss": {"run": "metrics-test"},
    "ray_raymoe_mtp_loss": {"run": "metrics-test"},
    "ray_raymoe_tokens_per_s": {"run": "metrics-test"},
    "ray_raymoe_step_time_s": {"run": "metrics-test"},
    "ray_raymoe_max_vio": {"router": "mtp 0"},
    "ray_raymoe_pipeline_bubble_fraction": {"rank": "1"},
    "ray_raymoe_compute_time_s": {"rank": "0"},
    "ray_raymoe_all_to_all_bytes": {"rank": "0"},
    "ray_raymoe_all_to_all_seconds": {"rank": "1"},
    "ray_raymoe_tokens_received": {"rank": "1"},
    "ray_raymoe_all_to_all_step_bytes": {"kind": "dedup"},
    "ray_raymoe_all_to_all_tokens_received": {"stat": "max"},
    "ray_raymoe_zero_optimizer_bytes": {"rank": "0"},
    "ray_raymoe_param_bytes": {"rank": "0"},
    "ray_raymoe_peak_memory_bytes": {"rank": "1"},
    "ray_raymoe_steps_total": {"run": "metrics-test"},
    "ray_raymoe_checkpoint_seconds": {"run": "metrics-test"},
    "ray_raymoe_checkpoints_total": {"run": "metrics-test"},
    "ray_raymoe_recoveries_total": {"run": "metrics-test"},
}


def _series(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text format -> name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
            out.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return out


def _find(series, name: str, labels: dict) -> float | None:
    for found, value in series.get(name, []):
        if found.get("run") == "metrics-test" and all(found.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_bubble_from_timings_is_per_pipeline():
    class R:
        def __init__(self, rank, pp_rank, dp_rank, timings):
            self.rank, self.pp_rank, self.dp_rank, self.timings = rank, pp_rank, dp_rank, timings

    # Two replicas of a 2-stage pipeline; replica 1 is twice as slow, which must not change replica 0's numbers.
    fast = [R(0, 0, 0, [("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 3.0, 4.0)]), R(2, 1, 0, [("F", 1, 0, 1.0, 3.0)])]
    slow = [R(1, 0, 1, [("F", 0, 0, 0.0, 2.0), ("B", 0, 0, 6.0, 8.0)]), R(3, 1, 1, [("F", 1, 0, 2.0, 6.0)])]
    bubbles = pipeline_bubbles(0, fast + slow)
    assert bubbles[0] == pytest.approx((0.5, 2.0))
    assert bubbles[2] == pytest.approx((0.5, 2.0))
    assert bubbles[1] == pytest.approx((0.5, 4.0))
    rows = timed_actions(3, 1, [("I", 1, 2, 0.5, 0.75)])
    assert rows[0].to_dict() == {"step": 3, "rank": 1, "kind": "I", "stage": 1, "microbatch": 2, "start": 0.5,
                                 "end": 0.75}


def test_the_grafana_dashboard_plots_every_exported_series():
    dashboard = json.loads((REPO / "cluster" / "grafana" / "raymoe.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["description"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b(ray_raymoe_\w+)\{", target["expr"]))
    assert queried == prometheus_names()
    assert set(EXPECTED) <= prometheus_names()


@pytest.mark.ray
@pytest.mark.slow
def test_metrics_reach_the_prometheus_endpoint(tmp_path):
    actions_path = tmp_path / "actions.jsonl"
    with LocalHead(num_cpus=1, dashboard=False) as head:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, head.gcs_address, str(actions_path)],
                                  env=head.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            deadline = time.monotonic() + 90
            missing = list(EXPECTED)
            while missing and time.monotonic() < deadline:
                assert driver.poll() is None, f"driver exited early:\n{driver.stdout.read()}"
                series = _series(head.scrape())
                missing = [n for n, labels in EXPECTED.items() if _find(series, n, labels) is None]
                if missing:
                    time.sleep(1.0)
            assert not missing, f"not exported within 90 s: {missing}\nhead log:\n{head.log_tail()}"
        finally:
            driver.kill()
            driver.wait()
    # The last step's values, with the right tags.
    assert _find(series, "ray_raymoe_loss", {}) == pytest.approx(4.0)
    assert _find(series, "ray_raymoe_max_vio", {"router": "mtp 0"}) == pytest.approx(0.25)
    assert _find(series, "ray_raymoe_zero_optimizer_bytes", {"rank": "0"}) == pytest.approx(4096 + 1024)
    assert _find(series, "ray_raymoe_all_to_all_bytes", {"rank": "0"}) == 0.0  # ep == 1: exported, zero
    assert _find(series, "ray_raymoe_all_to_all_bytes", {"rank": "1"}) == pytest.approx(512)
    assert _find(series, "ray_raymoe_tokens_received", {"rank": "1"}) == pytest.approx(96)
    assert _find(series, "ray_raymoe_all_to_all_step_bytes", {"kind": "naive"}) == pytest.approx(2048)
    assert _find(series, "ray_raymoe_all_to_all_step_bytes", {"kind": "measured_cross_node"}) == pytest.approx(128)
    assert _find(series, "ray_raymoe_all_to_all_tokens_received", {"stat": "mean"}) == pytest.approx(48)
    # rank 0 computes 0.1 + 0.2 s of a 0.5 s step; rank 1 0.2 s.
    assert _find(series, "ray_raymoe_pipeline_bubble_fraction", {"rank": "0"}) == pytest.approx(0.4)
    assert _find(series, "ray_raymoe_pipeline_bubble_fraction", {"rank": "1"}) == pytest.approx(0.6)
    assert _find(series, "ray_raymoe_steps_total", {}) == pytest.approx(2)
    assert _find(series, "ray_raymoe_checkpoint_bytes", {}) == pytest.approx(4 << 20)
    assert _find(series, "ray_raymoe_recoveries_total", {}) == pytest.approx(1)
    rows = [json.loads(line) for line in actions_path.read_text().splitlines()]
    assert len(rows) == 8 and {r["rank"] for r in rows} == {0, 1} and {r["step"] for r in rows} == {0, 1}
