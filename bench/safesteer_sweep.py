"""Knob sweep without re-exporting: refusal rate on harmful vs over-refusal on edgy test prompts.

    .venv/bin/python bench/safesteer_sweep.py ARTIFACT --grid alpha=7,20 lam=8,30 [--n 12] [--new-tokens 32]

Same test-split prompts and keyword judge as bench/safesteer_effect.py; greedy decoding.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safesteer_effect import suites  # noqa: E402

from safesteer_export.judges import KeywordJudge  # noqa: E402
from safesteer_rt import Generator, SafetyConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--grid", nargs="+", default=["alpha=7,20", "lam=8,30"], help="knob=v1,v2,...")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    gen = Generator(args.artifact)
    judge = KeywordJudge()
    prompts = suites(args.n, 0)
    names, values = zip(*((g.split("=")[0], [float(v) for v in g.split("=")[1].split(",")]) for g in args.grid))
    configs = [("undefended", False)] + [
        (" ".join(f"{n}={v:g}" for n, v in zip(names, combo)),
         SafetyConfig.from_manifest(gen.manifest.safety,
                                    **{n: int(v) if n in ("k", "lookahead_steps") else v for n, v in zip(names, combo)}))
        for combo in itertools.product(*values)]
    print("| knobs | harmful refusal | edgy refusal |\n|---|---|---|", flush=True)
    for label, cfg in configs:
        rates = []
        for suite in ("harmful", "edgy"):
            outs = [gen.generate([{"role": "user", "content": q}], max_new_tokens=args.new_tokens, safety=cfg).text
                    for q in prompts[suite]]
            rates.append(sum(judge.is_refusal(t) for t in outs) / len(outs))
        print(f"| {label} | {rates[0]:.0%} | {rates[1]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
