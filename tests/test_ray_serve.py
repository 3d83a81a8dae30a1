"""`dgemma serve --ray`: the bundled Sudoku model on a local Ray cluster (2 CPUs) with 2 Ray Serve replicas.

One cluster and one deployment for the module. Covered: the `openai` client's seeded requests give the same text
as `dgemma serve` (a LiveServer in this process), SSE drafts, 4xx answers and the API key through Ray's proxy, and
replica death: one replica's actor is killed while both hold streaming requests; every request the other replica
holds finishes with the same text as a solo run, and the deployment is back to 2 replicas that serve.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from openai import OpenAI  # noqa: E402
from ray import serve  # noqa: E402

from dgemma.serve import Limits  # noqa: E402
from dgemma.serve.ray_serve import (  # noqa: E402
    REPLICA_HEADER,
    ReplicaSpec,
    ScaleSpec,
    replica_actor,
    running_replicas,
    start,
)
from dgemma.tasks.sudoku_run import default_model_path  # noqa: E402

from live_server import LiveServer, free_port  # noqa: E402

KEY = "ray-test-key"
NAME = "sudoku"
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
# Long requests for the kill test: every step of 2 canvases runs (stability never reached).
LONG = {"max_denoising_steps": 128, "stability_threshold": 1024}


def prompt(puzzle: str = PUZZLE) -> str:
    return f"Solve this sudoku. 0 marks an empty cell.\n{puzzle}"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    spec = ReplicaSpec(model=str(default_model_path()), model_name=NAME, api_key=KEY,
                       limits=Limits(max_tokens=512), threads=1)
    start(spec, ScaleSpec(replicas=2, num_cpus=1), port=port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def single():
    with LiveServer(default_model_path(), name=NAME, api_key=KEY, limits=Limits(max_tokens=512)) as server:
        yield server.url


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_seeded_requests_match_single_server(cluster, single):
    ray_c, one = client(cluster), client(single)
    for seed in (1, 2, 3):
        a = ray_c.completions.create(model=NAME, prompt=prompt(), seed=seed, max_tokens=82)
        b = one.completions.create(model=NAME, prompt=prompt(), seed=seed, max_tokens=82)
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
        assert a.model_extra["dgemma"]["steps"] == b.model_extra["dgemma"]["steps"]
    chat = [{"role": "user", "content": prompt()}]
    a = ray_c.chat.completions.create(model=NAME, messages=chat, seed=9)
    b = one.chat.completions.create(model=NAME, messages=chat, seed=9)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_drafts_errors_and_key_through_the_proxy(cluster):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": prompt(), "seed": 4, "stream": True, "stream_drafts": True}
    events = []
    with httpx.stream("POST", cluster + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[REPLICA_HEADER].startswith("SERVE_REPLICA::")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert any(c.get("dgemma", {}).get("event") == "draft" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    r = httpx.post(cluster + "/v1/completions", json={"model": NAME, "prompt": prompt()}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(cluster + "/v1/completions", json={"prompt": prompt(), "max_tokens": 10**6}, headers=headers,
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(cluster + "/v1/completions", content=b"{not json", headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(cluster + "/health", timeout=30).json()["status"] == "ok"


class Stream(threading.Thread):
    """One streaming completion; records the replica that holds it, its text and whether it finished."""

    def __init__(self, url: str, seed: int):
        super().__init__(daemon=True)
        self.url, self.seed = url, seed
        self.replica: str | None = None
        self.started = threading.Event()
        self.text, self.finished, self.error = "", False, None

    def run(self) -> None:
        body = {"model": NAME, "prompt": prompt(), "seed": self.seed, "max_tokens": 164, "stream": True,
                "diffusion": LONG}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                self.replica = r.headers.get(REPLICA_HEADER)
                self.started.set()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.finished = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.error = chunk["error"]
                        else:
                            self.text += chunk["choices"][0]["text"]
        except Exception as e:  # the killed replica's requests: any failure is acceptable, recorded
            self.error = repr(e)
        finally:
            self.started.set()


def test_killed_replica_loses_no_request_held_by_the_other(cluster, single):
    streams = []
    for seed in range(100, 106):
        s = Stream(cluster, seed)
        s.start()
        assert s.started.wait(60)
        streams.append(s)
    held = {s.replica for s in streams}
    assert len(held) == 2, f"requests should spread over both replicas, got {held}"
    victim = streams[0].replica
    ray.kill(replica_actor(victim), no_restart=True)
    for s in streams:
        s.join(120)
    survivors = [s for s in streams if s.replica != victim]
    assert survivors and all(s.finished and s.error is None for s in survivors), [
        (s.seed, s.error) for s in survivors]
    # Unaffected: each survivor's text is what the single server gives for its seed.
    one = client(single)
    s = survivors[0]
    solo = one.completions.create(model=NAME, prompt=prompt(), seed=s.seed, max_tokens=164,
                                  extra_body={"diffusion": LONG})
    assert s.text == solo.choices[0].text

    # Recovery: Ray Serve replaces the dead replica, and the replacement serves.
    survivor = next(iter(held - {victim}))
    deadline = time.time() + 90
    while running_replicas() < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert running_replicas() == 2
    seen = set()
    ray_c = client(cluster)
    for seed in range(20):  # the router picks either replica: a new one shows up within a few requests
        raw = ray_c.completions.with_raw_response.create(model=NAME, prompt=prompt(), seed=seed, max_tokens=82)
        seen.add(raw.headers[REPLICA_HEADER])
        assert raw.parse().choices[0].text
        if seen - {survivor}:
            break
    assert victim not in seen and seen - {survivor}


def test_cli_and_builder_check_their_arguments(capsys):
    from dgemma.cli import main
    from dgemma.serve.ray_serve import app_builder

    assert main(["serve", "--ray", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--max-replicas", "3"]) == 2
    assert "--min-replicas and --max-replicas" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"replica": "2"})
    with pytest.raises(ValueError, match="--compile-seconds must be a positive"):
        app_builder({"compile_seconds": "-1"})
    app = app_builder({"replicas": "2", "replica_cpus": "0.5", "max_batch": "4", "compile_states": "5000"})
    assert isinstance(app, serve.Application)
