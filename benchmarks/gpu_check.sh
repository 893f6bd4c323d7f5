#!/usr/bin/env bash
# The whole GPU measurement of issue 17 as one script, for a session that is lent the accelerator machine.
#
# That machine (see the device tool's README and H200.md) has python3 3.12 with torch 2.11+cu130, Triton, pytest,
# click, numpy, pyarrow, matplotlib, tqdm, safetensors and PyYAML -- but no ray, deepspeed or omegaconf, and no
# network. raymoe's GPU path needs none of ray/deepspeed; omegaconf (the config loader) travels as a wheel.
#
#   1. here, once (needs PyPI):      bash benchmarks/gpu_check.sh prepare
#   2. on the device, in one call:   run(command="bash benchmarks/gpu_check.sh device", carry=[".whl"],
#                                        timeout_s=600)
#      It prints the environment, runs the gpu-marked tests (limit 240 s; much of it torch.compile of the FP8
#      quantizers), then `python -m raymoe bench --only gpu` (limit 270 s), each under its own time limit so the call
#      returns inside 10 minutes, with everything under $OUT: env.txt, tests.log, bench.log, gpu.json, SUMMARY.md.
#   3. here: copy gpu.json to benchmarks/results/, put its markdown in README's "GPU path" section.
#
# Budget: the device allows 15 minutes per session, start included, so a full run leaves room to rerun one half:
# `device tests` or `device bench` runs only that part. Call give_back afterwards unless rerunning at once.
set -uo pipefail
cd "$(dirname "$0")/.."

OMEGACONF_VERSION=2.4.0   # what the CPU venv runs; pure Python, needs only PyYAML (present on the device)

prepare() {
    local exclude
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d .whl "omegaconf==${OMEGACONF_VERSION}"
    ls -l .whl
}

device() {
    local part="${1:-all}" out="${OUT:-/tmp/gpu_check_out}" site="${SITE:-/tmp/site}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            .whl/*.whl || exit 1
    fi
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
        python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("has _grouped_mm", hasattr(torch, "_grouped_mm"), "has _scaled_mm", hasattr(torch, "_scaled_mm"))
import omegaconf, raymoe.model.grouped, raymoe.fp8.fused, raymoe.bench.gpu  # noqa: F401
print("ray/deepspeed imported:", sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed")))
EOF
    } 2>&1 | tee "$out/env.txt"

    [ "$part" = bench ] || run_tests "$out"
    [ "$part" = tests ] || run_bench "$out"
}

run_tests() {
    local out="$1"
    # gpu-marked tests: this issue's (tests/test_gpu.py) and the earlier, never-run ones of the FP8 package.
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rA \
        tests/test_gpu.py tests/test_fp8_gemm.py tests/test_fp8_linear.py tests/test_fp8_bench.py \
        2>&1 | tee "$out/tests.log"
    echo "tests exit status: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
}

run_bench() {
    local out="$1"
    timeout 270 python3 -m raymoe bench --only gpu --out "$out/results" 2>&1 | tee "$out/bench.log"
    echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
    cp "$out/results/gpu.json" "$out/results/SUMMARY.md" "$out/" 2>/dev/null
    rm -rf "$out/results"
    cat "$out/SUMMARY.md" 2>/dev/null
}

case "${1:-}" in
    prepare) prepare ;;
    device) device "${2:-all}" ;;
    *) echo "usage: $0 prepare | device [all|tests|bench]" >&2; exit 2 ;;
esac
