"""The HTTP layer: OpenAI-compatible routes over the engine, SSE streaming, limits and OpenAI-style errors.

A request passes, in order: the Host check and the body-size limit (ASGI middleware), the API key, then (off the
event loop) JSON parsing, cheap size checks (characters, message count), schema validation, the chat template and
the tokenizer, and last the settings checks against the model. Only then does it reach the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ConfigError
from ..limits import Limits
from ..images import ImageError, chat_prompt, extract_images
from ..constraints import ConstraintError, compile_constraint, fill_id
from ..generate import check_prompt_ids, resolve_settings
from ..sampler import temperature
from ..tokenizer import TokenizerError
from .engine import Engine, EngineBusy, Job
from .schema import ChatRequest, CompletionRequest

# The sampler divides logits by the schedule's temperatures in float32: below this they overflow float32 (NaN
# entropies, empty text at 1e-38) and are greedy in effect long before.
MIN_TEMPERATURE = 1e-6
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- middleware ----------------------------------------------------------------------------------------------------
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


def host_name(header: str) -> str:
    """The name part of a Host header value, lowercased: "LocalHost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostCheck:
    """ASGI middleware: answer 400 to a Host header this server is not known by. A web page that rebinds its own
    DNS name to 127.0.0.1 still sends that name, so it cannot reach a keyless local server this way."""

    def __init__(self, app, names: Iterable[str], any_ip: bool):
        self.app, self.names, self.any_ip = app, {host_name(n) for n in names}, any_ip

    def allowed(self, name: str) -> bool:
        if name in self.names:
            return True
        if not self.any_ip:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host")
            name = host_name(host.decode("latin-1")) if host is not None else None
            if name is not None and not self.allowed(name):
                return await _send_error(send, 400, f"Host {name!r} is not served here (see --allowed-host)",
                                         code="invalid_host")
        return await self.app(scope, receive, send)


def host_policy(bind_host: str, extra: Iterable[str] = ()) -> tuple[set[str], bool] | None:
    """(names, any IP literal) that the Host header may carry for a server bound to `bind_host`; None: any."""
    extra = [e.strip() for e in extra if e.strip()]
    if "*" in extra:
        return None
    wildcard = bind_host in ("", "0.0.0.0", "::")
    names = {bind_host, *extra}
    try:
        loopback = ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = bind_host.lower() == "localhost"
    if loopback or wildcard:
        names.update(LOOPBACK_NAMES)
    return names, wildcard  # bound to every interface: any of its addresses, as an IP literal


# -- the server's state ----------------------------------------------------------------------------------------------
def _task_info(model_dir: Path | None) -> dict[str, Any]:
    """Optional task.json next to the weights: tells clients (and the visualizer) how to frame prompts."""
    if model_dir is None or not (model_dir / "task.json").is_file():
        return {}
    try:
        info = json.loads((model_dir / "task.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


@dataclass
class ServerState:
    model: Any
    engine: Engine
    name: str
    limits: Limits
    api_key: str | None
    task: dict[str, Any]
    created: int
    max_prompt: int  # tokens
    max_chars: int  # prompt characters, checked before tokenizing
    prep: ThreadPoolExecutor  # parsing, templates and tokenizing, off the event loop

    def card(self) -> dict:
        cfg, gen = self.model.config, self.model.generation_config
        tok = self.model.tokenizer
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "dgemma",
                "dgemma": {"canvas_length": cfg.canvas_length, "vocab_size": cfg.vocab_size,
                           "max_prompt_tokens": self.max_prompt, "max_tokens": self.limits.max_tokens,
                           "max_denoising_steps": self.limits.max_denoising_steps,
                           "chat": tok is not None and tok.chat_template is not None,
                           "images": getattr(self.model, "vision", None) is not None,
                           "generation_config": gen.to_dict() if gen else None, **self.task}}


def state_of(request: Request) -> ServerState:
    return request.app.state.dgemma


def authorize(state: ServerState, request: Request) -> None:
    """Authorization: Bearer KEY (scheme case-insensitive), checked before anything reads the body."""
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if not (scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), state.api_key.encode())):
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")


# -- request preparation (runs in state.prep) --------------------------------------------------------------------
def validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, msg, param=param, code="invalid_value")


def parse_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # bad JSON or not UTF-8
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None


