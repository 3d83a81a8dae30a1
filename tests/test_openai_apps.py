"""What application developers use, through the official `openai` client against a served random model: tool calls
(required / named / auto / none, history with tool turns, streamed deltas, bad definitions), n choices, logprobs,
reasoning (the thought channel as reasoning_content)."""

from __future__ import annotations

import json
import math
import re

import httpx
import jsonschema
import openai
import pytest
from live_server import LiveServer

from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.serve import Limits
from dgemma.serve.messages import CALL_OPEN, THOUGHT_CLOSE, THOUGHT_OPEN, call_text
from dgemma.serve.prepare import chat_prompt_ids
from dgemma.serve.schema import ChatRequest
from dgemma.serve.tools import plan

FAST = {"diffusion": {"max_denoising_steps": 4}}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# A chat template that renders tools, tool calls, tool turns and enable_thinking itself (as Gemma 4's does).
NATIVE_TEMPLATE = (
    "{{ bos_token }}{% if enable_thinking %}<|think|>{% endif %}"
    "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% for c in m.get('tool_calls') or [] %}<|tool_call>call:{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}<tool_call|>{% endfor %}"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("apps") / "tiny", "tiny", seed=0)
    with LiveServer(path, limits=Limits(max_tokens=96, max_n=4)) as s:
        yield s


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("native") / "tiny", "tiny", seed=0)
    (path / "chat_template.jinja").write_text(NATIVE_TEMPLATE, encoding="utf-8")
    with LiveServer(path, limits=Limits(max_tokens=96)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kw):
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 64)
    kw.setdefault("seed", 1)
    extra = {**FAST, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model="tiny", extra_body=extra, **kw)


def valid_call(call) -> None:
    """The call names a known function and its arguments parse and validate against that function's schema."""
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# -- tool calls ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_call_always_validates(client, seed):
    r = chat(client, tools=TOOLS, tool_choice="required", seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    valid_call(call)


def test_parameters_without_type_are_an_object():
    """A parameters schema without "type" ({} accepts any JSON value) still makes the arguments an object."""
    req = ChatRequest.model_validate({"messages": ASK, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"description": "anything"}}}]})
    regex = re.compile(plan(req).constraint.value)
    assert regex.fullmatch(call_text("f", '{"x":1}'))
    assert not any(regex.fullmatch(call_text("f", v)) for v in ("1", "[1]", '"s"'))


def test_named_tool_call(client):
    r = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    valid_call(call)


def test_streamed_tool_call_deltas(client):
    whole = chat(client, tools=TOOLS, tool_choice="required", seed=4)
    chunks = list(chat(client, tools=TOOLS, tool_choice="required", seed=4, stream=True))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls and all(tc.index == 0 for tc in calls)
    name = "".join(tc.function.name or "" for tc in calls)
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    want = whole.choices[0].message.tool_calls[0].function
    assert (name, arguments) == (want.name, want.arguments)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_auto_is_text_or_a_valid_call(client, seed):
    r = chat(client, tools=TOOLS, tool_choice="auto", seed=seed)
    msg = r.choices[0].message
    if msg.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        valid_call(msg.tool_calls[0])
    else:
        assert not msg.content.startswith("<") and r.choices[0].finish_reason in ("stop", "length")


def test_none_leaves_text(client):
    r = chat(client, tools=TOOLS, tool_choice="none", seed=2, max_tokens=16)
    plain = chat(client, tools=TOOLS, tool_choice="none", seed=2, max_tokens=16)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content


