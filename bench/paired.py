"""The Generator against onnxruntime-genai, request by request in the same processes: paired speed ratios.

    .venv/bin/python bench/paired.py HF_DIR --work DIR [--precisions fp32 int8 int4] [--processes 3] [--rounds 4]
        [--new-tokens 128] [--prompt-tokens 40] [--threads 2] [--json FILE]

``bench/speed.py`` runs every engine in its own process, one after the other; on a shared 2-core VM the
machine's speed drifts by 10-30% between minutes, so its ratios move by as much between runs. Here, per
precision, each of ``--processes`` fresh processes loads onnxruntime-genai's model, the Generator (whole-model
artifact, huge pages as by default; safety off, and with a calibrated artifact the same Generator with the probe +
correction on every step) and the Generator with ``huge_pages=False`` (safety off), then runs
``--rounds`` rounds of one request per engine and prompt size, the engine order rotating every round. Each round
gives a ratio (genai's ms/token over ours) measured seconds apart, so drift between minutes cancels. What does
not cancel is the process itself: the same engines in another process can land on memory that streams faster
or slower (0.91x and 1.43x at int4 in two processes of one afternoon), hence several processes. Reported per
engine: the median ratio over all rounds, each process's median ratio, rounds where ours was faster, median
ms/token and time to first token, the median cost against the safety-off Generator of the same round, and how
much of the Generator's memory went onto huge pages. Artifacts and
genai models are the ones ``bench/speed.py`` builds into the same ``--work`` (built here when missing). Needs
the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from pathlib import Path

from speed import PRECISIONS, build, genai_generate, genai_model, prompt_ids


class _Genai:
    def __init__(self, path: Path, threads: int):
        self.model = genai_model(path, threads)

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        ttft, ms, _ = genai_generate(self.model, ids, new_tokens)
        return ms, ttft


class _Ours:
    def __init__(self, gen, safety):
        self.gen, self.safety = gen, safety

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        out = self.gen.generate(prompt_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                safety=self.safety)
        return out.timings.ms_per_token, out.timings.prefill_s


def one_process(args: argparse.Namespace, prec: str) -> dict:
    """Load the engines and run the rounds: {"engine|size": [[ms/token, TTFT s], ...]}, "huge_pages_mb"."""
    from safesteer_rt import Generator, SafetyConfig

    artifacts, genai = build(args.hf_dir.resolve(), args.work, prec, [0], True)
    prompts = prompt_ids(artifacts[0], args.prompt_tokens)
    engines = {"onnxruntime-genai": _Genai(genai, args.threads)}
    gen = Generator(artifacts[0], threads=args.threads)
    engines["Generator"] = _Ours(gen, False)
    if gen.manifest.safety is not None:  # the same Generator with the probe + correction on every step
        probe = SafetyConfig.from_manifest(gen.manifest.safety, k=8, lookahead_steps=0)
        engines["Generator, probe"] = _Ours(gen, probe)
    engines["Generator, 4 KB pages"] = _Ours(Generator(artifacts[0], threads=args.threads, huge_pages=False), False)
    names = list(engines)
    for engine in engines.values():
        for ids in prompts.values():
            engine.run(ids, 4)  # warm-up
    out = {f"{name}|{size}": [] for name in names for size in prompts}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for size, ids in prompts.items():
            for name in order:
                out[f"{name}|{size}"].append(engines[name].run(ids, args.new_tokens))
        print(f"  {prec} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{key} {rows[-1][0]:.1f}" for key, rows in out.items()) + " ms/token", flush=True)
    return {"rounds": out, "huge_pages_mb": gen.huge_pages.bytes / 2**20}


def summarize(processes: list[dict]) -> dict:
    """Per "engine|size": medians over every round of every process, and each process's median ratio to genai."""
    out = {}
    for key in processes[0]["rounds"]:
        base = [[ms for ms, _ in p["rounds"]["onnxruntime-genai|" + key.split("|")[1]]] for p in processes]
        runs = [p["rounds"][key] for p in processes]
        ratios = [[b / ms for b, (ms, _) in zip(bs, rs)] for bs, rs in zip(base, runs)]
        flat = [x for r in ratios for x in r]
        off = [ms for p in processes for ms, _ in p["rounds"]["Generator|" + key.split("|")[1]]]
        mine = [ms for rs in runs for ms, _ in rs]
        out[key] = {"ms_per_token": statistics.median(mine),
                    "ttft_s": statistics.median(t for rs in runs for _, t in rs),
                    "ratio": statistics.median(flat), "process_ratios": [statistics.median(r) for r in ratios],
                    "faster_rounds": sum(x > 1.0 for x in flat), "rounds": len(flat),
                    "slower_than_off": statistics.median(ms / o - 1 for ms, o in zip(mine, off))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--work", type=Path, required=True, help="where artifacts and genai models are (or get) built")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"],
                   choices=[x for x in PRECISIONS if x != "fp16"])
    p.add_argument("--processes", type=int, default=3, help="fresh processes per precision")
    p.add_argument("--rounds", type=int, default=4, help="rounds per process")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", nargs="+", type=int, default=[40])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the raw rounds and the summary here")
    args = p.parse_args()
    if args.processes < 1 or args.rounds < 1:
        p.error("--processes and --rounds must be >= 1")
    args.work.mkdir(parents=True, exist_ok=True)
    raw, summary = {}, {}
    for prec in args.precisions:
        raw[prec] = []
        for i in range(args.processes):  # fresh each time: nothing an earlier process freed is reused
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                raw[prec].append(pool.apply(one_process, (args, prec)))
            print(f"{prec}: process {i + 1}/{args.processes} done "
                  f"({raw[prec][-1]['huge_pages_mb']:.0f} MB on huge pages)", flush=True)
        summary[prec] = summarize(raw[prec])
    print(f"\n{args.new_tokens} new tokens, greedy, batch 1, {args.threads} threads, safety off, whole model; "
          f"{args.processes} processes x {args.rounds} interleaved rounds per precision\n")
    print("| precision | prompt | engine | ms/token | TTFT s | genai ms / ours, median | per process | rounds faster "
          "| slower than safety off, median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prec, rows in summary.items():
        for key, r in rows.items():
            name, size = key.split("|")
            ratio = ("1 (baseline)", "-", "-") if name == "onnxruntime-genai" else (
                f"{r['ratio']:.2f}x", ", ".join(f"{x:.2f}" for x in r["process_ratios"]),
                f"{r['faster_rounds']}/{r['rounds']}")
            cost = f"{100 * r['slower_than_off']:+.1f}%" if name.startswith("Generator, ") else "-"
            print(f"| {prec} | {size} | {name} | {r['ms_per_token']:.1f} | {r['ttft_s']:.2f} | " + " | ".join(ratio)
                  + f" | {cost} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "processes": raw}, indent=1))


if __name__ == "__main__":
    main()
