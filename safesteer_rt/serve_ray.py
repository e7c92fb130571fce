"""``safesteer-serve ARTIFACT --ray --replicas N``: the same OpenAI-compatible app as a Ray Serve deployment.

Each replica is a Ray actor that loads its own Generator and runs ``serve.build_app``'s Starlette app (its own
worker thread, queue and limits); Ray's HTTP proxy routes requests between the replicas and can autoscale them.
Every response names the replica that made it (header ``x-safesteer-replica``). Ray is the ``serve-ray`` extra;
the plain server does not need it.

``serve run`` takes the same application from a config file through ``build`` (docs/usage.md).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from safesteer_runtime.errors import ConfigError

from .serve import ServeConfig, build_app


def application(artifact: str, *, replicas: int = 1, threads: int = 0, model_name: Optional[str] = None,
                cfg: ServeConfig = ServeConfig(), expected_sha256: Optional[str] = None,
                replica_cpus: float = 1.0, autoscaling: Optional[dict] = None):
    """A Ray Serve application: ``replicas`` copies of the server (or Ray's ``autoscaling_config``)."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(f"replicas must be an integer >= 1, got {replicas!r}")
    from ray import serve
    artifact = os.path.abspath(artifact)  # replicas may start in another working directory
    name = model_name or os.path.basename(artifact)

    def app_on_replica():  # runs in each replica's process when it starts
        from safesteer_rt import Generator

        gen = Generator(artifact, threads=threads, expected_sha256=expected_sha256)
        return build_app(gen, name, cfg, instance=f"{socket.gethostname()}:{os.getpid()}")

    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # one queue per replica already bounds its requests; Ray may hand a replica that many plus its batch
    deployment = serve.deployment(name="safesteer", ray_actor_options={"num_cpus": replica_cpus},
                                  max_ongoing_requests=cfg.max_queue + cfg.max_batch, **scale)
    return deployment(serve.ingress(app_on_replica)()).bind()


def build(args: dict):
    """``serve run`` entry point: ``import_path: safesteer_rt.serve_ray:build`` with ``args`` holding ``artifact``
    and optionally ``replicas``, ``threads``, ``model_name``, ``max_tokens``, ``max_queue``, ``timeout``,
    ``max_batch``, ``prefill_chunk``, ``kv_capacity``, ``expected_sha256``, ``replica_cpus``."""
    args = dict(args)
    if "artifact" not in args:
        raise ConfigError("the Ray Serve config's args need 'artifact': the artifact directory")
    ints = {name: int(args.pop(name, getattr(ServeConfig, name)))
            for name in ("max_tokens", "max_queue", "max_batch", "prefill_chunk", "kv_capacity")}
    cfg = ServeConfig(request_timeout_s=float(args.pop("timeout", ServeConfig.request_timeout_s)), **ints)
    artifact = args.pop("artifact")
    known = {"replicas", "threads", "model_name", "expected_sha256", "replica_cpus", "autoscaling"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown Ray Serve args {unknown}; known: artifact, timeout, "
                          + ", ".join(sorted(known | set(ints))))
    return application(artifact, cfg=cfg, **args)


def run(artifact: str, *, host: str, port: int, replicas: int, threads: int, model_name: Optional[str],
        cfg: ServeConfig, expected_sha256: Optional[str]) -> None:
    """Start a local Ray instance, deploy, and serve until interrupted (SIGINT / SIGTERM)."""
    import signal
    import time

    import ray
    from ray import serve

    def stop(*_):
        raise KeyboardInterrupt

    # a service manager's stop shuts Serve and Ray down like Ctrl-C; SIGINT too when a shell started us in the
    # background (which leaves SIGINT ignored, and Ray's processes would outlive us)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    app = application(artifact, replicas=replicas, threads=threads, model_name=model_name, cfg=cfg,
                      expected_sha256=expected_sha256)  # bad arguments fail here, before Ray starts
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # on-prem: Ray reports nothing anywhere
    # Ray's own services (GCS, raylet, workers) listen on the machine's network address, as Ray always does (it
    # refuses a loopback node address); the HTTP proxy listens where --host says (docs/security.md)
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="safesteer", route_prefix="/")
        print(f"safesteer-serve: {replicas} Ray Serve replica(s) on http://{host}:{port} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
