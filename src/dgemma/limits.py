"""The server's limits, declared once: each field carries its default, type and meaning, and `dgemma serve`'s flags
and the Ray Serve app builder's arguments are derived from these fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # pixels per decoded image (decompression bombs)


def limit(default: Any, kind: type, help: str) -> Any:
    """A server limit: its default, type and meaning, from which `dgemma serve`'s flag and the Ray Serve app
    builder's argument are derived."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass
class Limits:
    """Per-request and queue limits of one server (or of every Ray Serve replica); each is a positive number."""

    max_body_bytes: int = limit(1 << 20, int, "request body bytes")
    max_prompt_tokens: int | None = limit(None, int, "prompt tokens (default: what the model's positions allow)")
    max_prompt_chars: int | None = limit(None, int, "prompt characters, checked before tokenizing (default: 16 per "
                                                     "allowed prompt token)")
    max_tokens: int = limit(4096, int, "cap on a request's max_tokens")
    max_denoising_steps: int = limit(256, int, "cap on diffusion.max_denoising_steps (the model's default counts "
                                               "too)")
    request_timeout: float = limit(300.0, float, "seconds from submission until a request is stopped (408)")
    max_batch: int = limit(8, int, "requests batched into one diffusion run")
    max_running: int = limit(16, int, "requests decoded at once")
    max_pending: int = limit(64, int, "requests waiting beyond --max-running (more get a 429)")
    max_n: int = limit(8, int, "choices per request (n); they run as one batch")
    prefix_cache_gib: float | None = limit(None, float, "GiB of prompt KV kept for later requests that share a "
                                                        "prefix (default: no prefix cache)")
    max_images: int = limit(8, int, "images per chat request (data: URLs only)")
    max_image_bytes: int = limit(8 << 20, int, "encoded image bytes per request (--max-body-bytes bounds them too)")
    max_image_pixels: int = limit(DEFAULT_MAX_PIXELS, int, "pixels per decoded image (larger ones, e.g. "
                                                            "decompression bombs, are refused)")

    def validate(self, spell: Callable[[str], str] = str) -> None:
        """Every limit positive (an optional one may be None); `spell` names a field in the message."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if isinstance(v, bool) or not isinstance(v, f.metadata["kind"] | int) or not v > 0:
                raise ValueError(f"{spell(f.name)} must be positive, got {v!r}")


@dataclass
class ConnectionLimits:
    """Connection limits of the HTTP server (flags of `dgemma serve`, derived from these fields)."""

    max_connections: int = field(default=256, metadata={"kind": int, "help": "open connections and running "
                                                         "requests (beyond: 503)"})
    read_timeout: float = field(default=10.0, metadata={"kind": float, "help": "seconds a client has to send a "
                                                         "whole request"})
    keep_alive_timeout: float = field(default=5.0, metadata={"kind": float, "help": "idle keep-alive connections "
                                                              "close after this many seconds"})
    max_header_bytes: int = 16 * 1024  # request line + headers (not a flag)
