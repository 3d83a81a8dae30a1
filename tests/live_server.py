"""A real dgemma server on loopback for the API and page tests: uvicorn in a thread, random tiny weights."""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from pathlib import Path

from dgemma.checkpoint.load import load_model
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.serve import ConnectionLimits, Limits, create_app, make_server
from dgemma.tasks import sudoku


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sudoku_shaped_checkpoint(path: Path) -> Path:
    """Random weights with the bundled Sudoku model's canvas (82 = 81 digits + end of turn) and its task.json."""
    write_random_checkpoint(path, "tiny", seed=7, canvas_length=82)
    (path / "task.json").write_text(json.dumps(sudoku.task_info()), encoding="utf-8")
    return path


class LiveServer:
    def __init__(self, model_dir: Path, name: str = "tiny", api_key: str | None = None, limits: Limits | None = None,
                 connections: ConnectionLimits | None = None, allowed_hosts: tuple[str, ...] = ()):
        self.model = load_model(model_dir)
        self.app = create_app(self.model, model_name=name, model_dir=model_dir, api_key=api_key,
                              limits=limits or Limits(max_tokens=256), host="127.0.0.1", allowed_hosts=allowed_hosts)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, "127.0.0.1", self.port, connections)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        gc.freeze()  # as `dgemma serve` does: startup objects stay out of full collections
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.engine
