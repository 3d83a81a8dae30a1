"""`dgemma serve --ray`: the same FastAPI app and engine as `dgemma serve`, as a Ray Serve deployment.

Each replica is a Ray actor that loads its own model and runs its own batching engine behind `create_app`, so
every per-request promise of the single server (OpenAI routes, SSE drafts, seeds that reproduce, 4xx errors, the
API key, deadlines) holds per replica. Ray's HTTP proxy routes requests to replicas and Ray's controller replaces
a replica whose actor dies; requests held by the other replicas are not touched. Connection limits (read
deadlines, keep-alive, the connection cap) are the proxy's, not dgemma's uvicorn wiring.

Needs the optional extra: `pip install 'dgemma[ray]'`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ..constraints import CompileLimits
from ..limits import Limits

APP_NAME = "dgemma"
REPLICA_HEADER = "x-dgemma-replica"  # which replica answered: the replica's id in Ray Serve


@dataclass
class ReplicaSpec:
    """What every replica loads and how it serves (the arguments of `create_app`)."""

    model: str
    dtype: str | None = None
    device: str = "cpu"
    model_name: str = "dgemma"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"  # the proxy's bound address: the Host header check follows it
    allowed_hosts: tuple[str, ...] = ()
    threads: int | None = None  # torch intra-op threads per replica (default: its CPU share, at least 1)
    compile_limits: CompileLimits = field(default_factory=CompileLimits)  # a constraint's compile bounds


@dataclass
class ScaleSpec:
    """How many replicas and what each one reserves."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscale on ongoing requests per replica
    max_replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas for autoscaling, or neither")
        if self.max_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas, got {self.min_replicas}, "
                             f"{self.max_replicas}")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError("--max-replicas must be at least 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be non-negative")


class _ReplicaHeader:
    """ASGI middleware: name the replica in every response (load balancing is visible; tests find a request's
    replica from its first bytes)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, tagged)


@serve.ingress()  # the app is built per replica, after its model has loaded
class DgemmaReplica:
    def __init__(self, spec: ReplicaSpec, num_cpus: float = 1.0):
        # imported in the replica's process, where the model is loaded (this module itself needs only Ray)
        import torch

        from ..checkpoint.load import load_model
        from .app import create_app

        torch.set_num_threads(spec.threads or max(1, int(num_cpus)))
        model = load_model(spec.model, dtype=spec.dtype, device=spec.device)
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self._app = create_app(model, model_name=spec.model_name, model_dir=spec.model, api_key=spec.api_key,
                               limits=spec.limits, host=spec.host, allowed_hosts=spec.allowed_hosts,
                               compile_limits=spec.compile_limits)
        self._app.add_middleware(_ReplicaHeader, replica=self.replica_id)

    def __serve_build_asgi_app__(self):
        return self._app


def deployment_options(spec: ReplicaSpec, scale: ScaleSpec) -> dict[str, Any]:
    """Ray Serve options: replica count or autoscaling bounds, resources, and a per-replica request cap that
    leaves the engine's own queue (and its 429) in charge."""
    scale.validate()
    limits = spec.limits
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus},
        "max_ongoing_requests": limits.max_running + limits.max_pending,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if scale.max_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                      "initial_replicas": min(max(scale.replicas, scale.min_replicas),
                                                              scale.max_replicas),
                                      "target_ongoing_requests": limits.max_batch}
    else:
        opts["num_replicas"] = scale.replicas
    return opts


def build_app(spec: ReplicaSpec, scale: ScaleSpec):
    """The bound Ray Serve application (pass it to `serve.run`)."""
    deployment = serve.deployment(DgemmaReplica, name="DgemmaReplica").options(**deployment_options(spec, scale))
    return deployment.bind(spec, scale.num_cpus)


def start(spec: ReplicaSpec, scale: ScaleSpec, port: int = 8000, blocking: bool = False):
    """Deploy on the connected Ray cluster (call `ray.init` first); the HTTP proxy binds `spec.host:port`.
    Returns once every replica is up (or never, with `blocking`)."""
    serve.start(http_options={"host": spec.host, "port": port})
    return serve.run(build_app(spec, scale), name=APP_NAME, route_prefix="/", blocking=blocking)


def replica_actor(replica_id: str):
    """The Ray actor of a replica named in the x-dgemma-replica header."""
    return ray.get_actor(replica_id, namespace="serve")


def running_replicas() -> int:
    """Replicas of the dgemma application that are up and serving."""
    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return 0
    dep = status.deployments.get("DgemmaReplica")
    return 0 if dep is None else dep.replica_states.get("RUNNING", 0)


def serve_forever(spec: ReplicaSpec, scale: ScaleSpec, port: int, address: str | None = None,
                  num_cpus: int | None = None) -> None:
    """`dgemma serve --ray`: join the cluster at `address` (default: RAY_ADDRESS, else start a local one with
    `num_cpus`), deploy, and serve until interrupted; the deployment is torn down on exit."""
    scale.validate()
    if address is None and num_cpus is not None:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        start(spec, scale, port=port, blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def app_builder(args: dict[str, str]):
    """For Ray's own CLI and config files: `serve run dgemma.serve.ray_serve:app_builder model=DIR replicas=2`
    (keys: model, model_name, dtype, device, replicas, min_replicas, max_replicas, replica_cpus, replica_gpus,
    host, every server limit of `dgemma serve` by its field name, e.g. max_batch, max_tokens, and the compile limits
    as compile_seconds, compile_memory_mb, compile_states; the API key comes from $DGEMMA_API_KEY, so it stays out
    of config files)."""
    compile_keys = {"compile_" + f.name: f for f in fields(CompileLimits) if "help" in f.metadata}
    known = {"model", "model_name", "dtype", "device", "replicas", "min_replicas", "max_replicas", "replica_cpus",
             "replica_gpus", "host", *(f.name for f in fields(Limits)), *compile_keys}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(known)}")
    if "model" in args:
        model = args["model"]
    else:
        from ..tasks.sudoku_run import default_model_path

        model = str(default_model_path())
    opt = lambda key, kind: kind(args[key]) if key in args else None  # noqa: E731
    limits = Limits(**{f.name: opt(f.name, f.metadata["kind"]) for f in fields(Limits) if f.name in args})
    limits.validate()
    compile_limits = CompileLimits(**{f.name: opt(k, f.metadata["kind"]) for k, f in compile_keys.items()
                                      if k in args})
    compile_limits.validate()
    spec = ReplicaSpec(model=model, dtype=args.get("dtype"), device=args.get("device", "cpu"),
                       model_name=args.get("model_name", Path(model).resolve().name),
                       api_key=os.environ.get("DGEMMA_API_KEY") or None, limits=limits,
                       host=args.get("host", "127.0.0.1"), compile_limits=compile_limits)
    scale = ScaleSpec(replicas=opt("replicas", int) or 1, min_replicas=opt("min_replicas", int),
                      max_replicas=opt("max_replicas", int), num_cpus=opt("replica_cpus", float) or 1.0,
                      num_gpus=opt("replica_gpus", float) or 0.0)
    return build_app(spec, scale)