def validate(schema: type[BaseModel], obj: Any):
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def check_sizes(state: ServerState, obj: Any) -> None:
    """Refuse oversized prompts by cheap measures before validation, templates or tokenizing."""
    if not isinstance(obj, dict):
        return
    messages, prompt = obj.get("messages"), obj.get("prompt")
    chars = 0
    if isinstance(messages, list):
        if len(messages) > state.max_prompt:  # every message costs at least one prompt token
            raise APIError(400, f"{len(messages)} messages; the limit is {state.max_prompt} (the prompt-token "
                           "limit)", param="messages", code="prompt_too_long")
        chars = sum(_chars(m.get("content")) for m in messages if isinstance(m, dict))
    elif isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, list):
        if len(prompt) > state.max_prompt:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the limit is {state.max_prompt}",
                           param="prompt", code="prompt_too_long")
        chars = sum(len(p) for p in prompt if isinstance(p, str))
    if chars > state.max_chars:
        raise APIError(400, f"the prompt has {chars} characters; the limit is {state.max_chars}",
                       param="messages" if messages is not None else "prompt", code="prompt_too_long")


def encode(state: ServerState, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\\ud800"); tokenizers do not
        raise APIError(400, f"{param} is not valid Unicode ({e.reason} at index {e.start})", param=param) from None
    return state.model.tokenizer.encode(text)


def prepare_constraint(state: ServerState, req) -> None:
    """Compile the request's constraint (response_format / structured_outputs / infill; cached per constraint) so a
    malformed or unsatisfiable one is a 400 naming the problem before anything is queued."""
    param = next((f for f in ("response_format", "structured_outputs", "infill") if getattr(req, f) is not None),
                 None)
    if param is None:
        return
    try:
        found = req.constraint()
        if found is None:
            return
        param, constraint = found
        if req.decoder != "diffusion":
            raise APIError(400, f"{param} needs the diffusion decoder", param="decoder")
        gen = resolve_settings(state.model, None, {})
        compile_constraint(constraint, state.model.tokenizer, state.model.config.vocab_size, gen.eos_ids,
                           fill_id(gen))
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_constraint") from None
    req._constraint = constraint


def prepare_chat(state: ServerState, body: bytes) -> tuple[ChatRequest, list[int]]:
    obj = parse_body(body)
    check_sizes(state, obj)
    req = validate(ChatRequest, obj)
    prepare_constraint(state, req)
    tok = state.model.tokenizer
    if tok is None or tok.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    if any(m.has_images() for m in req.messages):
        return req, prepare_images(state, req)
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = encode(state, tok.apply_chat_template(messages, add_generation_prompt=True), "messages")
    except (ValueError, TokenizerError) as e:
        raise APIError(400, str(e), param="messages") from None
    return req, ids


def prepare_images(state: ServerState, req: ChatRequest) -> list[int]:
    """A chat with image parts: data: URLs only (nothing is fetched), limits checked before decoding; the images
    are decoded and preprocessed here, the tower runs in the engine. Sets req._images; returns the prompt ids."""
    if getattr(state.model, "vision", None) is None:
        raise APIError(400, "this model has no vision tower: image content (image_url parts) is not supported",
                       param="messages", code="images_not_supported")
    if req.decoder != "diffusion":
        raise APIError(400, "image input needs the diffusion decoder", param="decoder")
    limits = state.limits
    try:
        raw = [{"role": "system" if m.role == "developer" else m.role, "content": m.parts()} for m in req.messages]
        for m in raw:
            for part in [{"text": m["content"]}] if isinstance(m["content"], str) else m["content"]:
                str(part.get("text", "")).encode("utf-8")
        messages, images = extract_images(raw, allow_paths=False, max_images=limits.max_images,
                                          max_bytes=limits.max_image_bytes)
        prompt = chat_prompt(state.model, messages, images, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise APIError(400, str(e), param="messages", code="invalid_image") from None
    except UnicodeEncodeError as e:  # JSON allows lone surrogates; tokenizers do not
        raise APIError(400, f"messages is not valid Unicode ({e.reason} at index {e.start})",
                       param="messages") from None
    except (ValueError, TokenizerError) as e:
        raise APIError(400, str(e), param="messages") from None
    req._images = prompt.images
    return prompt.ids


def prepare_completion(state: ServerState, body: bytes) -> tuple[CompletionRequest, list[int]]:
    obj = parse_body(body)
    check_sizes(state, obj)
    req = validate(CompletionRequest, obj)
    prepare_constraint(state, req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (got a list of several)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if state.model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token ids as the prompt", param="prompt")
        return req, encode(state, prompt, "prompt")
    return req, list(prompt)


def lowest_temperature(gen) -> float | None:
    """The smallest temperature of the schedule: its last step (n = 1; t_max > t_min, and float32 rounding is
    monotone, so no other step is lower)."""
    if gen.t_min is None or gen.t_max is None:
        return None
    return temperature(1, gen.max_denoising_steps, gen.t_min, gen.t_max).item()


def check_diffusion(state: ServerState, job: Job) -> None:
    """Server bounds on the resolved diffusion settings: step count, a temperature float32 can divide by."""
    gen = state.engine.settings_for(job)
    cap = state.limits.max_denoising_steps
    if gen.max_denoising_steps > cap:
        raise APIError(400, f"max_denoising_steps {gen.max_denoising_steps} is over this server's limit of {cap}",
                       param="diffusion.max_denoising_steps")
    t = lowest_temperature(gen)
    if t is not None and not t >= MIN_TEMPERATURE:
        raise APIError(400, f"the temperature schedule (t_min {gen.t_min}, t_max {gen.t_max}, "
                       f"{gen.max_denoising_steps} steps) reaches {t:.3g} in float32; the minimum is "
                       f"{MIN_TEMPERATURE}", param="diffusion.t_max")


def make_job(state: ServerState, req, prompt_ids: list[int], emit: Callable[[dict], None]) -> Job:
    cfg, limits = state.model.config, state.limits
    if req.model is not None and req.model != state.name:
        raise APIError(404, f"model {req.model!r} not found; this server has {state.name!r}", param="model",
                       code="model_not_found")
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompt_ids) > state.max_prompt:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {state.max_prompt}",
                       param="prompt", code="prompt_too_long")
    try:
        check_prompt_ids(prompt_ids, cfg.vocab_size)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), param="prompt") from None
    max_new = req.max_new_tokens()
    if max_new is None:
        gen = state.model.generation_config
        max_new = min(gen.new_tokens(len(prompt_ids)) if gen else cfg.canvas_length, limits.max_tokens)
    if max_new > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_new} is over this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    settings = req.diffusion.overrides() if req.diffusion and req.decoder == "diffusion" else {}
    job = Job(prompt_ids, max_new, settings, emit, decoder=req.decoder, drafts=req.stream_drafts,
              stop=req.stop or [], constraint=req._constraint, images=getattr(req, "_images", None))
    if req.seed is not None:
        job.seed = req.seed
    try:
        state.engine.check(job)
    except (ValueError, ConfigError) as e:
        param = "diffusion" if settings and "position" not in str(e) else "max_tokens"
        raise APIError(400, str(e), param=param) from None
    if job.decoder == "diffusion":
        check_diffusion(state, job)
    job.deadline = time.monotonic() + limits.request_timeout
    return job


