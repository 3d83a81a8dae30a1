"""Tool calls: checking `tools` / `tool_choice`, the constraint that makes a call's arguments valid under the
function's parameters schema, and the chat messages (assistant `tool_calls`, `tool` turns) for the chat template.

A call is written as Gemma 4 writes it, `<|tool_call>call:NAME{...}<tool_call|>`, with the arguments as JSON. With
`tool_choice` "required" or a named function the whole output is constrained to such a call (a regex built from
each function's schema), so the arguments always parse and validate; with "auto" (the default with tools) the output
is either such a call or text that does not start with "<"; "none" leaves the output free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..constraints import Constraint, ConstraintError
from ..constraints.compile import escape
from .messages import CALL_CLOSE, CALL_OPEN, CALL_PREFIX, call_text
from .schema import ChatRequest, NamedToolChoice

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
ANY_TEXT = r"[\s\S]*"


class ToolError(ValueError):
    """A bad tool definition or choice; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    mode: str | None  # "call", "auto" or None (text only)
    names: set[str] = field(default_factory=set)
    constraint: Constraint | None = None


def not_starting_with(marker: str) -> str:
    """A regex of the texts that do not start with `marker`'s first character (the empty text too). Coarser than
    "not starting with the marker", whose regex takes outlines-core minutes to compile."""
    first = "\\" + marker[0] if marker[0] in "\\]^-[" else marker[0]
    return f"(|[^{first}]{ANY_TEXT})"


def _arguments_regex(index: int, parameters: dict[str, Any] | None) -> str:
    schema = parameters if parameters is not None else NO_PARAMETERS
    param = f"tools.{index}.function.parameters"
    if schema.get("type", "object") != "object":
        raise ToolError(f"{param}: must be a JSON schema of type \"object\"", param)
    schema = {**schema, "type": "object"}  # no type would let the arguments be any JSON value
    try:
        return Constraint.json_schema(schema).regex_text()
    except ConstraintError as e:
        raise ToolError(f"{param}: {e}", param) from None


def plan(req: ChatRequest) -> ToolPlan:
    """What the request's tools ask of the output. ToolError names the field at fault."""
    tools, choice = req.tools or [], req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return ToolPlan(None)
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolError(f"tools.{i}.function.name: {name!r} is defined twice", f"tools.{i}.function.name")
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan(None)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ToolError(f"tool_choice names {choice.function.name!r}, which is not among tools", "tool_choice")
        chosen = [names.index(choice.function.name)]
    else:
        chosen = list(range(len(tools)))
    calls = [escape(CALL_OPEN + CALL_PREFIX + names[i]) + _arguments_regex(i, tools[i].function.parameters)
             + escape(CALL_CLOSE) for i in chosen]
    regex = "(" + "|".join(calls) + ")"
    mode = "auto" if choice == "auto" else "call"
    if mode == "auto":
        regex = f"({not_starting_with(CALL_OPEN)}|{regex})"
    return ToolPlan(mode, {names[i] for i in chosen}, Constraint.regex(regex))


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tool_calls" in template


def chat_messages(req: ChatRequest, native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for the chat template. `native`: the template renders `tools`,
    `tool_calls` and `tool` turns itself (Gemma 4's does); otherwise they are written out as text: the tools as a
    system turn, calls in the call format, tool results as turns of role "tool"."""
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        out: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]
            if native:
                out["tool_calls"] = calls
            else:
                out["content"] += "".join(call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
        if role == "tool" and native:
            out["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                out["name"] = m.name
        messages.append(out)
    extra = dict(req.chat_template_kwargs or {})
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if tools and native:
        extra["tools"] = tools
    elif tools:
        listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        preface = (f"You can call these functions: {listing}\nTo call one, answer with "
                   f"{CALL_OPEN}{CALL_PREFIX}NAME{{JSON arguments}}{CALL_CLOSE} and nothing else.")
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = preface + "\n\n" + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": preface})
    return messages, extra


def _arguments(text: str) -> Any:
    """A call's arguments as the template gets them: the object when the text is JSON, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
