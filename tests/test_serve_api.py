"""The HTTP API against a live server on loopback: the official openai client, errors, fuzzing, load, disconnects."""

from __future__ import annotations

import json
import socket
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
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.serve import ConnectionLimits, Limits
from dgemma.serve.app import host_policy

FAST = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    limits = Limits(max_tokens=96, max_prompt_tokens=200, max_body_bytes=20_000, max_denoising_steps=400)
    with LiveServer(model_dir, limits=limits) as s:
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


def solo(model, prompt: list[int], seed: int, max_tokens: int, **settings) -> tuple[list[int], str, str, list[int]]:
    """What the server must return: whole canvases from model.generate, cut to max_tokens (ids, text, finish
    reason, steps)."""
    want = model.generate(prompt, seed=seed, max_new_tokens=max_tokens, **settings)
    ids = want.ids[:max_tokens]
    eos = set(model.generation_config.eos_ids)
    finish = "stop" if any(t in eos for t in ids) else "length"
    return ids, model.tokenizer.decode(ids), finish, want.steps


def test_completion_matches_direct_generate(client, server):
    r = complete(client, seed=5, temperature=0.7, logit_bias={"1": 2}, foo=1)
    model = server.model
    prompt = model.tokenizer.encode("Hello")
    ids, text, finish, steps = solo(model, prompt, 5, 40, **FAST)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(prompt)
    assert r.usage.model_extra["forward_passes"] == sum(steps)
    assert r.usage.model_extra["tokens_per_forward"] == pytest.approx(len(ids) / sum(steps))
    ext = r.model_extra["dgemma"]
    assert ext["seed"] == 5 and ext["steps"] == steps and ext["decoder"] == "diffusion"
    assert ext["ignored"] == ["foo", "logit_bias", "temperature"]


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
    "n_over_max_n": ({"prompt": "x", "n": 9}, 400, "limit of 8"),
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
def fuzz_server(model_dir):
    """The main server's limits, with 2 denoising steps by default so that the valid requests fuzzing finds are
    cheap (the model's 48 would spend minutes on them)."""
    limits = Limits(max_tokens=96, max_prompt_tokens=200, max_body_bytes=20_000, max_denoising_steps=400)
    with LiveServer(model_dir, limits=limits) as s:
        s.model.generation_config = s.model.generation_config.replace(max_denoising_steps=2)
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


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
def test_json_fuzz_no_5xx(fuzz_server, path, body):
    try:
        content = json.dumps(body, allow_nan=True)
    except (ValueError, TypeError):
        return
    r = httpx.post(fuzz_server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
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
    before = engine.forward_passes
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 3:
                    break
    deadline = time.time() + 10
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.running, "the run kept going after its client left"
    passes = engine.forward_passes
    time.sleep(0.3)
    assert engine.forward_passes == passes
    # 3 canvases x 400 steps were asked for; the client read 2 drafts, and few more passes ran before the server
    # noticed it had gone.
    assert 2 <= passes - before < 100, passes - before
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 4, "diffusion": FAST})
    assert r.status_code == 200


# -- finite JSON: no temperature float32 cannot divide by, no NaN on the wire --------------------------------------
def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def sse_objects(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [strict_json(line) for line in lines[:-1]]


@pytest.mark.parametrize("diffusion", [
    {"t_min": 0, "t_max": 1e-40},  # t_max itself is beyond float32's reach
    {"t_min": 0, "t_max": 1e-5, "max_denoising_steps": 16},  # the schedule's last step falls under the floor
])
def test_tiny_temperature_refused(server, diffusion):
    r = post(server, "/v1/completions", {"prompt": "x", "seed": 1, "stream": True, "stream_drafts": True,
                                         "diffusion": diffusion})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "diffusion.t_max" and "temperature" in err["message"]


def test_smallest_temperature_gives_finite_json(server):
    chunks = sse_objects(server, {"prompt": "x", "seed": 1, "stream_drafts": True, "max_tokens": 32,
                                  "diffusion": {"t_min": 0, "t_max": 8e-6, "max_denoising_steps": 4}})
    drafts = [c["dgemma"] for c in chunks if (c.get("dgemma") or {}).get("event") == "draft"]
    assert drafts and all(e is not None and e >= 0 for d in drafts for e in d["entropy"])
    assert chunks[-1]["usage"]["completion_tokens"] > 0


# -- max_tokens is a hard cap on the returned tokens ---------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 5, 33])
def test_max_tokens_caps_completion(server, client, max_tokens):
    model = server.model
    ids, text, finish, steps = solo(model, model.tokenizer.encode("Hello"), 11, max_tokens, **FAST)
    r = complete(client, seed=11, max_tokens=max_tokens)
    assert r.usage.completion_tokens == len(ids) <= max_tokens
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.model_extra["dgemma"]["steps"] == steps  # whole canvases were generated
    streamed = sse_objects(server, {"prompt": "Hello", "seed": 11, "max_tokens": max_tokens, "diffusion": FAST})
    assert "".join(c["choices"][0]["text"] for c in streamed) == text
    assert streamed[-1]["choices"][0]["finish_reason"] == finish
    assert streamed[-1]["usage"]["completion_tokens"] == len(ids)


def test_max_completion_tokens_caps_chat(server, client):
    msgs = [{"role": "user", "content": "Hi"}]
    model = server.model
    ids, text, finish, _ = solo(model, model.tokenizer.encode_chat(msgs), 2, 3, **FAST)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3, seed=2,
                                       extra_body={"diffusion": FAST})
    assert r.usage.completion_tokens == len(ids) <= 3
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish


