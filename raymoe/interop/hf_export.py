"""Write a Hugging Face DeepSeek-V3 model directory that ``AutoModelForCausalLM.from_pretrained`` loads as is.

    config.json              DeepSeek-V3 fields (``hf_config``)
    model.safetensors        the weights under transformers' names (``hf_names``), routing biases as each
                             router's ``e_score_correction_bias``; the header also holds our config (YAML) and
                             step, so importing it back is lossless
    mtp.safetensors          the MTP module(s), as the released weights name them (layer num_layers + k). A file
                             of its own because transformers has no MTP module: it reads only model.safetensors
                             (no index), so it loads without "unexpected keys"; vLLM and SGLang read every file
    generation_config.json   BOS / EOS / PAD ids
    tokenizer.json, tokenizer_config.json   the byte tokenizer (``hf_tokenizer``)

Router gates and biases stay fp32 with ``--dtype bf16`` (transformers keeps them fp32 too: they select experts).
The directory appears all at once: it is written next to ``out`` and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from raymoe.config import Config, to_yaml
from raymoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from raymoe.interop.hf_config import check_exportable, hf_config
from raymoe.interop.hf_names import bias_name, to_hf
from raymoe.interop.hf_tokenizer import write_byte_tokenizer

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
WEIGHTS = "model.safetensors"
MTP_WEIGHTS = "mtp.safetensors"


def hf_tensors(tensors: dict[str, torch.Tensor], bias_RE: torch.Tensor, config: Config,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters (full model, our names) and routing biases -> the checkpoint tensors, transformers' names."""
    from raymoe.model.transformer import router_slots

    m = config.model
    out = {}
    for name, tensor in tensors.items():
        hf, value = to_hf(name, tensor.detach(), m.num_layers)
        out[hf] = value.to(torch.float32 if hf.endswith("mlp.gate.weight") else dtype).contiguous()
    for row, layer_id in enumerate(router_slots(m, config.mtp.depth)):
        out[bias_name(layer_id)] = bias_RE[row].to(torch.float32).clone()
        if m.num_shared_experts == 0:  # transformers builds a zero-width shared MLP all the same
            prefix = f"model.layers.{layer_id}.mlp.shared_experts"
            out[f"{prefix}.gate_proj.weight"] = torch.zeros(0, m.dim, dtype=dtype)
            out[f"{prefix}.up_proj.weight"] = torch.zeros(0, m.dim, dtype=dtype)
            out[f"{prefix}.down_proj.weight"] = torch.zeros(m.dim, 0, dtype=dtype)
    for k in range(config.mtp.depth):  # the released layout repeats the shared embedding and head per MTP layer
        prefix = f"model.layers.{m.num_layers + k}"
        out[f"{prefix}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"{prefix}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def write_hf_dir(tensors: dict[str, torch.Tensor], bias_RE: torch.Tensor, config: Config, out: Path, *,
                 dtype: str = "fp32", step: int = 0) -> Path:
    """Write the model directory ``out`` (replacing an earlier export there, refusing any other directory)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_exportable(config)
    torch_dtype, name = DTYPES[dtype]
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ValueError(f"--out {str(out)!r} exists and is not an earlier model export; choose a new directory")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    metadata = {"format": "pt", "raymoe_config": to_yaml(config), "raymoe_step": str(step)}
    everything = hf_tensors(tensors, bias_RE, config, torch_dtype)
    mtp_layers = tuple(f"model.layers.{config.model.num_layers + k}." for k in range(config.mtp.depth))
    mtp = {k: v for k, v in everything.items() if k.startswith(mtp_layers)}
    save_file({k: v for k, v in everything.items() if k not in mtp}, str(staging / WEIGHTS), metadata=metadata)
    if mtp:
        save_file(mtp, str(staging / MTP_WEIGHTS), metadata=metadata)
    (staging / "config.json").write_text(json.dumps(hf_config(config, dtype=name), indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_byte_tokenizer(staging, max_seq_len=config.model.max_seq_len)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def export_hf(checkpoint: Path, out: Path, *, dtype: str = "fp32") -> Path:
    """A checkpoint (all shards, checked as for the safetensors export) -> a Hugging Face model directory."""
    from raymoe.checkpoint.compat import config_of
    from raymoe.checkpoint.export import consolidate

    tensors, manifest = consolidate(checkpoint)
    config = config_of(manifest)
    check_exportable(config)
    bias_RE = torch.tensor(manifest.routing_bias_RE, dtype=torch.float32)
    return write_hf_dir(tensors, bias_RE, config, out, dtype=dtype, step=manifest.step)
