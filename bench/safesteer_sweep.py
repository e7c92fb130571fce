"""Knob sweep without re-exporting: refusal rate on harmful vs over-refusal on edgy test prompts.

    .venv/bin/python bench/safesteer_sweep.py ARTIFACT --grid alpha=7,20 lam=8,30 [--n 12] [--new-tokens 32]

The harmful and edgy suites of safesteer-eval (test split, disjoint from the artifact's calibration),
keyword judge, greedy decoding.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from safesteer_eval import suites as st
from safesteer_export.judges import KeywordJudge
from safesteer_rt import Generator, SafetyConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--grid", nargs="+", default=["alpha=7,20", "lam=8,30"], help="knob=v1,v2,...")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    gen = Generator(args.artifact)
    judge = KeywordJudge()
    cal = st.Calibration.of_artifact(args.artifact)
    prompts = {name: [c.prompt for c in st.build(name, args.n, cal)] for name in ("harmful", "edgy")}
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
