import dataclasses

import pytest

from raymoe.config import PRESETS, Config, ModelConfig, load_config


def test_presets_load_and_are_frozen():
    for name in PRESETS:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 3


def test_671b_preset_is_the_published_shape():
    m = load_config("671b")
    assert (m.model.num_layers, m.model.dim, m.model.num_dense_layers) == (61, 7168, 3)
    assert (m.model.num_shared_experts, m.model.num_routed_experts, m.model.moe_inter_dim) == (1, 256, 2048)
    assert (m.routing.top_k, m.routing.num_groups, m.routing.groups_kept, m.routing.route_scale) == (8, 8, 4, 2.5)
    assert (m.model.q_lora_rank, m.model.kv_lora_rank, m.model.qk_rope_head_dim) == (1536, 512, 64)
    assert (m.model.vocab_size, m.mtp.depth) == (129280, 1)


def test_small_preset_is_still_the_full_recipe():
    cfg = load_config("small")
    assert cfg.model.num_routed_experts >= 8 and cfg.model.num_shared_experts >= 1
    assert cfg.routing.num_groups > 1 and cfg.mtp.depth >= 1


def test_dotlist_overrides():
    cfg = load_config("small", ["model.num_layers=6", "optim.lr=3e-4"])
    assert cfg.model.num_layers == 6 and cfg.optim.lr == 3e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.dim=0"], r"model.dim must be > 0, got 0"),
        (["routing.top_k=9"], r"routing.top_k \(9\) exceeds model.num_routed_experts \(8\)"),
        (["routing.num_groups=3"], r"divisible by routing.num_groups \(3\)"),
        (["parallel.ep=3", "parallel.dp=3"], r"num_routed_experts \(8\) must be divisible by parallel.ep \(3\)"),
        (["parallel.dp=3"], r"data.batch_size \(8\) must be divisible by parallel.dp"),
        (
            ["parallel.pp=3", "schedule.name=dualpipe", "schedule.num_microbatches=8"],
            r"schedule.name=dualpipe, parallel.pp=3: dualpipe needs an even pp .*got pp=3",
        ),
        (
            ["parallel.pp=2", "schedule.name=dualpipev", "schedule.num_microbatches=2"],
            r"schedule.name=dualpipev, parallel.pp=2: .*num_microbatches >= 2\*pp = 4, got num_microbatches=2",
        ),
        (["schedule.name=pipedream"], r"schedule.name must be one of"),
        (["precision.dtype=fp16"], r"precision.dtype must be one of"),
        (["data.seq_len=1000"], r"data.seq_len \(1000\) exceeds model.max_seq_len"),
        (["parallel.pp=2", "parallel.stage_layers=[1,1]"], r"parallel.stage_layers \[1, 1\] must list 2"),
        (["model.num_dense_layers=9"], r"num_dense_layers \(9\) exceeds"),
        (["precision.fp8_promotion_interval=100"], r"multiple of 32 .*got 100"),
    ],
)
def test_validation_errors_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("debug", overrides)


def test_unknown_keys_and_presets_are_refused():
    with pytest.raises(ValueError, match="nonsense"):
        load_config("debug", ["model.nonsense=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ValueError, match="key=value"):
        load_config("debug", ["model.dim"])


def test_config_file_with_preset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("preset: debug\nrun:\n  steps: 7\n")
    cfg = load_config(None, ["optim.lr=0.01"], path)
    assert cfg.run.steps == 7 and cfg.model.dim == load_config("debug").model.dim and cfg.optim.lr == 0.01


def test_gamma_and_mtp_weight_schedules():
    cfg = load_config("671b")
    assert cfg.routing.gamma_at(0) == 0.001 and cfg.routing.gamma_at(14_300_000_000_000) == 0.0
    assert cfg.mtp.weight_at(0) == 0.3 and cfg.mtp.weight_at(10**13) == 0.1
    assert ModelConfig().qk_head_dim == 48
