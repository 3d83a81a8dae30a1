"""The visualizer page (`GET /`) in headless Chromium against a live server with random weights.

Random weights write random bytes, so these tests check the page's mechanics, not the text: the two streams race
and both panels fill, cells carry their denoising state, the counters agree with what the server guarantees, the
Sudoku grid and the linear canvas are chosen from the model card, and server errors reach the page.

Chromium comes from Debian (`apt-get install chromium`; `.ci/run` installs it), driven by Playwright for Python's
own driver: no `playwright install`, no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dgemma.checkpoint.write import write_random_checkpoint
from live_server import LiveServer, sudoku_shaped_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The first of Gordon Royle's 17-clue puzzles, typed with '.' blanks (the page sends 0s).
PUZZLE = ".......1.4.........2...........5.4.7..8...3....1.9....3..4..2...5.1........8.6..."
STEPS = 8
TIMEOUT_MS = 30_000


def artifacts_dir() -> Path:
    path = Path(os.environ.get("DGEMMA_ARTIFACTS") or Path(__file__).resolve().parent.parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page, name: str) -> Path:
    path = artifacts_dir() / name
    page.screenshot(path=str(path), full_page=True)
    assert path.is_file() and path.stat().st_size > 10_000, f"screenshot {path} is missing or nearly empty"
    return path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`; CI's .ci/run "
                    "does this) to run the visualizer tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def sudoku_server(tmp_path_factory):
    with LiveServer(sudoku_shaped_checkpoint(tmp_path_factory.mktemp("sudoku-model"))) as server:
        yield server


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat-model")
    write_random_checkpoint(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="module")
def chat_server(chat_model):
    with LiveServer(chat_model) as server:
        yield server


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_page(page, server) -> None:
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=TIMEOUT_MS)
    assert page.text_content("#model") == "tiny"


def settings(page, *, steps: int = STEPS, max_tokens: int, seed: int = 1) -> None:
    page.fill("#steps", str(steps))
    page.fill("#entropy", "0.1")
    page.fill("#seed", str(seed))
    page.fill("#max-tokens", str(max_tokens))


def run_to_end(page) -> None:
    """Click Run; wait until both panels have stopped streaming, and fail with the page's error if either failed."""
    page.click("#run")
    page.wait_for_function(
        "['diffusion-panel', 'ar-panel'].every(id => ['done', 'error'].includes(document.getElementById(id)"
        ".dataset.status))", timeout=TIMEOUT_MS)
    assert page.is_hidden("#error"), page.text_content("#error")
    for panel in ("#diffusion-panel", "#ar-panel"):
        assert page.get_attribute(panel, "data-status") == "done"


def number(page, selector: str) -> float:
    return float(page.text_content(selector))


def test_sudoku_race(page, sudoku_server):
    open_page(page, sudoku_server)
    assert page.is_visible("#puzzle") and page.is_hidden("#prompt")
    assert len(page.input_value("#puzzle")) == 81  # a sample puzzle is prefilled
    page.fill("#puzzle", PUZZLE)
    settings(page, max_tokens=82)  # one canvas: 81 digits and the end of turn
    run_to_end(page)

    # Diffusion: a 9x9 grid of the first 81 positions, every cell showing a token, givens marked.
    cells = page.locator("#diffusion-grid .cell")
    assert cells.count() == 81
    assert all(t.strip() for t in cells.all_text_contents())
    states = [cells.nth(i).get_attribute("data-state") for i in range(81)]
    assert states.count("committed") == 81  # the canvas was committed
    givens = page.locator("#diffusion-grid .cell[data-given]")
    assert givens.count() == 81 - PUZZLE.count(".")
    assert page.locator("#diffusion-canvas .cell").count() == 1  # the 82nd position, under the grid
    assert page.text_content("#diffusion-history").strip()  # the committed canvas as text

    # Autoregressive: one token per forward pass, filling its grid left to right.
    ar_tokens = page.locator("#ar-text .tok").count()
    ar_passes = number(page, "#ar-passes")
    assert 0 < ar_tokens == ar_passes == number(page, "#ar-tokens")
    ar_cells = page.locator("#ar-grid .cell[data-state=committed]")
    assert ar_cells.count() == min(ar_tokens, 81)
    assert page.get_attribute("#ar-tpf", "data-final") == "true" and number(page, "#ar-tpf") == 1.0

    # The race: diffusion finishes the canvas in at most STEPS passes; AR needs a pass per token, 82 unless it drew
    # an end-of-turn token early (random weights may), in which case it still made one pass per token.
    diff_passes = number(page, "#diffusion-passes")
    assert 0 < diff_passes <= STEPS
    assert number(page, "#diffusion-steps") == diff_passes  # one canvas: its step counter is the pass count
    assert page.get_attribute("#diffusion-tpf", "data-final") == "true" and number(page, "#diffusion-tpf") > 0
    if page.get_attribute("#ar-panel", "data-finish") == "length":
        assert ar_passes == 82 and diff_passes * 10 <= ar_passes
    else:
        assert page.get_attribute("#ar-panel", "data-finish") == "stop"
    screenshot(page, "visualizer-sudoku.png")


