"""From an HTTP body to prepared requests (runs in the server's preparation threads, off the event loop): JSON
parsing, cheap size checks (characters, message count) before anything else, schema validation, the chat template
(tools, template kwargs, images) and the tokenizer, then `requests.prepare` (the one preparation serve, batch and
the CLI share) for each of the request's `n` choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..constraints import Constraint, ConstraintError
from ..images import ImageError, chat_prompt, extract_images
from ..requests import Caps, PreparedRequest, RequestError, prepare
from ..tokenizer import TokenizerError
from .messages import OutputView
from .openai import APIError, parse_body, validate
from .schema import ChatRequest, CompletionRequest
from .state import ServerState
from .tools import ToolError, chat_messages, plan, template_knows_tools

RESERVED_TEMPLATE_NAMES = ("messages", "add_generation_prompt", "bos_token", "eos_token", "tools")


@dataclass
class Prepared:
    """A validated request: its schema object, one PreparedRequest per choice and how to read each choice."""

    req: ChatRequest | CompletionRequest
    choices: list[PreparedRequest]
    view: OutputView


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


def request_constraint(req) -> tuple[str, Constraint] | None:
    try:
        return req.constraint()
    except ConstraintError as e:
        param = next((f for f in ("response_format", "structured_outputs", "infill") if getattr(req, f) is not None),
                     None)
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_constraint") from None


def chat_prompt_ids(state: ServerState, req: ChatRequest) -> tuple[list[int], dict[str, Any] | None]:
    """The chat's prompt ids (tools and template kwargs rendered) and its preprocessed images (or None)."""
    tok = state.model.tokenizer
    if tok is None or tok.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    kwargs = req.chat_template_kwargs or {}
    bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_NAMES)
    if bad:
        raise APIError(400, f"chat_template_kwargs: {bad} are set by the server", param="chat_template_kwargs")
    if any(m.has_images() for m in req.messages):
        if req.tools or kwargs:
            raise APIError(400, "tools and chat_template_kwargs are not supported with image input",
                           param="tools" if req.tools else "chat_template_kwargs")
        return image_prompt(state, req)
    try:
        messages, context = chat_messages(req, template_knows_tools(tok.chat_template))
        text = tok.apply_chat_template(messages, add_generation_prompt=True, **context)
    except (ValueError, TokenizerError) as e:
        raise APIError(400, str(e), param="messages") from None
    return encode(state, text, "messages"), None


def image_prompt(state: ServerState, req: ChatRequest) -> tuple[list[int], dict[str, Any]]:
    """A chat with image parts: data: URLs only (nothing is fetched), limits checked before decoding; the images
    are decoded and preprocessed here, the tower runs in the engine."""
    if state.model.vision is None:
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
    return prompt.ids, prompt.images


def completion_prompt_ids(state: ServerState, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (got a list of several)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if state.model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token ids as the prompt", param="prompt")
        return encode(state, prompt, "prompt")
    return list(prompt)


def prepare_body(state: ServerState, body: bytes, chat: bool) -> Prepared:
    obj = parse_body(body)
    check_sizes(state, obj)
    req = validate(ChatRequest if chat else CompletionRequest, obj)
    if req.model is not None and req.model != state.name:
        raise APIError(404, f"model {req.model!r} not found; this server has {state.name!r}", param="model",
                       code="model_not_found")
    if req.n > state.limits.max_n:
        raise APIError(400, f"n {req.n} is over this server's limit of {state.limits.max_n}", param="n")
    constraint = request_constraint(req)
    view = OutputView()
    if chat:
        try:
            tools = plan(req)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_tools") from None
        if tools.constraint is not None:
            if constraint is not None:
                raise APIError(400, f"one constraint per request: tool_choice {tools.mode!r} constrains the output, "
                               f"and so does {constraint[0]}", param="tool_choice")
            constraint = ("tool_choice", tools.constraint)
        thinking = bool((req.chat_template_kwargs or {}).get("enable_thinking"))
        view = OutputView(thinking, tools.mode, tools.names)
        ids, images = chat_prompt_ids(state, req)
    else:
        ids, images = completion_prompt_ids(state, req), None
    return Prepared(req, prepare_choices(state, req, ids, constraint, images), view)


def prepare_choices(state: ServerState, req, ids: list[int], constraint, images) -> list[PreparedRequest]:
    """One PreparedRequest per choice: the same prompt and settings, seeds seed, seed+1, ..."""
    cfg, limits = state.model.config, state.limits
    if ids and len(ids) > state.max_prompt:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {state.max_prompt}",
                       param="prompt", code="prompt_too_long")
    max_new = req.max_new_tokens()
    if max_new is None and ids:
        gen = state.model.generation_config
        max_new = min(gen.new_tokens(len(ids)) if gen else cfg.canvas_length, limits.max_tokens)
    settings = req.diffusion.overrides() if req.diffusion and req.decoder == "diffusion" else {}
    caps = Caps(limits.max_tokens, limits.max_denoising_steps, "max_tokens", "this server's limit of {limit}")
    try:
        first = prepare(state.model, ids, max_new_tokens=max_new, settings=settings, seed=req.seed,
                        decoder=req.decoder, constraint=constraint, images=images, caps=caps,
                        compile_limits=state.compile_limits)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    return [first] + [prepare(state.model, ids, max_new_tokens=max_new, settings=settings,
                              seed=(first.seed + i) % 2**63, decoder=req.decoder, constraint=constraint,
                              images=images, caps=caps, compile_limits=state.compile_limits)
            for i in range(1, req.n)]
