"""Constrained output over the OpenAI-compatible API (openai client on a live server with random tiny weights):
structured_outputs regex / choice / json, response_format json_schema / json_object, infill templates, the length
case, and 400s naming the problem."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from live_server import LiveServer

from dgemma.checkpoint.write import write_random_checkpoint

FAST = {"max_denoising_steps": 4}  # validity never depends on the step count; the contract runs the default


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-constrained-serve")
    write_random_checkpoint(path, "tiny", seed=11)
    with LiveServer(path) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


EMAIL = r"[a-z]{2,6}\.[a-z]{2,6}@(example|test)\.(com|org)"


def test_regex_completions_match_and_stop(client):
    for seed in range(4):
        extra = {"structured_outputs": {"regex": EMAIL}}
        if seed:
            extra["diffusion"] = FAST
        r = client.completions.create(model="tiny", prompt="Contact:", seed=seed, max_tokens=64, extra_body=extra)
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(EMAIL, r.choices[0].text), r.choices[0].text


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
    "role": {"enum": ["admin", "user", "guest"]}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                             "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "[0-9]{5}"},
                                                 "city": {"type": "string", "maxLength": 10}},
                "required": ["zip", "city"], "additionalProperties": False}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}


def test_chat_json_schema_parses_and_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person?"}],
                                           seed=seed, max_tokens=200, response_format=fmt,
                                           extra_body={"diffusion": FAST})
        assert r.choices[0].finish_reason == "stop"
        obj = json.loads(r.choices[0].message.content)
        jsonschema.validate(obj, SCHEMA)
        assert list(obj) == list(SCHEMA["properties"])  # in the schema's order


def test_json_object_and_structured_json(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "{}"}], seed=1,
                                       max_tokens=128, response_format={"type": "json_object"},
                                       extra_body={"diffusion": FAST})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4}
    r = client.completions.create(model="tiny", prompt="[", seed=2, max_tokens=40,
                                  extra_body={"structured_outputs": {"json": schema}, "diffusion": FAST})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_choice_and_drafts_show_the_constrained_canvas(server, client):
    options = ["positive", "negative", "neutral", "neg"]
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="Sentiment:", seed=seed, max_tokens=16,
                                      extra_body={"structured_outputs": {"choice": options}, "diffusion": FAST})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text in options
    tok = server.model.tokenizer
    body = {"prompt": "Sentiment:", "seed": 5, "max_tokens": 16, "stream": True, "stream_drafts": True,
            "structured_outputs": {"choice": options}, "diffusion": FAST}
    drafts = 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                ext = json.loads(line[6:])["choices"] and json.loads(line[6:]).get("dgemma", {})
                if ext.get("event") == "draft":
                    drafts += 1
                    ids = ext["ids"]
                    end = next(i for i, t in enumerate(ids) if t in (1, 5))  # every draft already ends
                    assert tok.decode(ids[:end]) in options
    assert drafts == FAST["max_denoising_steps"]


def test_infill_template(client):
    tmpl = "Order {{hole:4:[0-9]+}} for {{hole:1-8:[A-Z][a-z]+}} is {{hole:4-5:(ready|late)}}."
    r = client.completions.create(model="tiny", prompt="Status:", seed=3, max_tokens=64,
                                  extra_body={"infill": {"template": tmpl}, "diffusion": FAST})
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(r"Order [0-9]{4} for [A-Z][a-z]+ is (ready|late)\.", r.choices[0].text)


def test_budget_too_short_ends_for_length_never_a_false_stop(client):
    r = client.completions.create(model="tiny", prompt="x", seed=0, max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "[a-z]{10}"}, "diffusion": FAST})
    assert r.choices[0].finish_reason == "length" and re.fullmatch("[a-z]{5}", r.choices[0].text)


@pytest.mark.parametrize("extra, needle", [
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "cannot be compiled"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "one constraint"),
    ({"infill": {"template": "no holes here"}}, "no hole"),
    ({"structured_outputs": {"regex": "a+"}, "decoder": "autoregressive"}, "diffusion decoder"),
])
def test_bad_constraints_are_400s(server, extra, needle):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 8, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_concurrent_requests_with_different_constraints(server):
    """Requests that arrive together are batched whatever their constraints (one automaton per row)."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, {"structured_outputs": {"choice": ["x", "yy"]}},
              {"structured_outputs": {"json": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}},
              {}, {"infill": {"template": "<{{hole:2:[a-f]+}}>"}}, {"structured_outputs": {"regex": r"\d+"}}]

    def call(i):
        body = {"prompt": "go", "seed": i, "max_tokens": 32, "diffusion": FAST, **bodies[i % len(bodies)]}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]

    with ThreadPoolExecutor(12) as pool:
        out = list(pool.map(call, range(12)))
    for i, choice in enumerate(out):
        text, kind = choice["text"], i % len(bodies)
        if kind == 3:
            continue  # unconstrained
        assert choice["finish_reason"] == "stop"
        if kind == 0:
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)
        elif kind == 1:
            assert text in ("x", "yy")
        elif kind == 2:
            assert isinstance(json.loads(text), list)
        elif kind == 4:
            assert re.fullmatch(r"<[a-f]{2}>", text)
        else:
            assert re.fullmatch(r"[0-9]+", text)
