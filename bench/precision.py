"""Decode speed of the same model at different weight precisions, in one process run.

    .venv/bin/python bench/precision.py FLOAT32_ARTIFACT QUANTIZED_ARTIFACT [...] [--new-tokens 128] [--runs 3]

Same chat prompt, greedy, SafeSteer off, 2 onnxruntime threads unless --threads; ms/token over the
decode (first token excluded), median of runs; ratios against the first artifact from the same run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from safesteer_rt import Generator

PROMPT = [{"role": "user", "content": "Explain how a refrigerator keeps food cold, step by step."}]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    rows = []
    for path in args.artifacts:
        gen = Generator(path, threads=args.threads)
        gen.generate(PROMPT, max_new_tokens=4, safety=False)
        runs = [gen.generate(PROMPT, max_new_tokens=args.new_tokens, safety=False, stop=None).timings
                for _ in range(args.runs)]
        ms = statistics.median(t.ms_per_token for t in runs)
        ttft = statistics.median(t.prefill_s for t in runs)
        rows.append((path.name, gen.manifest.export.weights, ms, ttft))
        del gen
    base = rows[0][2]
    print(f"| artifact | weights | ms/token ({args.new_tokens} new tokens) | tokens/s | time to first token | speed vs first |")
    print("|---|---|---|---|---|---|")
    for name, weights, ms, ttft in rows:
        print(f"| {name} | {weights} | {ms:.1f} | {1000 / ms:.1f} | {ttft:.2f} s | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
