"""What SafeSteer costs per token on one artifact: off / probe + correction only / full lookahead.

    .venv/bin/python bench/safesteer_cost.py ARTIFACT [--new-tokens 128] [--runs 3]

One process, one prompt, greedy; ms/token over the decode (first token excluded), median of runs;
ratios against "off" measured in the same run. Run it alone: other load on the cores skews ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from safesteer_rt import Generator, SafetyConfig

PROMPT = [{"role": "user", "content": "Explain how a refrigerator keeps food cold, step by step."}]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    gen = Generator(args.artifact)
    if gen.manifest.safety is None:
        sys.exit("the artifact has no SafeSteer calibration")
    defaults = SafetyConfig.from_manifest(gen.manifest.safety)
    modes = {"off": False, "probe + correction": SafetyConfig.from_manifest(gen.manifest.safety, lookahead_steps=0),
             f"full lookahead (K={defaults.k}, {defaults.lookahead_steps} steps)": defaults}
    cost = {}
    for name, safety in modes.items():
        gen.generate(PROMPT, max_new_tokens=4, safety=safety)
        cost[name] = statistics.median(
            gen.generate(PROMPT, max_new_tokens=args.new_tokens, safety=safety, stop=None).timings.ms_per_token
            for _ in range(args.runs))
    print(f"| mode | ms/token ({args.new_tokens} new tokens) | vs off |\n|---|---|---|")
    for name, ms in cost.items():
        print(f"| {name} | {ms:.1f} | {ms / cost['off']:.2f}x |")


if __name__ == "__main__":
    main()
