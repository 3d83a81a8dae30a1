"""Tokenizer (tokenizer.json via `tokenizers`) and chat template (jinja2, from the checkpoint).

Images in chat: a message's content may be a list of parts, text ({"type": "text", "text": ...}) and images
({"type": "image"}). The checkpoint's template writes the image placeholder (the tokenizer's `image_token`,
"<|image|>" in Gemma 4) for each image part; `encode_with_images` then puts begin-of-image, the image's soft tokens
and end-of-image at each placeholder, as the reference processor does. Templates that do not know image parts
(they print the content as one string) get each message's parts flattened into one string with the placeholder
inline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

DEFAULT_IMAGE_TOKEN = "<|image|>"


class TokenizerError(ValueError):
    pass


def _token_str(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self.tok = tok
        self.config = config or {}
        self.chat_template = chat_template
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
            raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be loaded ({e})") from None
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: not valid JSON ({e})") from None
        template = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **context: Any) -> str:
        """Render `messages`; `context`: more template variables (tools, enable_thinking, ...)."""
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template; pass a raw prompt instead")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str):
                raise TokenizerError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template does not compile: {e}") from None
        try:
            return self._template.render(
                **context, messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **context: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **context))

    # -- images ----------------------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        """The placeholder the chat template writes for an image (tokenizer_config.json's `image_token`)."""
        return _token_str(self.config.get("image_token")) or DEFAULT_IMAGE_TOKEN

    def apply_chat_template_images(self, messages: list[dict[str, Any]], n_images: int,
                                   add_generation_prompt: bool = True) -> str:
        """Render messages whose content may hold image parts; the text holds one image placeholder per image
        part, in order. Text-only part lists are joined into a string first (as for a template without parts)."""
        placeholder = self.image_token
        for m in messages:
            for part in _parts(m.get("content")):
                if part.get("type") == "text" and placeholder in str(part.get("text", "")):
                    raise TokenizerError(f"message text contains the image placeholder {placeholder!r}")
        flat = [{**m, "content": _flatten(m.get("content"), placeholder)} for m in messages]
        if n_images == 0:
            return self.apply_chat_template(flat, add_generation_prompt)
        structured = [m if _has_image(m.get("content")) else f for m, f in zip(messages, flat)]
        text = self.apply_chat_template(structured, add_generation_prompt)
        if text.count(placeholder) != n_images:  # the template does not render image parts: flatten them
            text = self.apply_chat_template(flat, add_generation_prompt)
        if text.count(placeholder) != n_images:
            raise TokenizerError(f"the chat template wrote {text.count(placeholder)} image placeholder(s) "
                                 f"{placeholder!r} for {n_images} image(s)")
        return text

    def encode_with_images(self, text: str, image_runs: list[list[int]]) -> list[int]:
        """Encode `text`, putting image_runs[i] (begin-of-image, soft tokens, end-of-image ids) at the i-th image
        placeholder. The text around placeholders is encoded piece by piece, as the tokenizer splits around
        special tokens anyway."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(image_runs):
            raise TokenizerError(f"the prompt has {len(pieces) - 1} image placeholder(s) {self.image_token!r} "
                                 f"for {len(image_runs)} image(s)")
        ids = self.encode(pieces[0])
        for run, piece in zip(image_runs, pieces[1:]):
            ids += run
            ids += self.encode(piece)
        return ids


def _parts(content: Any) -> list[dict[str, Any]]:
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def _has_image(content: Any) -> bool:
    return any(p.get("type") == "image" for p in _parts(content))


def _flatten(content: Any, placeholder: str) -> Any:
    """A list of text and image parts -> one string (images as the placeholder); other content unchanged."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(str(part.get("text", "")))
        elif kind == "image":
            out.append(placeholder)
        else:
            raise TokenizerError(f"content parts of type {kind!r} are not supported (text and image only)")
    return "".join(out)


# -- the byte-level tokenizer shipped with random and project-trained checkpoints --------------------------------
BYTE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_byte_tokenizer() -> Tokenizer:
    """Specials at ids 0-5 (pad, eos, bos, unk, start/end of turn), then one token per byte (ids 6-261)."""
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    config = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": BYTE_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return Tokenizer(tok, config, BYTE_CHAT_TEMPLATE)


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    tokenizer.tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer.config, indent=2) + "\n", encoding="utf-8")
    if tokenizer.chat_template is not None:
        (path / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def stable_prefix(text: str, stop: Sequence[str] = ()) -> int:
    """How much of a growing decoded text can be shown now: not a trailing incomplete character (U+FFFD until the
    next tokens complete it) nor a tail that may still grow into one of the `stop` strings."""
    safe = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    while safe > 0 and text[safe - 1] == "\ufffd":
        safe -= 1
    return safe


class IncrementalText:
    """The one incremental detokenizer: ids arrive in pieces, and `push` returns the text that is safe to show now
    (decoded from all ids so far, so a character split across pieces comes out whole; a trailing incomplete
    character and a tail that may grow into a stop string are held back). When a stop string appears the text ends
    before it and `stopped` is set; `flush` returns what was held back."""

    def __init__(self, decode, stop: Sequence[str] = ()):
        self.decode = decode  # ids -> text
        self.stop = list(stop)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._text = ""

    @property
    def text(self) -> str:
        """The whole text so far (up to a stop string)."""
        return self._text

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._text = True, text[:cut]
            return self._advance(self._text)
        self._text = text
        return self._advance(text[:stable_prefix(text, self.stop)])

    def flush(self) -> str:
        """The held-back rest of the text (nothing more will come)."""
        return self._advance(self._text)

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.sent):  # a later token changed earlier text: never take back what was sent
            return ""
        delta, self.sent = upto[len(self.sent):], upto
        return delta
