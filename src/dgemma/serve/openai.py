"""The OpenAI adapter: error bodies, response and chunk shapes, SSE, and turning the engine's typed events for a
request's choices (one job per choice) into a response body or a stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from .engine import Job
from .events import Commit, Done, Draft, Error, Event, Text, TokenLogprob
from .messages import OutputView


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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


def engine_error(event: Error) -> APIError:
    kind = ("server_error" if event.status >= 500 else "timeout_error" if event.status == 408
            else "invalid_request_error")
    return APIError(event.status, event.message, type=kind, code=event.code)


def sse(obj: dict) -> bytes:
    """One server-sent event; NaN/Infinity are not JSON, so they are an error here, never on the wire."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


# -- logprobs -------------------------------------------------------------------------------------------------------
def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def chat_logprobs(lps: list[TokenLogprob], token_str: Callable[[int], str]) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{**_token_entry(token_str(t.id), t.logprob),
                         "top_logprobs": [_token_entry(token_str(i), v) for i, v in t.top]} for t in lps],
            "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], token_str: Callable[[int], str], offset: int = 0) -> dict:
    """Completions' legacy `logprobs`: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    tokens = [token_str(t.id) for t in lps]
    offsets, at = [], offset
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{token_str(i): v for i, v in t.top} for t in lps], "text_offset": offsets}


# -- responses ------------------------------------------------------------------------------------------------------
@dataclass
class Reply:
    """What every chunk (or the one body) of a response carries, and how each choice's text is read (reasoning,
    tool calls; see messages.OutputView)."""

    id: str
    chat: bool
    model: str
    created: int
    views: list[OutputView]
    ignored: list[str]
    token_str: Callable[[int], str]
    logprobs: bool = False
    sent_offsets: list[int] = field(default_factory=list)  # completions: text offset per choice (logprobs)

    @classmethod
    def new(cls, chat: bool, model: str, views: list[OutputView], ignored: list[str],
            token_str: Callable[[int], str], logprobs: bool) -> Reply:
        return cls(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, chat, model, int(time.time()), views,
                   ignored, token_str, logprobs, [0] * len(views))

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _lp(self, lps: list[TokenLogprob], index: int) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(lps, self.token_str)
        out = completion_logprobs(lps, self.token_str, self.sent_offsets[index])
        self.sent_offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    def chunk(self, index: int, delta: dict[str, Any] | None = None, finish: str | None = None,
              lps: list[TokenLogprob] | None = None, **extra) -> dict:
        logprobs = self._lp(lps, index) if lps else None
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": (delta or {}).get("content", ""), "finish_reason": finish,
                      "logprobs": logprobs}
        return {"id": self.id, "object": self.kind + ("" if not self.chat else ".chunk"), "created": self.created,
                "model": self.model, "choices": [choice], **extra}

    def choice(self, index: int, done: Done) -> dict:
        msg = self.views[index].message(done.text)
        finish = "tool_calls" if msg.tool_calls else done.finish_reason
        logprobs = self._lp(done.logprobs, index) if self.logprobs else None
        if not self.chat:
            return {"index": index, "text": done.text, "finish_reason": finish, "logprobs": logprobs}
        return {"index": index, "message": msg.wire(), "finish_reason": finish, "logprobs": logprobs}

    def whole(self, dones: list[Done]) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [self.choice(i, d) for i, d in enumerate(dones)], "usage": usage(dones),
                "dgemma": extension(dones, self.ignored)}


def usage(dones: list[Done]) -> dict:
    prompt = dones[0].prompt_tokens
    completion = sum(d.completion_tokens for d in dones)
    passes = sum(d.forward_passes for d in dones)
    tpf = dones[0].tokens_per_forward if len(dones) == 1 else (completion / passes if passes else 0.0)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "tokens_per_forward": tpf, "forward_passes": passes}
    cached = [d.cached_tokens for d in dones if d.cached_tokens is not None]
    if cached:  # OpenAI's field; the choices share the prompt, the first one's prefill counts
        out["prompt_tokens_details"] = {"cached_tokens": cached[0]}
    return out


def extension(dones: list[Done], ignored: list[str]) -> dict:
    first = dones[0]
    ext: dict[str, Any] = {"seed": first.seed, "decoder": first.decoder, "steps": first.steps}
    if len(dones) > 1:
        ext["choices"] = [{"seed": d.seed, "steps": d.steps} for d in dones]
    if ignored:
        ext["ignored"] = ignored
    return ext


# -- delivery -------------------------------------------------------------------------------------------------------
class Choices:
    """A request's jobs (one per choice) and the queue their events arrive on, tagged with the choice index."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs: list[Job] = []

    def emitter(self, index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        return emit

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()  # no-op when finished; stops the work when the handler is torn down early


async def collect(request: Request, choices: Choices, reply: Reply) -> JSONResponse:
    dones: dict[int, Done] = {}
    try:
        while len(dones) < len(choices.jobs):
            try:
                index, event = await asyncio.wait_for(choices.queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(error_body("client disconnected"), status_code=499)
                continue
            if isinstance(event, Error):
                raise engine_error(event)
            if isinstance(event, Done):
                dones[index] = event
        return JSONResponse(reply.whole([dones[i] for i in range(len(choices.jobs))]))  # allow_nan=False
    finally:
        choices.cancel()


async def stream_events(choices: Choices, reply: Reply) -> AsyncIterator[bytes]:
    dones: dict[int, Done] = {}
    try:
        if reply.chat:
            for i in range(len(choices.jobs)):
                yield sse(reply.chunk(i, {"role": "assistant"}))
        while len(dones) < len(choices.jobs):
            index, event = await choices.queue.get()
            view = reply.views[index]
            if isinstance(event, Error):
                e = engine_error(event)
                yield sse(error_body(e.message, e.type, code=e.code))
                break
            if isinstance(event, Done):
                dones[index] = event
                for delta in view.end(event.text):
                    yield sse(reply.chunk(index, delta))
                finish = "tool_calls" if view.called else event.finish_reason
                last = len(dones) == len(choices.jobs)
                extra = {"usage": usage(list(dones.values())), "dgemma": extension(
                    [dones[i] for i in sorted(dones)], reply.ignored)} if last else {}
                yield sse(reply.chunk(index, {}, finish, **extra))
            elif isinstance(event, Draft):
                yield sse(reply.chunk(index, dgemma=event.wire()))
            elif isinstance(event, Text):
                for delta in view.feed(event.text):
                    yield sse(reply.chunk(index, delta))
            elif isinstance(event, Commit):
                deltas = view.feed(event.text) or [{}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield sse(reply.chunk(index, delta, lps=event.logprobs if last else None,
                                          **({"dgemma": event.wire()} if last else {})))
        yield b"data: [DONE]\n\n"
    finally:
        choices.cancel()  # the client went away (or we are done): stop spending passes on it
