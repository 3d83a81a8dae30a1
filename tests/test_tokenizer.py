"""The byte-level tokenizer, chat templates, loading a tokenizer from a checkpoint directory, and the tokenizer on
loaded models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import dgemma
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.tokenizer import (
    BYTE_CHAT_TEMPLATE,
    BYTE_SPECIALS,
    Tokenizer,
    TokenizerError,
    build_byte_tokenizer,
    save_tokenizer,
)

TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "naïve café — “quotes” ‘single’ …",
    "日本語のテキストと中文和한국어",
    "emoji 🤖🎉👩‍👩‍👧‍👦 and flags 🇩🇪 and skin tone 👍🏽",
    "math ∑∫√∞ ≠ ≤ ≥, arrows ←→, zero-width\u200bspace, combining e\u0301",
    "\x00\x01\x7f control bytes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP 𐍈",
]

USER_ASSISTANT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_byte_tokenizer()


@pytest.fixture
def saved(tmp_path, tok) -> Path:
    save_tokenizer(tok, tmp_path)
    return tmp_path


# -- byte tokenizer ------------------------------------------------------------------------------------------------
def test_vocab_and_specials(tok):
    assert tok.vocab_size == 262
    for i, name in enumerate(BYTE_SPECIALS):
        assert tok.token_to_id(name) == i
    assert BYTE_SPECIALS == ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte
    assert all(6 <= i < 262 for i in ids)  # never a special token
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_every_byte_has_its_own_token(tok):
    # Every byte value that UTF-8 text can contain: ASCII, all continuation bytes, and each lead byte
    # (0xC2..0xDF from U+0080..U+07FF, 0xE0..0xEF from U+0800 and U+k000, 0xF0..0xF4 from the supplementary planes).
    chars = [chr(c) for c in range(0x800)] + ["\u0800"] + [chr(k * 0x1000) for k in range(1, 16)]
    chars += [chr(c) for c in (0x10000, 0x40000, 0x80000, 0xC0000, 0x100000)]
    text = "".join(chars)
    raw = text.encode("utf-8")
    assert set(raw) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    ids = tok.encode(text)
    assert len(ids) == len(raw)
    by_byte: dict[int, int] = {}
    for b, i in zip(raw, ids):
        assert by_byte.setdefault(b, i) == i  # a byte always maps to the same id
    assert len(set(by_byte.values())) == len(by_byte)  # and different bytes to different ids
    assert tok.decode(ids) == text
    # The vocabulary is exactly the 6 specials plus 256 byte tokens, ids 0..261 without gaps.
    assert sorted(tok.tok.get_vocab(with_added_tokens=True).values()) == list(range(262))


def test_specials_skipped_on_decode(tok):
    hello = tok.encode("hi")
    ids = [2, 4, *hello, 5, 1]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>hi<end_of_turn><eos>"


# -- chat template -------------------------------------------------------------------------------------------------
def test_chat_template_renders_gemma_turns(tok):
    text = tok.apply_chat_template(USER_ASSISTANT)
    assert text == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    without = tok.apply_chat_template(USER_ASSISTANT, add_generation_prompt=False)
    assert text == without + "<start_of_turn>model\n"


def test_encode_chat_uses_special_ids(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 2  # bos
    assert ids[1] == 4  # start_of_turn
    assert ids.count(4) == 2 and ids.count(5) == 1
    assert ids[-len(tok.encode("model\n")):] == tok.encode("model\n")
    expected = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.decode(ids, skip_special_tokens=False) == expected


def test_template_cannot_mutate_messages(tok):
    evil = Tokenizer(tok.tok, tok.config, "{{ messages.append({'role': 'x'}) }}")
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError):
        evil.apply_chat_template(msgs)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_template_syntax_error(tok):
    broken = Tokenizer(tok.tok, tok.config, "{% for m in messages %}no end")
    with pytest.raises(TokenizerError, match="does not compile"):
        broken.apply_chat_template(USER_ASSISTANT)


def test_raise_exception_in_template(tok):
    strict = Tokenizer(tok.tok, tok.config,
                       "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}"
                       "{% endif %}ok")
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="first turn must be user") as info:
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    assert isinstance(info.value, ValueError)


# -- Tokenizer.from_dir --------------------------------------------------------------------------------------------
def test_from_dir_round_trip(saved, tok):
    assert {p.name for p in saved.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    loaded = Tokenizer.from_dir(saved)
    assert loaded.vocab_size == 262
    assert loaded.chat_template == BYTE_CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<eos>", "<pad>")
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode_chat(USER_ASSISTANT) == tok.encode_chat(USER_ASSISTANT)


def test_from_dir_prefers_jinja_file(saved):
    (saved / "chat_template.jinja").write_text("JINJA{{ bos_token }}{{ messages[0]['content'] }}", encoding="utf-8")
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "CONFIG{{ messages[0]['content'] }}"
    (saved / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    loaded = Tokenizer.from_dir(saved)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "JINJA<bos>x"


def test_from_dir_falls_back_to_config_template(saved):
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "CONFIG{{ eos_token }}{{ messages[0]['content'] }}"
    (saved / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (saved / "chat_template.jinja").unlink()
    loaded = Tokenizer.from_dir(saved)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "CONFIG<eos>x"


def test_from_dir_without_any_template(saved):
    (saved / "chat_template.jinja").unlink()
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (saved / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    loaded = Tokenizer.from_dir(saved)
    assert loaded.chat_template is None
    assert loaded.encode("plain") == build_byte_tokenizer().encode("plain")  # plain text still works
    with pytest.raises(TokenizerError, match="no chat template") as info:
        loaded.apply_chat_template([{"role": "user", "content": "x"}])
    assert isinstance(info.value, ValueError)
    with pytest.raises(TokenizerError):
        loaded.encode_chat([{"role": "user", "content": "x"}])


def test_from_dir_without_tokenizer_config(saved):
    (saved / "tokenizer_config.json").unlink()
    loaded = Tokenizer.from_dir(saved)
    assert loaded.bos_token is None
    assert loaded.chat_template == BYTE_CHAT_TEMPLATE  # the .jinja file still counts
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<start_of_turn>user\nx")


def test_from_dir_raise_exception_template(saved):
    (saved / "chat_template.jinja").write_text("{{ raise_exception('system role not supported') }}",
                                               encoding="utf-8")
    loaded = Tokenizer.from_dir(saved)
    with pytest.raises(TokenizerError, match="system role not supported"):
        loaded.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', "", "not json at all", '{"model": 3}'])
def test_corrupted_tokenizer_json(saved, content):
    (saved / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_dir(saved)
    assert isinstance(info.value, ValueError)


def test_missing_tokenizer_json(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(saved)


def test_corrupted_tokenizer_config(saved):
    (saved / "tokenizer_config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(saved)


def test_special_token_objects_in_config(saved):
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["bos_token"] = {"content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "__type": "AddedToken"}
    (saved / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    loaded = Tokenizer.from_dir(saved)
    assert loaded.bos_token == "<bos>"
    assert loaded.encode_chat([{"role": "user", "content": "x"}])[0] == 2


# -- the tokenizer on a loaded model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tok") / "tiny", "tiny", seed=0)


def test_model_exposes_tokenizer_and_text(ckpt):
    model = dgemma.load_model(ckpt)
    tok = model.tokenizer
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == model.config.vocab_size == 262
    prompt = tok.encode_chat([{"role": "user", "content": "Hello"}])
    out = model.generate(prompt, max_new_tokens=64, seed=0, max_denoising_steps=4, eos_token_id=9999)
    assert len(out.ids) == 64
    assert isinstance(out.text, str)
    assert out.text == tok.decode(out.ids)
    assert out.to_dict()["text"] == out.text
    out = model.generate(prompt, max_new_tokens=32, seed=1, max_denoising_steps=4)
    assert out.text == tok.decode(out.ids)


def test_model_without_tokenizer(ckpt, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    model = dgemma.load_model(bare)
    assert model.tokenizer is None
    out = model.generate([5, 17, 3], max_new_tokens=32, seed=0, max_denoising_steps=4)
    assert out.ids and out.text is None
    assert "text" not in out.to_dict()


def test_model_with_corrupted_tokenizer_fails_to_load(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        dgemma.load_model(bad)


def test_stable_prefix_holds_back_partial_characters_and_stop_prefixes():
    from dgemma.tokenizer import stable_prefix

    assert stable_prefix("hello") == 5
    assert stable_prefix("caf\ufffd") == 3  # an incomplete character waits for the next tokens
    assert stable_prefix("say ST", stop=["STOP"]) == 4  # "ST" may grow into "STOP"
    assert stable_prefix("say STx", stop=["STOP"]) == 7
    assert stable_prefix("S\ufffd", stop=["S\ufffdX"]) == 0


def test_incremental_text_streams_whole_characters_and_stops():
    from dgemma.tokenizer import IncrementalText, build_byte_tokenizer

    tok = build_byte_tokenizer()
    ids = tok.encode("café STOP more")
    text = IncrementalText(tok.decode, stop=["STOP"])
    deltas = [text.push([i]) for i in ids]
    assert "\ufffd" not in "".join(deltas)  # the two bytes of "é" come out as one character
    assert "".join(deltas) + text.flush() == "café " and text.stopped and text.text == "café "
    assert text.push(tok.encode("x")) == ""  # nothing after a stop
