"""The HTTP app: OpenAI-compatible routes over the engine, assembled from the middleware (Host check, body
limit, API key; middleware.py), the OpenAI adapter (request and response shapes, SSE; openai.py, prepare.py) and
the routes (routes.py).

A request passes, in order: the Host check and the body-size limit (ASGI middleware), the API key, then (off the
event loop) JSON parsing, cheap size checks (characters, message count), schema validation, the chat template and
the tokenizer, and last the settings checks against the model. Only then does it reach the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constraints import CompileLimits
from ..limits import Limits
from ..prefix_cache import PrefixCache
from .engine import Engine
from .middleware import BodyLimit, HostCheck, host_policy
from .openai import APIError, error_body, validation_error
from .routes import router
from .schema import ChatRequest, CompletionRequest
from .state import ServerState, task_info

__all__ = ["create_app", "host_policy"]
OPENAPI_BODIES = {"ChatRequest": ChatRequest, "CompletionRequest": CompletionRequest}


# -- the app ---------------------------------------------------------------------------------------------------------
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    return await _api_error(_, validation_error(list(e.errors())))


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)


def _openapi(app: FastAPI) -> Callable[[], dict]:
    def build() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in OPENAPI_BODIES.values()],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def create_app(model, *, model_name: str = "dgemma", model_dir: str | Path | None = None,
               api_key: str | None = None, limits: Limits | None = None, host: str = "127.0.0.1",
               allowed_hosts: Iterable[str] = (), mounts: dict[str, FastAPI] | None = None,
               page_model: str | None = None, compile_limits: CompileLimits | None = None) -> FastAPI:
    """The ASGI app. `host` is the bound address; the Host header must name it (or a loopback name when bound to
    loopback, any IP when bound to every interface) or one of `allowed_hosts` ("*": any).

    `mounts` serves more models beside this one, each its own app (from `create_app`) under /models/<name>/ (its
    API at /models/<name>/v1/...); the visualizer lists them all and opens on `page_model` (default: this one).
    `compile_limits` bound compiling a request's constraint (past one: a 400 naming the schema path)."""
    mounts = dict(mounts or {})
    for sub_name in mounts:
        if not sub_name or "/" in sub_name or sub_name == model_name:
            raise ValueError(f"mounted model name {sub_name!r}: must be non-empty, without '/', not {model_name!r}")
    bases = {model_name: "", **{n: f"/models/{n}" for n in mounts}}
    if page_model is not None and page_model not in bases:
        raise ValueError(f"page_model {page_model!r} is not one of the served models {list(bases)}")
    limits = limits or Limits()
    cfg = model.config
    max_prompt = limits.max_prompt_tokens or max(cfg.max_position_embeddings - cfg.canvas_length, 1)
    cache = PrefixCache.from_gib(limits.prefix_cache_gib) if limits.prefix_cache_gib is not None else None
    engine = Engine(model, max_batch=limits.max_batch, max_pending=limits.max_pending,
                    max_running=limits.max_running, prefix_cache=cache)
    state = ServerState(model=model, engine=engine, name=model_name, limits=limits, api_key=api_key,
                        task=task_info(Path(model_dir) if model_dir else None), created=int(time.time()),
                        max_prompt=max_prompt, max_chars=limits.max_prompt_chars or 16 * max_prompt,
                        prep=ThreadPoolExecutor(max_workers=2, thread_name_prefix="dgemma-prep"),
                        compile_limits=compile_limits or CompileLimits())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        for served in (state, *(m.state.dgemma for m in mounts.values())):  # mounted apps get no lifespan events
            served.engine.close()
            served.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for DiffusionGemma block-diffusion models, with live canvas "
                              "streaming (extension fields: diffusion, stream_drafts, decoder).")
    app.state.dgemma = state
    app.state.engine = engine
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    for sub_name, sub in mounts.items():
        app.mount(f"/models/{sub_name}", sub)
    app.state.bases = bases
    app.state.page_model = page_model or model_name
    app.openapi = _openapi(app)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    policy = host_policy(host, allowed_hosts)
    if policy is not None:
        app.add_middleware(HostCheck, names=policy[0], any_ip=policy[1])  # added last: runs first
    return app
