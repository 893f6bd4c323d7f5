"""Benchmarks run by ``raymoe bench`` (``make bench``).

Each benchmark is a module here with ``run(out_dir: Path, *, quick: bool = False) -> dict`` that measures against a
reference taken in the same run (ratios, never absolute timed assertions), writes ``out_dir/<name>.json`` plus any
plots, and returns a summary dict with a ``markdown`` entry (a table for the README). Those in ``TINY_CAPABLE`` also
take ``tiny=True`` (``raymoe bench --tiny``): toy shapes, so the default test suite can run them on a CPU.
"""

BENCHMARKS = {
    "data_prepare": "raymoe.bench.data_prepare",
    "data_tokenizers": "raymoe.bench.data_tokenizers",
    "fp8_training": "raymoe.bench.fp8_training",
    "gpu": "raymoe.bench.gpu",
    "runtime_schedules": "raymoe.bench.runtime_schedules",
    "expert_parallel": "raymoe.bench.expert_parallel",
    "a2a_overlap": "raymoe.bench.a2a_overlap",
    "pipeline_efficiency": "raymoe.bench.pipeline_efficiency",
}

TINY_CAPABLE = frozenset({"gpu"})
