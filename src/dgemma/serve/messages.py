"""Reading a chat choice's generated text as an assistant message: Gemma 4's thought channel (`<|channel>thought
...<channel|>`) becomes `reasoning_content`, a tool call (`<|tool_call>call:NAME{json arguments}<tool_call|>`)
becomes `tool_calls`, the rest is `content`. `OutputView` does it for a whole text and incrementally for a stream
(a marker that may still be coming is held back, a call is sent whole once its text is complete)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import stable_prefix

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought", "<channel|>"
CALL_OPEN, CALL_CLOSE, CALL_PREFIX = "<|tool_call>", "<tool_call|>", "call:"


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (arguments: JSON text of an object)."""
    return f"{CALL_OPEN}{CALL_PREFIX}{name}{arguments}{CALL_CLOSE}"


def parse_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) when `text` is exactly one call of a known function with a JSON object, else None."""
    head = CALL_OPEN + CALL_PREFIX
    if not text.startswith(head) or not text.endswith(CALL_CLOSE):
        return None
    body = text[len(head):-len(CALL_CLOSE)]
    brace = body.find("{")
    name, args = body[:brace], body[brace:]
    if brace <= 0 or name not in names:
        return None
    try:
        if not isinstance(json.loads(args), dict):
            return None
    except ValueError:
        return None
    return name, args


@dataclass
class AssistantMessage:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class OutputView:
    """How one choice's text is read. `thinking`: the thought channel is split off; `tools`: "call" (the text is
    a call), "auto" (a call or text), None (text only); `names`: the functions a call may name."""

    thinking: bool = False
    tools: str | None = None
    names: set[str] = field(default_factory=set)
    text: str = ""  # everything fed so far
    sent: tuple[str, str] = ("", "")  # reasoning and content already streamed
    called: bool = False  # the stream ended in a tool call

    @property
    def reads_markup(self) -> bool:
        """Whether the text is read for markers (the text must then keep special tokens)."""
        return self.thinking or self.tools is not None

    def split(self, text: str, final: bool) -> tuple[str | None, str, bool]:
        """(reasoning, content, a call) readable from `text` now; partial text holds back what may change."""
        reasoning, rest = None, text
        if self.thinking:
            if text.startswith(THOUGHT_OPEN):
                body = text[len(THOUGHT_OPEN):]
                end = body.find(THOUGHT_CLOSE)
                if end < 0:
                    body = body if final else body[:stable_prefix(body, [THOUGHT_CLOSE])]
                    return _strip_newline(body), "", False
                reasoning, rest = _strip_newline(body[:end]), body[end + len(THOUGHT_CLOSE):]
            elif not final and THOUGHT_OPEN.startswith(text):
                return None, "", False  # the channel may be opening
        if self.tools == "call" or (self.tools == "auto" and rest.startswith(CALL_OPEN)):
            return reasoning, "" if not final else rest, True
        if self.tools == "auto" and not final and CALL_OPEN.startswith(rest):
            return reasoning, "", False  # a call may be starting
        return reasoning, rest, False

    def message(self, text: str) -> AssistantMessage:
        reasoning, content, calling = self.split(text, final=True)
        if calling:
            found = parse_call(content, self.names)
            if found is not None:
                return AssistantMessage(None, reasoning, [tool_call(*found)])
        return AssistantMessage(content, reasoning)

    def _deltas(self, reasoning: str | None, content: str) -> list[dict[str, Any]]:
        out = []
        r, c = reasoning or "", content
        if len(r) > len(self.sent[0]) and r.startswith(self.sent[0]):
            out.append({"reasoning_content": r[len(self.sent[0]):]})
        if len(c) > len(self.sent[1]) and c.startswith(self.sent[1]):
            out.append({"content": c[len(self.sent[1]):]})
        self.sent = (max(r, self.sent[0], key=len), max(c, self.sent[1], key=len))
        return out

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Stream deltas ({"content"} / {"reasoning_content"}) for the text so far plus `delta`."""
        self.text += delta
        if not self.thinking and self.tools is None:
            return [{"content": delta}] if delta else []
        reasoning, content, calling = self.split(self.text, final=False)
        return self._deltas(reasoning, "" if calling else content)

    def end(self, text: str) -> list[dict[str, Any]]:
        """The last deltas, from the whole final text: the rest of the text, or the call."""
        if not self.thinking and self.tools is None:
            return []
        msg = self.message(text)
        out = self._deltas(msg.reasoning, msg.content or "")
        if msg.tool_calls:
            self.called = True
            out.append({"tool_calls": [{"index": 0, **msg.tool_calls[0]}]})
        return out


def _strip_newline(text: str) -> str:
    """The thought channel's text without the newline after its name."""
    return text.removeprefix("\n")
