"""Interoperability with the Hugging Face DeepSeek-V3 format (``transformers.DeepseekV3ForCausalLM``).

``hf_config`` maps our config to ``config.json`` and back, ``hf_names`` maps parameter names, ``hf_tokenizer``
writes the byte tokenizer as ``tokenizer.json``, ``hf_export`` writes a model directory, ``hf_import`` reads one
for ``run.init_from``. Only ``safetensors`` and ``tokenizers`` are needed; ``transformers`` is not imported.
"""

from raymoe.interop.hf_export import write_hf_dir
from raymoe.interop.hf_import import is_hf_dir

__all__ = ["is_hf_dir", "write_hf_dir"]
