"""`dgemma serve` as a user runs it: a subprocess on loopback, the bundled model by default, bad flags refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from live_server import free_port

from dgemma.cli import main
from dgemma.checkpoint.write import write_random_checkpoint


def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
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


def test_serve_bundled_model_by_default_key_from_env():
    proc, url = start(env={"DGEMMA_API_KEY": "from-env"})
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        card = httpx.get(url + "/v1/models", headers={"authorization": "Bearer from-env"}).json()["data"][0]
        assert card["id"] == "sudoku" and card["dgemma"]["task"] == "sudoku"
        assert "<title>" in httpx.get(url + "/").text
        assert "from-env" not in " ".join(proc.args)
    finally:
        stop(proc)


def test_serve_model_name_key_file_and_hosts(tmp_path):
    model = write_random_checkpoint(tmp_path / "m", "tiny", seed=1)
    (tmp_path / "key").write_text("k\n")
    proc, url = start("--model", str(model), "--served-model-name", "mine", "--api-key-file", str(tmp_path / "key"),
                      "--allowed-host", "my.box", "--read-timeout", "1")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"authorization": "bearer k"})
        assert r.json()["data"][0]["id"] == "mine"
        assert httpx.get(url + "/health", headers={"host": "my.box"}).status_code == 200
        assert httpx.get(url + "/health", headers={"host": "localhost"}).status_code == 200
        assert httpx.get(url + "/health", headers={"host": "rebound.example"}).status_code == 400
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:  # --read-timeout reaches the server
            sock.sendall(b"GET / HTTP/1.1\r\n")
            sock.settimeout(5)
            assert sock.recv(100) == b""
    finally:
        stop(proc)


@pytest.mark.parametrize("args,needle", [
    (["--port", "0"], "--port"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--model", "/does/not/exist"], "does/not/exist"),
    (["--api-key", "a", "--api-key-file", "f"], "not both"),
    (["--api-key-file", "/no/such/key"], "/no/such/key"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--compile-states", "0"], "--compile-states"),
])
def test_serve_bad_flags(args, needle, capsys):
    assert main(["serve", *args]) == 2  # in-process: refused before any model is loaded or port bound
    assert needle in capsys.readouterr().err
