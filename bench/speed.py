"""Decode speed of the Generator against onnxruntime-genai and transformers, in one run.

    .venv/bin/python bench/speed.py HF_DIR --work DIR [--precisions fp32 int8 int4] [--blocks 4 0]
        [--new-tokens 128] [--prompt-tokens 40 256] [--runs 3] [--rounds 2] [--threads 2] [--skip-transformers]
        [--skip-genai] [--providers CUDAExecutionProvider]   # GPU: also --precisions fp32 fp16 int4

Needs the ``bench`` extra (``.venv/bin/pip install -e '.[cpu,export,bench]'``: onnxruntime-genai).
For each precision it builds (once, reused from DIR) the safesteer artifacts (calibrated, one per block size)
with ``safesteer-export`` and the onnxruntime-genai model with its model builder, from the same HF folder.
Every engine then runs in its own child process, one after the other (its peak RSS is its own), and the
whole list runs ``--rounds`` times so that a slow minute on a shared machine does not land on one engine, on the
same prompt token ids (the model's chat template around a fixed request, padded to the prompt sizes),
greedy, batch 1, ``--threads`` intra-op threads everywhere (onnxruntime-genai through its config overlay).

Reported per engine and prompt size: decode ms/token and tokens/s (median over runs, then over rounds; the first
token is excluded), time to first token (prefill + choosing the first token), peak RSS of the process, and the
speed ratio against onnxruntime-genai at the same precision from the same run. Generator modes:
``off`` (safety=False), ``probe`` (probe + in-graph correction every step, no lookahead) and
``lookahead`` (K=8 candidates for the first 16 steps, then probe + correction); the safety modes run at the
last ``--blocks`` size (the whole model by default), the other sizes with safety off, on the CPU both with the
default thread pool per graph and with ``thread_pool="shared"``. On the CPU two more rows show what huge pages do:
the Generator with ``huge_pages=False`` (its default moves the weights onto 2 MB pages at load) and
onnxruntime-genai started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (ratios stay against plain genai, as
built). Load time (constructing the Generator / og.Model) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REQUEST = ("Write a long, detailed guide to keeping a vegetable garden healthy through a dry summer: soil, "
           "watering schedules, mulching, shade, pests and harvest timing.")
FILLER = ("Some background on my garden: it is a raised bed of about ten square metres in a sunny yard, with "
          "tomatoes, beans, courgettes, lettuce and herbs, clay soil improved with compost last spring, and a "
          "rain barrel that runs dry by July. ")
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # the same names in safesteer-export --quantize and the genai builder
HUGE_MALLOC = "glibc.malloc.hugetlb=1"  # glibc's malloc asks for transparent huge pages (read at process start)


# --- children: one engine each -------------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child_generator(job: dict) -> dict:
    from safesteer_rt import Generator, SafetyConfig

    start = time.perf_counter()
    gen = Generator(job["path"], providers=job["providers"], threads=job["threads"],
                    thread_pool=job.get("thread_pool", "auto"), huge_pages=job.get("huge_pages", True))
    load_s = time.perf_counter() - start
    if job["mode"] == "off":
        safety = False
    else:
        steps = 0 if job["mode"] == "probe" else 16
        safety = SafetyConfig.from_manifest(gen.manifest.safety, k=8, lookahead_steps=steps)
    out = {}
    for size, ids in job["prompts"].items():
        gen.generate(prompt_ids=ids, max_new_tokens=4, safety=safety)  # warm-up
        runs = [gen.generate(prompt_ids=ids, max_new_tokens=job["new_tokens"], safety=safety,
                             min_new_tokens=job["new_tokens"]) for _ in range(job["runs"])]
        out[size] = {"ms_per_token": statistics.median(r.timings.ms_per_token for r in runs),
                     "ttft_s": statistics.median(r.timings.prefill_s for r in runs),
                     "new_tokens": len(runs[0].token_ids), "tokens": runs[0].token_ids[:32]}
    return out, load_s


def genai_model(path, threads: int):
    """onnxruntime-genai's model from its folder, with ``threads`` intra-op threads (its config overlay)."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def genai_generate(model, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Greedy, exactly ``new_tokens`` tokens: time to first token (s), decode ms/token after it, the tokens."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens)
    start = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    gen.generate_next_token()
    first = time.perf_counter()
    tokens = [int(gen.get_next_tokens()[0])]
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    end = time.perf_counter()
    return first - start, 1000.0 * (end - first) / max(len(tokens) - 1, 1), tokens


def _child_genai(job: dict) -> dict:
    start = time.perf_counter()
    model = genai_model(job["path"], job["threads"])
    load_s = time.perf_counter() - start
    out = {}
    for size, ids in job["prompts"].items():
        genai_generate(model, ids, 4)
        runs = [genai_generate(model, ids, job["new_tokens"]) for _ in range(job["runs"])]
        out[size] = {"ms_per_token": statistics.median(r[1] for r in runs),
                     "ttft_s": statistics.median(r[0] for r in runs),
                     "new_tokens": len(runs[0][2]), "tokens": runs[0][2][:32]}
    return out, load_s


