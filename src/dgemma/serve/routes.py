"""The routes: models, chat and text completions, health, the visualizer page. A completion request is checked
for its key before its body is read, prepared off the event loop (prepare.py), queued as one engine job per
choice, and answered as a body or a stream (openai.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from .engine import EngineBusy, Job
from .middleware import authorize
from .openai import APIError, Choices, Reply, collect, stream_events
from .prepare import Prepared, prepare_body
from .state import ServerState

router = APIRouter()


def state_of(request: Request) -> ServerState:
    return request.app.state.dgemma


def _authorized(request: Request) -> ServerState:
    state = state_of(request)
    authorize(state.api_key, request.headers.get("authorization", ""))
    return state


def _body(schema: str) -> dict:
    """The request body's schema for /openapi.json (the routes parse bodies themselves, after the key check)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


async def run(state: ServerState, request: Request, prepared: Prepared, chat: bool) -> Response:
    req = prepared.req
    choices = Choices(asyncio.get_running_loop())
    deadline = time.monotonic() + state.limits.request_timeout
    for i, one in enumerate(prepared.choices):
        choices.jobs.append(Job(one, choices.emitter(i), drafts=req.stream_drafts, stop=req.stop or [],
                                logprobs=req.top_k() if one.decoder == "diffusion" else None, deadline=deadline,
                                markup=prepared.view.reads_markup))
    try:
        state.engine.submit(*choices.jobs)
    except EngineBusy as e:
        raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
    views = [dataclasses.replace(prepared.view) for _ in choices.jobs]  # each choice is read on its own
    reply = Reply.new(chat, state.name, views, req.ignored(), lambda i: state.engine.token_strings([i])[0],
                      logprobs=any(j.logprobs is not None for j in choices.jobs))
    if req.stream:
        return StreamingResponse(stream_events(choices, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, choices, reply)


@router.get("/health")
def health(request: Request) -> dict:
    state = state_of(request)
    eng = state.engine
    return {"status": "ok", "model": state.name, "queued": eng.pending, "running": eng.running,
            "runs_started": eng.runs_started, "largest_batch": eng.largest_batch,
            "forward_passes": eng.forward_passes}


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(resources.files("dgemma.serve").joinpath("static/index.html").read_text("utf-8"))


@router.get("/visualizer/models", include_in_schema=False)
def visualizer_models(request: Request) -> dict:
    """The models the page can pick: this app's at "" and the mounted ones at /models/<name> (names only)."""
    bases = request.app.state.bases
    return {"data": [{"id": n, "base": b} for n, b in bases.items()], "default": request.app.state.page_model}


@router.get("/v1/models")
def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_authorized(request).card()]}


@router.get("/v1/models/{name}")
def get_model(name: str, request: Request) -> dict:
    state = _authorized(request)
    if name != state.name:
        raise APIError(404, f"model {name!r} not found; this server has {state.name!r}", param="model",
                       code="model_not_found")
    return state.card()


async def _complete(request: Request, chat: bool) -> Response:
    """A chat or text completion: authorize, prepare off the event loop (tokenizing, compiling constraints), run."""
    state = _authorized(request)
    body = await request.body()
    prepared = await asyncio.get_running_loop().run_in_executor(state.prep, prepare_body, state, body, chat)
    return await run(state, request, prepared, chat=chat)


@router.post("/v1/chat/completions", openapi_extra=_body("ChatRequest"))
async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


@router.post("/v1/completions", openapi_extra=_body("CompletionRequest"))
async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)