def test_conversation_with_tool_turns(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = chat(client, messages=history, tools=TOOLS, tool_choice="required")
    valid_call(r.choices[0].message.tool_calls[0])


def test_tools_rendered_by_a_native_template(native):
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    req = ChatRequest.model_validate({"messages": history, "tools": TOOLS, "chat_template_kwargs":
                                      {"enable_thinking": True}})
    ids, _ = chat_prompt_ids(native.app.state.dgemma, req)
    text = native.model.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|think|>TOOLS:get_weather;get_time;" in text
    assert '<|tool_call>call:get_weather{"city": "Oslo"}<tool_call|>' in text
    assert "<start_of_turn>tool\nrain<end_of_turn>" in text


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name", "parameters": WEATHER}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "nope"}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_bad_tools_are_400s_naming_the_field(server, client, change, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, extra_body=change)
    assert e.value.body["param"] == param, e.value.body
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# -- n -------------------------------------------------------------------------------------------------------------
def test_n_choices_equal_single_requests_with_consecutive_seeds(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, seed=7, n=3, extra_body=FAST)
    singles = [client.completions.create(model="tiny", prompt="Hello", max_tokens=40, seed=7 + i, extra_body=FAST)
               for i in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert [c.finish_reason for c in r.choices] == [s.choices[0].finish_reason for s in singles]
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert [c["seed"] for c in r.model_extra["dgemma"]["choices"]] == [7, 8, 9]


def test_n_chat_streamed(client):
    whole = chat(client, n=2, seed=3, max_tokens=40)
    texts = ["", ""]
    finish = [None, None]
    for chunk in chat(client, n=2, seed=3, max_tokens=40, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_n_over_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, n=5)
    assert e.value.body["param"] == "n" and "limit of 4" in e.value.body["message"]


# -- logprobs ------------------------------------------------------------------------------------------------------
def test_chat_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=40)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert math.isfinite(e.logprob) and e.logprob <= 0
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    plain = chat(client, max_tokens=40)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completion_logprobs_streamed_equal_whole(client):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 40, "seed": 5, "logprobs": 2, "extra_body": FAST}
    whole = client.completions.create(**body).choices[0].logprobs
    assert len(whole.token_logprobs) == len(whole.tokens) and all(v <= 0 for v in whole.token_logprobs)
    assert all(len(t) <= 2 for t in whole.top_logprobs)
    streamed = [v for c in client.completions.create(**body, stream=True) if c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.token_logprobs


# -- reasoning -----------------------------------------------------------------------------------------------------
THOUGHT = {"regex": "<\\|channel>thought\\n[a-z]{3,6}<channel\\|>[a-z]{2,5}"}


def test_thought_channel_is_reasoning_content(client):
    kw = {"max_tokens": 40, "extra_body": {"structured_outputs": THOUGHT,
                                           "chat_template_kwargs": {"enable_thinking": True}}}
    msg = chat(client, **kw).choices[0].message
    raw = chat(client, max_tokens=40, extra_body={"structured_outputs": THOUGHT}).choices[0].message.content
    assert raw.startswith(THOUGHT_OPEN) and THOUGHT_CLOSE in raw  # thinking off: the text as generated
    assert msg.model_extra["reasoning_content"] == raw[len(THOUGHT_OPEN) + 1:raw.index(THOUGHT_CLOSE)]
    assert msg.content == raw[raw.index(THOUGHT_CLOSE) + len(THOUGHT_CLOSE):]
    reasoning = content = ""
    for chunk in chat(client, stream=True, **kw):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == (msg.model_extra["reasoning_content"], msg.content)
    assert CALL_OPEN not in content


# -- prefix cache --------------------------------------------------------------------------------------------------
def test_prefix_cache_reports_cached_tokens_and_changes_nothing(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("cache") / "tiny", "tiny", seed=0)
    system = {"role": "system", "content": "You answer briefly and politely. " * 20}  # ~660 prompt tokens
    turns = [[system, {"role": "user", "content": q}] for q in ("first question", "second question")]
    limits = Limits(max_tokens=64, prefix_cache_gib=0.05)
    with LiveServer(path, limits=limits) as warm:
        c = openai.OpenAI(base_url=warm.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        first, second = (chat(c, messages=m, max_tokens=32) for m in turns)
    with LiveServer(path, limits=limits) as cold:
        c = openai.OpenAI(base_url=cold.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        alone = chat(c, messages=turns[1], max_tokens=32)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert alone.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 512  # the shared blocks of 128 tokens
    assert second.choices[0].message.content == alone.choices[0].message.content


def test_no_prefix_cache_no_cached_tokens(client):
    assert chat(client, max_tokens=8).usage.prompt_tokens_details is None


def test_markers_that_are_special_tokens_are_kept_for_reading():
    """Gemma 4's thought and call markers are special tokens: a job read for them decodes them (EOS and pad
    still dropped), so the thought channel splits off; a plain job's text drops them as before."""
    from types import SimpleNamespace

    from tokenizers import AddedToken

    from dgemma.config import GenerationConfig
    from dgemma.requests import PreparedRequest
    from dgemma.serve.engine import Engine, Job
    from dgemma.serve.messages import OutputView
    from dgemma.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    tok.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|channel>", "<channel|>")])
    ids = [tok.token_to_id("<|channel>"), *tok.encode("thought\nhmm"), tok.token_to_id("<channel|>"),
           *tok.encode("yes"), 1, 0]  # then EOS, pad
    fake = SimpleNamespace(tokenizer=tok, text_of=tok.decode)
    request = PreparedRequest([5], 8, {}, GenerationConfig(eos_token_id=1, pad_token_id=0), seed=0)
    read = Engine._text(fake, Job(request, print, markup=True))
    plain = Engine._text(fake, Job(request, print))
    read.push(ids), plain.push(ids)
    assert plain.text == "thought\nhmmyes"
    msg = OutputView(thinking=True).message(read.text)
    assert (msg.reasoning, msg.content) == ("hmm", "yes")
