"""thread_pool="shared": a Generator's sessions on onnxruntime's process-wide intra-op pool. onnxruntime allows that
pool once per process and then refuses sessions with pools of their own, so the checks run in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safesteer_rt import ConfigError, Generator

LLAMA = ("LlamaForCausalLM", "gqa")

CHILD = r"""
import json, sys
from safesteer_rt import ConfigError, Generator
case, blocks = sys.argv[1], sys.argv[2]
ids = [5, 17, 42, 9, 33]

def pools(gen):  # use_per_session_threads of every session
    return sorted({b.session.get_session_options().use_per_session_threads for b in gen.engine.blocks})

def error(**kw):
    try:
        Generator(blocks, **kw)
        return "no error"
    except ConfigError as exc:
        return str(exc)

out = {}
if case == "ours":
    own = Generator(blocks, threads=1)
    out["before"] = (own.thread_pool, pools(own))
    tokens = own.generate(prompt_ids=ids, max_new_tokens=12).token_ids
    shared = Generator(blocks, threads=1, thread_pool="shared")
    out["shared"] = (shared.thread_pool, pools(shared))
    out["same_tokens"] = shared.generate(prompt_ids=ids, max_new_tokens=12).token_ids == tokens
    out["old_generator_still_runs"] = own.generate(prompt_ids=ids, max_new_tokens=12).token_ids == tokens
    out["after_auto"] = Generator(blocks, threads=2).thread_pool
    out["after_per_graph"] = error(thread_pool="per-graph")
else:  # the application made onnxruntime's global pools itself
    from onnxruntime.capi import _pybind_state
    _pybind_state.set_global_thread_pool_sizes(1, 1)
    out["auto"] = error()
    out["shared"] = Generator(blocks, thread_pool="shared").thread_pool
print("RESULT " + json.dumps(out))
"""


def child(case: str, artifact) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, case, str(artifact)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def test_thread_pool_choice_is_validated(tiny):
    with pytest.raises(ConfigError, match="thread_pool must be one of"):
        Generator(tiny.artifact(*LLAMA), thread_pool="global")


def test_shared_pool_runs_every_block_and_then_binds_the_process(tiny):
    out = child("ours", tiny.artifact(*LLAMA))
    assert out["before"] == ["per-graph", [True]]  # auto without a shared pool in the process
    assert out["shared"] == ["shared", [False]]  # every block session on the process-wide pool
    assert out["same_tokens"] and out["old_generator_still_runs"]
    assert out["after_auto"] == "shared"  # later Generators join it (threads=2 is logged as ignored)
    assert "refuses per-graph pools" in out["after_per_graph"] and "thread_pool='auto'" in out["after_per_graph"]


def test_global_pool_made_by_the_application(tiny):
    out = child("theirs", tiny.artifact(*LLAMA))
    assert "made elsewhere" in out["auto"] and "thread_pool='shared'" in out["auto"]
    assert out["shared"] == "shared"
