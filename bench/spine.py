"""Issue-2 numbers: export time and peak RSS, and decode speed of the Generator vs transformers eager.

    .venv/bin/python bench/spine.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct] [--new-tokens 128]

Each export runs in its own process (peak RSS of that process alone). Decoding: the same chat prompt,
greedy, the Generator (fp32, 4-layer blocks) and transformers eager `generate` in this one process;
median of --runs runs each. Prints a markdown table with the ratio Generator / transformers.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Explain how a refrigerator keeps food cold, step by step, for a curious ten-year-old."


def export(ckpt: Path, out: Path, block_size: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "safesteer_export.cli", str(ckpt), "-o", str(out), "--no-safety", "--overwrite",
           "--block-size", str(block_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"in ([\d.]+)s, peak RSS (\d+) MB", done.stdout)
    return float(m.group(1)), float(m.group(2))


def time_generator(art: Path, new_tokens: int, runs: int) -> tuple[float, float, list[int]]:
    from safesteer_rt import Generator

    gen = Generator(art)
    msgs = [{"role": "user", "content": PROMPT}]
    gen.generate(msgs, max_new_tokens=4)  # warm-up
    speeds, ttfts, ids = [], [], []
    for _ in range(runs):
        r = gen.generate(msgs, max_new_tokens=new_tokens, stop=None)
        speeds.append(r.timings.tokens_per_s)
        ttfts.append(r.timings.prefill_s)
        ids = r.prompt_ids
    return statistics.median(speeds), statistics.median(ttfts), ids


def time_transformers(ckpt: Path, prompt_ids: list[int], new_tokens: int, runs: int) -> float:
    import torch
    import transformers

    cls = getattr(transformers, __import__("json").loads((ckpt / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt_ids])
    speeds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            t2 = time.perf_counter()
            speeds.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(speeds)


def main() -> None:
    from safesteer_checkpoints.packaged import PACKAGED, checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(PACKAGED))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--block-size", type=int, default=4)
    args = p.parse_args()
    rows = []
    for name in args.models:
        ckpt = checkpoint(PACKAGED[name])
        weights_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / "artifact"
            secs, rss = export(ckpt, art, args.block_size)
            gen_tps, ttft, prompt_ids = time_generator(art, args.new_tokens, args.runs)
        hf_tps = time_transformers(ckpt, prompt_ids, args.new_tokens, args.runs)
        rows.append((name, weights_mb, secs, rss, len(prompt_ids), gen_tps, ttft, hf_tps))
    print(f"\n{args.new_tokens} new tokens, greedy, fp32, block size {args.block_size}, median of {args.runs} runs\n")
    print("| model | fp32 weights | export time | export peak RSS | prompt tokens | Generator tok/s | "
          "Generator TTFT | transformers eager tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, w, secs, rss, n, g, ttft, h in rows:
        print(f"| {name} | {w:.0f} MB | {secs:.1f} s | {rss:.0f} MB | {n} | {g:.1f} | {ttft:.2f} s | {h:.1f} | {g / h:.2f}x |")


if __name__ == "__main__":
    main()