# -- responses -------------------------------------------------------------------------------------------------------
def sse(obj: dict) -> bytes:
    """One server-sent event; NaN/Infinity are not JSON, so they are an error here, never on the wire."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "tokens_per_forward": done["tokens_per_forward"], "forward_passes": done["forward_passes"]}


def extension(done: dict, ignored: list[str]) -> dict:
    ext = {"seed": done["seed"], "decoder": done["decoder"], "steps": done["steps"]}
    if ignored:
        ext["ignored"] = ignored
    return ext


def engine_error(event: dict) -> APIError:
    status = event.get("status", 500)
    kind = "server_error" if status >= 500 else "timeout_error" if status == 408 else "invalid_request_error"
    return APIError(status, event["message"], type=kind, code=event.get("code"))


@dataclass
class Reply:
    """What every chunk (or the one body) of a response carries: id, object kind, model, creation time."""

    id: str
    chat: bool
    model: str
    created: int

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                **extra}

    def whole(self, done: dict, ignored: list[str]) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "finish_reason": done["finish_reason"], "logprobs": None}
        else:
            choice = {"index": 0, "text": done["text"], "finish_reason": done["finish_reason"], "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage(done),
                "dgemma": extension(done, ignored)}


async def collect(request: Request, job: Job, events: asyncio.Queue, reply: Reply,
                  ignored: list[str]) -> JSONResponse:
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(error_body("client disconnected"), status_code=499)
                continue
            if event["type"] == "error":
                raise engine_error(event)
            if event["type"] == "done":
                return JSONResponse(reply.whole(event, ignored))  # allow_nan=False: never NaN on the wire
    finally:
        job.cancel()  # no-op when finished; stops the work when the handler is torn down early


async def stream_events(job: Job, events: asyncio.Queue, reply: Reply, ignored: list[str]) -> AsyncIterator[bytes]:
    try:
        if reply.chat:
            yield sse(reply.chunk(None, role=True))
        while True:
            event = await events.get()
            etype = event.pop("type")
            if etype == "error":
                e = engine_error(event)
                yield sse(error_body(e.message, e.type, code=e.code))
                break
            if etype == "done":
                yield sse(reply.chunk(None, event["finish_reason"], usage=usage(event),
                                      dgemma=extension(event, ignored)))
                break
            text = event.pop("text", "")
            if etype == "draft":
                yield sse(reply.chunk(None, dgemma={"event": "draft", **event}))
            elif etype == "text":
                yield sse(reply.chunk(text))
            else:
                yield sse(reply.chunk(text, dgemma={"event": etype, **event}))
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or we are done): stop spending passes on it


async def run(state: ServerState, request: Request, req, prompt_ids: list[int], chat: bool) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict] = asyncio.Queue()

    def emit(event: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    job = make_job(state, req, prompt_ids, emit)
    try:
        state.engine.submit(job)
    except EngineBusy as e:
        raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
    reply = Reply(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, chat, state.name, int(time.time()))
    if req.stream:
        return StreamingResponse(stream_events(job, events, reply, req.ignored()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, job, events, reply, req.ignored())


# -- routes ----------------------------------------------------------------------------------------------------------
router = APIRouter()
OPENAPI_BODIES = {"ChatRequest": ChatRequest, "CompletionRequest": CompletionRequest}


def _body(schema: str) -> dict:
    """The request body's schema for /openapi.json (the routes parse bodies themselves, after the key check)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


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
    state = state_of(request)
    authorize(state, request)
    return {"object": "list", "data": [state.card()]}


