"""Inference: load what a run trained, generate with the MLA cache (plain or MTP speculative), stream it.

``forward`` is the training computation without a cache (evaluation, parity), ``cache`` the MLA latent cache,
``decode`` the cached forwards, ``sampling`` temperature / top-p / the speculative rule, ``generator`` the loops,
``load`` reads run directories, exports and Hugging Face directories.
"""

from raymoe.generate.generator import GenerationStats, Generator
from raymoe.generate.load import LoadedModel, load_model
from raymoe.generate.sampling import SamplingConfig

__all__ = ["GenerationStats", "Generator", "LoadedModel", "SamplingConfig", "load_model"]
