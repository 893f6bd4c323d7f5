"""Evaluation every K steps under Ray (the driver evaluates a scratch checkpoint of its workers' weights), and a
Ray run started from a Hugging Face directory (``run.init_from``): same numbers as the single-process trainer."""

from __future__ import annotations

import json

import pytest

from raymoe.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_run_evaluates_every_k_steps_like_the_local_one(ray_session, tmp_path):
    from raymoe.runtime.launch import train_ray
    from raymoe.train.local import train_local

    overrides = ["run.steps=4", "run.eval_every=2", "run.eval_tokens=256", "parallel.pp=2",
                 "schedule.name=1f1b", "schedule.num_microbatches=4"]
    ray_records = train_ray(load_config("debug", overrides), out_dir=str(tmp_path / "ray"), progress=False)
    local_records = train_local(load_config("debug", overrides), out_dir=str(tmp_path / "local"), progress=False)
    ray_evals = [r["eval_loss"] for r in ray_records if "eval_loss" in r]
    local_evals = [r["eval_loss"] for r in local_records if "eval_loss" in r]
    assert len(ray_evals) == len(local_evals) == 2
    assert ray_evals == pytest.approx(local_evals, rel=1e-5)
    assert not (tmp_path / "ray" / "checkpoints" / ".eval-scratch").exists()
    logged = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [1, 3]


def test_a_ray_pipeline_starts_from_a_hugging_face_directory(ray_session, tmp_path):
    from raymoe.interop.hf_export import write_hf_dir
    from raymoe.model import build_model
    from raymoe.runtime.launch import train_ray
    from raymoe.train.local import train_local

    source = load_config("debug")
    model = build_model(source, seed=11)
    write_hf_dir(dict(model.named_parameters()), model.routing_biases(), source, tmp_path / "hf")
    overrides = ["run.steps=1", f"run.init_from={tmp_path / 'hf'}", "parallel.pp=2", "schedule.name=1f1b",
                 "schedule.num_microbatches=4"]
    ray_loss = train_ray(load_config("debug", overrides), out_dir=str(tmp_path / "ray"), progress=False)[0]["loss"]
    local_loss = train_local(load_config("debug", overrides), out_dir=str(tmp_path / "l"), progress=False)[0]["loss"]
    assert ray_loss == pytest.approx(local_loss, rel=1e-5)