def _child_transformers(job: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(job["threads"])
    arch = json.loads((Path(job["path"]) / "config.json").read_text())["architectures"][0]
    start = time.perf_counter()
    model = getattr(transformers, arch).from_pretrained(job["path"], dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    load_s = time.perf_counter() - start

    def timed(ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    out = {}
    with torch.no_grad():
        for size, ids in job["prompts"].items():
            t = torch.tensor([ids])
            timed(t, 4)
            firsts = [timed(t, 1)[0] for _ in range(job["runs"])]
            fulls = [timed(t, job["new_tokens"]) for _ in range(job["runs"])]
            ttft = statistics.median(firsts)
            total = statistics.median(f[0] for f in fulls)
            out[size] = {"ms_per_token": 1000.0 * (total - ttft) / (job["new_tokens"] - 1), "ttft_s": ttft,
                         "new_tokens": len(fulls[0][1]), "tokens": fulls[0][1][:32]}
    return out, load_s


CHILDREN = {"generator": _child_generator, "genai": _child_genai, "transformers": _child_transformers}


def child_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result, load_s = CHILDREN[job["engine"]](job)
    print("RESULT " + json.dumps({"sizes": result, "load_s": load_s, "peak_rss_mb": _peak_rss_mb()}))


# --- parent: build, run children, print ----------------------------------------------------------
def prompt_ids(artifact: Path, sizes: list[int]) -> dict[str, list[int]]:
    """The chat-templated request, with background text prepended until it is about ``size`` tokens."""
    from safesteer_runtime import manifest as m
    from safesteer_runtime.text import TextCodec, load_chat_template, render_messages

    man = m.load_manifest(artifact, verify_files=False)
    codec, chat = TextCodec(artifact, man.tokenizer), load_chat_template(artifact, man.tokenizer)
    out = {}
    for size in sizes:
        content, ids = REQUEST, []
        while True:
            text, _ = render_messages(chat, [{"role": "user", "content": content}], None)
            ids = codec.encode(text, add_bos=False)
            if len(ids) >= size:
                break
            content = FILLER + content
        out[str(size)] = ids
    return out


def build(hf_dir: Path, work: Path, precision: str, blocks: list[int], genai: bool,
          standard_ops: bool = False) -> tuple[dict[int, Path], Optional[Path]]:
    """The safesteer artifacts (float32 exported and calibrated once per block size; fp16/int8/int4 made
    from those, with the exporter's accuracy check) and the onnxruntime-genai model; reused when present.
    ``standard_ops``: --standard-ops exports (what CUDA / TensorRT run)."""
    artifacts = {}
    std = "-std" if standard_ops else ""
    for b in blocks:
        fp32 = work / f"safesteer-fp32-b{b}{std}"
        if not (fp32 / "manifest.json").is_file():
            _sh([sys.executable, "-m", "safesteer_export.cli", str(hf_dir), "-o", str(fp32), "--overwrite",
                 "--block-size", str(b), *(["--standard-ops"] if standard_ops else [])])
        out = fp32 if precision == "fp32" else work / f"safesteer-{precision}-b{b}{std}"
        if not (out / "manifest.json").is_file():
            _sh([sys.executable, "-c", "import sys; from pathlib import Path; "
                 "from safesteer_export.quantize import quantize_artifact; "
                 "quantize_artifact(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])", str(fp32), str(out), precision])
        artifacts[b] = out
    if not genai:
        return artifacts, None
    model = work / f"genai-{precision}"
    if not (model / "genai_config.json").is_file():
        _sh([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(model),
             "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache"),
             "--extra_options", "hf_token=false"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return artifacts, model


def _sh(cmd: list[str], env=None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def run_child(job: dict, work: Path) -> dict:
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, __file__, "--child", str(job_file)], capture_output=True, text=True,
                          env={**os.environ, **job.get("env", {})})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{job['engine']} {job['path']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child_main(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--work", type=Path, required=True, help="where artifacts and genai models are built (reused)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=PRECISIONS)
    p.add_argument("--blocks", nargs="+", type=int, default=[4, 0], help="safesteer block sizes (0 = whole model)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", nargs="+", type=int, default=[40, 256])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="passes over all engines; medians are taken across them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["off", "probe", "lookahead"])
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-genai", action="store_true", help="no onnxruntime-genai rows (GPU runs: its CPU build only)")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="the Generator's execution providers (e.g. CUDAExecutionProvider)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if "fp16" in args.precisions and not args.skip_genai:
        p.error("onnxruntime-genai's CPU builds have no fp16: add --skip-genai (GPU runs)")
    on_gpu = bool(set(args.providers) - {"CPUExecutionProvider"})  # GPU runs need --standard-ops artifacts
    built = {prec: build(args.hf_dir.resolve(), args.work, prec, args.blocks, not args.skip_genai, on_gpu)
             for prec in args.precisions}
    first = next(iter(built.values()))[0]
    prompts = prompt_ids(next(iter(first.values())), args.prompt_tokens)
    base = {"prompts": prompts, "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
            "providers": args.providers}

    jobs = []  # (precision, engine label, job)
    if not args.skip_transformers:
        jobs.append(("fp32", "transformers eager", {**base, "engine": "transformers", "path": str(args.hf_dir)}))
    for prec, (artifacts, genai) in built.items():
        if genai is not None:
            jobs.append((prec, "onnxruntime-genai", {**base, "engine": "genai", "path": str(genai)}))
            if not on_gpu:  # what it gets from huge pages when the process starts with glibc's tunable
                jobs.append((prec, "onnxruntime-genai, GLIBC_TUNABLES huge pages", {
                    **base, "engine": "genai", "path": str(genai), "env": {"GLIBC_TUNABLES": HUGE_MALLOC}}))
        for b, art in artifacts.items():
            name = f"Generator {'whole model' if b == 0 else f'{b}-layer blocks'}"
            for mode in args.modes if b == args.blocks[-1] else ["off"]:  # safety modes: last block size only
                jobs.append((prec, f"{name}, {mode}", {**base, "engine": "generator", "path": str(art), "mode": mode}))
            if b == args.blocks[-1] and not on_gpu:  # the default huge pages' share
                jobs.append((prec, f"{name}, off, 4 KB pages", {**base, "engine": "generator", "path": str(art),
                                                               "mode": "off", "huge_pages": False}))
            if b != 0 and not on_gpu:  # several graphs per step: also on one shared thread pool (opt-in)
                jobs.append((prec, f"{name}, off, shared pool", {**base, "engine": "generator", "path": str(art),
                                                                 "mode": "off", "thread_pool": "shared"}))
    results = {(prec, label): [] for prec, label, _ in jobs}
    done = _load_done(args.work / "results.jsonl")  # a rerun with the same jobs resumes where one stopped
    for r in range(args.rounds):  # engines alternate, so a slow minute on a shared machine hits all of them
        for prec, label, job in jobs:
            key = json.dumps([r, prec, label, job], sort_keys=True)
            if key not in done:
                done[key] = run_child(job, args.work)
                with open(args.work / "results.jsonl", "a") as f:
                    f.write(json.dumps({"key": key, "result": done[key]}) + "\n")
            results[prec, label].append(done[key])
            print(f"round {r + 1}/{args.rounds}: {prec} {label} done", flush=True)
    rows = [(prec, label, merge_rounds(results[prec, label])) for prec, label, _ in jobs]
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps([{"precision": p, "engine": e, **r} for p, e, r in rows], indent=1))


def _load_done(path: Path) -> dict:
    if not path.is_file():
        return {}
    return {row["key"]: row["result"] for row in map(json.loads, path.read_text().splitlines()) if row}


def merge_rounds(rounds: list[dict]) -> dict:
    """One engine's results from several rounds: per prompt size, the median ms/token and TTFT; the largest peak RSS."""
    sizes = {}
    for size, first in rounds[0]["sizes"].items():
        per = [r["sizes"][size] for r in rounds]
        sizes[size] = {**first, "ms_per_token": statistics.median(x["ms_per_token"] for x in per),
                       "ttft_s": statistics.median(x["ttft_s"] for x in per),
                       "ms_per_token_rounds": [x["ms_per_token"] for x in per]}
    return {"sizes": sizes, "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
            "load_s": statistics.median(r.get("load_s", float("nan")) for r in rounds)}


def print_table(rows, args) -> None:
    genai = {prec: r for prec, e, r in rows if e == "onnxruntime-genai"}
    sizes = [str(s) for s in args.prompt_tokens]
    head = "| precision | engine | " + " | ".join(
        f"{s}-tok prompt: tok/s | ms/token | TTFT s | vs genai" for s in sizes) + " | peak RSS MB | load s |"
    print(f"\n{args.new_tokens} new tokens, greedy, batch 1, {args.threads} threads, median of {args.runs} runs x {args.rounds} rounds\n")
    print(head)
    print("|" + "---|" * (4 + 4 * len(sizes)))
    for prec, engine, r in rows:
        cells = []
        for s in sizes:
            x = r["sizes"][s]
            ref = genai.get(prec, {}).get("sizes", {}).get(s)
            ratio = f"{ref['ms_per_token'] / x['ms_per_token']:.2f}x" if ref else "-"
            short = "" if x["new_tokens"] == args.new_tokens else f" ({x['new_tokens']} tok)"
            cells += [f"{1000 / x['ms_per_token']:.1f}{short}", f"{x['ms_per_token']:.1f}", f"{x['ttft_s']:.2f}", ratio]
        print(f"| {prec} | {engine} | " + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |")


if __name__ == "__main__":
    main()
