"""`dgemma serve` with several Sudoku models: the 6x6 and the 9x9 one side by side (the second under
/models/<name>/), the visualizer's model list, and the page drawing each grid size. Random tiny weights: these
tests check the plumbing, not the answers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_page import CHROMIUM, browser, page, run_to_end, settings  # noqa: F401 (pytest fixtures)

from dgemma.checkpoint.load import load_model
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.serve import Limits, create_app, make_server
from dgemma.tasks import sudoku
from live_server import LiveServer, free_port


def sudoku_checkpoint(path: Path, size: int) -> Path:
    """Random weights whose canvas holds a size x size grid and its end token, with that grid's task.json."""
    write_random_checkpoint(path, "tiny", seed=size, canvas_length=size * size + 1)
    (path / "task.json").write_text(json.dumps(sudoku.task_info(size)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("sudoku-models")
    return {6: sudoku_checkpoint(root / "six", 6), 9: sudoku_checkpoint(root / "nine", 9)}


def two_model_app(models: dict[int, Path], **kw):
    """The 9x9 model at the root, the 6x6 one under /models/six, the page opening on the 6x6 one (as `dgemma
    serve` does with the bundled models). Returns (app, the mounted app)."""
    six = create_app(load_model(models[6]), model_name="six", model_dir=models[6], **kw)
    return create_app(load_model(models[9]), model_name="nine", model_dir=models[9], mounts={"six": six},
                      page_model="six", **kw), six


class TwoModelServer(LiveServer):
    def __init__(self, models: dict[int, Path]):
        self.app, _ = two_model_app(models, limits=Limits(max_tokens=256))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, "127.0.0.1", self.port, None)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def test_two_models_side_by_side(models):
    app, six_app = two_model_app(models, limits=Limits(max_tokens=64), api_key="k")
    auth = {"authorization": "Bearer k"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        listed = client.get("/visualizer/models").json()  # names only: no key needed, as for /health
        assert listed == {"data": [{"id": "nine", "base": ""}, {"id": "six", "base": "/models/six"}],
                          "default": "six"}
        nine = client.get("/v1/models", headers=auth).json()["data"]
        six = client.get("/models/six/v1/models", headers=auth).json()["data"]
        assert [c["id"] for c in nine] == ["nine"] and [c["id"] for c in six] == ["six"]
        assert (six[0]["dgemma"]["size"], six[0]["dgemma"]["box_rows"], six[0]["dgemma"]["box_cols"]) == (6, 2, 3)
        assert nine[0]["dgemma"]["size"] == 9 and six[0]["dgemma"]["canvas_length"] == 37
        assert client.get("/models/six/v1/models").status_code == 401  # the mounted model keeps the key
        puzzle = sudoku.generate_many(1, seed=5, size=6)[0][0]
        prompt = sudoku.task_info(6)["prompt_template"].replace("{puzzle}", puzzle)
        body = {"model": "six", "prompt": prompt, "max_tokens": 37, "seed": 1, "diffusion": {"max_denoising_steps": 4}}
        r = client.post("/models/six/v1/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "six" and out["usage"]["completion_tokens"] <= 37
        assert out["usage"]["forward_passes"] <= 4  # one canvas, at most the step cap
        # Each app answers for its own model only; the other's name is a 404 naming this one.
        wrong = client.post("/v1/completions", json=body, headers=auth)
        assert wrong.status_code == 404 and "'nine'" in wrong.json()["error"]["message"]
        assert client.get("/models/nope/v1/models", headers=auth).status_code == 404
    # Shutdown closes the mounted model's engine too (mounted apps get no lifespan events of their own).
    assert app.state.engine._closed and six_app.state.engine._closed


def test_mount_names_checked(models):
    model = load_model(models[6])
    sub = create_app(model, model_name="six")
    for bad in ("", "a/b", "main"):
        with pytest.raises(ValueError, match="mounted model name"):
            create_app(model, model_name="main", mounts={bad: sub})
    with pytest.raises(ValueError, match="page_model 'nine'"):
        create_app(model, model_name="main", mounts={"six": sub}, page_model="nine")
    sub.state.engine.close()


def test_page_offers_both_sizes(page, models):  # noqa: F811
    with TwoModelServer(models) as server:
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30_000)
        assert page.text_content("#model") == "six" and page.is_visible("#model-pick")
        assert len(page.input_value("#puzzle")) == 36  # the 6x6 sample
        assert page.eval_on_selector_all("#diffusion-grid .cell", "cs => cs.length") == 36
        # Boxes of 2 rows by 3 columns: thick borders after columns 3 and rows 2 and 4.
        assert page.eval_on_selector_all("#diffusion-grid .cell.box-r", "cs => cs.length") == 6
        assert page.eval_on_selector_all("#diffusion-grid .cell.box-b", "cs => cs.length") == 12
        settings(page, steps=4, max_tokens=37)
        run_to_end(page)
        assert page.eval_on_selector_all("#ar-grid .cell[data-state]", "cs => cs.length") > 0
        page.select_option("#model-pick", "")  # the 9x9 model, at the server's root
        page.wait_for_function("document.getElementById('model').textContent === 'nine' && "
                               "document.getElementById('status').textContent === 'ready'", timeout=30_000)
        assert len(page.input_value("#puzzle")) == 81
        assert page.eval_on_selector_all("#diffusion-grid .cell", "cs => cs.length") == 81
        page.fill("#puzzle", "1" * 36)
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert "the puzzle must have 81 cells, got 36 (a 9x9 grid)" in page.text_content("#error")


def test_serve_bundled_models_by_default():
    from test_serve_cli import start, stop

    proc, url = start()
    try:
        import httpx

        listed = httpx.get(url + "/visualizer/models").json()
        assert listed == {"data": [{"id": "sudoku", "base": ""}, {"id": "sudoku6", "base": "/models/sudoku6"}],
                          "default": "sudoku6"}
        six = httpx.get(url + "/models/sudoku6/v1/models").json()["data"][0]["dgemma"]
        nine = httpx.get(url + "/v1/models").json()["data"][0]["dgemma"]
        assert (six["size"], six["box_rows"], six["box_cols"], nine["size"]) == (6, 2, 3, 9)
    finally:
        stop(proc)
