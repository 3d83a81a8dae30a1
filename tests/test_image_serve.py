"""Image input through the interfaces, on a tiny random checkpoint with a vision tower: the HTTP API (the openai
client sends data: URL images to a live server; bad images get a 400 naming the problem and the server keeps
serving), `dgemma generate --image` and `dgemma info`."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from dgemma.images import chat_prompt
from dgemma.serve import Limits
from imagemodels import IMAGE, build_vision_checkpoint, png_header
from live_server import LiveServer

FAST = {"max_denoising_steps": 4}
MAX_IMAGE_BYTES = 60_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_vision_checkpoint(tmp_path_factory.mktemp("image_serve") / "vision", seed=2)[1]


@pytest.fixture(scope="module")
def server(ckpt):
    path = ckpt
    limits = Limits(max_tokens=64, max_body_bytes=200_000, max_images=2, max_image_bytes=MAX_IMAGE_BYTES,
                    max_image_pixels=MAX_PIXELS)
    with LiveServer(path, name="vision", limits=limits) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def messages(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def chat(client, msgs, seed=0, **kw):
    return client.chat.completions.create(model="vision", messages=msgs, max_tokens=16, seed=seed,
                                          extra_body={"diffusion": FAST}, **kw)


def test_data_url_image_matches_direct_generate(client, server):
    imgs = [_image(50, 30, 1), _image(20, 90, 2)]
    msgs = messages(*(data_url(_encode(i)) for i in imgs))
    r = chat(client, msgs, seed=4)
    model = server.model
    direct = [{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "image", "image": imgs[1]},
                                           {"type": "text", "text": "What is in the picture?"}]}]
    prompt = chat_prompt(model, direct)
    assert prompt.ids.count(IMAGE) == sum(prompt.images["num_soft_tokens"]) > 0
    want = model.generate(prompt.ids, seed=4, max_new_tokens=16, **FAST, **prompt.image_inputs())
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(prompt.ids) and r.usage.completion_tokens == len(want.ids[:16])
    # The image reaches the model: another image, same text and seed, gives a different first draft (logits).
    other = chat_prompt(model, [{"role": "user", "content": [{"type": "image", "image": _image(50, 30, 9)},
                                                             {"type": "image", "image": imgs[1]},
                                                             {"type": "text", "text": "What is in the picture?"}]}])
    canvas = [[3] * model.config.canvas_length]
    import torch

    a = model.canvas_logits(torch.tensor([prompt.ids]), torch.tensor(canvas), **prompt.image_inputs())
    b = model.canvas_logits(torch.tensor([other.ids]), torch.tensor(canvas), **other.image_inputs())
    assert (a - b).abs().max() > 1e-3
    # Streaming gives the same text.
    chunks = list(chat(client, msgs, seed=4, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def _post(server, msgs, **extra):
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "vision", "messages": msgs, "max_tokens": 8, "diffusion": FAST, **extra})


def test_bad_images_are_400s_and_the_server_keeps_serving(server):
    good = data_url(_encode(_image(30, 30, 3)))
    png = _encode(_image(120, 120, 4))
    big = data_url(_encode(_image(160, 160, 5)))  # over MAX_IMAGE_BYTES as base64
    cases = [
        (messages("https://example.com/cat.png"), "remote image URLs are not fetched"),
        (messages("http://127.0.0.1/x.png"), "remote image URLs are not fetched"),
        (messages("/etc/hostname"), "must be a data: URL"),
        (messages(data_url(b"\x00\x01 definitely not an image")), "cannot identify the image"),
        (messages(data_url(png[: len(png) // 2])), "cannot decode"),  # truncated
        (messages(data_url(b"%PDF-1.4 fake", "image/png")), "cannot identify the image"),  # unsupported format
        (messages(data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")), "cannot identify"),
        (messages(data_url(png_header(0, 0))), "zero pixels"),
        (messages(data_url(png_header(30000, 30000))), "too many pixels"),  # a decompression bomb's header
        (messages(data_url(_encode(Image.new("RGB", (2000, 1000), (9, 9, 9))))), f"limit of {MAX_PIXELS}"),
        (messages(data_url(b"")), "no bytes"),
        (messages("data:image/png;base64,***"), "not valid base64"),
        (messages("data:text/plain;base64,aGk="), "not an image"),
        (messages(good, good, good), "more than 2 image"),
        (messages(big), f"exceed {MAX_IMAGE_BYTES} bytes"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "not-an-object"}]}], "data: URL"),
        ([{"role": "user", "content": [{"type": "image", "image": "/etc/hostname"}]}], "data: URL"),
    ]
    for msgs, why in cases:
        r = _post(server, msgs)
        assert r.status_code == 400, (why, r.status_code, r.text)
        err = r.json()["error"]
        assert why in err["message"], (why, err)
        assert err["param"] == "messages"
    r = _post(server, messages(good), decoder="autoregressive")
    assert r.status_code == 400 and "diffusion decoder" in r.json()["error"]["message"]
    # Still serving, images and text alike.
    assert _post(server, messages(good)).status_code == 200
    assert _post(server, [{"role": "user", "content": "hi"}]).status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_cli_generate_with_images(server, ckpt, tmp_path, capsys):
    """`dgemma generate --image` (chat and raw prompts) gives what the Python API gives for the same prompt."""
    import json

    from dgemma.cli import main
    from dgemma.images import text_prompt

    a, b = tmp_path / "a.png", tmp_path / "b.gif"
    _image(40, 60, 7).save(a)
    frames = [_image(30, 30, 8), _image(30, 30, 9)]
    frames[0].save(b, save_all=True, append_images=frames[1:])  # animated: the first frame counts
    model = server.model
    base = ["generate", "--model", str(ckpt), "--max-new-tokens", "8", "--seed", "3", "--json", "--max-denoising-steps",
            "4"]
    assert main([*base, "--prompt", "Compare", "--chat", "--image", str(a), "--image", str(b)]) == 0
    got = json.loads(capsys.readouterr().out)
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(a)}, {"type": "image", "path": str(b)},
                                         {"type": "text", "text": "Compare"}]}]
    p = chat_prompt(model, msgs)
    assert got["ids"] == model.generate(p.ids, seed=3, max_new_tokens=8, max_denoising_steps=4,
                                        **p.image_inputs()).ids
    assert main([*base, "--prompt", "x<|image|>y", "--image", str(a), "--max-soft-tokens", "70"]) == 0
    got = json.loads(capsys.readouterr().out)
    p = text_prompt(model, "x<|image|>y", [a])
    assert got["ids"] == model.generate(p.ids, seed=3, max_new_tokens=8, max_denoising_steps=4,
                                        **p.image_inputs()).ids
    assert main([*base, "--prompt", "x", "--image", str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_info_shows_the_vision_tower(ckpt, capsys):
    from dgemma.cli import main
    from dgemma.info import describe

    info = describe(ckpt)
    v = info["vision"]
    assert v == {"layers": 1, "hidden_size": 16, "heads": 2, "head_dim": 8, "intermediate_size": 32, "patch_size": 4,
                 "pooling_kernel_size": 3, "standardize": False, "parameters": info["stored_vision_parameters"],
                 "max_soft_tokens": 70, "patches_per_image": 630}
    assert v["parameters"] > 0
    assert main(["info", "--model", str(ckpt)]) == 0
    assert "vision tower: 1 layers, width 16" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def browser():
    from pathlib import Path

    chromium = "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail(f"{chromium} is missing: install Debian's chromium (`apt-get install chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        yield b
        b.close()


def test_page_attaches_an_image(browser, server, tmp_path):
    """The visualizer sends the attached file inline (data: URL in an image_url part); the diffusion panel runs,
    the autoregressive one is skipped (images are diffusion-only)."""
    import json

    path = tmp_path / "pic.png"
    _image(36, 24, 11).save(path)
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30_000)
    assert page.is_visible("#image")
    page.set_input_files("#image", str(path))
    page.fill("#prompt", "Describe it")
    page.fill("#steps", "4")
    page.fill("#max-tokens", "8")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.click("#run")
    page.wait_for_function("['done', 'error'].includes(document.getElementById('diffusion-panel').dataset.status)",
                           timeout=30_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.get_attribute("#diffusion-panel", "data-status") == "done"
    assert page.get_attribute("#ar-panel", "data-status") == "skipped"
    content = json.loads(sent.value.post_data)["messages"][0]["content"]
    assert content == [{"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
                       {"type": "text", "text": "Describe it"}]
    context.close()
    assert not errors, errors


def test_vision_bench_smoke():
    """`dgemma bench --vision`'s measurement on one real-width layer at the smallest budget: the row it reports."""
    from dgemma.vision import VisionConfig
    from dgemma.bench.vision import run, tower_flops

    r = run([1], ["float32"], max_soft_tokens=70, layers=1, repeats=0, log=lambda _: None)
    (row,) = r["rows"]
    assert row["soft_tokens"] == [70] and row["patches_per_image"] == 630 and row["tower_s"] > 0
    assert row["tower_gflop_per_image"] == round(tower_flops(VisionConfig(num_hidden_layers=1), 630) / 1e9, 1)
    # The count: one more layer adds its matmuls and attention, nothing else.
    d, p = 1152, 630
    layer = 2 * (p * (4 * d * 16 * 72 + 3 * d * 4304) + 2 * 16 * p * p * 72)
    one, two = (tower_flops(VisionConfig(num_hidden_layers=n), p) for n in (1, 2))
    assert two - one == layer
    assert r["cpu"]["cpu"] and len(r["load_average_at_end"]) == 3
