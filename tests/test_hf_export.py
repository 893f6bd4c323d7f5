"""``raymoe checkpoint export --format hf``: transformers' DeepSeek-V3 computes our logits from the directory.

The independent implementation is ``transformers.DeepseekV3ForCausalLM`` (5.x), loaded with plain
``AutoModelForCausalLM.from_pretrained(DIR)``. Checked in fp32 at init and after training steps (the routing
biases have moved by then, so ``e_score_correction_bias`` is exercised), for both presets and for the variants
the presets do not cover (queries without a low-rank projection, route scale, no shared expert).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from raymoe.config import load_config
from raymoe.data.tokenizer import ByteTokenizer
from raymoe.generate.forward import logits
from raymoe.interop.hf_export import export_hf, write_hf_dir
from raymoe.model import build_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


def _hf_logits(directory, tokens_BT: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        return model(tokens_BT).logits.float()


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def _train_and_export(config, tmp_path, steps: int):
    """Train ``steps`` steps in-process, checkpoint, export; return (our trained model, the HF directory)."""
    from raymoe.checkpoint import resolve_checkpoint
    from raymoe.train.local import train_local

    run = tmp_path / "run"
    train_local(config, out_dir=str(run), progress=False)
    checkpoint = resolve_checkpoint(run)
    out = export_hf(checkpoint, tmp_path / "hf")
    model = build_model(config)
    from raymoe.checkpoint.export import consolidate

    tensors, manifest = consolidate(checkpoint)
    model.load_state_dict(tensors, strict=False)
    model.set_routing_biases(torch.tensor(manifest.routing_bias_RE))
    return model, out


VARIANTS = [
    ("debug", []),
    ("debug", ["model.q_lora_rank=0", "routing.route_scale=2.5"]),
    ("debug", ["model.num_shared_experts=0", "model.num_dense_layers=2", "routing.num_groups=1",
               "routing.groups_kept=1"]),
    ("small", ["data.batch_size=4", "data.seq_len=64"]),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_transformers_computes_our_logits_before_and_after_training(tmp_path, preset, overrides):
    config = load_config(preset, [*overrides, "run.steps=3", "run.checkpoint_every=3"])
    tokens_BT = torch.randint(0, config.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    fresh = build_model(config)
    write_hf_dir(dict(fresh.named_parameters()), fresh.routing_biases(), config, tmp_path / "init")
    with torch.no_grad():
        before = _relative(logits(fresh, tokens_BT), _hf_logits(tmp_path / "init", tokens_BT))

    trained, directory = _train_and_export(config, tmp_path, steps=3)
    assert trained.routing_biases().abs().max() > 0  # the bias rule moved: the correction bias matters now
    with torch.no_grad():
        ours = logits(trained, tokens_BT)
    after = _relative(ours, _hf_logits(directory, tokens_BT))
    assert before < TOLERANCE and after < TOLERANCE, (before, after)
    assert not torch.allclose(ours, logits(fresh, tokens_BT).detach(), atol=1e-4)  # training changed the model


def test_directory_layout_config_and_tokenizer(tmp_path):
    config = load_config("debug", ["model.q_lora_rank=0"])
    model = build_model(config)
    out = write_hf_dir(dict(model.named_parameters()), model.routing_biases(), config, tmp_path / "hf")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "mtp.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["q_lora_rank"] is None and hf["first_k_dense_replace"] == 1 and hf["n_group"] == 2
    assert hf["num_nextn_predict_layers"] == 1 and hf["rope_interleave"] is True

    loaded = transformers.AutoConfig.from_pretrained(str(out))
    assert loaded.model_type == "deepseek_v3" and loaded.topk_group == 1

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x + 1  # é ✓"
    ours = ByteTokenizer().encode(text, add_eos=False)
    assert tokenizer(text)["input_ids"] == ours
    assert tokenizer.decode(ours, skip_special_tokens=True) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)


def test_the_mtp_projection_is_stored_in_the_released_order(tmp_path):
    from safetensors.torch import load_file

    config = load_config("debug")
    model = build_model(config)
    out = write_hf_dir(dict(model.named_parameters()), model.routing_biases(), config, tmp_path / "hf")
    stored = load_file(str(out / "mtp.safetensors"))["model.layers.4.eh_proj.weight"]
    ours = model.mtp[0].proj.weight.detach()
    dim = config.model.dim
    assert torch.equal(stored[:, :dim], ours[:, dim:]) and torch.equal(stored[:, dim:], ours[:, :dim])


def test_refuses_what_transformers_computes_differently(tmp_path):
    config = load_config("small", ["routing.groups_kept=1"])  # top-4 of 1 group: group score of 4 experts
    with pytest.raises(ValueError, match="top_k/groups_kept = 4/1"):
        write_hf_dir({}, torch.zeros(6, 16), config, tmp_path / "x")
    config = load_config("debug", ["model.norm_eps=1e-5"])
    with pytest.raises(ValueError, match="norm_eps"):
        write_hf_dir({}, torch.zeros(4, 8), config, tmp_path / "y")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    config = load_config("debug")
    with pytest.raises(ValueError, match="not an earlier model export"):
        write_hf_dir({}, torch.zeros(4, 8), config, tmp_path / "busy")


def test_cli_exports_a_run_directory(tmp_path):
    from raymoe.cli import main
    from raymoe.train.local import train_local

    config = load_config("debug", ["run.steps=1", "run.checkpoint_every=1"])
    train_local(config, out_dir=str(tmp_path / "run"), progress=False)
    result = CliRunner().invoke(main, ["checkpoint", "export", str(tmp_path / "run"), "--format", "hf",
                                       "--out", str(tmp_path / "hf"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "hf" in result.output and (tmp_path / "hf" / "config.json").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
