"""Config values that used to slip through, or fail far from their cause (issue 21, defects 3, 4, 5 and 7)."""

import dataclasses

import pytest

from raymoe.config import Config, load_config


def _fields_of_type(kind: str) -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(type(getattr(Config(), section.name))):
            if f.type == kind:
                keys.append(f"{section.name}.{f.name}")
    return keys


FLOATS = _fields_of_type("float")
INTS = _fields_of_type("int")
BOOLS = _fields_of_type("bool")


def test_the_schema_has_the_fields_this_file_fuzzes():
    assert {"optim.grad_clip", "routing.bias_update_speed", "routing.route_scale", "model.rope_theta",
            "routing.seq_aux_alpha"} <= set(FLOATS)
    assert {"model.vocab_size", "model.moe_inter_dim", "model.kv_lora_rank"} <= set(INTS)
    assert "run.checkpoint_on_stop" in BOOLS and "precision.fp8" in BOOLS


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-1e400"])
def test_every_float_field_refuses_non_finite_values(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be a finite number, got -?(nan|inf)$"):
        load_config("debug", [f"{key}={value}"])


@pytest.mark.parametrize("key", INTS)
def test_every_int_field_refuses_values_beyond_int64(key):
    with pytest.raises(ValueError, match=rf"^{key} must fit in int64"):
        load_config("debug", [f"{key}=99999999999999999999"])


@pytest.mark.parametrize("key", BOOLS)
@pytest.mark.parametrize("value", ["2", "0", "1.5", "maybe", "[true]"])
def test_booleans_must_be_booleans(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be true or false"):
        load_config("debug", [f"{key}={value}"])


def test_real_booleans_still_load():
    cfg = load_config("debug", ["precision.fp8=true", "run.checkpoint_on_stop=False"])
    assert cfg.precision.fp8 is True and cfg.run.checkpoint_on_stop is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=1", r"^model=1: model is a section of settings, not a value; set its fields instead"),
        ("run=abc", r"^run='abc': run is a section"),
        ("modl.dim=3", r"^unknown key 'modl' \(did you mean 'model'\?\)"),
        ("model.dimm=3", r"^unknown key 'model.dimm' \(did you mean 'model.dim'\?\)"),
        ("model.dim=[", r"^model.dim: cannot parse the value '\['"),
        ("model.dim=abc", r"^model.dim: Value 'abc' of type 'str' could not be converted to Integer"),
        ("optim.lr=true", r"^optim.lr must be a number, got True"),
        ("data.path=[1]", r"^data.path must be a string, got \[1\]"),
        ("parallel.stage_layers=3", r"^parallel.stage_layers must be a list"),
        ("parallel.stage_layers=[1,true]", r"^parallel.stage_layers must list integers"),
        ("run.seed=-1", r"^run.seed must be >= 0, got -1"),
        ("data.seed=-5", r"^data.seed must be >= 0, got -5"),
        ("model.num_layers=1000000000000", r"^model.num_layers must be <= 10,000"),
        ("mtp.depth=100000", r"^mtp.depth must be <= 64"),
        ("run.step_timeout_s=1e300", r"^run.step_timeout_s must be <= "),
        ("run.ray_address=bogus", r"^run.ray_address must be '', 'auto', HOST:PORT or ray://HOST:PORT"),
        ("run.ray_address=host:99999", r"^run.ray_address must be .* got 'host:99999'"),
        ("run.checkpoint_dir=/tmp/" + "a" * 300, r"^run.checkpoint_dir: the name 'a+'\.\.\. is 300 bytes long"),
        ("run.out_dir=" + "b" * 256, r"^run.out_dir: the name 'b+'\.\.\. is 256 bytes long"),
        ("run.out_dir=''", r"^run.out_dir must name a directory"),
    ],
)
def test_refusals_name_the_key_first(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("debug", [override])


@pytest.mark.parametrize("address", ["", "auto", "127.0.0.1:6379", "head.example:6379", "ray://head:10001",
                                     "[::1]:6379"])
def test_well_formed_ray_addresses_load(address):
    assert load_config("debug", [f"run.ray_address='{address}'"]).run.ray_address == address


def test_a_config_file_that_is_not_yaml_or_not_a_mapping_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"config file '.*bad.yaml' is not valid YAML"):
        load_config(None, [], bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"must hold a mapping of sections, got a list"):
        load_config(None, [], listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("preset: debug\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate'"):
        load_config(None, [], typo)