def test_max_tokens_cut_reports_length():
    """A cut that drops tokens is "length"; one that keeps the EOS is "stop" (engine level, fixed canvases)."""
    from dgemma.config import GenerationConfig
    from dgemma.requests import PreparedRequest
    from dgemma.serve.engine import Job, _DiffusionRun
    from dgemma.tokenizer import IncrementalText

    class FakeEngine:
        reason = None

        def advance(self, job, new, commit):
            job.text = job.text or IncrementalText(lambda ids: "")
            job.text.push(new)

        def finish(self, job, reason):
            job.finished = True
            self.reason = reason

        def token_strings(self, ids):
            return [str(i) for i in ids]

    run = _DiffusionRun.__new__(_DiffusionRun)
    run.pad, run.eos = 0, {1}
    cases = [([7, 8, 9, 1, 0], 3, "length", [7, 8, 9]), ([7, 1, 0, 0, 0], 3, "stop", [7, 1]),
             ([7, 8, 9, 4, 5], 9, None, [7, 8, 9, 4, 5]), ([7, 8, 9, 4, 5], 5, "length", [7, 8, 9, 4, 5])]
    for row, cap, reason, kept in cases:
        request = PreparedRequest([3], cap, {}, GenerationConfig(), seed=0)
        job, run.engine = Job(request, lambda e: None), FakeEngine()
        run._commit(job, row, 4, 0, row_finished=1 in row)
        assert job.ids == kept and run.engine.reason == reason, (row, cap)