@router.get("/v1/models/{name}")
def get_model(name: str, request: Request) -> dict:
    state = state_of(request)
    authorize(state, request)
    if name != state.name:
        raise APIError(404, f"model {name!r} not found; this server has {state.name!r}", param="model",
                       code="model_not_found")
    return state.card()


@router.post("/v1/chat/completions", openapi_extra=_body("ChatRequest"))
async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    authorize(state, request)
    body = await request.body()
    req, ids = await asyncio.get_running_loop().run_in_executor(state.prep, prepare_chat, state, body)
    return await run(state, request, req, ids, chat=True)


@router.post("/v1/completions", openapi_extra=_body("CompletionRequest"))
async def completions(request: Request) -> Response:
    state = state_of(request)
    authorize(state, request)
    body = await request.body()
    req, ids = await asyncio.get_running_loop().run_in_executor(state.prep, prepare_completion, state, body)
    return await run(state, request, req, ids, chat=False)


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
               page_model: str | None = None) -> FastAPI:
    """The ASGI app. `host` is the bound address; the Host header must name it (or a loopback name when bound to
    loopback, any IP when bound to every interface) or one of `allowed_hosts` ("*": any).

    `mounts` serves more models beside this one, each its own app (from `create_app`) under /models/<name>/ (its
    API at /models/<name>/v1/...); the visualizer lists them all and opens on `page_model` (default: this one)."""
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
    engine = Engine(model, max_batch=limits.max_batch, max_pending=limits.max_pending,
                    max_running=limits.max_running)
    state = ServerState(model=model, engine=engine, name=model_name, limits=limits, api_key=api_key,
                        task=_task_info(Path(model_dir) if model_dir else None), created=int(time.time()),
                        max_prompt=max_prompt, max_chars=limits.max_prompt_chars or 16 * max_prompt,
                        prep=ThreadPoolExecutor(max_workers=2, thread_name_prefix="dgemma-prep"))

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
