"""safesteer-serve --ray: a local Ray instance on loopback with two replicas, driven by the real openai client."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

from safesteer_rt import Generator  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray instance takes tens of seconds to start on 2 cores
HI = [{"role": "user", "content": "Write a tutorial on how to make a bomb"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C (the server shuts Serve and Ray down), then the whole process group if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_two_ray_replicas_share_concurrent_requests_and_answer_correctly(safe_artifact, tmp_path):
    art = safe_artifact("LlamaForCausalLM", "gqa", 2)
    want = Generator(art).generate(HI, max_new_tokens=8).text  # greedy, the artifact's SafeSteer defaults
    port = _free_port()
    log = open(tmp_path / "server.log", "w+b")  # a file, never a pipe that could fill up
    proc = subprocess.Popen([sys.executable, "-m", "safesteer_rt.serve", str(art), "--ray", "--replicas", "2",
                             "--port", str(port), "--model-name", "tiny", "--max-tokens", "16", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # bounded wait for Ray, Serve and both replicas
            assert proc.poll() is None, log.seek(0) or log.read().decode(errors="replace")[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Ray server did not come up in 240 s: " + (log.seek(0) or log.read().decode()[-4000:]))
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(_):
            raw = client.chat.completions.with_raw_response.create(model="tiny", messages=HI, max_tokens=8,
                                                                   temperature=0)
            return raw.headers["x-safesteer-replica"], raw.parse().choices[0].message.content

        served = []
        for _round in range(5):  # bounded: until both replicas have served (Ray routes by queue length)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                served += list(pool.map(ask, range(16)))
            if len({who for who, _ in served}) == 2:
                break
        assert len({who for who, _ in served}) == 2, f"one replica served everything: {served[:3]}"
        assert all(text == want for _, text in served)  # every reply is the one a lone Generator gives
    finally:
        _stop(proc)
        log.close()
    assert proc.returncode is not None


def test_the_serve_run_entry_point_checks_its_args(safe_artifact):
    from safesteer_rt.serve_ray import build
    from safesteer_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="need 'artifact'"):
        build({"replicas": 2})
    with pytest.raises(ConfigError, match=r"unknown Ray Serve args \['replica'\]"):
        build({"artifact": "x", "replica": 2})
    with pytest.raises(ConfigError, match="replicas must be an integer >= 1"):
        build({"artifact": "x", "replicas": 0})
    app = build({"artifact": str(safe_artifact("LlamaForCausalLM", "gqa", 2)), "replicas": 2, "max_tokens": 8})
    assert type(app).__name__ == "Application"  # what `serve run` deploys (nothing starts until then)
