"""safesteer-generate ARTIFACT --prompt ... [--image PATH] [--max-new-tokens N] [--json]"""

from __future__ import annotations

import argparse
import json
import sys

from safesteer_runtime.errors import SafeSteerError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="safesteer-generate", description="Generate text from a safesteer artifact.")
    p.add_argument("artifact", help="artifact directory written by safesteer-export")
    p.add_argument("--prompt", required=True, help="the user message (rendered with the chat template)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--providers", default="auto", help="'auto' or a comma-separated list of onnxruntime EPs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = onnxruntime default)")
    p.add_argument("--thread-pool", choices=("auto", "shared", "per-graph"), default="auto",
                   help="shared: all graphs on onnxruntime's process-wide pool (faster with multi-block artifacts "
                        "on the CPU); per-graph: a pool per graph; auto (default): per-graph")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="keep the weights on 4 KB pages (default: moved onto 2 MB pages after loading, CPU, Linux)")
    p.add_argument("--kv-cache", choices=("auto", "host", "device"), default="auto",
                   help="where the KV cache lives (auto: device memory on CUDA/TensorRT, host memory on CPU)")
    p.add_argument("--engine-cache-dir", default=None, help="TensorRT engine + timing caches (default ~/.cache/safesteer/trt/<manifest sha256>)")
    p.add_argument("--trt-max-tokens", type=int, default=4096,
                   help="context (prompt + new tokens) the TensorRT engines are built for")
    p.add_argument("--safety", choices=["auto", "on", "off"], default="auto",
                   help="SafeSteer: auto = on when the artifact was calibrated (default)")
    for knob, typ in safety_knobs():
        p.add_argument(f"--{knob.replace('_', '-')}", type=typ, default=None,
                       help=f"SafeSteer knob {knob} (default: the artifact's)")
    p.add_argument("--expected-sha256", default=None,
                   help="refuse the artifact unless its manifest.json has this sha256 (pins every file in it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p.parse_args(argv)


def safety_knobs() -> list[tuple[str, type]]:
    """SafetyConfig's numeric knobs and their types: the flags are made from the one definition."""
    from dataclasses import fields

    from safesteer_runtime.safety import SafetyConfig

    return [(f.name, int if f.type == "int" else float) for f in fields(SafetyConfig) if f.type in ("int", "float")]


def safety_arg(args, gen):
    from safesteer_rt import SafetyConfig

    overrides = {name: getattr(args, name) for name, _ in safety_knobs() if getattr(args, name) is not None}
    if args.safety == "off":
        return False
    if not overrides:
        return True if args.safety == "on" else "auto"
    if gen.manifest.safety is None:
        return True  # raises the "exported without calibration" error with what to do
    return SafetyConfig.from_manifest(gen.manifest.safety, **overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    from safesteer_rt import Generator

    try:
        providers = args.providers if args.providers == "auto" else args.providers.split(",")
        gen = Generator(args.artifact, providers=providers, threads=args.threads, thread_pool=args.thread_pool,
                        kv_cache=args.kv_cache, huge_pages=args.huge_pages,
                        engine_cache_dir=args.engine_cache_dir, trt_max_tokens=args.trt_max_tokens,
                        expected_sha256=args.expected_sha256)
        knobs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                     safety=safety_arg(args, gen))
        if args.raw:
            request = dict(prompt=args.prompt, images=args.image or None)
        else:
            content = [{"type": "image", "image": path} for path in args.image]
            content.append({"type": "text", "text": args.prompt})
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": content})
            request = dict(messages=messages)
        if args.json:
            result = gen.generate(**request, **knobs)
            print(json.dumps({
                "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                "timings": result.timings.as_dict(), "providers": gen.providers,
                "huge_pages_mb": round(gen.huge_pages.bytes / 2**20),
                "prompt_score": result.prompt_score, "safety_trace": result.safety_trace,
            }, indent=2))
        else:
            for piece in gen.stream(**request, **knobs):
                print(piece, end="", flush=True)
            print()
    except SafeSteerError as exc:
        print(f"safesteer-generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