# -- bounded work ---------------------------------------------------------------------------------------------------
def test_step_cap(server):
    r = post(server, "/v1/completions", {"prompt": "x", "diffusion": {"max_denoising_steps": 401}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "diffusion.max_denoising_steps"
    assert "limit of 400" in r.json()["error"]["message"]


# Far more work than the deadline allows on any CPU (32 canvases x 1024 decoder passes of the tiny model).
LONG = {"max_denoising_steps": 1024, "stability_threshold": None, "confidence_threshold": None, "entropy_bound": 1e-9}


def test_running_cap_queue_and_deadline(model_dir):
    """One request runs, one waits, the next is refused (429); the running one and the waiting one are stopped at
    the deadline (a stream gets an error event, a plain request a 408) and the engine is idle again."""
    limits = Limits(max_tokens=1024, max_running=1, max_pending=1, request_timeout=3.0, max_denoising_steps=1024)
    with LiveServer(model_dir, limits=limits) as s:
        body = {"prompt": "Hello", "max_tokens": 1024, "seed": 1, "diffusion": LONG}
        first: list = []
        t0 = time.time()
        streamer = threading.Thread(target=lambda: first.extend(sse_lines(s.url, body)))
        streamer.start()
        while s.engine.running == 0 and time.time() - t0 < 5:
            time.sleep(0.01)
        second: list = []
        waiter = threading.Thread(target=lambda: second.append(post(s, "/v1/completions", body)))
        waiter.start()
        while s.engine.pending == 0 and time.time() - t0 < 5:
            time.sleep(0.01)
        assert (s.engine.running, s.engine.pending) == (1, 1)
        r = post(s, "/v1/completions", body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
        streamer.join(30)
        waiter.join(30)
        assert time.time() - t0 < 10  # 32 canvases x 1024 steps would take far longer
        last = strict_json(first[-2])
        assert first[-1] == "[DONE]" and last["error"]["code"] == "deadline_exceeded"
        assert second[0].status_code == 408 and second[0].json()["error"]["code"] == "deadline_exceeded"
        assert (s.engine.running, s.engine.pending) == (0, 0)
        assert post(s, "/v1/completions", {"prompt": "a", "max_tokens": 4, "diffusion": FAST}).status_code == 200


def sse_lines(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


# -- no event-loop stalls on large inputs ---------------------------------------------------------------------------
def health_latency_while(url: str, action) -> tuple[object, float]:
    """Run `action` in a thread; poll /health meanwhile; return its result and the slowest /health answer."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(action()))
    worker.start()
    worst = 0.0
    while worker.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.02)
    worker.join()
    return out[0], worst


@pytest.fixture(scope="module")
def big_body_server(model_dir):
    with LiveServer(model_dir, limits=Limits(max_tokens=96, max_prompt_tokens=200)) as s:  # 1 MB bodies
        yield s


def test_many_messages_refused_cheaply(big_body_server):
    s = big_body_server
    body = json.dumps({"messages": [{"role": "user"}] * 60_000}, separators=(",", ":")).encode()  # 960 KB
    r, worst = health_latency_while(s.url, lambda: httpx.post(s.url + "/v1/chat/completions", content=body,
                                                              headers={"content-type": "application/json"}))
    assert r.status_code == 400 and "60000 messages" in r.json()["error"]["message"]
    assert worst < 1.0


def test_long_prompt_refused_by_characters(big_body_server):
    s = big_body_server
    body = json.dumps({"prompt": "z" * 1_000_000}).encode()
    r, worst = health_latency_while(s.url, lambda: httpx.post(s.url + "/v1/completions", content=body,
                                                              headers={"content-type": "application/json"}))
    assert r.status_code == 400 and "1000000 characters" in r.json()["error"]["message"]
    assert worst < 1.0


def test_tokenizer_runs_off_the_event_loop(big_body_server, monkeypatch):
    s = big_body_server
    tok = s.model.tokenizer
    real = tok.encode

    def slow_encode(text, *a, **kw):
        time.sleep(1.5)
        return real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", slow_encode)
    r, worst = health_latency_while(s.url, lambda: post(s, "/v1/completions", {"prompt": "a", "max_tokens": 4,
                                                                                "diffusion": FAST}))
    assert r.status_code == 200 and worst < 0.75


# -- connections are reaped ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(model_dir):
    conns = ConnectionLimits(read_timeout=1.0, keep_alive_timeout=1.0, max_header_bytes=4096)
    with LiveServer(model_dir, connections=conns, allowed_hosts=("my.box",)) as s:
        yield s


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (reads and drops what it sends); fails after `seconds`."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 100\r\n\r\n{\"prompt\""])
def test_incomplete_requests_are_closed(strict_server, sent):
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(sent)
        assert closed_within(sock, 4.0) >= 0.5


def test_idle_keep_alive_closed(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        closed_within(sock, 4.0)


def test_oversized_headers_refused(strict_server):
    """Headers growing past the limit are refused at once (the server does not buffer them until the timeout)."""
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8000)
        sock.settimeout(0.5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")


def test_connection_cap(model_dir):
    with LiveServer(model_dir, connections=ConnectionLimits(max_connections=3, read_timeout=5.0)) as s:
        held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(s.url + "/health").status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(s.url + "/health").status_code == 200


def test_half_closed_client_gets_response(strict_server):
    body = json.dumps({"prompt": "Hi", "max_tokens": 8, "seed": 1, "diffusion": FAST}).encode()
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(payload)["usage"]["completion_tokens"] > 0


# -- auth and Host -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(model_dir):
    with LiveServer(model_dir, api_key="sekret") as s:
        yield s


@pytest.mark.parametrize("body", [{"prompt": "x", "n": 2}, {"nonsense": True}, "not json"])
def test_key_checked_before_body(keyed_server, body):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(keyed_server.url + "/v1/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_case_insensitive(keyed_server, scheme):
    r = httpx.get(keyed_server.url + "/v1/models", headers={"authorization": f"{scheme} sekret"})
    assert r.status_code == 200


@pytest.mark.parametrize("host,status", [("127.0.0.1", 200), ("localhost", 200), ("LOCALHOST.", 200),
                                         ("my.box", 200), ("[::1]", 200), ("evil.example", 400),
                                         ("my.box.evil.example", 400), ("10.1.2.3", 400)])
def test_host_header(strict_server, host, status):
    r = httpx.get(strict_server.url + "/health", headers={"host": f"{host}:{strict_server.port}"})
    assert r.status_code == status
    if status == 400:
        assert r.json()["error"]["code"] == "invalid_host"


def test_any_host_when_allowed(model_dir):
    with LiveServer(model_dir, allowed_hosts=("*",)) as s:
        assert httpx.get(s.url + "/health", headers={"host": "anything.example"}).status_code == 200


def test_host_policy_for_wildcard_bind():
    names, any_ip = host_policy("0.0.0.0", ["box.lan"])
    assert any_ip and {"box.lan", "localhost"} <= names
    names, any_ip = host_policy("192.168.1.5", [])
    assert not any_ip and names == {"192.168.1.5"}


# -- small ones ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["entropy_bound", "t_min", "t_max", "confidence_threshold"])
def test_boolean_refused_for_float_settings(server, field):
    r = post(server, "/v1/completions", {"prompt": "x", "diffusion": {field: True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == f"diffusion.{field}"


def test_autoregressive_lists_diffusion_fields_as_ignored(client):
    r = complete(client, max_tokens=4, decoder="autoregressive", stream_drafts=True)
    assert r.model_extra["dgemma"]["ignored"] == ["diffusion", "stream_drafts"]
    plain = complete(client, max_tokens=4)
    assert "ignored" not in plain.model_extra["dgemma"]


def test_head_page(server):
    r = httpx.head(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and r.content == b""


def test_health_counts_only_decoder_passes(server, client):
    before = httpx.get(server.url + "/health").json()["forward_passes"]
    r = complete(client, seed=4, max_tokens=64)
    after = httpx.get(server.url + "/health").json()
    assert after["forward_passes"] - before == r.usage.model_extra["forward_passes"]
    assert after["running"] == 0 and after["queued"] == 0


# -- bounded load: streams, idle and slow connections at once -------------------------------------------------------
LOAD_SECONDS = 15


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def stream_once(url: str, body: dict) -> tuple[int, str, str | None]:
    text, finish = "", None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), None
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = strict_json(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return 200, text, finish


def test_load(model_dir):
    """16 seeded streaming clients plus idle and trickling connections for LOAD_SECONDS: every output equals its solo
    run, nothing answers 5xx, the server reaps the idle and slow sockets, /health answers within 1 s throughout and
    memory stays bounded."""
    conns = ConnectionLimits(read_timeout=1.5, keep_alive_timeout=1.5, max_connections=128)
    limits = Limits(max_tokens=96, max_running=16, max_pending=64, request_timeout=60)
    with LiveServer(model_dir, limits=limits, connections=conns) as s:
        model = s.model
        bodies = [{"prompt": f"load {i} " + "?" * (i % 5), "seed": 500 + i, "max_tokens": 20 + 4 * i,
                   "diffusion": {"max_denoising_steps": 3 + i % 3}} for i in range(16)]
        want = [(200, *solo(model, model.tokenizer.encode(b["prompt"]), b["seed"], b["max_tokens"],
                            **b["diffusion"])[1:3]) for b in bodies]
        assert stream_once(s.url, bodies[0]) == want[0]  # warm up
        rss0 = rss_mib()
        stop_at = time.monotonic() + LOAD_SECONDS
        lock = threading.Lock()
        wrong: list = []
        rounds = [0] * 16
        reaped = {"idle": 0, "slow": 0}
        health: list[float] = []

        def client(i: int) -> None:
            while time.monotonic() < stop_at:
                got = stream_once(s.url, bodies[i])
                with lock:
                    rounds[i] += 1
                    if got != want[i]:
                        wrong.append((i, got))

        def lingerer(kind: str) -> None:
            """Holds a connection the server should close: silent, or one byte of a request every 0.2 s."""
            while time.monotonic() < stop_at:
                with socket.create_connection(("127.0.0.1", s.port)) as sock:
                    sock.settimeout(0.2)
                    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    for k in range(10_000):
                        try:
                            if kind == "slow":
                                sock.sendall(request[k % len(request):k % len(request) + 1])
                            closed = sock.recv(4096) == b""
                        except TimeoutError:
                            closed = False
                        except (ConnectionResetError, BrokenPipeError):  # a byte sent after the server closed
                            closed = True
                        if closed:
                            with lock:
                                reaped[kind] += 1
                            break
                        if time.monotonic() > stop_at + 5:
                            raise AssertionError(f"a {kind} connection was never closed")

        def poll_health() -> None:
            with httpx.Client(timeout=30) as c:
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    assert c.get(s.url + "/health").status_code == 200
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        threads += [threading.Thread(target=lingerer, args=(k,)) for k in ["idle"] * 8 + ["slow"] * 8]
        threads.append(threading.Thread(target=poll_health))
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_SECONDS + 60)
        assert not any(t.is_alive() for t in threads)
        assert wrong == [], wrong[:3]
        assert min(rounds) >= 1 and reaped["idle"] >= 8 and reaped["slow"] >= 8, (rounds, reaped)
        assert len(health) >= LOAD_SECONDS and max(health) < 1.0, max(health)
        assert rss_mib() - rss0 < 200
        assert (s.engine.running, s.engine.pending) == (0, 0)
