"""Interleaved A/B timing of ONNX graphs with the same kind of inputs (e.g. two exports of one block).

    .venv/bin/python bench/graph_ab.py A.onnx B.onnx [...] [--past 100] [--rounds 8] [--calls 40] [--threads 2]

Decode-step shapes: one new row over ``--past`` cached positions (past_* inputs get that length, or for
blocks with an in-place cache buffers of past + 1 positions bound to both past_* and present_*; the
attention mask past + 1, position ids the next position; SafeSteer knobs are zero). The graphs run in
one process, alternating every ``--calls`` calls for ``--rounds`` rounds, so a slow minute on a shared
machine hits all of them; prints each graph's median ms per call and its ratio to the first. Step-level
timings on a 2-core VM drift by ±10% between minutes; this is how graph changes were judged in issue 5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.force_spinning_stop", "1")  # as the runtime opens its graphs
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def decode_feeds(sess: ort.InferenceSession, past: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        if inp.name.startswith("past_") and len(shape) == 4:  # in-place cache buffer [b, kv_heads, capacity, d]
            shape[2] = past + 1
        elif inp.name.startswith("past_"):
            shape[1] = past
        if inp.name == "attention_mask" and len(shape) == 4:
            shape[3] = past + 1
        dtype = TYPES[inp.type]
        if inp.name == "position_ids":
            feeds[inp.name] = np.full(shape, past, dtype)
        elif dtype is np.float32 and inp.name not in ("attention_mask", "steer_alpha", "msav_beta", "gate_logit"):
            feeds[inp.name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        elif inp.name == "top_k":
            feeds[inp.name] = np.ones(shape, dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def binding(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
    """Inputs bound once; an in-place cache's buffers also as their present_* outputs (as the runtime does), other
    outputs left to onnxruntime."""
    io = sess.io_binding()
    outputs = {o.name for o in sess.get_outputs()}
    for name, value in feeds.items():
        present = name.replace("past_", "present_", 1)
        if name.startswith("past_") and present in outputs:
            buffer = ort.OrtValue.ortvalue_from_numpy(value)
            io.bind_ortvalue_input(name, buffer)
            io.bind_ortvalue_output(present, buffer)
        else:
            io.bind_cpu_input(name, value)
    for name in outputs:
        if not name.startswith("present_"):
            io.bind_output(name)
    return io


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("graphs", nargs="+")
    p.add_argument("--past", type=int, default=100)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    sessions = [session(g, args.threads) for g in args.graphs]
    bindings = [binding(s, decode_feeds(s, args.past, rng)) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for s, io, acc in zip(sessions, bindings, times):
            start = time.perf_counter()
            for _ in range(args.calls):
                s.run_with_iobinding(io)
            acc.append((time.perf_counter() - start) / args.calls * 1000.0)
    base = statistics.median(times[0])
    for g, acc in zip(args.graphs, times):
        med = statistics.median(acc)
        print(f"{med:8.2f} ms  {med / base:5.2f}x  {g}  (rounds: {', '.join(f'{x:.1f}' for x in acc)})")


if __name__ == "__main__":
    main()
