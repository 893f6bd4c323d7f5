"""``run.init_from`` accepts a Hugging Face DeepSeek-V3 directory: one made by transformers from a random config
(the ecosystem's side), and our own ``--format hf`` export (lossless, MTP included)."""

from __future__ import annotations

import math

import pytest
import torch

from raymoe.config import load_config
from raymoe.generate.forward import logits
from raymoe.interop.hf_config import overrides_from_hf
from raymoe.interop.hf_export import write_hf_dir
from raymoe.model import build_model
from raymoe.train.reference import ReferenceTrainer

transformers = pytest.importorskip("transformers")


def _tiny_transformers_model(directory, *, stacked: bool = False):
    """A random DeepSeek-V3 made by transformers alone, saved with save_pretrained (optionally experts stacked)."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=260, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, n_shared_experts=2, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=12, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=64, num_mtp_layers=0, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(3)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
            for p in (layer.mlp.gate.weight, layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.normal_(0, 0.1)  # transformers' init leaves router weights at 0: make the routing real
    model.save_pretrained(str(directory))
    if stacked:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("stacked", [False, True])
def test_a_transformers_model_starts_our_trainer(tmp_path, stacked):
    import json

    hf_model = _tiny_transformers_model(tmp_path / "hf", stacked=stacked)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    overrides = [*overrides_from_hf(hf), "data.seq_len=32", "data.batch_size=4", "run.steps=2",
                 "mtp.depth=1", f"run.init_from={tmp_path / 'hf'}"]
    trainer = ReferenceTrainer(load_config("debug", overrides))
    tokens_BT = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    trainer.model.set_routing_biases(trainer.routing_bias_RE)
    with torch.no_grad():
        ours, theirs = logits(trainer.model, tokens_BT), hf_model(tokens_BT).logits.float()
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5
    assert torch.equal(trainer.routing_bias_RE[0], hf_model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert trainer.routing_bias_RE[-1].abs().sum() == 0  # the MTP router: no bias in the directory
    record = trainer.step()  # and it trains (MTP started fresh)
    assert math.isfinite(record["loss"]) and math.isfinite(record["mtp_loss"])


def test_our_export_comes_back_bitwise_with_mtp_and_biases(tmp_path):
    config = load_config("debug", ["run.steps=1"])
    model = build_model(config, seed=7)
    bias_RE = torch.randn(model.num_routers(), 8) * 0.01
    write_hf_dir(dict(model.named_parameters()), bias_RE, config, tmp_path / "hf")
    trainer = ReferenceTrainer(load_config("debug", ["run.steps=1", f"run.init_from={tmp_path / 'hf'}"]))
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(trainer.model.named_parameters())[name]), name
    assert torch.equal(trainer.routing_bias_RE, bias_RE)


def test_another_model_is_refused_with_the_overrides_to_use(tmp_path):
    _tiny_transformers_model(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model.dim=64 but the directory has 48.*add the overrides: .*model.dim=48"):
        ReferenceTrainer(load_config("debug", [f"run.init_from={tmp_path / 'hf'}"]))


def test_yarn_or_half_split_rope_is_refused(tmp_path):
    import json

    _tiny_transformers_model(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["rope_interleave"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    config = load_config("debug", [*overrides_from_hf(hf), "data.seq_len=32", f"run.init_from={tmp_path / 'hf'}"])
    with pytest.raises(ValueError, match="rope_interleave"):
        ReferenceTrainer(config)


def test_generate_continues_a_transformers_model_as_transformers_does(tmp_path):
    from raymoe.generate import Generator, load_model

    hf_model = _tiny_transformers_model(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")  # no raymoe header: the config comes from config.json
    assert loaded.config.model.dim == 48 and loaded.config.routing.route_scale == 2.5
    prompt = [256, 100, 101, 102, 32]
    ours = Generator(loaded.model).generate([prompt], 16)[0]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()
