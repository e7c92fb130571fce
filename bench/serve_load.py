"""Load on ``safesteer-serve``: N concurrent streaming clients, aggregate tokens/s against one client, same run.

    .venv/bin/python bench/serve_load.py ARTIFACT [--clients 1 2 4 8 16] [--requests 4] [--max-tokens 64]
        [--max-batch 8] [--serial] [--timeout 600] [--soak N] [--json FILE]

Starts the server on 127.0.0.1 (a free port), then for each client count runs that many threads, each sending
``--requests`` streaming chat requests one after another (bounded in count, and every request in time by
``--timeout``), and stops the server. Prints per client count: aggregate completion tokens/s and its ratio to the
one-client rate measured in the same run, time to first token p50 / p95, inter-token latency p50 / p95, errors.
SafeSteer runs with the artifact's defaults (probe on). ``--serial`` then repeats the levels on a second server
with ``--max-batch 1`` (one request at a time: the server before batching) in the same run, for the ratio.
``--soak N`` then sends N more requests from the largest client count, in rounds, and prints the server's resident
memory (VmRSS) after each round with the errors so far: a leak shows as a rising curve.
Needs the serve and dev extras (the openai client).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
           "Give three tips for learning a new language.", "Describe the water cycle for a child."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(artifact: str, port: int, max_tokens: int, queue: int, max_batch: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "safesteer_rt.serve", artifact, "--port", str(port),
                             "--model-name", "bench", "--max-tokens", str(max_tokens), "--max-queue", str(queue),
                             "--max-batch", str(max_batch)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def one_request(client, prompt: str, max_tokens: int, timeout: float) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, stream=True, timeout=timeout)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": (stamps[0] - start) if stamps else float("nan"), "gaps": gaps, "tokens": tokens,
            "seconds": time.perf_counter() - start}


def run_level(client, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    results, errors, lock = [], [], threading.Lock()

    def worker(i: int) -> None:
        for r in range(requests):
            try:
                out = one_request(client, PROMPTS[(i + r) % len(PROMPTS)], max_tokens, timeout)
                with lock:
                    results.append(out)
            except Exception as exc:  # counted and reported, never retried
                with lock:
                    errors.append(repr(exc)[:200])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * requests + 60)
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"), "ttft_p95_s": pct(ttft, 0.95),
            "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"), "itl_p95_ms": 1000 * pct(gaps, 0.95),
            "error_samples": errors[:3]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(client, pid: int, clients: int, total: int, max_tokens: int, timeout: float, per_round: int = 48) -> list:
    """``total`` requests (rounded up to whole rounds) from ``clients`` clients; the RSS after each round."""
    each = max(1, per_round // clients)
    curve, done, errors = [], 0, 0
    while done < total:
        row = run_level(client, clients, each, max_tokens, timeout)
        done += row["requests"] + row["errors"]
        errors += row["errors"]
        curve.append({"requests": done, "errors": errors, "rss_mb": rss_mb(pid), "tokens_per_s": row["tokens_per_s"]})
        print(f"soak: {done} requests, {errors} errors, server RSS {curve[-1]['rss_mb']:.0f} MB", flush=True)
    return curve


def serve_levels(args, max_batch: int, soak_too: bool) -> tuple[list, list]:
    """One server (``max_batch``), every client level, then the soak (``soak_too``); the server is stopped."""
    import openai

    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = start(args.artifact, port, args.max_tokens, max(args.clients) * 2, max_batch, log)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            one_request(client, PROMPTS[0], 8, args.timeout)  # warm-up
            rows = [run_level(client, n, args.requests, args.max_tokens, args.timeout) for n in args.clients]
            curve = soak(client, proc.pid, max(args.clients), args.soak, args.max_tokens, args.timeout) \
                if soak_too and args.soak else []
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows, curve


def table(rows: list, serial: list) -> list[str]:
    base = rows[0]["tokens_per_s"]
    by_clients = {r["clients"]: r for r in serial}
    head = "| clients | requests | errors | tokens/s | vs 1 client |" + (" vs one-at-a-time |" if serial else "")
    out = [head + " TTFT p50 / p95 s | inter-token p50 / p95 ms |",
           "|---|---|---|---|---|" + ("---|" if serial else "") + "---|---|"]
    for r in rows:
        vs = ""
        if serial:
            s = by_clients.get(r["clients"])
            vs = f" {r['tokens_per_s'] / s['tokens_per_s']:.2f}x ({s['tokens_per_s']:.1f}) |" if s else " — |"
        out.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
                   f"{r['tokens_per_s'] / base:.2f}x |{vs} {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
                   f"{r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client (bounded)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--serial", action="store_true", help="also run the levels one request at a time (--max-batch 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most")
    p.add_argument("--soak", type=int, default=0, help="then this many requests from the largest client count")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows, curve = serve_levels(args, args.max_batch, soak_too=True)
    serial = serve_levels(args, 1, soak_too=False)[0] if args.serial else []
    print(f"safesteer-serve load, {args.artifact}, --max-batch {args.max_batch}, {args.requests} requests per client, "
          f"{args.max_tokens} max tokens, SafeSteer defaults")
    print("\n".join(table(rows, serial)))
    if curve:
        rss = [c["rss_mb"] for c in curve]
        print(f"\nsoak: {curve[-1]['requests']} requests from {max(args.clients)} clients, {curve[-1]['errors']} errors; "
              f"server RSS after the first round {rss[0]:.0f} MB, after the last {rss[-1]:.0f} MB, max {max(rss):.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"max_batch": args.max_batch, "levels": rows, "serial": serial,
                                         "soak": curve}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
