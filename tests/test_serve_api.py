"""The HTTP API against a live server on loopback: the official openai client, errors, fuzzing, load, disconnects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import LiveServer

from dgemma.ar import ar_generate
from dgemma.presets import write_random_checkpoint
from dgemma.serve import Limits

FAST = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    with LiveServer(model_dir, limits=Limits(max_tokens=96, max_prompt_tokens=200, max_body_bytes=20_000)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def complete(client, prompt="Hello", seed=0, max_tokens=40, **extra):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, seed=seed,
                                     extra_body={"diffusion": FAST, **extra})


# -- the openai client ---------------------------------------------------------------------------------------------
def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["dgemma"]["canvas_length"] == 32


def test_completion_matches_direct_generate(client, server):
    r = complete(client, seed=5, temperature=0.7, logit_bias={"1": 2}, foo=1)
    model = server.model
    prompt = model.tokenizer.encode("Hello")
    want = model.generate(prompt, seed=5, max_new_tokens=40, **FAST)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.ids) and r.usage.prompt_tokens == len(prompt)
    assert r.usage.model_extra["tokens_per_forward"] == pytest.approx(want.tokens_per_forward)
    assert r.usage.model_extra["forward_passes"] == sum(want.steps)
    ext = r.model_extra["dgemma"]
    assert ext["seed"] == 5 and ext["steps"] == want.steps and ext["decoder"] == "diffusion"
    assert ext["ignored"] == ["foo", "logit_bias", "temperature"]
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "eos" else "length")


def test_seeds(client):
    a, b, c = (complete(client, seed=s).model_extra["dgemma"] for s in (1, 1, 2))
    ta, tb, tc = (complete(client, seed=s).choices[0].text for s in (1, 1, 2))
    assert ta == tb and ta != tc
    assert a["steps"] == b["steps"]


def test_chat_stream_equals_non_stream(client, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=64, seed=3, extra_body={"diffusion": FAST})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    commits = [c for c in chunks if (c.model_extra.get("dgemma") or {}).get("event") == "commit"]
    assert 1 <= len(commits) <= 2  # one delta per committed canvas (64 tokens = 2 canvases of 32)
    ids = server.model.tokenizer.encode_chat(msgs)
    want = server.model.generate(ids, seed=3, max_new_tokens=64, **FAST)
    assert whole.choices[0].message.content == want.text


def test_drafts(client):
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=4, stream=True,
                                            extra_body={"stream_drafts": True, "diffusion": FAST}))
    drafts = [c.model_extra["dgemma"] for c in chunks if (c.model_extra.get("dgemma") or {}).get("event") == "draft"]
    assert drafts, "no draft events"
    for d in drafts:
        assert len(d["tokens"]) == len(d["ids"]) == len(d["accepted"]) == len(d["entropy"]) == 32
        assert all(e >= 0 for e in d["entropy"])
    by_canvas: dict[int, list[int]] = {}
    for d in drafts:
        by_canvas.setdefault(d["canvas_index"], []).append(d["step"])
    final = chunks[-1].model_extra["dgemma"]
    assert [len(v) for v in by_canvas.values()] == final["steps"]
    assert all(v == list(range(1, len(v) + 1)) for v in by_canvas.values())
    # Without the flag there are none.
    plain = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=4, stream=True,
                                           extra_body={"diffusion": FAST}))
    assert not [c for c in plain if (c.model_extra.get("dgemma") or {}).get("event") == "draft"]
    assert "".join(c.choices[0].text for c in plain) == "".join(c.choices[0].text for c in chunks)


def test_per_request_settings(client):
    r = complete(client, seed=0, max_tokens=64, diffusion={"max_denoising_steps": 1})
    assert r.model_extra["dgemma"]["steps"] == [1] * len(r.model_extra["dgemma"]["steps"])
    assert r.usage.model_extra["forward_passes"] == len(r.model_extra["dgemma"]["steps"])


def test_autoregressive_decoder(client, server):
    r = complete(client, prompt="Hello", max_tokens=12, decoder="autoregressive")
    want = ar_generate(server.model, server.model.tokenizer.encode("Hello"), max_new_tokens=12)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.ids) == r.usage.model_extra["forward_passes"]
    assert r.usage.model_extra["tokens_per_forward"] == 1.0
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, stream=True,
                                            extra_body={"decoder": "autoregressive"}))
    events = [c.model_extra["dgemma"] for c in chunks if (c.model_extra.get("dgemma") or {}).get("event") == "token"]
    assert [e["forwards"] for e in events] == list(range(1, len(want.ids) + 1))


def test_stop_strings(client):
    full = complete(client, seed=9, max_tokens=64, diffusion={"max_denoising_steps": 2}).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=9, stop=[stop],
                                  extra_body={"diffusion": {"max_denoising_steps": 2}})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=64, seed=9, stop=stop,
                                              stream=True, extra_body={"diffusion": {"max_denoising_steps": 2}}))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_token_id_prompt(client, server):
    ids = server.model.tokenizer.encode("Hello")
    a = client.completions.create(model="tiny", prompt=ids, max_tokens=32, seed=1, extra_body={"diffusion": FAST})
    b = complete(client, prompt="Hello", seed=1, max_tokens=32)
    assert a.choices[0].text == b.choices[0].text


# -- client mistakes: 4xx with OpenAI's error body, and the server keeps serving ---------------------------------
BAD = {
    "max_tokens_zero": ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens_negative": ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    "max_tokens_over_cap": ({"prompt": "x", "max_tokens": 97}, 400, "limit of 96"),
    "max_tokens_string": ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    "n_two": ({"prompt": "x", "n": 2}, 400, "n"),
    "t_order": ({"prompt": "x", "diffusion": {"t_min": 0.9, "t_max": 0.5}}, 400, "t_max must be > t_min"),
    "entropy_zero": ({"prompt": "x", "diffusion": {"entropy_bound": 0}}, 400, "entropy_bound"),
    "steps_zero": ({"prompt": "x", "diffusion": {"max_denoising_steps": 0}}, 400, "max_denoising_steps"),
    "unknown_setting": ({"prompt": "x", "diffusion": {"nope": 1}}, 400, "nope"),
    "seed_negative": ({"prompt": "x", "seed": -1}, 400, "seed"),
    "seed_huge": ({"prompt": "x", "seed": 2**64}, 400, "seed"),
    "wrong_model": ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    "empty_prompt": ({"prompt": ""}, 400, "empty"),
    "ids_outside_vocab": ({"prompt": [5, 99999]}, 400, "99999"),
    "prompt_too_long": ({"prompt": "y" * 300}, 400, "limit is 200"),
    "several_prompts": ({"prompt": ["a", "b"]}, 400, "one prompt"),
    "bad_decoder": ({"prompt": "x", "decoder": "beam"}, 400, "decoder"),
    "too_many_stops": ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "no_prompt": ({"max_tokens": 4}, 400, "prompt"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_requests(server, name):
    body, status, needle = BAD[name]
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"] + str(err["param"])


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
])
def test_bad_chat(server, body, needle):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"] + str(r.json()["error"]["param"])


@pytest.mark.parametrize("content,headers,status", [
    (b"{not json", {"content-type": "application/json"}, 400),
    (b"[1, 2]", {"content-type": "application/json"}, 400),
    (b"", {"content-type": "application/json"}, 400),
    (b'{"prompt": "' + b"z" * 30_000 + b'"}', {"content-type": "application/json"}, 413),
])
def test_malformed_bodies(server, content, headers, status):
    r = httpx.post(server.url + "/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status and "message" in r.json()["error"]


def test_chunked_body_over_limit(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"z" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "20000" in r.json()["error"]["message"]


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_still_serving_after_errors(client):
    assert complete(client, max_tokens=8).choices[0].text is not None


def test_api_key(model_dir):
    with LiveServer(model_dir, api_key="sekret") as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=4, extra_body={"diffusion": FAST})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


# -- fuzzing: nothing a client sends gives a 5xx ----------------------------------------------------------------
@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_no_5xx(case):
    r = case.call(timeout=60)
    assert r.status_code < 500, (case.method, case.path, case.body, r.text[:300])


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)
FIELDS = st.fixed_dictionaries({}, optional={
    "prompt": JSON | st.text(max_size=20), "messages": JSON, "max_tokens": JSON | st.integers(-3, 40),
    "seed": JSON, "stop": JSON, "stream": JSON, "diffusion": JSON | st.fixed_dictionaries(
        {}, optional={"max_denoising_steps": st.integers(-2, 3) | JSON, "entropy_bound": JSON,
                      "t_min": JSON, "t_max": JSON}),
    "decoder": JSON, "stream_drafts": JSON, "n": JSON, "model": JSON})


@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=FIELDS | JSON)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_json_fuzz_no_5xx(server, path, body):
    try:
        content = json.dumps(body, allow_nan=True)
    except (ValueError, TypeError):
        return
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (path, content, r.text[:300])


# -- load and disconnects ------------------------------------------------------------------------------------------
def _stream_text(url: str, body: dict) -> tuple[str, list[int]]:
    text, steps = "", []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"]
            if chunk["choices"][0]["finish_reason"]:
                steps = chunk["dgemma"]["steps"]
    return text, steps


def test_concurrent_streams_match_solo_runs(server):
    bodies = [{"model": "tiny", "prompt": f"prompt number {i}" + "!" * i, "max_tokens": 64, "seed": 100 + i,
               "diffusion": {"max_denoising_steps": 6}} for i in range(8)]
    solo = [_stream_text(server.url, b) for b in bodies]
    before = httpx.get(server.url + "/health").json()
    results: list = [None] * 8
    gate = threading.Barrier(8)

    def worker(i):
        gate.wait()
        results[i] = _stream_text(server.url, bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo
    after = httpx.get(server.url + "/health").json()
    # Some of the 8 requests shared a batched run (fewer runs than requests).
    assert after["runs_started"] - before["runs_started"] < 8
    assert after["largest_batch"] >= 2


def test_disconnect_cancels_work(server):
    engine = server.engine
    body = {"prompt": "Hello", "max_tokens": 96, "seed": 3, "stream": True, "stream_drafts": True,
            "diffusion": {"max_denoising_steps": 400, "stability_threshold": None, "confidence_threshold": None,
                          "entropy_bound": 1e-9}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 3:
                    break
    deadline = time.time() + 10
    while engine._runs and time.time() < deadline:
        time.sleep(0.01)
    assert not engine._runs, "the run kept going after its client left"
    passes = engine.forward_passes
    time.sleep(0.3)
    assert engine.forward_passes == passes
    # 3 canvases x 400 steps were asked for; far fewer passes ran.
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 4, "diffusion": FAST})
    assert r.status_code == 200
