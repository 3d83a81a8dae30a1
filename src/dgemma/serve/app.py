"""The HTTP layer: OpenAI-compatible routes over the engine, SSE streaming, limits and OpenAI-style errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ConfigError
from ..tokenizer import TokenizerError
from .engine import Engine, Job
from .schema import ChatRequest, CompletionRequest


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: what the model's positions allow
    max_tokens: int = 4096  # cap on max_tokens
    max_batch: int = 8
    max_pending: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (by Content-Length, or while streaming in) with a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
        if too_big:
            return await _send_error(send, 413, f"request body over {self.limit} bytes", code="body_too_large")
        # No (trusted) length: read the body here, up to the limit, then replay it to the app.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_error(send, 413, f"request body over {self.limit} bytes", code="body_too_large")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _task_info(model_dir: Path | None) -> dict[str, Any]:
    """Optional task.json next to the weights: tells clients (and the visualizer) how to frame prompts."""
    if model_dir is None or not (model_dir / "task.json").is_file():
        return {}
    try:
        info = json.loads((model_dir / "task.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def create_app(model, *, model_name: str = "dgemma", model_dir: str | Path | None = None,
               api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    cfg = model.config
    positions = cfg.max_position_embeddings
    max_prompt = limits.max_prompt_tokens or max(positions - cfg.canvas_length, 1)
    gen_default = model.generation_config
    engine = Engine(model, max_batch=limits.max_batch, max_pending=limits.max_pending)
    task = _task_info(Path(model_dir) if model_dir else None)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for DiffusionGemma block-diffusion models, with live canvas "
                              "streaming (extension fields: diffusion, stream_drafts, decoder).")
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    # -- errors: OpenAI's body shape, 4xx for every client mistake ------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON", code="invalid_json"), status_code=400)
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem(s))"
        return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    # -- routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": engine.pending, "running": len(engine._runs),
                "runs_started": engine.runs_started, "largest_batch": engine.largest_batch,
                "forward_passes": engine.forward_passes}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("dgemma.serve").joinpath("static/index.html").read_text("utf-8"))

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dgemma",
                "dgemma": {"canvas_length": cfg.canvas_length, "vocab_size": cfg.vocab_size,
                           "max_prompt_tokens": max_prompt, "max_tokens": limits.max_tokens,
                           "chat": model.tokenizer is not None and model.tokenizer.chat_template is not None,
                           "generation_config": gen_default.to_dict() if gen_default else None, **task}}

    @app.get("/v1/models")
    def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    def get_model(name: str, request: Request) -> dict:
        authorize(request)
        if name != model_name:
            raise APIError(404, f"model {name!r} not found; this server has {model_name!r}", param="model",
                           code="model_not_found")
        return model_card()

    def make_job(req, prompt_ids: list[int], emit) -> Job:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server has {model_name!r}", param="model",
                           code="model_not_found")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {max_prompt}",
                           param="prompt", code="prompt_too_long")
        bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})", param="prompt")
        max_new = req.max_new_tokens()
        if max_new is None:
            max_new = min(gen_default.max_new_tokens if gen_default else cfg.canvas_length, limits.max_tokens)
        if max_new > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_new} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        settings = req.diffusion.overrides() if req.diffusion else {}
        job = Job(prompt_ids, max_new, settings, emit, decoder=req.decoder, drafts=req.stream_drafts,
                  stop=req.stop or [])
        if req.seed is not None:
            job.seed = req.seed
        try:
            engine.check(job)
        except (ValueError, ConfigError) as e:
            param = "diffusion" if settings and "position" not in str(e) else "max_tokens"
            raise APIError(400, str(e), param=param) from None
        return job

    async def run(request: Request, req, prompt_ids: list[int], kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = make_job(req, prompt_ids, emit)
        try:
            engine.submit(job)
        except OverflowError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        ignored = req.ignored()
        if req.stream:
            return StreamingResponse(_sse(request, job, events, rid, kind, ignored), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, job, events, rid, kind, ignored)

    def _usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
                "tokens_per_forward": done["tokens_per_forward"], "forward_passes": done["forward_passes"]}

    def _ext(done: dict, ignored: list[str]) -> dict:
        ext = {"seed": done["seed"], "decoder": done["decoder"], "steps": done["steps"]}
        if ignored:
            ext["ignored"] = ignored
        return ext

    async def _collect(request: Request, job: Job, events: asyncio.Queue, rid: str, kind: str, ignored):
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if event["type"] == "error":
                    raise APIError(500, event["message"], type="server_error")
                if event["type"] == "done":
                    break
        finally:
            job.cancel()  # no-op when finished; stops the work when the handler is torn down early
        done = event
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "finish_reason": done["finish_reason"], "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": done["text"], "finish_reason": done["finish_reason"], "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": _usage(done), "dgemma": _ext(done, ignored)}

    async def _sse(request: Request, job: Job, events: asyncio.Queue, rid: str, kind: str,
                   ignored) -> AsyncIterator[bytes]:
        created_at = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> bytes:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name, "choices": [choice],
                    **extra}
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                etype = event.pop("type")
                if etype == "error":
                    yield b"data: " + json.dumps(error_body(event["message"], type="server_error")).encode() + b"\n\n"
                    break
                if etype == "done":
                    yield chunk(None, event["finish_reason"], usage=_usage(event), dgemma=_ext(event, ignored))
                    break
                text = event.pop("text", "")
                if etype == "draft":
                    yield chunk(None, dgemma={"event": "draft", **event})
                elif etype == "text":
                    yield chunk(text)
                else:
                    yield chunk(text, dgemma={"event": etype, **event})
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or we are done): stop spending passes on it

    def encode(text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\\ud800"); tokenizers do not
            raise APIError(400, f"{param} is not valid Unicode ({e.reason} at index {e.start})", param=param) from None
        return model.tokenizer.encode(text)

    # -- endpoints ---------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        authorize(request)
        if model.tokenizer is None or model.tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            ids = encode(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True), "messages")
        except (ValueError, TokenizerError) as e:
            raise APIError(400, str(e), param="messages") from None
        return await run(request, req, ids, "chat")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        authorize(request)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (got a list of several)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids as the prompt", param="prompt")
            ids = encode(prompt, "prompt")
        else:
            ids = list(prompt)
        return await run(request, req, ids, "completion")

    return app
