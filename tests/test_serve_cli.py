"""`dgemma serve` as a user runs it: a subprocess on loopback, the bundled model by default, bad flags refused."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from live_server import free_port

from dgemma.presets import write_random_checkpoint


def start(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def test_serve_bundled_model_by_default():
    proc, url = start()
    try:
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["id"] == "sudoku" and card["dgemma"]["task"] == "sudoku"
        assert "<title>" in httpx.get(url + "/").text
    finally:
        stop(proc)


def test_serve_model_name_and_key(tmp_path):
    model = write_random_checkpoint(tmp_path / "m", "tiny", seed=1)
    proc, url = start("--model", str(model), "--served-model-name", "mine", "--api-key", "k")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"authorization": "Bearer k"})
        assert r.json()["data"][0]["id"] == "mine"
    finally:
        stop(proc)


@pytest.mark.parametrize("args,needle", [
    (["--port", "0"], "--port"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--model", "/does/not/exist"], "does/not/exist"),
])
def test_serve_bad_flags(args, needle):
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and needle in r.stderr
