"""raymoe: DeepSeek-V3-style Mixture-of-Experts training on Ray.

Importing the package is cheap and torch-only: Ray lives under ``raymoe.runtime`` and DeepSpeed in
``raymoe.zero``, imported only by the code paths that need them.
"""

__version__ = "0.1.0"