def test_plain_model_linear_canvas(page, chat_server):
    open_page(page, chat_server)
    assert page.is_visible("#prompt") and page.is_hidden("#puzzle")
    assert page.is_visible("#chat")  # the random checkpoint has a chat template
    assert page.is_hidden("#diffusion-grid") and page.is_hidden("#ar-grid")
    page.fill("#prompt", "Hello <b>there</b>")
    settings(page, max_tokens=64)
    run_to_end(page)

    cells = page.locator("#diffusion-canvas .cell")
    assert cells.count() == 32  # canvas_length of the tiny preset
    assert all(cells.nth(i).get_attribute("data-state") in ("accepted", "renoised", "committed") for i in range(32))
    assert page.locator("#diffusion-canvas .cell[data-state=committed]").count() > 0
    assert page.locator("#diffusion-grid .cell").count() == 0
    assert 0 < number(page, "#diffusion-passes") and page.get_attribute("#diffusion-tpf", "data-final") == "true"
    assert page.locator("#ar-text .tok").count() == number(page, "#ar-passes") > 0
    assert page.locator("#diffusion-history b, #ar-text b, .cell b").count() == 0  # model text is never HTML
    screenshot(page, "visualizer-chat.png")


def test_errors_are_shown(page, chat_server):
    open_page(page, chat_server)
    settings(page, max_tokens=100_000)
    page.click("#run")
    page.wait_for_selector("#error", state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')",
                           timeout=TIMEOUT_MS)
    message = page.text_content("#error")
    assert "max_tokens 100000 is over this server's limit of 256" in message
    assert "HTTP 400" in message
    assert page.get_attribute("#diffusion-panel", "data-status") == "error"
    assert page.get_attribute("#ar-panel", "data-status") == "error"
    screenshot(page, "visualizer-error.png")

    # The page is not stuck: a valid run afterwards clears the error and completes.
    settings(page, max_tokens=8)
    run_to_end(page)
    assert page.locator("#ar-text .tok").count() > 0


def test_bad_puzzle_is_reported_without_a_request(page, sudoku_server):
    open_page(page, sudoku_server)
    page.fill("#puzzle", "12x" + "0" * 78)
    page.click("#run")
    page.wait_for_selector("#error", state="visible", timeout=TIMEOUT_MS)
    assert "invalid character \"x\" at cell 3" in page.text_content("#error")
    page.fill("#puzzle", "123")
    page.click("#run")
    assert "the puzzle must have 81 cells, got 3" in page.text_content("#error")
    assert page.get_attribute("#diffusion-panel", "data-status") is None  # nothing was sent


def test_api_key(page, chat_model):
    with LiveServer(chat_model, api_key="sesame") as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#error", state="visible", timeout=TIMEOUT_MS)
        assert "HTTP 401: missing or invalid API key" in page.text_content("#error")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")  # the model card is fetched again with the key
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=TIMEOUT_MS)
        assert page.is_hidden("#error")
        settings(page, max_tokens=8)
        run_to_end(page)
        page.reload()  # the key is remembered (localStorage) so a reload works at once
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=TIMEOUT_MS)
        assert page.input_value("#api-key") == "sesame"
