"""Measure MTP speculative decoding against plain decoding on a trained model: tokens/s min/median/max over
repeats, the acceptance rate of the drafted second token, main forwards; greedy (both emit the same tokens,
checked) and sampled (temperature 1, top-p 0.95: speculative sampling keeps the main model's distribution).

    flock /tmp/raymoe-bench.lock python -m raymoe.generate.bench runs/small --out benchmarks/results/mtp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from raymoe.data.tokenizer import ByteTokenizer
from raymoe.generate import Generator, SamplingConfig, load_model

PROMPTS = ["import os\n", "def main(", "class Reader:\n    def __init__(self", "    for i in range(",
           "# Copyright", "from typing import ", "def _check_args(self, name, value):\n    if ", "    return "]
SETTINGS = {"greedy": SamplingConfig(), "sampled": SamplingConfig(temperature=1.0, top_p=0.95, seed=0)}


def measure(source: str, *, max_new_tokens: int, repeats: int, batch: int) -> dict:
    model = load_model(source).model
    encoded = [ByteTokenizer().encode(p, add_eos=False) for p in PROMPTS[:batch]]
    out: dict = {"source": source, "max_new_tokens": max_new_tokens, "batch": len(encoded), "threads":
                 torch.get_num_threads(), "loadavg_before": os.getloadavg()}
    for setting, sampling in SETTINGS.items():
        outputs, result = {}, {}
        for mode in ("plain", "mtp"):
            rates, last = [], None
            for _ in range(repeats):
                g = Generator(model, sampling=sampling, speculative=mode == "mtp", stop_at_eos=False)
                outputs[mode] = g.generate(encoded, max_new_tokens)
                rates.append(g.stats.tokens_per_s)
                last = g.stats
            result[mode] = {"tokens_per_s": {"min": min(rates), "median": statistics.median(rates),
                                             "max": max(rates)},
                            "new_tokens": last.new_tokens, "main_forwards": last.main_forwards,
                            "acceptance": last.acceptance, "drafted": last.drafted, "accepted": last.accepted}
        if setting == "greedy":
            result["identical_output"] = outputs["plain"] == outputs["mtp"]
        result["speedup_median"] = result["mtp"]["tokens_per_s"]["median"] / result["plain"]["tokens_per_s"]["median"]
        row = 1 % len(encoded)
        result["sample"] = PROMPTS[row] + ByteTokenizer().decode(outputs["mtp"][row])
        out[setting] = result
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=len(PROMPTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.source, max_new_tokens=args.max_new_tokens, repeats=args.repeats, batch=args.batch)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
